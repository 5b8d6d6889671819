package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

var transferKinds = protoEnum(tallyv1.TransferKind_value, "TRANSFER_KIND_")

type balanceOpts struct {
	account, atText string
	strong          bool
	minVersion      int64
	at              *timestamppb.Timestamp
}

// Validate parses --at.
func (o *balanceOpts) Validate() (err error) {
	o.at, err = parseAt("at", o.atText)
	return err
}

func (a *app) newBalanceCmd() *cobra.Command {
	o := &balanceOpts{}
	cmd := &cobra.Command{Use: "balance", Short: "Read a balance (now, or --at an instant)", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.BoolVar(&o.strong, "strong", false, "read PostgreSQL, not the cache")
	f.Int64Var(&o.minVersion, "min-version", 0, "never return an older version than this")
	f.StringVar(&o.atText, "at", "", "the balance at this instant (RFC 3339), from entries")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *balanceOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	cons := tallyv1.Consistency_CONSISTENCY_CACHED
	if o.strong || o.at != nil {
		cons = tallyv1.Consistency_CONSISTENCY_STRONG
	}
	b, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: o.account, Consistency: cons, MinVersion: o.minVersion, At: o.at})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, b)
	}
	table(a.out, balanceHeader, balanceRow(b))
	return nil
}

type balancesOpts struct {
	accounts     []string
	file, atText string
	at           *timestamppb.Timestamp
}

// Validate parses --at.
func (o *balancesOpts) Validate() (err error) {
	o.at, err = parseAt("at", o.atText)
	return err
}

func (a *app) newBalancesCmd() *cobra.Command {
	o := &balancesOpts{}
	cmd := &cobra.Command{Use: "balances", Short: "Read many balances at once (e.g. month-end)", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringArrayVar(&o.accounts, "account", nil, "account id (repeatable)")
	f.StringVar(&o.file, "file", "", "file of account ids, one per line")
	f.StringVar(&o.atText, "at", "", "balances at this instant (RFC 3339), e.g. month-end")
	cmd.MarkFlagsOneRequired("account", "file")
	a.conn.register(cmd)
	return cmd
}

func (o *balancesOpts) run(a *app) error {
	if o.file != "" {
		b, err := os.ReadFile(o.file)
		if err != nil {
			return err
		}
		o.accounts = append(o.accounts, strings.Fields(string(b))...)
	}
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	res, err := cl.GetBalances(ctx, &tallyv1.GetBalancesRequest{AccountIds: o.accounts, At: o.at})
	if err != nil {
		return err
	}
	if a.conn.json {
		return printJSON(a.out, res)
	}
	rows := make([]string, 0, len(res.GetBalances()))
	for _, b := range res.GetBalances() {
		rows = append(rows, balanceRow(b))
	}
	table(a.out, balanceHeader, rows...)
	return nil
}

type entriesOpts struct {
	account, pageToken string
	pageSize, pagesMax int
	all                bool
	kinds              []string
	since, until       string
	req                *tallyv1.ListEntriesRequest
}

// Validate builds the first page's request from the flags.
func (o *entriesOpts) Validate() error {
	req := &tallyv1.ListEntriesRequest{AccountId: o.account, PageSize: int32(o.pageSize), PageToken: o.pageToken}
	for _, k := range o.kinds {
		req.Kinds = append(req.Kinds, tallyv1.TransferKind(tallyv1.TransferKind_value["TRANSFER_KIND_"+strings.ToUpper(k)]))
	}
	var err error
	if req.StartTime, err = parseAt("since", o.since); err != nil {
		return err
	}
	if req.EndTime, err = parseAt("until", o.until); err != nil {
		return err
	}
	o.req = req
	return nil
}

func (a *app) newEntriesCmd() *cobra.Command {
	o := &entriesOpts{}
	cmd := &cobra.Command{Use: "entries", Short: "List an account's entries, oldest first", Args: cobra.NoArgs, RunE: a.runE(o)}
	f := cmd.Flags()
	f.StringVar(&o.account, "account", "", "account id")
	f.IntVar(&o.pageSize, "page-size", 100, "entries per page")
	f.StringVar(&o.pageToken, "page-token", "", "page token from a previous call")
	f.BoolVar(&o.all, "all", false, "follow page tokens to the end (at most --pages-max pages)")
	f.IntVar(&o.pagesMax, "pages-max", 1000, "most pages --all fetches")
	enumListFlag(cmd, &o.kinds, "kind", transferKinds, "only these transfer kinds, comma-separated")
	f.StringVar(&o.since, "since", "", "only entries at or after this instant (RFC 3339)")
	f.StringVar(&o.until, "until", "", "only entries before this instant (RFC 3339)")
	require(cmd, "account")
	a.conn.register(cmd)
	return cmd
}

func (o *entriesOpts) run(a *app) error {
	cl, ctx, err := a.client()
	if err != nil {
		return err
	}
	var list []*tallyv1.Entry
	for page := 0; page < o.pagesMax; page++ {
		resp, err := cl.ListEntries(ctx, o.req)
		if err != nil {
			return err
		}
		list = append(list, resp.GetEntries()...)
		o.req.PageToken = resp.GetNextPageToken()
		if !o.all || o.req.PageToken == "" {
			break
		}
	}
	next := o.req.PageToken
	if a.conn.json {
		return printJSON(a.out, &tallyv1.ListEntriesResponse{Entries: list, NextPageToken: next})
	}
	rows := make([]string, 0, len(list))
	for _, e := range list {
		rows = append(rows, fmt.Sprintf("%d\t%s\t%s\t%d\t%d\t%d\t%s\t%s", e.GetSequence(), e.GetTransferId(),
			enumName(e.GetKind(), "TRANSFER_KIND_"), e.GetAmount(), e.GetBalanceAfter(), e.GetVersionAfter(),
			e.GetCreatedAt().AsTime().Format(time.RFC3339Nano), createdBy(e.GetCreatedByClientId(), e.GetCreatedByKeyId())))
	}
	table(a.out, "SEQ\tTRANSFER\tKIND\tAMOUNT\tBALANCE_AFTER\tVERSION\tCREATED\tCREATED_BY", rows...)
	if next != "" {
		fmt.Fprintln(a.out, "next page: --page-token", next)
	}
	return nil
}
