package main

import (
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// exportCSVHeader are the columns of tally export --format csv.
var exportCSVHeader = []string{"cursor", "event", "created_at", "id", "kind", "debit_account_id", "credit_account_id",
	"account_id", "amount", "currency", "status", "refund_of", "hold_id", "idempotency_key", "threshold_crossed"}

type exportOpts struct {
	since, format, file string
	follow              bool
}

// Validate has nothing to check: cobra checks --format.
func (o *exportOpts) Validate() error { return nil }

// newExportCmd writes the change feed as JSON lines or CSV and reports the
// cursor to resume from: on standard error when the data goes to standard
// output, else on standard output.
func (a *app) newExportCmd() *cobra.Command {
	o := &exportOpts{}
	cmd := &cobra.Command{Use: "export", Short: "Write the change feed (JSON lines or CSV) from a cursor", Args: cobra.NoArgs,
		RunE: a.runE(o), Example: "  tally export --since CURSOR --format csv --out feed.csv"}
	f := cmd.Flags()
	f.StringVar(&o.since, "since", "", "cursor to resume after (empty: from the beginning)")
	enumFlag(cmd, &o.format, "format", "jsonl", []string{"jsonl", "csv"}, "output format")
	f.StringVar(&o.file, "out", "", "write to this file instead of standard output")
	f.BoolVar(&o.follow, "follow", false, "keep streaming new events until interrupted or --timeout")
	a.conn.register(cmd)
	return cmd
}

func (o *exportOpts) run(a *app) error {
	data, report := a.out, a.errOut
	if o.file != "" {
		f, err := os.Create(o.file)
		if err != nil {
			return err
		}
		defer f.Close()
		data, report = f, a.out
	}
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	var w *csv.Writer
	if o.format == "csv" {
		w = csv.NewWriter(data)
		if err := w.Write(exportCSVHeader); err != nil {
			return err
		}
	}
	n := 0
	prog := newProgress(a.errOut, "export", 0)
	cursor, err := cl.Export(ctx, o.since, o.follow, func(ev *tallyv1.ExportTransfersResponse) error {
		n++
		prog.add(1)
		if w != nil {
			return w.Write(csvRow(ev))
		}
		b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(ev)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(data, "%s\n", b)
		return err
	})
	prog.done()
	if w != nil {
		w.Flush()
		if ferr := w.Error(); ferr != nil && err == nil {
			err = ferr
		}
	}
	// A follow ended by --timeout or Ctrl-C is a normal end: report where
	// to resume.
	if o.follow && errors.Is(err, context.DeadlineExceeded) {
		err = nil
	}
	fmt.Fprintf(report, "exported %d events; resume with: tally export --since %s\n", n, cursor)
	return err
}

func csvRow(ev *tallyv1.ExportTransfersResponse) []string {
	row := make([]string, len(exportCSVHeader))
	row[0], row[2] = ev.GetCursor(), ev.GetCreatedAt().AsTime().Format(time.RFC3339Nano)
	switch {
	case ev.GetTransfer() != nil:
		t := ev.GetTransfer()
		row[1], row[3], row[4] = "transfer", t.GetTransferId(), enumName(t.GetKind(), "TRANSFER_KIND_")
		row[5], row[6], row[8], row[9] = t.GetDebitAccountId(), t.GetCreditAccountId(), strconv.FormatInt(t.GetAmount(), 10), t.GetCurrency()
		row[11], row[12], row[13], row[14] = t.GetRefundOf(), t.GetHoldId(), t.GetIdempotencyKey(), strconv.FormatBool(t.GetThresholdCrossed())
	case ev.GetHold() != nil:
		h := ev.GetHold()
		row[1], row[3], row[7], row[8], row[9] = "hold", h.GetHoldId(), h.GetAccountId(), strconv.FormatInt(h.GetAmount(), 10), h.GetCurrency()
		row[10], row[12], row[13] = enumName(h.GetStatus(), "HOLD_STATUS_"), h.GetHoldId(), h.GetIdempotencyKey()
	case ev.GetAccountChange() != nil:
		a := ev.GetAccountChange()
		row[1], row[3], row[4], row[7] = "account_change", a.GetAccountId(), a.GetAction(), a.GetAccountId()
	case ev.GetLowBalance() != nil:
		l := ev.GetLowBalance()
		row[1], row[3], row[7], row[8] = "low_balance", l.GetAccountId(), l.GetAccountId(), strconv.FormatInt(l.GetAvailable(), 10)
		row[12] = l.GetHoldId()
	case ev.GetTopup() != nil:
		x := ev.GetTopup()
		row[1], row[3], row[4], row[7] = "topup", x.GetTopupId(), enumName(x.GetStatus(), "TOP_UP_STATUS_"), x.GetAccountId()
		row[8], row[9], row[10] = strconv.FormatInt(x.GetAmount(), 10), x.GetCurrency(), enumName(x.GetStatus(), "TOP_UP_STATUS_")
	}
	return row
}
