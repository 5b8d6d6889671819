package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Limits of tally reconcile --external.
const (
	externalRowsMax        = 1_000_000
	externalBalancesPerRPC = 10_000
)

// Check names found by the CLI itself, comparing an external file.
const (
	checkExternalBalance = "external_balance"
	checkExternalUnknown = "external_unknown"
)

// errFindings makes tally exit non-zero when reconciliation found problems.
var errFindings = errors.New("reconciliation found problems")

type finding struct {
	Check      string `json:"check"`
	AccountID  string `json:"account_id,omitempty"`
	TransferID string `json:"transfer_id,omitempty"`
	Currency   string `json:"currency,omitempty"`
	Detail     string `json:"detail"`
	Repaired   bool   `json:"repaired,omitempty"`
}

type reconcileOpts struct {
	accounts []string
	repair   bool
	external string
	pageSize int
	// stripe compares the provider's payments of the last stripeSince
	// with the top-ups, through tallyd.
	stripe      bool
	stripeSince time.Duration
	findings    []finding
	checked     int64
}

// Validate has nothing to check: the server checks the account ids.
func (o *reconcileOpts) Validate() error { return nil }

func (a *app) newReconcileCmd() *cobra.Command {
	o := &reconcileOpts{}
	cmd := &cobra.Command{Use: "reconcile", Short: "Prove the books add up (and compare an external CSV); exit 1 on any mismatch",
		Args: cobra.NoArgs, RunE: a.runE(o), Long: strings.TrimSpace(`
Prove the books add up: every balance equals its entries, sequences are
gapless, held equals open holds, the cache agrees, each currency sums to
zero, every transfer has two entries summing to zero, refunds stay within
their charges, every SUCCEEDED top-up has exactly one credit and every
top-up credit its top-up; with --external, every balance equals the CSV's;
with --stripe, Stripe's payments of the window match the top-ups. Exits 1 on
any finding. Without --timeout it has no deadline (Ctrl-C stops it).`)}
	f := cmd.Flags()
	f.StringArrayVar(&o.accounts, "account", nil, "check only this account (repeatable; default: all, plus the ledger-wide sums)")
	f.BoolVar(&o.repair, "repair-cache", false, "delete cached balances that disagree with PostgreSQL")
	f.StringVar(&o.external, "external", "", "CSV of account_id or external_ref, expected_balance (e.g. from a payment provider)")
	f.IntVar(&o.pageSize, "page-size", 0, "accounts per statement (server default 500)")
	f.BoolVar(&o.stripe, "stripe", false, "also compare the payment provider's (Stripe's) payments with the top-ups, through tallyd (--topup-provider)")
	f.DurationVar(&o.stripeSince, "stripe-since", 24*time.Hour, "with --stripe: compare the payments made this long ago until now (at most 744h)")
	a.conn.register(cmd)
	return cmd
}

func (o *reconcileOpts) run(a *app) error {
	if !a.cmd.Flags().Changed("timeout") {
		a.conn.timeout = 0 // a full run may take minutes; Ctrl-C stops it
	}
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	if err := o.stream(ctx, cl, a.errOut); err != nil {
		return err
	}
	if o.external != "" {
		ext, err := compareExternal(ctx, cl, o.external)
		if err != nil {
			return err
		}
		o.findings = append(o.findings, ext...)
	}
	if a.conn.json {
		if err := o.printJSON(a.out); err != nil {
			return err
		}
	} else {
		printFindings(a.out, o.checked, o.findings)
	}
	if len(o.findings) > 0 {
		return fmt.Errorf("%w: %d", errFindings, len(o.findings))
	}
	return nil
}

// stream runs the Reconcile RPC, collecting its findings and showing its
// progress on progressOut.
func (o *reconcileOpts) stream(ctx context.Context, cl *client.Client, progressOut io.Writer) error {
	prog := newProgress(progressOut, "reconcile", 0)
	defer prog.done()
	req := &tallyv1.ReconcileRequest{AccountIds: o.accounts, PageSize: int32(o.pageSize), RepairCache: o.repair, Provider: o.stripe}
	if o.stripe {
		now := time.Now()
		req.ProviderFrom, req.ProviderTo = timestamppb.New(now.Add(-o.stripeSince)), timestamppb.New(now)
	}
	return cl.Reconcile(ctx, req, func(m *tallyv1.ReconcileResponse) error {
		switch {
		case m.GetProgress() != nil:
			p := m.GetProgress()
			prog.total = p.GetAccountsTotal()
			prog.add(p.GetAccountsChecked() - prog.n)
		case m.GetFinding() != nil:
			f := m.GetFinding()
			o.findings = append(o.findings, finding{Check: f.GetCheck(), AccountID: f.GetAccountId(), TransferID: f.GetTransferId(),
				Currency: f.GetCurrency(), Detail: f.GetDetail(), Repaired: f.GetRepaired()})
		case m.GetSummary() != nil:
			o.checked = m.GetSummary().GetAccountsChecked()
		}
		return nil
	})
}

