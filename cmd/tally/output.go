package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/tallyledger/tally/api/client"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

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

const accountHeader = "ACCOUNT\tCURRENCY\tTYPE\tFLOOR\tCREDIT_LIMIT\tSTATUS\tEXTERNAL_REF"

func accountRow(a *tallyv1.Account) string {
	return fmt.Sprintf("%s\t%s\t%s\t%s\t%d\t%s\t%s", a.GetAccountId(), a.GetCurrency(),
		enumName(a.GetType(), "ACCOUNT_TYPE_"), enumName(a.GetFloor(), "FLOOR_"), a.GetCreditLimit(),
		enumName(a.GetStatus(), "ACCOUNT_STATUS_"), a.GetExternalRef())
}

// printAccount prints an account as a table row, or JSON.
func (a *app) printAccount(acct *tallyv1.Account) error {
	if a.conn.json {
		return printJSON(a.out, acct)
	}
	table(a.out, accountHeader, accountRow(acct))
	return nil
}

const balanceHeader = "ACCOUNT\tCURRENCY\tBALANCE\tHELD\tAVAILABLE\tCREDIT_LIMIT\tVERSION\tSOURCE\tAS_OF\tFINAL"

func balanceRow(b *tallyv1.Balance) string {
	return fmt.Sprintf("%s\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%v", b.GetAccountId(), b.GetCurrency(), b.GetBalance(), b.GetHeld(),
		b.GetAvailable(), b.GetCreditLimit(), b.GetVersion(), enumName(b.GetSource(), "BALANCE_SOURCE_"),
		b.GetAsOf().AsTime().Format(time.RFC3339Nano), b.GetFinal())
}

// createdBy renders the audit trail: "client/key", or "-" for a transfer
// made without authentication.
func createdBy(clientID, keyID string) string {
	if clientID == "" {
		return "-"
	}
	return clientID + "/" + keyID
}

// printTransferResult prints a money movement's outcome, or JSON.
func (a *app) printTransferResult(res *tallyv1.TransferResult) error {
	if a.conn.json {
		return printJSON(a.out, res)
	}
	t, b := res.GetTransfer(), res.GetBalance()
	table(a.out, "TRANSFER\tKIND\tDEBIT\tCREDIT\tAMOUNT\tREPLAYED\tBALANCE\tHELD\tAVAILABLE\tVERSION\tTHRESHOLD_CROSSED",
		fmt.Sprintf("%s\t%s\t%s\t%s\t%d %s\t%v\t%d\t%d\t%d\t%d\t%v", t.GetTransferId(), enumName(t.GetKind(), "TRANSFER_KIND_"),
			t.GetDebitAccountId(), t.GetCreditAccountId(), t.GetAmount(), t.GetCurrency(), res.GetReplayed(),
			b.GetBalance(), b.GetHeld(), b.GetAvailable(), b.GetVersion(), res.GetThresholdCrossed()))
	return nil
}

// keyOrNew fills an empty idempotency key with a fresh one and prints it,
// so that the call can be repeated with it.
func (a *app) keyOrNew(key *string) {
	if *key == "" {
		*key = client.NewIdempotencyKey()
		fmt.Fprintln(a.errOut, "idempotency key:", *key)
	}
}
