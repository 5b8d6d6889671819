package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"time"

	"github.com/tallyledger/tally/internal/flagenv"
)

// runHealthcheck probes /readyz of a running tallyd. Container images without
// a shell or curl use it as their health check.
func runHealthcheck(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("tallyd healthcheck", flag.ContinueOnError)
	addr := fs.String("http-addr", "127.0.0.1:7071", "tallyd's HTTP address")
	timeout := fs.Duration("timeout", 3*time.Second, "probe timeout")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz answered %s", resp.Status)
	}
	return nil
}
