// Command tally is a small client for the Tally ledger.
//
//	tally account create --currency USD [--type customer|revenue|funding] [--external-ref R] [--credit-limit N] [--id UUID] [--quiet]
//	tally account get    --account ID
//	tally account find   [--external-ref R] [--currency C] [--type T]
//	tally credit   --account ID --amount N --key K [--funding ID] [--description D]
//	tally charge   --account ID --amount N --key K [--revenue ID] [--description D]
//	tally transfer create --from ID --to ID --amount N --key K
//	tally transfer get (--id ID | --key K [--client-id C])
//	tally account freeze|unfreeze|close --account ID
//	tally account update --account ID [--credit-limit N] [--low-balance-threshold N|none] [--replace-meta --meta k=v ...]
//	tally refund   --transfer CHARGE_ID [--amount N] --key K [--reason R]
//	tally hold create  --account ID --amount N --key K [--expires-in D | --expires-at T] [--revenue ID]
//	tally hold capture --hold ID [--amount N] --key K
//	tally hold release --hold ID --key K
//	tally hold get     --hold ID
//	tally batch    --mode atomic|independent --key K [--file ops.jsonl]
//	tally balance  --account ID [--strong] [--min-version N] [--at T]
//	tally balances --account ID ... | --file IDS [--at T]
//	tally entries  --account ID [--page-size N] [--all] [--kind charge,refund,...] [--since T] [--until T]
//	tally export   [--since CURSOR] [--format jsonl|csv] [--out FILE] [--follow]
//	tally show     (--account ID | --external-ref R) [--entries 20]
//	tally reconcile [--account ID ...] [--repair-cache] [--external FILE.csv] [--json]
//	tally usage    [--from DAY] [--to DAY] [--account ID | --external-ref R] [--group-by product,month,...]
//	tally topup set --account ID --threshold N --target N --amount-max N --per-day-max N --customer C --payment-method PM
//	tally topup get|list --account ID
//	tally bench    --scenario S [--clients N] [--duration D] [--warmup D] [--accounts N] [--json]
//
// Every command takes --addr (TALLY_ADDR), --api-key (TALLY_API_KEY),
// --tls/--tls-ca/--tls-cert/--tls-key and --json. Money-moving commands retry UNAVAILABLE and DEADLINE_EXCEEDED with
// the same idempotency key (package api/client); a missing --key gets a
// fresh one, printed so the call can be repeated safely.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/internal/flagenv"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

const usageText = `usage: tally <command> [flags]

commands:
  account create|get|find   manage accounts
  account freeze|unfreeze|close|update
                            account lifecycle (recorded with who did it)
  credit                    top up an account (debits the funding account)
  charge                    charge an account (credits the revenue account)
  refund                    refund all or part of a charge
  hold create|capture|release|get
                            reserve funds, then charge or free them
  batch                     submit up to 1,000 operations, atomic or independent
  transfer create|get       move money between accounts / look up a transfer or key
  balance                   read a balance (now, or --at an instant)
  balances                  read many balances at once (e.g. month-end)
  entries                   list an account's statement
  export                    write the change feed (JSON lines or CSV) from a cursor
  show                      a customer at a glance: balance, held, available, latest entries
  reconcile                 prove the books add up (and compare an external CSV); exit 1 on any mismatch
  usage                     spend breakdown: charges minus refunds by metadata key, revenue account, day or month
  bench                     load-test a running tallyd (throughput, latency, batch sizes)
  bench-usage               time SummarizeUsage against filled rollups (bench/usage.sh)
  topup set|get|list        an account's auto top-up rule (tallyd --topup-provider) and its top-ups

Common flags: --addr ($TALLY_ADDR, default 127.0.0.1:7070), --api-key ($TALLY_API_KEY),
--tls-ca/--tls-cert/--tls-key (TLS and mTLS), --json, --timeout. Run "tally <command> -h" for more.
`

