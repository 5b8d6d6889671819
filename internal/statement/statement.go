// Package statement renders account statements (tally.v1.Statement) for
// people and programs: money in the currency's units, CSV, a text table and
// PDF. The CLI (tally statement) and the support console share it.
package statement

import (
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// currencyExponents are the ISO 4217 minor-unit exponents of common
// currencies; any other currency is shown in minor units.
var currencyExponents = map[string]int{
	"USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "NZD": 2, "SEK": 2, "NOK": 2, "DKK": 2,
	"PLN": 2, "CZK": 2, "INR": 2, "CNY": 2, "HKD": 2, "SGD": 2, "BRL": 2, "MXN": 2, "ZAR": 2, "ILS": 2,
	"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0,
	"BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3,
}

// Money renders minor units in the currency's units ("12.34 USD"), or as
// minor units for currencies without a known exponent ("1234 CREDITS").
func Money(minor int64, currency string) string {
	return Units(minor, currency) + " " + currency
}

// Units renders minor units in the currency's units without the code.
func Units(minor int64, currency string) string {
	exp, ok := currencyExponents[currency]
	if !ok || exp == 0 {
		return strconv.FormatInt(minor, 10)
	}
	neg := minor < 0
	u := uint64(minor)
	if neg {
		u = uint64(-minor) // two's complement also covers MinInt64
	}
	s := strconv.FormatUint(u, 10)
	if len(s) <= exp {
		s = strings.Repeat("0", exp-len(s)+1) + s
	}
	s = s[:len(s)-exp] + "." + s[len(s)-exp:]
	if neg {
		s = "-" + s
	}
	return s
}

// Full is a whole statement: the first page's header with every page's
// lines.
type Full struct {
	*tallyv1.Statement
	// ExternalRef is the account's external_ref, when known (for headers).
	ExternalRef string
}

// PagesMax bounds how many pages Collect reads.
const PagesMax = 10_000

// Collect reads every page of a statement with get (called with each page
// token, "" first) and returns them as one.
func Collect(ctx context.Context, get func(ctx context.Context, token string) (*tallyv1.Statement, error)) (*Full, error) {
	var full *tallyv1.Statement
	token := ""
	for i := 0; i < PagesMax; i++ {
		st, err := get(ctx, token)
		if err != nil {
			return nil, err
		}
		if full == nil {
			full = st
		} else {
			full.Lines = append(full.Lines, st.GetLines()...)
		}
		if token = st.GetNextPageToken(); token == "" {
			full.NextPageToken = ""
			return &Full{Statement: full}, nil
		}
	}
	return nil, fmt.Errorf("statement has more than %d pages: choose a shorter period", PagesMax)
}

// Kind names a transfer kind for people: "charge".
func Kind(k tallyv1.TransferKind) string {
	return strings.ToLower(strings.TrimPrefix(k.String(), "TRANSFER_KIND_"))
}

// CSVHeader is the first row of WriteCSV.
var CSVHeader = []string{"created_at", "kind", "description", "amount", "running_balance", "currency",
	"transfer_id", "created_by_client_id", "created_by_key_id", "shard_id", "sequence"}

// WriteCSV writes one row per line, amounts in minor units (exact, for
// programs), times in RFC 3339 UTC.
func WriteCSV(w io.Writer, st *tallyv1.Statement) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader); err != nil {
		return err
	}
	for _, l := range st.GetLines() {
		if err := cw.Write(CSVRow(st.GetCurrency(), l)); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

// CSVRow is the CSV row of a line.
func CSVRow(currency string, l *tallyv1.StatementLine) []string {
	return []string{
		l.GetCreatedAt().AsTime().UTC().Format(time.RFC3339Nano), Kind(l.GetKind()), l.GetDescription(),
		strconv.FormatInt(l.GetAmount(), 10), strconv.FormatInt(l.GetRunningBalance(), 10), currency,
		l.GetTransferId(), l.GetCreatedByClientId(), l.GetCreatedByKeyId(), l.GetShardId(), strconv.FormatInt(l.GetSequence(), 10),
	}
}

// Period renders a statement's period.
func Period(st *tallyv1.Statement) string {
	return st.GetFrom().AsTime().UTC().Format(time.RFC3339) + " to " + st.GetTo().AsTime().UTC().Format(time.RFC3339)
}

// WriteText writes a statement for a terminal: header, lines, totals.
func WriteText(w io.Writer, st *Full) error {
	cur := st.GetCurrency()
	fmt.Fprintf(w, "Statement  %s  %s\nPeriod     %s (to exclusive)\n", st.GetAccountId(), cur, Period(st.Statement))
	if st.ExternalRef != "" {
		fmt.Fprintf(w, "Customer   %s\n", st.ExternalRef)
	}
	fmt.Fprintf(w, "Opening    %s\n\n", Money(st.GetOpeningBalance(), cur))
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WHEN (UTC)\tKIND\tAMOUNT\tBALANCE\tDESCRIPTION\tTRANSFER")
	for _, l := range st.GetLines() {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", l.GetCreatedAt().AsTime().UTC().Format("2006-01-02 15:04:05"),
			Kind(l.GetKind()), Units(l.GetAmount(), cur), Units(l.GetRunningBalance(), cur), l.GetDescription(), l.GetTransferId())
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\nClosing    %s%s\n", Money(st.GetClosingBalance(), cur), finalNote(st.Statement))
	for _, t := range st.GetTotals() {
		fmt.Fprintf(w, "Total %-8s %d lines, in %s, out %s\n", Kind(t.GetKind()), t.GetCount(),
			Money(t.GetCredits(), cur), Money(-t.GetDebits(), cur))
	}
	return nil
}

func finalNote(st *tallyv1.Statement) string {
	if st.GetFinal() {
		return ""
	}
	return "  (not final: the period ends within the settle window)"
}
