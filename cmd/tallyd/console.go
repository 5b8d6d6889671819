package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/console"
)

// consoleConfig holds the --console-* flags.
type consoleConfig struct {
	addr   string
	limits console.Limits
}

func (c *consoleConfig) register(fs *flag.FlagSet) {
	fs.StringVar(&c.addr, "console-addr", "", "serve the support console (HTML) on this address, e.g. 127.0.0.1:7072 (empty: off); TLS with --tls-cert like gRPC")
	fs.DurationVar(&c.limits.SessionTTL, "console-session-ttl", console.SessionTTLDefault, "how long a console session lasts after sign-in")
	fs.IntVar(&c.limits.SessionsMax, "console-sessions-max", console.SessionsMaxDefault, "most live console sessions")
	fs.IntVar(&c.limits.SearchBytesMax, "console-search-bytes-max", console.SearchBytesMaxDefault, "longest console search term in bytes")
	fs.IntVar(&c.limits.ReasonBytesMax, "console-reason-bytes-max", console.ReasonBytesMaxDefault, "longest freeze or unfreeze reason in bytes (at most --description-bytes-max)")
	fs.IntVar(&c.limits.PageSize, "console-page-size", console.PageSizeDefault, "statement lines per console page (at most --page-size-max)")
	fs.IntVar(&c.limits.FormBytesMax, "console-form-bytes-max", console.FormBytesMaxDefault, "largest console request body in bytes")
	fs.IntVar(&c.limits.DownloadLinesMax, "console-download-lines-max", console.DownloadLinesMaxDefault, "most lines of a console CSV or PDF statement download")
}

// consoleBufBytes is the in-memory connection's buffer.
const consoleBufBytes = 1 << 20

// startConsole serves the console on c.consoleCfg.addr. The console
// reaches the gRPC server gs over an in-memory connection, so every page
// goes through the same interceptors (authentication, the role table,
// limits, metrics) as any client. It returns the console's address and a
// stop function.
func startConsole(c serveConfig, gs *grpc.Server, opts *api.AuthOptions, tlsCfg *tls.Config, log *slog.Logger) (string, func(), error) {
	if opts == nil {
		return "", nil, errors.New("--console-addr needs authentication: it cannot be used with --insecure-no-auth")
	}
	if c.tlsClientCA != "" {
		return "", nil, errors.New("--console-addr cannot be used with --tls-client-ca yet: the console's in-process connection has no client certificate")
	}
	bl := bufconn.Listen(consoleBufBytes)
	go func() { _ = gs.Serve(bl) }()
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		// The connection never leaves this process: there is no network
		// to authenticate the server against.
		creds = credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}) //nolint:gosec // in-memory connection
	}
	conn, err := grpc.NewClient("passthrough:///tallyd-console",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return bl.DialContext(ctx) }),
		grpc.WithTransportCredentials(creds))
	if err != nil {
		bl.Close()
		return "", nil, err
	}
	cons := console.New(console.Config{Conn: conn, Verify: opts.Verifier.Verify, Logger: log, Limits: c.console.limits})
	lis, err := net.Listen("tcp", c.console.addr)
	if err != nil {
		conn.Close()
		bl.Close()
		return "", nil, err
	}
	srv := &http.Server{Handler: cons.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 2 * time.Minute, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10}
	go func() {
		var err error
		if tlsCfg != nil {
			srv.TLSConfig = tlsCfg.Clone()
			srv.TLSConfig.ClientAuth = tls.NoClientCert
			err = srv.ServeTLS(lis, "", "")
		} else {
			err = srv.Serve(lis)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("console stopped", "err", err.Error())
		}
	}()
	stop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		conn.Close()
		bl.Close()
	}
	return lis.Addr().String(), stop, nil
}