type common struct {
	addr    string
	apiKey  string
	json    bool
	timeout time.Duration
	retries int
	tlsCA   string
	tlsCert string
	tlsKey  string
	tls     bool
}

func (c *common) register(fs *flag.FlagSet) {
	fs.StringVar(&c.addr, "addr", client.AddrDefault, "tallyd gRPC address")
	fs.StringVar(&c.apiKey, "api-key", "", "API key")
	fs.BoolVar(&c.json, "json", false, "print JSON")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "overall deadline, retries included")
	fs.IntVar(&c.retries, "retry-attempts-max", client.RetryAttemptsMaxDefault, "attempts per call, the first included")
	fs.BoolVar(&c.tls, "tls", false, "connect with TLS, trusting the system's CAs (implied by --tls-ca)")
	fs.StringVar(&c.tlsCA, "tls-ca", "", "PEM CA bundle to verify tallyd's certificate (implies --tls)")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "PEM client certificate, for a tallyd that requires one (mTLS)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "PEM private key of --tls-cert")
}

// dialOptions returns the transport credentials the flags ask for (none:
// plaintext, the client package's default).
func (c *common) dialOptions() ([]grpc.DialOption, error) {
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
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return nil, errors.New("--tls-cert and --tls-key go together")
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

func main() {
	err := run(os.Args[1:], os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "tally:", describe(err))
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func describe(err error) string {
	if errors.Is(err, errUsage) {
		return strings.TrimSpace(usageText)
	}
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	s := fmt.Sprintf("%s: %s", st.Code(), st.Message())
	if info, ok := api.ErrorInfo(err); ok {
		s = fmt.Sprintf("%s %s: %s", st.Code(), info.GetReason(), st.Message())
		if info.GetMetadata()["replayed"] == "true" {
			s += " (replayed: this key's stored outcome)"
		}
	}
	return s
}

func run(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errUsage
	}
	cmd, rest := args[0], args[1:]
	if (cmd == "account" || cmd == "transfer" || cmd == "hold" || cmd == "topup") && len(rest) > 0 && !strings.HasPrefix(rest[0], "-") {
		cmd, rest = cmd+" "+rest[0], rest[1:]
	}
	switch cmd {
	case "account create":
		return accountCreate(rest, out)
	case "account get":
		return accountGet(rest, out)
	case "account find":
		return accountFind(rest, out)
	case "credit":
		return move(rest, out, "credit")
	case "charge":
		return move(rest, out, "charge")
	case "transfer create":
		return move(rest, out, "transfer")
	case "transfer get":
		return transferGet(rest, out)
	case "balance":
		return balance(rest, out)
	case "entries":
		return entries(rest, out)
	case "bench":
		return benchCmd(rest, out)
	case "account freeze", "account unfreeze", "account close", "account update":
		return accountChange(strings.TrimPrefix(cmd, "account "), rest, out)
	case "refund":
		return refund(rest, out)
	case "hold create", "hold capture", "hold release", "hold get":
		return holdCmd(strings.TrimPrefix(cmd, "hold "), rest, out)
	case "batch":
		return batch(rest, os.Stdin, out)
	case "balances":
		return balances(rest, out)
	case "export":
		return export(rest, out)
	case "reconcile":
		return reconcile(rest, out)
	case "show":
		return show(rest, out)
	case "usage":
		return usageCmd(rest, out)
	case "bench-usage":
		return benchUsageCmd(rest, out)
	case "topup set", "topup get", "topup list":
		return topupCmd(strings.TrimPrefix(cmd, "topup "), rest, out)
	}
	return errUsage
}

func connect(c *common) (*client.Client, context.Context, context.CancelFunc, error) {
	p := client.DefaultPolicy()
	p.RetryAttemptsMax = c.retries
	opts, err := c.dialOptions()
	if err != nil {
		return nil, nil, nil, err
	}
	cl, err := client.New(client.Config{Addr: c.addr, APIKey: c.apiKey, Policy: p, DialOptions: opts})
	if err != nil {
		return nil, nil, nil, err
	}
	if c.timeout <= 0 {
		// No overall deadline (long jobs); Ctrl-C still stops the process.
		ctx, cancel := context.WithCancel(context.Background())
		return cl, ctx, cancel, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	return cl, ctx, cancel, nil
}

func parse(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(os.Stderr)
	return flagenv.Parse(fs, args)
}

func printJSON(out io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	// protojson varies its whitespace on purpose; re-indent so the output is
	// stable for scripts.
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		return err
	}
	_, err = fmt.Fprintln(out, buf.String())
	return err
}

func table(out io.Writer, header string, rows ...string) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, r)
	}
	tw.Flush()
}