func (o *reconcileOpts) printJSON(out io.Writer) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	findings := o.findings
	if findings == nil {
		findings = []finding{}
	}
	return enc.Encode(map[string]any{"accounts_checked": o.checked, "findings": findings, "ok": len(findings) == 0})
}

func printFindings(out io.Writer, checked int64, findings []finding) {
	if len(findings) == 0 {
		fmt.Fprintf(out, "OK: %d accounts checked; every balance equals its entries, sequences are gapless, held equals open holds, "+
			"the cache agrees, each currency sums to zero, every transfer has two entries summing to zero, refunds stay within their charges, "+
			"every SUCCEEDED top-up has exactly one credit and every top-up credit its top-up\n", checked)
		return
	}
	byCheck := map[string]int{}
	for _, f := range findings {
		byCheck[f.Check]++
	}
	names := make([]string, 0, len(byCheck))
	for k := range byCheck {
		names = append(names, k)
	}
	sort.Strings(names)
	fmt.Fprintf(out, "MISMATCH: %d accounts checked, %d problems\n", checked, len(findings))
	for _, n := range names {
		fmt.Fprintf(out, "  %-22s %d\n", n, byCheck[n])
	}
	rows := make([]string, 0, len(findings))
	for _, f := range findings {
		id := f.AccountID
		if id == "" {
			id = f.TransferID
		}
		if id == "" {
			id = f.Currency
		}
		detail := f.Detail
		if f.Repaired {
			detail += " (repaired)"
		}
		rows = append(rows, fmt.Sprintf("%s\t%s\t%s", f.Check, id, detail))
	}
	table(out, "CHECK\tACCOUNT/TRANSFER\tDETAIL", rows...)
}

// compareExternal reads rows of (account_id or external_ref, expected
// balance) and reports every account whose balance differs.
func compareExternal(ctx context.Context, cl *client.Client, path string) ([]finding, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := csv.NewReader(f)
	header, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("--external %s: %v", path, err)
	}
	if len(header) < 2 || (header[0] != "account_id" && header[0] != "external_ref") {
		return nil, fmt.Errorf("--external %s: the header must be account_id,expected_balance or external_ref,expected_balance", path)
	}
	byRef := header[0] == "external_ref"
	expected := map[string]int64{}
	var ids []string
	var out []finding
	for n := 2; ; n++ {
		rec, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("--external line %d: %v", n, err)
		}
		if len(expected) >= externalRowsMax {
			return nil, fmt.Errorf("--external: more than %d rows", externalRowsMax)
		}
		want, err := strconv.ParseInt(strings.TrimSpace(rec[1]), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("--external line %d: balance %q is not an integer of minor units", n, rec[1])
		}
		key := strings.TrimSpace(rec[0])
		id := key
		if byRef {
			res, err := cl.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: key, PageSize: 2})
			if err != nil {
				return nil, err
			}
			if len(res.GetAccounts()) != 1 {
				out = append(out, finding{Check: checkExternalUnknown, Detail: fmt.Sprintf("external_ref %q matches %d accounts", key, len(res.GetAccounts()))})
				continue
			}
			id = res.GetAccounts()[0].GetAccountId()
		}
		expected[id] = want
		ids = append(ids, id)
	}
	seen := map[string]bool{}
	for lo := 0; lo < len(ids); lo += externalBalancesPerRPC {
		chunk := ids[lo:min(lo+externalBalancesPerRPC, len(ids))]
		res, err := cl.GetBalances(ctx, &tallyv1.GetBalancesRequest{AccountIds: chunk})
		if err != nil {
			return nil, err
		}
		for _, b := range res.GetBalances() {
			seen[b.GetAccountId()] = true
			if want := expected[b.GetAccountId()]; b.GetBalance() != want {
				out = append(out, finding{Check: checkExternalBalance, AccountID: b.GetAccountId(), Currency: b.GetCurrency(),
					Detail: fmt.Sprintf("Tally %d, external %d (difference %d)", b.GetBalance(), want, b.GetBalance()-want)})
			}
		}
	}
	for _, id := range ids {
		if !seen[id] {
			out = append(out, finding{Check: checkExternalUnknown, AccountID: id, Detail: "no such account in Tally"})
		}
	}
	return out, nil
}
