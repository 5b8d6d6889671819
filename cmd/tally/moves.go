package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// moveOpts are the options of credit, charge and transfer create.
type moveOpts struct {
	kind              string // credit, charge or transfer
	account, from, to string
	amount            int64
	key, description  string
	revenue, funding  string
	meta              []string
	metadata          map[string]string
}

// Validate parses --meta.
func (o *moveOpts) Validate() (err error) {
	o.metadata, err = parseMeta(o.meta)
	return err
}

// flags defines the flags credit, charge and transfer create share.
func (o *moveOpts) flags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.Int64Var(&o.amount, "amount", 0, "amount in minor units")
	f.StringVar(&o.key, "key", "", "idempotency key (default: a fresh one, printed)")
	f.StringVar(&o.description, "description", "", "description")
	f.StringArrayVar(&o.meta, "meta", nil, "metadata key=value (repeatable)")
	require(cmd, "amount")
}

func (a *app) newCreditCmd() *cobra.Command {
	o := &moveOpts{kind: "credit"}
	cmd := &cobra.Command{Use: "credit", Short: "Top up an account (debits the funding account)", Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally credit --account \"$ACCT\" --amount 1000 --key topup-1"}
	cmd.Flags().StringVar(&o.account, "account", "", "account id")
	cmd.Flags().StringVar(&o.funding, "funding", "", "funding account (default: the currency's)")
	o.flags(cmd)
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (a *app) newChargeCmd() *cobra.Command {
	o := &moveOpts{kind: "charge"}
	cmd := &cobra.Command{Use: "charge", Short: "Charge an account (credits the revenue account)", Args: cobra.NoArgs, RunE: a.runE(o),
		Example: "  tally charge --account \"$ACCT\" --amount 250 --key order-1 --meta product=api"}
	cmd.Flags().StringVar(&o.account, "account", "", "account id")
	cmd.Flags().StringVar(&o.revenue, "revenue", "", "revenue account (default: the currency's)")
	o.flags(cmd)
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (a *app) newTransferCmd() *cobra.Command {
	cmd := group(&cobra.Command{Use: "transfer", Short: "Move money between accounts, or look up a transfer or key"})
	o := &moveOpts{kind: "transfer"}
	create := &cobra.Command{Use: "create", Short: "Move money from one account to another", Args: cobra.NoArgs, RunE: a.runE(o)}
	create.Flags().StringVar(&o.from, "from", "", "debit account id")
	create.Flags().StringVar(&o.to, "to", "", "credit account id")
	o.flags(create)
	require(create, "from", "to")
	a.conn.register(create)
	cmd.AddCommand(create, a.newTransferGetCmd())
	return cmd
}

func (o *moveOpts) run(a *app) error {
	a.keyOrNew(&o.key)
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	var res *tallyv1.TransferResult
	switch o.kind {
	case "charge":
		res, err = cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: o.account, Amount: o.amount, IdempotencyKey: o.key,
			Description: o.description, Metadata: o.metadata, RevenueAccountId: o.revenue})
	case "credit":
		res, err = cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: o.account, Amount: o.amount, IdempotencyKey: o.key,
			Description: o.description, Metadata: o.metadata, FundingAccountId: o.funding})
	default:
		res, err = cl.Transfer(ctx, &tallyv1.TransferRequest{DebitAccountId: o.from, CreditAccountId: o.to, Amount: o.amount,
			IdempotencyKey: o.key, Description: o.description, Metadata: o.metadata})
	}
	if err != nil {
		return err
	}
	return a.printTransferResult(res)
}

type transferGetOpts struct{ id, key, clientID string }

// Validate checks that --client-id comes with --key.
func (o *transferGetOpts) Validate() error {
	if o.clientID != "" && o.key == "" {
		return errors.New("--client-id needs --key")
	}
	return nil
}

func (a *app) newTransferGetCmd() *cobra.Command {
	o := &transferGetOpts{}
	cmd := &cobra.Command{Use: "get", Short: "Look up a transfer by id or idempotency key", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.id, "id", "", "transfer id")
	f.StringVar(&o.key, "key", "", "idempotency key")
	f.StringVar(&o.clientID, "client-id", "", "with --key: look in this client's key scope (default: the caller's own)")
	cmd.MarkFlagsOneRequired("id", "key")
	cmd.MarkFlagsMutuallyExclusive("id", "key")
	a.conn.register(cmd)
	return cmd
}

func (o *transferGetOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	t, err := cl.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: o.id, IdempotencyKey: o.key, ClientId: o.clientID})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, t)
	}
	table(a.out, "TRANSFER\tKIND\tDEBIT\tCREDIT\tAMOUNT\tKEY\tCREATED\tCREATED_BY\tREFUNDED",
		fmt.Sprintf("%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", t.GetTransferId(), enumName(t.GetKind(), "TRANSFER_KIND_"),
			t.GetDebitAccountId(), t.GetCreditAccountId(), money(t.GetAmount(), t.GetCurrency()), t.GetIdempotencyKey(),
			t.GetCreatedAt().AsTime().Format(time.RFC3339Nano), createdBy(t.GetCreatedByClientId(), t.GetCreatedByKeyId()),
			money(t.GetRefundedAmount(), t.GetCurrency())))
	if t.GetRefundOf() != "" {
		fmt.Fprintln(a.out, "refund of charge", t.GetRefundOf())
	}
	if t.GetHoldId() != "" {
		fmt.Fprintln(a.out, "captured from hold", t.GetHoldId())
	}
	return nil
}

type refundOpts struct {
	transfer, key, reason string
	amount                int64
}

// Validate has nothing to check: cobra enforces --transfer, the server the
// amount.
func (o *refundOpts) Validate() error { return nil }

func (a *app) newRefundCmd() *cobra.Command {
	o := &refundOpts{}
	cmd := &cobra.Command{Use: "refund", Short: "Refund all or part of a charge", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.transfer, "transfer", "", "the CHARGE to refund")
	f.Int64Var(&o.amount, "amount", 0, "amount in minor units (0: all that remains refundable)")
	f.StringVar(&o.key, "key", "", "idempotency key (default: a fresh one, printed)")
	f.StringVar(&o.reason, "reason", "", "why (stored as the refund's description)")
	require(cmd, "transfer")
	a.conn.register(cmd)
	return cmd
}

func (o *refundOpts) run(a *app) error {
	a.keyOrNew(&o.key)
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	res, err := cl.Refund(ctx, &tallyv1.RefundRequest{TransferId: o.transfer, Amount: o.amount, IdempotencyKey: o.key, Reason: o.reason})
	if err != nil {
		return err
	}
	return a.printTransferResult(res)
}