func enumName(s fmt.Stringer, prefix string) string {
	return strings.TrimPrefix(s.String(), prefix)
}

func accountRow(a *tallyv1.Account) string {
	return fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%s\t%s", a.GetAccountId(), a.GetCurrency(),
		enumName(a.GetType(), "ACCOUNT_TYPE_"), enumName(a.GetFloor(), "FLOOR_"), a.GetCreditLimit(),
		enumName(a.GetStatus(), "ACCOUNT_STATUS_"), a.GetExternalRef())
}

const accountHeader = "ACCOUNT\tCURRENCY\tTYPE\tFLOOR\tCREDIT_LIMIT\tSTATUS\tEXTERNAL_REF"

func parseMeta(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("--meta wants key=value, got %q", kv)
		}
		m[k] = v
	}
	return m, nil
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(s string) error { *m = append(*m, s); return nil }

func accountCreate(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally account create", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("id", "", "account id (UUID); default: a new UUIDv7, which makes retries safe")
	currency := fs.String("currency", "", "currency code, e.g. USD")
	typ := fs.String("type", "customer", "customer, revenue or funding")
	ref := fs.String("external-ref", "", "the customer's id in your system")
	floor := fs.String("floor", "", "non_negative or none (default by type)")
	limit := fs.Int64("credit-limit", 0, "how far below zero a non_negative account may go")
	quiet := fs.Bool("quiet", false, "print only the account id")
	var meta multi
	fs.Var(&meta, "meta", "metadata key=value (repeatable)")
	if err := parse(fs, args); err != nil {
		return err
	}
	md, err := parseMeta(meta)
	if err != nil {
		return err
	}
	req := &tallyv1.CreateAccountRequest{
		AccountId: *id, Currency: *currency, ExternalRef: *ref, CreditLimit: *limit, Metadata: md,
		Type:  tallyv1.AccountType(tallyv1.AccountType_value["ACCOUNT_TYPE_"+strings.ToUpper(*typ)]),
		Floor: tallyv1.Floor(tallyv1.Floor_value["FLOOR_"+strings.ToUpper(*floor)]),
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	a, err := cl.CreateAccount(ctx, req)
	if err != nil {
		return err
	}
	if *quiet {
		_, err := fmt.Fprintln(out, a.GetAccountId())
		return err
	}
	if c.json {
		return printJSON(out, a)
	}
	table(out, accountHeader, accountRow(a))
	return nil
}

func accountGet(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally account get", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("account", "", "account id")
	if err := parse(fs, args); err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	a, err := cl.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: *id})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, a)
	}
	table(out, accountHeader, accountRow(a))
	return nil
}

