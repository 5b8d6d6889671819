package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// batchLineBytesMax bounds one line of a --file batch.
const batchLineBytesMax = 1 << 20

var batchModes = protoEnum(tallyv1.BatchMode_value, "BATCH_MODE_")

func (a *app) newHoldCmd() *cobra.Command {
	cmd := group(&cobra.Command{Use: "hold", Short: "Reserve funds, then charge (capture) or free (release) them"})
	cmd.AddCommand(a.newHoldCreateCmd(), a.newHoldFinishCmd("capture"), a.newHoldFinishCmd("release"), a.newHoldGetCmd())
	return cmd
}

type holdCreateOpts struct {
	account, key, expiresAt, revenue, description string
	amount                                        int64
	expiresIn                                     time.Duration
	at                                            *timestamppb.Timestamp
}

// Validate parses --expires-at.
func (o *holdCreateOpts) Validate() (err error) {
	o.at, err = parseAt("expires-at", o.expiresAt)
	return err
}

func (a *app) newHoldCreateCmd() *cobra.Command {
	o := &holdCreateOpts{}
	cmd := &cobra.Command{Use: "create", Short: "Reserve funds on an account", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.Int64Var(&o.amount, "amount", 0, "amount in minor units")
	f.StringVar(&o.key, "key", "", "idempotency key (default: a fresh one, printed)")
	f.DurationVar(&o.expiresIn, "expires-in", 0, "hold lifetime, e.g. 30m (default: the server's, 24h)")
	f.StringVar(&o.expiresAt, "expires-at", "", "expiry as RFC 3339")
	f.StringVar(&o.revenue, "revenue", "", "revenue account a capture credits (default: the currency's)")
	f.StringVar(&o.description, "description", "", "description")
	require(cmd, "account", "amount")
	cmd.MarkFlagsMutuallyExclusive("expires-in", "expires-at")
	a.conn.register(cmd)
	return cmd
}

func (o *holdCreateOpts) run(a *app) error {
	a.keyOrNew(&o.key)
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	res, err := cl.Hold(ctx, &tallyv1.HoldRequest{AccountId: o.account, Amount: o.amount, IdempotencyKey: o.key,
		ExpiresAt: o.at, ExpiresInSeconds: int64(o.expiresIn.Seconds()), RevenueAccountId: o.revenue, Description: o.description})
	if err != nil {
		return err
	}
	return a.printHoldResult(res)
}

// holdFinishOpts are the options of hold capture and hold release.
type holdFinishOpts struct {
	action, hold, key string
	amount            int64
}

// Validate has nothing to check: cobra enforces --hold.
func (o *holdFinishOpts) Validate() error { return nil }

func (a *app) newHoldFinishCmd(action string) *cobra.Command {
	o := &holdFinishOpts{action: action}
	short := "Charge all or part of a hold, freeing the rest"
	if action == "release" {
		short = "Free a hold's funds"
	}
	cmd := &cobra.Command{Use: action, Short: short, Args: cobra.NoArgs, RunE: a.runE(o)}
	cmd.Flags().StringVar(&o.hold, "hold", "", "hold id")
	cmd.Flags().StringVar(&o.key, "key", "", "idempotency key (default: a fresh one, printed)")
	if action == "capture" {
		cmd.Flags().Int64Var(&o.amount, "amount", 0, "amount in minor units (0 captures all)")
	}
	require(cmd, "hold")
	a.conn.register(cmd)
	return cmd
}

func (o *holdFinishOpts) run(a *app) error {
	a.keyOrNew(&o.key)
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	var res *tallyv1.HoldResult
	if o.action == "capture" {
		res, err = cl.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: o.hold, Amount: o.amount, IdempotencyKey: o.key})
	} else {
		res, err = cl.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: o.hold, IdempotencyKey: o.key})
	}
	if err != nil {
		return err
	}
	return a.printHoldResult(res)
}

type holdGetOpts struct{ hold string }

// Validate has nothing to check: cobra enforces --hold.
func (o *holdGetOpts) Validate() error { return nil }

func (a *app) newHoldGetCmd() *cobra.Command {
	o := &holdGetOpts{}
	cmd := &cobra.Command{Use: "get", Short: "Show a hold", Args: cobra.NoArgs, RunE: a.runE(o)}
	cmd.Flags().StringVar(&o.hold, "hold", "", "hold id")
	require(cmd, "hold")
	a.conn.register(cmd)
	return cmd
}

func (o *holdGetOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	h, err := cl.GetHold(ctx, &tallyv1.GetHoldRequest{HoldId: o.hold})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, h)
	}
	return a.printHoldResult(&tallyv1.HoldResult{Hold: h})
}

