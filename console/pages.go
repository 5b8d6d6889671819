package console

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/auth"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// keyBytesMax bounds the API key a sign-in form may carry.
const keyBytesMax = 512

// signInPage shows the sign-in form with a fresh CSRF token.
func (c *Console) signInPage(w http.ResponseWriter, r *http.Request) {
	if s := c.sessionOf(r); s != nil {
		http.Redirect(w, r, "/", http.StatusSeeOther)
		return
	}
	c.showSignIn(w, r, http.StatusOK, "")
}

func (c *Console) showSignIn(w http.ResponseWriter, r *http.Request, code int, msg string) {
	tok := randomID()
	setCookie(w, r, signInCookie, tok, 600)
	v := view{Title: "Sign in", Error: msg, Data: tok}
	if r.URL.Query().Get("ended") != "" && msg == "" {
		v.Notice = "Your session ended (signed out, expired, or the key was revoked). Sign in again."
	}
	c.render(w, r, code, "signin", v)
}

// signIn exchanges an API key for a session.
func (c *Console) signIn(w http.ResponseWriter, r *http.Request) {
	ck, err := r.Cookie(signInCookie)
	if err != nil || !sameToken(r.PostFormValue("csrf"), ck.Value) {
		c.showSignIn(w, r, http.StatusForbidden, "The sign-in form expired; try again.")
		return
	}
	key := strings.TrimSpace(r.PostFormValue("api_key"))
	if key == "" || len(key) > keyBytesMax {
		c.showSignIn(w, r, http.StatusUnauthorized, "Enter a valid API key.")
		return
	}
	p, err := c.verify(r.Context(), key)
	switch {
	case errors.Is(err, auth.ErrUnavailable):
		c.showSignIn(w, r, http.StatusServiceUnavailable, "Cannot check keys right now; try again shortly.")
		return
	case err != nil:
		keyID, _ := auth.KeyIDOf(key)
		c.log.InfoContext(r.Context(), "console: sign-in with an invalid API key", "key_id", keyID)
		c.showSignIn(w, r, http.StatusUnauthorized, "That API key is not valid.")
		return
	case !api.Allowed(tallyv1.LedgerService_GetAccount_FullMethodName, p.Role):
		c.showSignIn(w, r, http.StatusForbidden, "Keys of role "+string(p.Role)+" cannot use the console (viewer, support, reconciler or admin can).")
		return
	}
	s, err := c.sessions.create(key, p)
	if err != nil {
		c.showSignIn(w, r, http.StatusServiceUnavailable, "Too many people are signed in; try again later.")
		return
	}
	c.log.InfoContext(r.Context(), "console: signed in", "key_id", p.KeyID, "role", string(p.Role))
	setCookie(w, r, signInCookie, "", -1)
	setCookie(w, r, sessionCookie, s.id, int(c.limits.SessionTTL/time.Second))
	http.Redirect(w, r, "/", http.StatusSeeOther)
}

// signOut ends the session.
func (c *Console) signOut(w http.ResponseWriter, r *http.Request, s *session) {
	c.sessions.end(s.id)
	setCookie(w, r, sessionCookie, "", -1)
	http.Redirect(w, r, "/signin", http.StatusSeeOther)
}

// home is the search form.
func (c *Console) home(w http.ResponseWriter, r *http.Request, s *session) {
	c.render(w, r, http.StatusOK, "search", view{Title: "Search", Session: viewOf(s), Data: searchView{By: "auto"}})
}

// searchView is the search form and its results.
type searchView struct {
	Q, By, Client string
	Accounts      []*tallyv1.Account
	Searched      bool
}

// searchKinds are what a search may look for.
var searchKinds = map[string]bool{"auto": true, "external_ref": true, "account": true, "transfer": true, "key": true, "hold": true}

// search finds accounts by external_ref, or an account, transfer, hold or
// idempotency key; one hit opens its page.
func (c *Console) search(w http.ResponseWriter, r *http.Request, s *session) {
	q := r.URL.Query()
	sv := searchView{Q: strings.TrimSpace(q.Get("q")), By: q.Get("by"), Client: strings.TrimSpace(q.Get("client")), Searched: true}
	if !searchKinds[sv.By] {
		sv.By = "auto"
	}
	if sv.Q == "" || len(sv.Q) > c.limits.SearchBytesMax || len(sv.Client) > 36 {
		c.render(w, r, http.StatusBadRequest, "search", view{Title: "Search", Session: viewOf(s), Data: sv,
			Error: "Enter a search term of at most " + strconv.Itoa(c.limits.SearchBytesMax) + " bytes."})
		return
	}
	ctx, cancel := c.call(r, s)
	defer cancel()
	target, accts, err := c.find(ctx, sv)
	if err != nil {
		c.apiError(w, r, s, err)
		return
	}
	if target != "" {
		http.Redirect(w, r, target, http.StatusSeeOther)
		return
	}
	sv.Accounts = accts
	v := view{Title: "Search", Session: viewOf(s), Data: sv}
	if len(accts) == 0 {
		v.Notice = "Nothing found."
	}
	c.render(w, r, http.StatusOK, "search", v)
}

