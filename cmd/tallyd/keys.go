package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/internal/flagenv"
	"github.com/tallyledger/tally/store"
)

const keysUsage = `usage:
  tallyd keys create --name N --role R [--client C] [--quiet]
      make an API key (printed once). Without --client, a new client named N
      with role R; with --client, another key of client C (for rotation).
  tallyd keys list
      list every key: id, client, role, created, last used, revoked
  tallyd keys revoke ID
      revoke a key; running tallyds refuse it within --auth-cache-ttl (5s)

Each takes --database-url ($TALLY_DATABASE_URL) and --database-pooler
($TALLY_DATABASE_POOLER), as tallyd serve does.
`

func runKeys(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, keysUsage)
		return errors.New("tallyd keys: missing subcommand")
	}
	switch args[0] {
	case "create":
		return keysCreate(ctx, args[1:], os.Stdout)
	case "list":
		return keysList(ctx, args[1:], os.Stdout)
	case "revoke":
		return keysRevoke(ctx, args[1:], os.Stdout)
	case "-h", "--help", "help":
		fmt.Fprint(os.Stderr, keysUsage)
		return nil
	}
	fmt.Fprint(os.Stderr, keysUsage)
	return fmt.Errorf("tallyd keys: unknown subcommand %q", args[0])
}

func openForKeys(ctx context.Context, url string, pooler *poolerFlag) (*store.Store, error) {
	if url == "" {
		return nil, errors.New("--database-url (TALLY_DATABASE_URL) is required")
	}
	st, err := store.Open(ctx, store.Config{URL: url, PoolConnsMax: 2, Pooler: pooler.get()})
	if err != nil {
		return nil, err
	}
	if err := st.CheckSchema(ctx); err != nil {
		st.Close()
		return nil, err
	}
	return st, nil
}

func keysCreate(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("tallyd keys create", flag.ContinueOnError)
	url := fs.String("database-url", "", "PostgreSQL connection URL (required)")
	var pooler poolerFlag
	pooler.register(fs)
	name := fs.String("name", "", "name of the key (and of the new client, without --client)")
	roleName := fs.String("role", "", "role: charger, viewer, support, reconciler or admin (default with --client: the client's)")
	clientName := fs.String("client", "", "add the key to this existing client (key rotation) instead of creating a client")
	quiet := fs.Bool("quiet", false, "print only the key")
	migrate := fs.Bool("migrate", false, "apply pending migrations first (for one-shot init containers)")
	ifNone := fs.Bool("if-no-active-keys", false, "do nothing (exit 0) when an active key exists already (for init containers that run on every start)")
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	var role auth.Role
	if *roleName != "" {
		r, err := auth.ParseRole(*roleName)
		if err != nil {
			return err
		}
		role = r
	}
	if *migrate {
		if *url == "" {
			return errors.New("--database-url (TALLY_DATABASE_URL) is required")
		}
		if err := store.Migrate(ctx, *url); err != nil {
			return err
		}
	}
	st, err := openForKeys(ctx, *url, &pooler)
	if err != nil {
		return err
	}
	defer st.Close()
	if *ifNone {
		n, err := st.ActiveAPIKeys(ctx)
		if err != nil {
			return err
		}
		if n > 0 {
			fmt.Fprintf(out, "%d active API key(s) exist already; not creating another (see `tallyd keys list`)\n", n)
			return nil
		}
	}
	c, err := auth.CreateKey(ctx, st, *name, role, *clientName)
	if err != nil {
		return err
	}
	if *quiet {
		fmt.Fprintln(out, c.Key.String())
		return nil
	}
	client := fmt.Sprintf("existing client %q", c.ClientName)
	if c.NewClient {
		client = fmt.Sprintf("new client %q", c.ClientName)
	}
	fmt.Fprintf(out, `Created API key %s (name %q) for %s, role %s, client_id %s.
This is the only time the key is shown; store it as a secret:

  %s

Callers send it as the gRPC metadata "authorization: Bearer <key>"; the tally CLI reads it from:
  export TALLY_API_KEY=%s
`, c.Key.ID, c.Name, client, c.Role, c.ClientID, c.Key.String(), c.Key.String())
	return nil
}

func keysList(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("tallyd keys list", flag.ContinueOnError)
	url := fs.String("database-url", "", "PostgreSQL connection URL (required)")
	var pooler poolerFlag
	pooler.register(fs)
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	st, err := openForKeys(ctx, *url, &pooler)
	if err != nil {
		return err
	}
	defer st.Close()
	keys, err := st.ListAPIKeys(ctx)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY ID\tNAME\tCLIENT\tCLIENT ID\tROLE\tCREATED\tLAST USED\tREVOKED")
	ts := func(t *time.Time) string {
		if t == nil {
			return "-"
		}
		return t.UTC().Format(time.RFC3339)
	}
	for _, k := range keys {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.ClientName, k.ClientID, k.Role,
			k.CreatedAt.UTC().Format(time.RFC3339), ts(k.LastUsedAt), ts(k.RevokedAt))
	}
	return tw.Flush()
}

func keysRevoke(ctx context.Context, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("tallyd keys revoke", flag.ContinueOnError)
	url := fs.String("database-url", "", "PostgreSQL connection URL (required)")
	var pooler poolerFlag
	pooler.register(fs)
	// Accept the key id before or after the flags.
	var id string
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		id, args = args[0], args[1:]
	}
	if err := flagenv.Parse(fs, args); err != nil {
		return err
	}
	if id == "" && fs.NArg() > 0 {
		id = fs.Arg(0)
	}
	if id == "" {
		return errors.New("usage: tallyd keys revoke ID")
	}
	// Accept a whole key too, but never echo its secret.
	if k, err := auth.ParseKey(id); err == nil {
		id = k.ID
	}
	if !auth.ValidKeyID(id) {
		return errors.New("not a key id (12 characters of a-z and 2-7, as shown by `tallyd keys list`)")
	}
	st, err := openForKeys(ctx, *url, &pooler)
	if err != nil {
		return err
	}
	defer st.Close()
	k, err := st.RevokeAPIKey(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("no key %s", id)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "revoked key %s (name %q, client %q) at %s; running tallyds refuse it within their --auth-cache-ttl (default %s)\n",
		k.ID, k.Name, k.ClientName, k.RevokedAt.UTC().Format(time.RFC3339), auth.CacheTTLDefault)
	return nil
}
