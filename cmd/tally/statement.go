package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/statement"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

var statementFormats = []string{"table", "csv", "pdf", "json"}

type statementOpts struct {
	account, externalRef, fromText, toText, format, output string
	pageSize                                               int32
	from, to                                               time.Time
}

// Validate parses the period (RFC 3339 instants or YYYY-MM-DD UTC days;
// --to defaults to now) and checks that it ends after it starts.
func (o *statementOpts) Validate() error {
	var err error
	if o.from, err = parseInstant("from", o.fromText); err != nil {
		return err
	}
	o.to = time.Now().UTC()
	if o.toText != "" {
		if o.to, err = parseInstant("to", o.toText); err != nil {
			return err
		}
	}
	if !o.from.Before(o.to) {
		return usageError{fmt.Errorf("--to must be after --from")}
	}
	return nil
}

// parseInstant parses an RFC 3339 instant or a YYYY-MM-DD UTC day.
func parseInstant(name, s string) (time.Time, error) {
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, usageError{fmt.Errorf("--%s wants YYYY-MM-DD or an RFC 3339 time such as 2026-10-31T23:59:59Z", name)}
	}
	return t, nil
}

// newStatementCmd is `tally statement`: an account's statement for a
// period as a table, CSV, PDF or JSON.
func (a *app) newStatementCmd() *cobra.Command {
	o := &statementOpts{}
	cmd := &cobra.Command{Use: "statement", Short: "An account's statement: opening balance, every line with its running balance, closing balance, totals",
		Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally statement --external-ref cust-42 --from 2026-11-01 --to 2026-12-01\n" +
			"  tally statement --account <id> --from 2026-11-01 --format pdf --output nov.pdf"}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.StringVar(&o.externalRef, "external-ref", "", "the customer's id in your system (exactly one account)")
	f.StringVar(&o.fromText, "from", "", "start of the period, included (YYYY-MM-DD UTC or RFC 3339)")
	f.StringVar(&o.toText, "to", "", "end of the period, excluded (default: now)")
	enumFlag(cmd, &o.format, "format", "table", statementFormats, "output format")
	f.StringVar(&o.output, "output", "", "write to this file instead of stdout")
	f.Int32Var(&o.pageSize, "page-size", 0, "lines per request (0: the server's default)")
	require(cmd, "from")
	cmd.MarkFlagsOneRequired("account", "external-ref")
	cmd.MarkFlagsMutuallyExclusive("account", "external-ref")
	a.conn.register(cmd)
	return cmd
}

func (o *statementOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	acct, err := o.findAccount(ctx, cl)
	if err != nil {
		return err
	}
	full, err := statement.Collect(ctx, func(ctx context.Context, tok string) (*tallyv1.Statement, error) {
		return cl.GetStatement(ctx, &tallyv1.GetStatementRequest{AccountId: acct.GetAccountId(),
			From: timestamppb.New(o.from), To: timestamppb.New(o.to), PageSize: o.pageSize, PageToken: tok})
	})
	if err != nil {
		return err
	}
	full.ExternalRef = acct.GetExternalRef()
	out := a.out
	if o.output != "" {
		f, err := os.Create(o.output)
		if err != nil {
			return err
		}
		defer f.Close()
		out = f
	}
	if err := writeStatement(out, o.format, full, a.conn.json); err != nil {
		return err
	}
	if f, ok := out.(*os.File); ok && o.output != "" {
		return f.Close()
	}
	return nil
}

func writeStatement(out io.Writer, format string, full *statement.Full, json bool) error {
	if json {
		format = "json"
	}
	switch format {
	case "csv":
		return statement.WriteCSV(out, full.Statement)
	case "pdf":
		return statement.WritePDF(out, full)
	case "json":
		b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(full.Statement)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(out, string(b))
		return err
	}
	return statement.WriteText(out, full)
}

// findAccount resolves --account or --external-ref to one account.
func (o *statementOpts) findAccount(ctx context.Context, cl *client.Client) (*tallyv1.Account, error) {
	s := showOpts{account: o.account, externalRef: o.externalRef}
	accts, err := s.accounts(ctx, cl)
	if err != nil {
		return nil, err
	}
	if len(accts) > 1 {
		return nil, fmt.Errorf("%d accounts have external_ref %q: name one with --account", len(accts), o.externalRef)
	}
	return accts[0], nil
}
