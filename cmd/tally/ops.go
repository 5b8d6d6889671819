package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// batchLineBytesMax bounds one line of a --file batch.
const batchLineBytesMax = 1 << 20

func keyOrNew(key *string) {
	if *key == "" {
		*key = client.NewIdempotencyKey()
		fmt.Fprintln(os.Stderr, "idempotency key:", *key)
	}
}

func parseAt(s string) (*timestamppb.Timestamp, error) {
	if s == "" {
		return nil, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return nil, fmt.Errorf("--at wants an RFC 3339 time such as 2026-10-31T23:59:59Z: %v", err)
	}
	return timestamppb.New(t), nil
}

func refund(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally refund", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("transfer", "", "the CHARGE to refund")
	amount := fs.Int64("amount", 0, "amount in minor units (0: all that remains refundable)")
	key := fs.String("key", "", "idempotency key (default: a fresh one, printed)")
	reason := fs.String("reason", "", "why (stored as the refund's description)")
	if err := parse(fs, args); err != nil {
		return err
	}
	keyOrNew(key)
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	res, err := cl.Refund(ctx, &tallyv1.RefundRequest{TransferId: *id, Amount: *amount, IdempotencyKey: *key, Reason: *reason})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, res)
	}
	printTransferResult(out, res)
	return nil
}

func printTransferResult(out io.Writer, res *tallyv1.TransferResult) {
	t, b := res.GetTransfer(), res.GetBalance()
	table(out, "TRANSFER\tKIND\tDEBIT\tCREDIT\tAMOUNT\tREPLAYED\tBALANCE\tHELD\tAVAILABLE\tVERSION\tTHRESHOLD_CROSSED",
		fmt.Sprintf("%s\t%s\t%s\t%s\t%d %s\t%v\t%d\t%d\t%d\t%d\t%v", t.GetTransferId(), enumName(t.GetKind(), "TRANSFER_KIND_"),
			t.GetDebitAccountId(), t.GetCreditAccountId(), t.GetAmount(), t.GetCurrency(), res.GetReplayed(),
			b.GetBalance(), b.GetHeld(), b.GetAvailable(), b.GetVersion(), res.GetThresholdCrossed()))
}

func holdCmd(sub string, args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally hold "+sub, flag.ContinueOnError)
	c.register(fs)
	acct := fs.String("account", "", "account id (create)")
	id := fs.String("hold", "", "hold id (capture, release, get)")
	amount := fs.Int64("amount", 0, "amount in minor units (capture: 0 captures all)")
	key := fs.String("key", "", "idempotency key (default: a fresh one, printed)")
	expiresIn := fs.Duration("expires-in", 0, "hold lifetime, e.g. 30m (default: the server's, 24h)")
	expiresAt := fs.String("expires-at", "", "expiry as RFC 3339")
	revenue := fs.String("revenue", "", "revenue account a capture credits (default: the currency's)")
	desc := fs.String("description", "", "description")
	if err := parse(fs, args); err != nil {
		return err
	}
	if sub != "get" {
		keyOrNew(key)
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	var res *tallyv1.HoldResult
	switch sub {
	case "create":
		at, err := parseAt(*expiresAt)
		if err != nil {
			return err
		}
		res, err = cl.Hold(ctx, &tallyv1.HoldRequest{AccountId: *acct, Amount: *amount, IdempotencyKey: *key,
			ExpiresAt: at, ExpiresInSeconds: int64(expiresIn.Seconds()), RevenueAccountId: *revenue, Description: *desc})
		if err != nil {
			return err
		}
	case "capture":
		res, err = cl.CaptureHold(ctx, &tallyv1.CaptureHoldRequest{HoldId: *id, Amount: *amount, IdempotencyKey: *key})
	case "release":
		res, err = cl.ReleaseHold(ctx, &tallyv1.ReleaseHoldRequest{HoldId: *id, IdempotencyKey: *key})
	case "get":
		h, gerr := cl.GetHold(ctx, &tallyv1.GetHoldRequest{HoldId: *id})
		if gerr != nil {
			return gerr
		}
		res = &tallyv1.HoldResult{Hold: h}
	default:
		return errUsage
	}
	if err != nil {
		return err
	}
	if c.json {
		if sub == "get" {
			return printJSON(out, res.GetHold())
		}
		return printJSON(out, res)
	}
	h := res.GetHold()
	table(out, "HOLD\tACCOUNT\tAMOUNT\tSTATUS\tCAPTURED\tEXPIRES\tREPLAYED",
		fmt.Sprintf("%s\t%s\t%d %s\t%s\t%d\t%s\t%v", h.GetHoldId(), h.GetAccountId(), h.GetAmount(), h.GetCurrency(),
			enumName(h.GetStatus(), "HOLD_STATUS_"), h.GetCapturedAmount(), h.GetExpiresAt().AsTime().Format(time.RFC3339),
			res.GetReplayed()))
	if res.GetBalance() != nil {
		b := res.GetBalance()
		fmt.Fprintf(out, "balance %d, held %d, available %d (version %d)\n", b.GetBalance(), b.GetHeld(), b.GetAvailable(), b.GetVersion())
	}
	if t := res.GetTransfer(); t != nil {
		fmt.Fprintf(out, "capture charge %s of %d\n", t.GetTransferId(), t.GetAmount())
	}
	return nil
}

// batch submits operations read as JSON lines (one tally.v1.BatchOperation
// per line, e.g. {"charge":{"accountId":"...","amount":"5","idempotencyKey":"k1"}}).
func batch(args []string, in io.Reader, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally batch", flag.ContinueOnError)
	c.register(fs)
	file := fs.String("file", "-", "JSON lines of operations (- reads standard input)")
	mode := fs.String("mode", "atomic", "atomic (all or nothing) or independent")
	key := fs.String("key", "", "batch key (default: a fresh one, printed; reuse it to retry)")
	if err := parse(fs, args); err != nil {
		return err
	}
	m := tallyv1.BatchMode(tallyv1.BatchMode_value["BATCH_MODE_"+strings.ToUpper(*mode)])
	if m == tallyv1.BatchMode_BATCH_MODE_UNSPECIFIED {
		return fmt.Errorf("--mode must be atomic or independent")
	}
	r := in
	if *file != "-" {
		f, err := os.Open(*file)
		if err != nil {
			return err
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
			return fmt.Errorf("line %d: %v", n, err)
		}
		ops = append(ops, op)
	}
	if err := sc.Err(); err != nil {
		return err
	}
	keyOrNew(key)
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	res, err := cl.SubmitBatch(ctx, &tallyv1.SubmitBatchRequest{BatchKey: *key, Mode: m, Operations: ops})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, res)
	}
	rows := make([]string, 0, len(res.GetResults()))
	for i, r := range res.GetResults() {
		switch {
		case r.GetError() != nil:
			rows = append(rows, fmt.Sprintf("%d\tERROR\t%s: %s", i, r.GetError().GetReason(), r.GetError().GetMessage()))
		case r.GetHold() != nil:
			h := r.GetHold().GetHold()
			rows = append(rows, fmt.Sprintf("%d\tOK\thold %s %s %d", i, h.GetHoldId(), enumName(h.GetStatus(), "HOLD_STATUS_"), h.GetAmount()))
		default:
			t := r.GetTransfer().GetTransfer()
			rows = append(rows, fmt.Sprintf("%d\tOK\t%s %s %d", i, enumName(t.GetKind(), "TRANSFER_KIND_"), t.GetTransferId(), t.GetAmount()))
		}
	}
	table(out, "ITEM\tOUTCOME\tDETAIL", rows...)
	fmt.Fprintf(out, "applied %v, failed item %d, replayed %v\n", res.GetApplied(), res.GetFailedIndex(), res.GetReplayed())
	return nil
}

