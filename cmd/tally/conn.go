package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/tallyledger/tally/api/client"
)

// connFlags are the flags of every command that talks to tallyd through
// api/client.
type connFlags struct {
	addr    string
	apiKey  string
	json    bool
	timeout time.Duration
	retries int
	tls     bool
	tlsCA   string
	tlsCert string
	tlsKey  string
}

// register defines the connection flags on cmd.
func (c *connFlags) register(cmd *cobra.Command) {
	fs := cmd.Flags()
	fs.StringVar(&c.addr, "addr", client.AddrDefault, "tallyd gRPC address")
	fs.StringVar(&c.apiKey, "api-key", "", "API key")
	fs.BoolVar(&c.json, "json", false, "print JSON")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "overall deadline, retries included (0: none)")
	fs.IntVar(&c.retries, "retry-attempts-max", client.RetryAttemptsMaxDefault, "attempts per call, the first included")
	fs.BoolVar(&c.tls, "tls", false, "connect with TLS, trusting the system's CAs (implied by --tls-ca)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "PEM CA bundle to verify tallyd's certificate (implies --tls)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM client certificate, for a tallyd that requires one (mTLS)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
	cmd.MarkFlagsRequiredTogether("tls-cert", "tls-key")
}

// dial creates the client (api/client, which connects lazily and owns the
// retry contract).
func (c *connFlags) dial() (*client.Client, error) {
	p := client.DefaultPolicy()
	p.RetryAttemptsMax = c.retries
	opts, err := c.dialOptions()
	if err != nil {
		return nil, err
	}
	return client.New(client.Config{Addr: c.addr, APIKey: c.apiKey, Policy: p, DialOptions: opts})
}

// dialOptions returns the transport credentials the flags ask for (none:
// plaintext, the client package's default).
func (c *connFlags) dialOptions() ([]grpc.DialOption, error) {
	if !c.tls && c.tlsCA == "" && c.tlsCert == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.tlsCA != "" {
		pem, err := os.ReadFile(c.tlsCA)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-ca %s: no PEM certificate found", c.tlsCA)
		}
		cfg.RootCAs = pool
	}
	if c.tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(c.tlsCert, c.tlsKey)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}, nil
}