func accountFind(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally account find", flag.ContinueOnError)
	c.register(fs)
	ref := fs.String("external-ref", "", "external ref")
	currency := fs.String("currency", "", "currency")
	typ := fs.String("type", "", "customer, revenue or funding")
	size := fs.Int("page-size", 100, "page size")
	token := fs.String("page-token", "", "page token from a previous call")
	if err := parse(fs, args); err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	resp, err := cl.FindAccounts(ctx, &tallyv1.FindAccountsRequest{
		ExternalRef: *ref, Currency: *currency, PageSize: int32(*size), PageToken: *token,
		Type: tallyv1.AccountType(tallyv1.AccountType_value["ACCOUNT_TYPE_"+strings.ToUpper(*typ)]),
	})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, resp)
	}
	rows := make([]string, 0, len(resp.GetAccounts()))
	for _, a := range resp.GetAccounts() {
		rows = append(rows, accountRow(a))
	}
	table(out, accountHeader, rows...)
	if resp.GetNextPageToken() != "" {
		fmt.Fprintln(out, "next page: --page-token", resp.GetNextPageToken())
	}
	return nil
}

func move(args []string, out io.Writer, kind string) error {
	var c common
	fs := flag.NewFlagSet("tally "+kind, flag.ContinueOnError)
	c.register(fs)
	acct := fs.String("account", "", "account id")
	from := fs.String("from", "", "debit account id (transfer)")
	to := fs.String("to", "", "credit account id (transfer)")
	amount := fs.Int64("amount", 0, "amount in minor units")
	key := fs.String("key", "", "idempotency key (default: a fresh one, printed)")
	desc := fs.String("description", "", "description")
	counter := fs.String("revenue", "", "revenue account (charge; default: the currency's)")
	funding := fs.String("funding", "", "funding account (credit; default: the currency's)")
	var meta multi
	fs.Var(&meta, "meta", "metadata key=value (repeatable)")
	if err := parse(fs, args); err != nil {
		return err
	}
	md, err := parseMeta(meta)
	if err != nil {
		return err
	}
	if *key == "" {
		*key = client.NewIdempotencyKey()
		fmt.Fprintln(os.Stderr, "idempotency key:", *key)
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	var res *tallyv1.TransferResult
	switch kind {
	case "charge":
		res, err = cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: *acct, Amount: *amount, IdempotencyKey: *key,
			Description: *desc, Metadata: md, RevenueAccountId: *counter})
	case "credit":
		res, err = cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: *acct, Amount: *amount, IdempotencyKey: *key,
			Description: *desc, Metadata: md, FundingAccountId: *funding})
	default:
		res, err = cl.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: *from, CreditAccountId: *to, Amount: *amount,
			IdempotencyKey: *key, Description: *desc, Metadata: md})
	}
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, res)
	}
	printTransferResult(out, res)
	return nil
}

func transferGet(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally transfer get", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("id", "", "transfer id")
	key := fs.String("key", "", "idempotency key")
	clientID := fs.String("client-id", "", "with --key: look in this client's key scope (default: the caller's own)")
	if err := parse(fs, args); err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	t, err := cl.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: *id, IdempotencyKey: *key, ClientId: *clientID})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, t)
	}
	table(out, "TRANSFER\tKIND\tDEBIT\tCREDIT\tAMOUNT\tKEY\tCREATED\tCREATED_BY\tREFUNDED",
		fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", t.GetTransferId(), enumName(t.GetKind(), "TRANSFER_KIND_"),
			t.GetDebitAccountId(), t.GetCreditAccountId(), money(t.GetAmount(), t.GetCurrency()), t.GetIdempotencyKey(),
			t.GetCreatedAt().AsTime().Format(time.RFC3339Nano), createdBy(t.GetCreatedByClientId(), t.GetCreatedByKeyId()),
			money(t.GetRefundedAmount(), t.GetCurrency())))
	if t.GetRefundOf() != "" {
		fmt.Fprintln(out, "refund of charge", t.GetRefundOf())
	}
	if t.GetHoldId() != "" {
		fmt.Fprintln(out, "captured from hold", t.GetHoldId())
	}
	return nil
}

// createdBy renders the audit trail: "client/key", or "-" for a transfer
// made without authentication.
func createdBy(clientID, keyID string) string {
	if clientID == "" {
		return "-"
	}
	return clientID + "/" + keyID
}