// lookup is one way of finding a search term: the page it opens.
type lookup func(ctx context.Context, term string) (string, error)

// find runs the search: the page to open, or the accounts of an
// external_ref. A NOT_FOUND (or INVALID_ARGUMENT for a term of the wrong
// shape) of one lookup moves on to the next.
func (c *Console) find(ctx context.Context, sv searchView) (string, []*tallyv1.Account, error) {
	byAccount := func(ctx context.Context, id string) (string, error) {
		_, err := c.api.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: id})
		return "/accounts/" + url.PathEscape(id), err
	}
	byTransfer := func(ctx context.Context, id string) (string, error) {
		_, err := c.api.GetTransfer(ctx, &tallyv1.GetTransferRequest{TransferId: id})
		return "/transfers/" + url.PathEscape(id), err
	}
	byHold := func(ctx context.Context, id string) (string, error) {
		_, err := c.api.GetHold(ctx, &tallyv1.GetHoldRequest{HoldId: id})
		return "/holds/" + url.PathEscape(id), err
	}
	byKey := func(ctx context.Context, key string) (string, error) {
		t, err := c.api.GetTransfer(ctx, &tallyv1.GetTransferRequest{IdempotencyKey: key, ClientId: sv.Client})
		return "/transfers/" + url.PathEscape(t.GetTransferId()), err
	}
	var order []lookup
	switch sv.By {
	case "account":
		order = []lookup{byAccount}
	case "transfer":
		order = []lookup{byTransfer}
	case "hold":
		order = []lookup{byHold}
	case "key":
		order = []lookup{byKey}
	case "external_ref":
		return c.findRef(ctx, sv.Q)
	default:
		if _, err := uuid.Parse(sv.Q); err == nil && len(sv.Q) == 36 {
			order = []lookup{byAccount, byTransfer, byHold, byKey}
		} else {
			if target, accts, err := c.findRef(ctx, sv.Q); err != nil || target != "" || len(accts) > 0 {
				return target, accts, err
			}
			order = []lookup{byKey}
		}
	}
	for _, l := range order {
		target, err := l(ctx, sv.Q)
		switch status.Code(err) {
		case codes.OK:
			return target, nil, nil
		case codes.NotFound, codes.InvalidArgument:
			continue
		default:
			return "", nil, err
		}
	}
	return "", nil, nil
}

// findRef lists the accounts of an external_ref (one opens its page).
func (c *Console) findRef(ctx context.Context, ref string) (string, []*tallyv1.Account, error) {
	res, err := c.api.FindAccounts(ctx, &tallyv1.FindAccountsRequest{ExternalRef: ref, PageSize: int32(c.limits.PageSize)})
	if err != nil {
		return "", nil, err
	}
	if len(res.GetAccounts()) == 1 {
		return "/accounts/" + res.GetAccounts()[0].GetAccountId(), nil, nil
	}
	return "", res.GetAccounts(), nil
}

// period reads a statement period from the query: from and to as
// YYYY-MM-DD (UTC) or RFC 3339; from defaults to the first of this month,
// to to now (and is never after now).
func (c *Console) period(q url.Values) (from, to time.Time, err error) {
	now := c.now().UTC()
	from = time.Date(now.Year(), now.Month(), 1, 0, 0, 0, 0, time.UTC)
	to = now
	if s := q.Get("from"); s != "" {
		if from, err = parseWhen(s); err != nil {
			return from, to, errors.New("from: use YYYY-MM-DD or an RFC 3339 time")
		}
	}
	if s := q.Get("to"); s != "" {
		if to, err = parseWhen(s); err != nil {
			return from, to, errors.New("to: use YYYY-MM-DD or an RFC 3339 time")
		}
	}
	if to.After(now) {
		to = now
	}
	if !from.Before(to) {
		return from, to, errors.New("the period must end after it starts")
	}
	return from, to, nil
}

func parseWhen(s string) (time.Time, error) {
	if len(s) > 40 {
		return time.Time{}, errors.New("too long")
	}
	if t, err := time.Parse(time.DateOnly, s); err == nil {
		return t, nil
	}
	return time.Parse(time.RFC3339Nano, s)
}

func statementRequest(id string, from, to time.Time, size int, token string) *tallyv1.GetStatementRequest {
	return &tallyv1.GetStatementRequest{AccountId: id, From: timestamppb.New(from), To: timestamppb.New(to),
		PageSize: int32(size), PageToken: token}
}