func accountChange(sub string, args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally account "+sub, flag.ContinueOnError)
	c.register(fs)
	id := fs.String("account", "", "account id")
	limit := fs.Int64("credit-limit", -1, "new credit limit (update)")
	threshold := fs.String("low-balance-threshold", "", "available amount below which debits report threshold_crossed (update; \"none\" clears it)")
	replace := fs.Bool("replace-meta", false, "replace all metadata with the --meta given (update)")
	var meta multi
	fs.Var(&meta, "meta", "metadata key=value (repeatable, with --replace-meta)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	var a *tallyv1.Account
	switch sub {
	case "freeze":
		a, err = cl.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: *id})
	case "unfreeze":
		a, err = cl.UnfreezeAccount(ctx, &tallyv1.UnfreezeAccountRequest{AccountId: *id})
	case "close":
		a, err = cl.CloseAccount(ctx, &tallyv1.CloseAccountRequest{AccountId: *id})
	case "update":
		req := &tallyv1.UpdateAccountRequest{AccountId: *id, UpdateMetadata: *replace}
		if *limit >= 0 {
			req.CreditLimit = limit
		}
		switch *threshold {
		case "":
		case "none":
			req.ClearLowBalanceThreshold = true
		default:
			var v int64
			if _, serr := fmt.Sscan(*threshold, &v); serr != nil {
				return fmt.Errorf("--low-balance-threshold wants an integer or none")
			}
			req.LowBalanceThreshold = &v
		}
		if *replace {
			if req.Metadata, err = parseMeta(meta); err != nil {
				return err
			}
		} else if len(meta) > 0 {
			return fmt.Errorf("--meta needs --replace-meta (metadata is replaced as a whole)")
		}
		a, err = cl.UpdateAccount(ctx, req)
	default:
		return errUsage
	}
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, a)
	}
	table(out, accountHeader, accountRow(a))
	return nil
}

func balances(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally balances", flag.ContinueOnError)
	c.register(fs)
	var ids multi
	fs.Var(&ids, "account", "account id (repeatable)")
	file := fs.String("file", "", "file of account ids, one per line")
	at := fs.String("at", "", "balances at this instant (RFC 3339), e.g. month-end")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *file != "" {
		b, err := os.ReadFile(*file)
		if err != nil {
			return err
		}
		for _, l := range strings.Fields(string(b)) {
			ids = append(ids, l)
		}
	}
	ts, err := parseAt(*at)
	if err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	res, err := cl.GetBalances(ctx, &tallyv1.GetBalancesRequest{AccountIds: ids, At: ts})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, res)
	}
	rows := make([]string, 0, len(res.GetBalances()))
	for _, b := range res.GetBalances() {
		rows = append(rows, balanceRow(b))
	}
	table(out, balanceHeader, rows...)
	return nil
}

const balanceHeader = "ACCOUNT\tCURRENCY\tBALANCE\tHELD\tAVAILABLE\tCREDIT_LIMIT\tVERSION\tSOURCE\tAS_OF\tFINAL"

func balanceRow(b *tallyv1.Balance) string {
	return fmt.Sprintf("%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%v", b.GetAccountId(), b.GetCurrency(), b.GetBalance(), b.GetHeld(),
		b.GetAvailable(), b.GetCreditLimit(), b.GetVersion(), enumName(b.GetSource(), "BALANCE_SOURCE_"),
		b.GetAsOf().AsTime().Format(time.RFC3339Nano), b.GetFinal())
}
