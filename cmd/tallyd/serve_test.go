package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/tallytest"
	"github.com/tallyledger/tally/internal/testdb"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// newDB returns a fresh migrated database of the shared test server.
func newDB(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	db, err := testdb.New(ctx, tallytest.DBOptions())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db.URL()
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func baseConfig(url string) serveConfig {
	var c serveConfig
	fs := newFlagSet(&c)
	_ = fs.Parse(nil)
	c.databaseURL = url
	c.grpcAddr, c.httpAddr = "127.0.0.1:0", "127.0.0.1:0"
	c.startupTimeout = 10 * time.Second
	return c
}

func TestServeRefusesWithoutKeysAndPlaintextOnNonLoopback(t *testing.T) {
	url := newDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := serve(ctx, baseConfig(url), quietLog(), nil)
	if err == nil || !strings.Contains(err.Error(), "tallyd keys create --name admin --role admin") {
		t.Fatalf("serve without keys: %v", err)
	}
	c := baseConfig(url)
	c.grpcAddr = "0.0.0.0:0"
	c.insecureNoAuth = true
	if err := serve(ctx, c, quietLog(), nil); err == nil || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("plaintext on 0.0.0.0: %v", err)
	}
	// --insecure-no-auth serves without keys.
	c = baseConfig(url)
	c.insecureNoAuth = true
	sctx, scancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- serve(sctx, c, quietLog(), func(grpcAddr, _ string) {
			cl, err := client.New(client.Config{Addr: grpcAddr, Policy: client.Policy{RetryAttemptsMax: 1}})
			if err == nil {
				_, err = cl.CreateAccount(sctx, &tallyv1.CreateAccountRequest{Currency: "USD"})
				cl.Close()
			}
			if err != nil {
				t.Errorf("no-auth call: %v", err)
			}
			scancel()
		})
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func writePEM(t *testing.T, dir, name, typ string, der []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

type miniCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	n    int64
}

func (ca *miniCA) issue(t *testing.T, cn string, server bool) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca.n++
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(ca.n), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	parent, signer := ca.cert, ca.key
	switch {
	case ca.cert == nil:
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign
		parent, signer = tmpl, key
	case server:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	default:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, key
}

// tallyd serve with --tls-cert/--tls-key/--tls-client-ca/--tls-client-role-map
// from real PEM files: a mapped client certificate works without a key, with
// its role; a client without a certificate is refused.
func TestServeMutualTLSFromFiles(t *testing.T) {
	url := newDB(t)
	dir := t.TempDir()
	ca := &miniCA{}
	ca.cert, ca.key = ca.issue(t, "test CA", false)
	caFile := writePEM(t, dir, "ca.pem", "CERTIFICATE", ca.cert.Raw)
	srv, srvKey := ca.issue(t, "tallyd", true)
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	c := baseConfig(url)
	c.tlsCert = writePEM(t, dir, "tls.crt", "CERTIFICATE", srv.Raw)
	c.tlsKey = writePEM(t, dir, "tls.key", "EC PRIVATE KEY", keyDER)
	c.tlsClientCA = caFile
	c.tlsClientRoleMap = "CN=recon-job:reconciler, CN=ops:admin"
	c.grpcAddr = "0.0.0.0:0" // TLS: no --insecure needed off loopback
	st, err := store.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := auth.CreateKey(context.Background(), st, "admin", auth.RoleAdmin, ""); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	dial := func(addr, cn string) tallyv1.LedgerServiceClient {
		cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		if cn != "" {
			cert, key := ca.issue(t, cn, false)
			cfg.Certificates = []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key}}
		}
		cl, err := client.New(client.Config{Addr: addr, Policy: client.Policy{RetryAttemptsMax: 1},
			DialOptions: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cl.Close() })
		return cl.Raw()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, c, quietLog(), func(grpcAddr, _ string) {
			_, port, _ := net.SplitHostPort(grpcAddr)
			addr := "127.0.0.1:" + port
			defer cancel()
			ops := dial(addr, "ops")
			a, err := ops.CreateAccount(ctx, &tallyv1.CreateAccountRequest{AccountId: "01a214a5-0000-7000-8000-000000000001", Currency: "USD"})
			if err != nil {
				t.Errorf("mapped admin cert: %v", err)
				return
			}
			recon := dial(addr, "recon-job")
			if _, err := recon.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: a.GetAccountId()}); err != nil {
				t.Errorf("mapped reconciler cert: %v", err)
			}
			if _, err := recon.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 1, IdempotencyKey: "k"}); status.Code(err) != codes.PermissionDenied {
				t.Errorf("reconciler Credit: %v, want PERMISSION_DENIED", err)
			}
			if _, err := dial(addr, "unmapped").GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: a.GetAccountId()}); status.Code(err) != codes.Unauthenticated {
				t.Errorf("unmapped cert without key: %v, want UNAUTHENTICATED", err)
			}
			if _, err := dial(addr, "").GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: a.GetAccountId()}); status.Code(err) != codes.Unavailable {
				t.Errorf("no client cert: %v, want UNAVAILABLE (handshake refused)", err)
			}
		})
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestParseRoleMapAndLoopback(t *testing.T) {
	m, err := parseRoleMap("CN=recon-job:reconciler,CN=ops:admin, CN=a:b:viewer")
	if err != nil || m["recon-job"] != auth.RoleReconciler || m["ops"] != auth.RoleAdmin || m["a:b"] != auth.RoleViewer {
		t.Fatalf("%v %v", m, err)
	}
	for _, bad := range []string{"recon-job:reconciler", "CN=x:root", "CN=:admin", "CN=x"} {
		if _, err := parseRoleMap(bad); err == nil {
			t.Errorf("parseRoleMap(%q) accepted", bad)
		}
	}
	for addr, want := range map[string]bool{"127.0.0.1:7070": true, "localhost:1": true, "[::1]:7070": true,
		"0.0.0.0:7070": false, ":7070": false, "[::]:7070": false, "10.0.0.5:7070": false, "tally.example:7070": false} {
		if got := isLoopback(addr); got != want {
			t.Errorf("isLoopback(%q) = %v", addr, got)
		}
	}
}
