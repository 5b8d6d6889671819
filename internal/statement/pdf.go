package statement

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"codeberg.org/go-pdf/fpdf"
)

// PDF layout: A4 landscape, widths of the line table's columns in mm.
var pdfColumns = []struct {
	title string
	width float64
	align string
}{
	{"When (UTC)", 38, "L"}, {"Kind", 20, "L"}, {"Description", 76, "L"}, {"Amount", 32, "R"},
	{"Balance", 32, "R"}, {"Transfer", 79, "L"},
}

// WritePDF writes a statement as a PDF: the account, the period, the
// currency, opening and closing balances in the currency's units, every
// line, the totals per kind, and "Page n of m" on every page.
func WritePDF(w io.Writer, st *Full) error {
	cur := st.GetCurrency()
	pdf := fpdf.New("L", "mm", "A4", "")
	pdf.SetTitle("Tally statement "+st.GetAccountId(), true)
	pdf.SetCreator("Tally", true)
	pdf.AliasNbPages("{nb}")
	tr := pdf.UnicodeTranslatorFromDescriptor("")
	pdf.SetFooterFunc(func() {
		pdf.SetY(-12)
		pdf.SetFont("Helvetica", "", 8)
		pdf.CellFormat(0, 6, fmt.Sprintf("Page %d of {nb}", pdf.PageNo()), "", 0, "C", false, 0, "")
	})
	first := true
	pdf.SetHeaderFunc(func() {
		if !first { // the first page's column titles follow the summary
			pdfTableHeader(pdf)
		}
	})
	pdf.AddPage()
	first = false
	pdfSummary(pdf, st, tr)
	pdf.SetFont("Helvetica", "", 8)
	for _, l := range st.GetLines() {
		cells := []string{
			l.GetCreatedAt().AsTime().UTC().Format("2006-01-02 15:04:05"), Kind(l.GetKind()), clip(l.GetDescription(), 48),
			Units(l.GetAmount(), cur), Units(l.GetRunningBalance(), cur), l.GetTransferId(),
		}
		for i, c := range pdfColumns {
			pdf.CellFormat(c.width, 5, tr(cells[i]), "B", 0, c.align, false, 0, "")
		}
		pdf.Ln(-1)
	}
	pdfTotals(pdf, st, tr)
	return pdf.Output(w)
}

// pdfSummary writes the statement's header block (first page only).
func pdfSummary(pdf *fpdf.Fpdf, st *Full, tr func(string) string) {
	cur := st.GetCurrency()
	pdf.SetFont("Helvetica", "B", 14)
	pdf.CellFormat(0, 8, "Account statement", "", 1, "L", false, 0, "")
	pdf.SetFont("Helvetica", "", 10)
	rows := [][2]string{{"Account", st.GetAccountId()}}
	if st.ExternalRef != "" {
		rows = append(rows, [2]string{"Customer", st.ExternalRef})
	}
	rows = append(rows, [2]string{"Currency", cur}, [2]string{"Period", Period(st.Statement) + " (to exclusive)"},
		[2]string{"Opening balance", Money(st.GetOpeningBalance(), cur)},
		[2]string{"Closing balance", Money(st.GetClosingBalance(), cur) + finalNote(st.Statement)},
		[2]string{"Lines", strconv.Itoa(len(st.GetLines()))})
	for _, r := range rows {
		pdf.CellFormat(40, 6, r[0], "", 0, "L", false, 0, "")
		pdf.CellFormat(0, 6, tr(r[1]), "", 1, "L", false, 0, "")
	}
	pdf.Ln(3)
	pdfTableHeader(pdf)
}

// pdfTableHeader writes the line table's column titles.
func pdfTableHeader(pdf *fpdf.Fpdf) {
	pdf.SetFont("Helvetica", "B", 8)
	for _, c := range pdfColumns {
		pdf.CellFormat(c.width, 6, c.title, "B", 0, c.align, false, 0, "")
	}
	pdf.Ln(-1)
	pdf.SetFont("Helvetica", "", 8)
}

// pdfTotals writes the totals per kind.
func pdfTotals(pdf *fpdf.Fpdf, st *Full, tr func(string) string) {
	cur := st.GetCurrency()
	pdf.Ln(4)
	pdf.SetFont("Helvetica", "B", 10)
	pdf.CellFormat(0, 6, "Totals", "", 1, "L", false, 0, "")
	pdf.SetFont("Helvetica", "", 9)
	for _, t := range st.GetTotals() {
		pdf.CellFormat(0, 5, tr(fmt.Sprintf("Total %s: %d lines, in %s, out %s", Kind(t.GetKind()), t.GetCount(),
			Money(t.GetCredits(), cur), Money(-t.GetDebits(), cur))), "", 1, "L", false, 0, "")
	}
}

// clip shortens s to n runes.
func clip(s string, n int) string {
	r := []rune(strings.ReplaceAll(s, "\n", " "))
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}