// printHoldResult prints a hold and, after a change, the balance and any
// capture charge; or JSON.
func (a *app) printHoldResult(res *tallyv1.HoldResult) error {
	if a.conn.json {
		return printJSON(a.out, res)
	}
	h := res.GetHold()
	table(a.out, "HOLD\tACCOUNT\tAMOUNT\tSTATUS\tCAPTURED\tEXPIRES\tREPLAYED",
		fmt.Sprintf("%s\t%s\t%d %s\t%s\t%d\t%s\t%v", h.GetHoldId(), h.GetAccountId(), h.GetAmount(), h.GetCurrency(),
			enumName(h.GetStatus(), "HOLD_STATUS_"), h.GetCapturedAmount(), h.GetExpiresAt().AsTime().Format(time.RFC3339),
			res.GetReplayed()))
	if b := res.GetBalance(); b != nil {
		fmt.Fprintf(a.out, "balance %d, held %d, available %d (version %d)\n", b.GetBalance(), b.GetHeld(), b.GetAvailable(), b.GetVersion())
	}
	if t := res.GetTransfer(); t != nil {
		fmt.Fprintf(a.out, "capture charge %s of %d\n", t.GetTransferId(), t.GetAmount())
	}
	return nil
}

type batchOpts struct{ file, mode, key string }

// Validate has nothing to check: cobra checks --mode.
func (o *batchOpts) Validate() error { return nil }

func (a *app) newBatchCmd() *cobra.Command {
	o := &batchOpts{}
	cmd := &cobra.Command{Use: "batch", Short: "Submit up to 1,000 operations, atomic or independent", Args: cobra.NoArgs,
		RunE: a.runE(o), Long: strings.TrimSpace(`
Submit up to 1,000 operations read as JSON lines, one tally.v1.BatchOperation
per line, e.g. {"charge":{"accountId":"...","amount":"5","idempotencyKey":"k1"}}.
In atomic mode all apply or none does; in independent mode each stands alone.`)}
	f := cmd.Flags()
	f.StringVar(&o.file, "file", "-", "JSON lines of operations (- reads standard input)")
	enumFlag(cmd, &o.mode, "mode", "atomic", batchModes, "all or nothing, or each on its own")
	f.StringVar(&o.key, "key", "", "batch key (default: a fresh one, printed; reuse it to retry)")
	a.conn.register(cmd)
	return cmd
}

func (o *batchOpts) run(a *app) error {
	ops, err := o.read(a.in)
	if err != nil {
		return err
	}
	a.keyOrNew(&o.key)
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	mode := tallyv1.BatchMode(tallyv1.BatchMode_value["BATCH_MODE_"+strings.ToUpper(o.mode)])
	res, err := cl.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: o.key, Mode: mode, Operations: ops})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, res)
	}
	rows := make([]string, 0, len(res.GetResults()))
	for i, r := range res.GetResults() {
		rows = append(rows, fmt.Sprintf("%d\t%s", i, batchOutcome(r)))
	}
	table(a.out, "ITEM\tOUTCOME\tDETAIL", rows...)
	fmt.Fprintf(a.out, "applied %v, failed item %d, replayed %v\n", res.GetApplied(), res.GetFailedIndex(), res.GetReplayed())
	return nil
}

// read parses the operations of --file (or in, for -).
func (o *batchOpts) read(in io.Reader) ([]*tallyv1.BatchOperation, error) {
	r := in
	if o.file != "-" {
		f, err := os.Open(o.file)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	var ops []*tallyv1.BatchOperation
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), batchLineBytesMax)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		op := &tallyv1.BatchOperation{}
		if err := protojson.Unmarshal([]byte(line), op); err != nil {
			return nil, fmt.Errorf("line %d: %v", n, err)
		}
		ops = append(ops, op)
	}
	return ops, sc.Err()
}

func batchOutcome(r *tallyv1.BatchOperationResult) string {
	switch {
	case r.GetError() != nil:
		return fmt.Sprintf("ERROR\t%s: %s", r.GetError().GetReason(), r.GetError().GetMessage())
	case r.GetHold() != nil:
		h := r.GetHold().GetHold()
		return fmt.Sprintf("OK\thold %s %s %d", h.GetHoldId(), enumName(h.GetStatus(), "HOLD_STATUS_"), h.GetAmount())
	default:
		t := r.GetTransfer().GetTransfer()
		return fmt.Sprintf("OK\t%s %s %d", enumName(t.GetKind(), "TRANSFER_KIND_"), t.GetTransferId(), t.GetAmount())
	}
}