func balance(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally balance", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("account", "", "account id")
	strong := fs.Bool("strong", false, "read PostgreSQL, not the cache")
	minVersion := fs.Int64("min-version", 0, "never return an older version than this")
	at := fs.String("at", "", "the balance at this instant (RFC 3339), from entries")
	if err := parse(fs, args); err != nil {
		return err
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
	cons := tallyv1.Consistency_CONSISTENCY_CACHED
	if *strong || ts != nil {
		cons = tallyv1.Consistency_CONSISTENCY_STRONG
	}
	b, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: *id, Consistency: cons, MinVersion: *minVersion, At: ts})
	if err != nil {
		return err
	}
	if c.json {
		return printJSON(out, b)
	}
	table(out, balanceHeader, balanceRow(b))
	return nil
}

func entries(args []string, out io.Writer) error {
	var c common
	fs := flag.NewFlagSet("tally entries", flag.ContinueOnError)
	c.register(fs)
	id := fs.String("account", "", "account id")
	size := fs.Int("page-size", 100, "entries per page")
	token := fs.String("page-token", "", "page token from a previous call")
	all := fs.Bool("all", false, "follow page tokens to the end (at most --pages-max pages)")
	pagesMax := fs.Int("pages-max", 1000, "most pages --all fetches")
	kindList := fs.String("kind", "", "only these transfer kinds, comma-separated: charge, credit, transfer, refund")
	since := fs.String("since", "", "only entries at or after this instant (RFC 3339)")
	until := fs.String("until", "", "only entries before this instant (RFC 3339)")
	if err := parse(fs, args); err != nil {
		return err
	}
	var kinds []tallyv1.TransferKind
	for _, k := range strings.Split(*kindList, ",") {
		if k = strings.TrimSpace(k); k == "" {
			continue
		}
		v, ok := tallyv1.TransferKind_value["TRANSFER_KIND_"+strings.ToUpper(k)]
		if !ok {
			return fmt.Errorf("--kind: unknown kind %q", k)
		}
		kinds = append(kinds, tallyv1.TransferKind(v))
	}
	start, err := parseAt(*since)
	if err != nil {
		return err
	}
	end, err := parseAt(*until)
	if err != nil {
		return err
	}
	cl, ctx, cancel, err := connect(&c)
	if err != nil {
		return err
	}
	defer cancel()
	defer cl.Close()
	var list []*tallyv1.Entry
	next := *token
	for page := 0; page < *pagesMax; page++ {
		resp, err := cl.ListEntries(ctx, &tallyv1.ListEntriesRequest{AccountId: *id, PageSize: int32(*size), PageToken: next,
			Kinds: kinds, StartTime: start, EndTime: end})
		if err != nil {
			return err
		}
		list = append(list, resp.GetEntries()...)
		next = resp.GetNextPageToken()
		if !*all || next == "" {
			break
		}
	}
	if c.json {
		return printJSON(out, &tallyv1.ListEntriesResponse{Entries: list, NextPageToken: next})
	}
	rows := make([]string, 0, len(list))
	for _, e := range list {
		rows = append(rows, fmt.Sprintf("%d\t%s\t%s\t%d\t%d\t%d\t%s\t%s", e.GetSequence(), e.GetTransferId(),
			enumName(e.GetKind(), "TRANSFER_KIND_"), e.GetAmount(), e.GetBalanceAfter(), e.GetVersionAfter(),
			e.GetCreatedAt().AsTime().Format(time.RFC3339Nano), createdBy(e.GetCreatedByClientId(), e.GetCreatedByKeyId())))
	}
	table(out, "SEQ\tTRANSFER\tKIND\tAMOUNT\tBALANCE_AFTER\tVERSION\tCREATED\tCREATED_BY", rows...)
	if next != "" {
		fmt.Fprintln(out, "next page: --page-token", next)
	}
	return nil
}
