package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/internal/statement"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// accountView is the account page.
type accountView struct {
	Account   *tallyv1.Account
	Balance   *tallyv1.Balance
	Type      string
	Statement *tallyv1.Statement
	// Holds are the open holds (the first page); MoreHolds says there are
	// more than shown.
	Holds     []*tallyv1.Hold
	MoreHolds bool
	// From and To are the period as RFC 3339 (exact, for the links);
	// FromDay and ToDay fill the form.
	From, To, FromDay, ToDay string
	// Next is the next page's token.
	Next string
	// CanChange: the role table lets this session freeze and unfreeze.
	CanChange, Frozen bool
	ReasonMax         int
}

// notices are the fixed messages a redirect may ask a page to show (the
// URL names one; no text from the URL is shown).
var notices = map[string]string{
	"frozen":   "The account is frozen. The change and its reason are recorded in account_changes.",
	"unfrozen": "The account is unfrozen. The change and its reason are recorded in account_changes.",
}

// account shows an account: balance (read STRONG from PostgreSQL), held,
// available, credit limit, status, threshold, and its statement for the
// chosen period, page by page.
func (c *Console) account(w http.ResponseWriter, r *http.Request, s *session) {
	id := r.PathValue("id")
	q := r.URL.Query()
	from, to, err := c.period(q)
	if err != nil {
		c.fail(w, r, s, http.StatusBadRequest, err.Error())
		return
	}
	ctx, cancel := c.call(r, s)
	defer cancel()
	acct, err := c.api.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: id})
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	bal, err := c.api.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: id, Consistency: tallyv1.Consistency_CONSISTENCY_STRONG})
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	holds, err := c.api.ListOpenHolds(ctx, &tallyv1.ListOpenHoldsRequest{AccountId: id, PageSize: int32(c.limits.PageSize)})
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	token := q.Get("page")
	if len(token) > 512 {
		c.fail(w, r, s, http.StatusBadRequest, "That page link is not valid.")
		return
	}
	st, err := c.api.GetStatement(ctx, statementRequest(id, from, to, c.limits.PageSize, token))
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	av := accountView{Account: acct, Balance: bal, Type: accountTypeName(acct.GetType()), Statement: st,
		From: from.Format(time.RFC3339Nano), To: to.Format(time.RFC3339Nano),
		FromDay: from.Format(time.DateOnly), ToDay: to.Format(time.DateOnly), ReasonMax: c.limits.ReasonBytesMax,
		CanChange: api.Allowed(tallyv1.LedgerService_FreezeAccount_FullMethodName, s.p.Role),
		Frozen:    acct.GetStatus() == tallyv1.AccountStatus_ACCOUNT_STATUS_FROZEN,
	}
	av.Next = st.GetNextPageToken()
	av.Holds, av.MoreHolds = holds.GetHolds(), holds.GetNextPageToken() != ""
	c.render(w, r, http.StatusOK, "account", view{Title: "Account " + id, Session: viewOf(s), Data: av, Notice: notices[q.Get("notice")]})
}

// statementCSV downloads the whole statement of the period as CSV.
func (c *Console) statementCSV(w http.ResponseWriter, r *http.Request, s *session) {
	full, ok := c.fullStatement(w, r, s)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "text/csv; charset=utf-8")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="statement-%s.csv"`, full.GetAccountId()))
	if err := statement.WriteCSV(w, full.Statement); err != nil {
		c.log.WarnContext(r.Context(), "console: writing CSV", "err", err.Error())
	}
}

// statementPDF downloads the whole statement of the period as PDF.
func (c *Console) statementPDF(w http.ResponseWriter, r *http.Request, s *session) {
	full, ok := c.fullStatement(w, r, s)
	if !ok {
		return
	}
	w.Header().Set("Content-Type", "application/pdf")
	w.Header().Set("Content-Disposition", fmt.Sprintf(`attachment; filename="statement-%s.pdf"`, full.GetAccountId()))
	if err := statement.WritePDF(w, full); err != nil {
		c.log.WarnContext(r.Context(), "console: writing PDF", "err", err.Error())
	}
}

// fullStatement reads every page of the period's statement, up to
// DownloadLinesMax lines.
func (c *Console) fullStatement(w http.ResponseWriter, r *http.Request, s *session) (*statement.Full, bool) {
	id := r.PathValue("id")
	from, to, err := c.period(r.URL.Query())
	if err != nil {
		c.fail(w, r, s, http.StatusBadRequest, err.Error())
		return nil, false
	}
	ctx, cancel := c.call(r, s)
	defer cancel()
	acct, err := c.api.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: id})
	if err != nil {
		c.apiError(w, r, s, err)
		return nil, false
	}
	lines := 0
	full, err := statement.Collect(ctx, func(ctx2 context.Context, tok string) (*tallyv1.Statement, error) {
		if lines > c.limits.DownloadLinesMax {
			return nil, errTooManyLines
		}
		st, err := c.api.GetStatement(ctx2, statementRequest(id, from, to, 0, tok))
		lines += len(st.GetLines())
		return st, err
	})
	if errors.Is(err, errTooManyLines) || (err == nil && len(full.GetLines()) > c.limits.DownloadLinesMax) {
		c.fail(w, r, s, http.StatusBadRequest, fmt.Sprintf("This period has more than %d lines; download a shorter period.", c.limits.DownloadLinesMax))
		return nil, false
	}
	if err != nil {
		c.apiError(w, r, s, err)
		return nil, false
	}
	full.ExternalRef = acct.GetExternalRef()
	return full, true
}

var errTooManyLines = errors.New("too many lines")

// statusChange is the freeze or unfreeze confirmation page.
type statusChange struct {
	Account        *tallyv1.Account
	Action, Reason string
}

// changeStatus freezes or unfreezes an account in two steps: the form
// (action and reason) shows a confirmation page; its confirmed POST makes
// the change through the API, which checks the role and records the
// reason with who in account_changes.
func (c *Console) changeStatus(w http.ResponseWriter, r *http.Request, s *session) {
	id := r.PathValue("id")
	action := r.PostFormValue("action")
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	if action != "freeze" && action != "unfreeze" {
		c.fail(w, r, s, http.StatusBadRequest, "Unknown action.")
		return
	}
	if !api.Allowed(tallyv1.LedgerService_FreezeAccount_FullMethodName, s.p.Role) {
		c.log.InfoContext(r.Context(), "console: status change refused by the role table", "key_id", s.p.KeyID, "role", string(s.p.Role))
		c.fail(w, r, s, http.StatusForbidden, "Your role ("+string(s.p.Role)+") may not freeze or unfreeze accounts.")
		return
	}
	if reason == "" || len(reason) > c.limits.ReasonBytesMax || !utf8.ValidString(reason) {
		c.fail(w, r, s, http.StatusBadRequest, fmt.Sprintf("A reason of at most %d bytes is required.", c.limits.ReasonBytesMax))
		return
	}
	ctx, cancel := c.call(r, s)
	defer cancel()
	if r.PostFormValue("confirm") != "yes" {
		acct, err := c.api.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: id})
		if err != nil {
			c.apiError(w, r, s, err)
			return
		}
		c.render(w, r, http.StatusOK, "confirm", view{Title: "Confirm", Session: viewOf(s),
			Data: statusChange{Account: acct, Action: action, Reason: reason}})
		return
	}
	var err error
	if action == "freeze" {
		_, err = c.api.FreezeAccount(ctx, &tallyv1.FreezeAccountRequest{AccountId: id, Reason: reason})
	} else {
		_, err = c.api.UnfreezeAccount(ctx, &tallyv1.UnfreezeAccountRequest{AccountId: id, Reason: reason})
	}
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	c.log.InfoContext(r.Context(), "console: account status changed", "account_id", id, "action", action, "key_id", s.p.KeyID)
	http.Redirect(w, r, "/accounts/"+url.PathEscape(id)+"?notice="+map[string]string{"freeze": "frozen", "unfreeze": "unfrozen"}[action], http.StatusSeeOther)
}

// transferView is the transfer page.
type transferView struct {
	T *tallyv1.Transfer
	// Refunds of a charge (the first page); MoreRefunds says there are more.
	Refunds     []*tallyv1.Transfer
	MoreRefunds bool
}

// transfer shows a transfer: both sides, kind, amount, key, who, when, the
// charge it refunds or how much of it was refunded, its hold.
func (c *Console) transfer(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := c.call(r, s)
	defer cancel()
	t, err := c.api.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: r.PathValue("id")})
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	tv := transferView{T: t}
	if t.GetKind() == tallyv1.TransferKind_TRANSFER_KIND_CHARGE && t.GetRefundedAmount() > 0 {
		rs, err := c.api.ListRefunds(ctx, &tallyv1.ListRefundsRequest{TransferId: t.GetTransferId(), PageSize: int32(c.limits.PageSize)})
		if err != nil {
			c.apiError(w, r, s, err)
			return
		}
		tv.Refunds, tv.MoreRefunds = rs.GetRefunds(), rs.GetNextPageToken() != ""
	}
	c.render(w, r, http.StatusOK, "transfer", view{Title: "Transfer " + t.GetTransferId(), Session: viewOf(s), Data: tv})
}

// hold shows a hold.
func (c *Console) hold(w http.ResponseWriter, r *http.Request, s *session) {
	ctx, cancel := c.call(r, s)
	defer cancel()
	h, err := c.api.GetHold(ctx, &tallyv1.GetHoldRequest{HoldId: r.PathValue("id")})
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	c.render(w, r, http.StatusOK, "hold", view{Title: "Hold " + h.GetHoldId(), Session: viewOf(s), Data: h})
}
