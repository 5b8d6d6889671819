// Package api holds Tally's gRPC handlers: decode and validate requests, call
// the ledger, and map ledger errors to status codes with an ErrorInfo reason.
// It holds no SQL and no Redis.
package api

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Server implements tally.v1.LedgerService on top of a ledger.
type Server struct {
	tallyv1.UnimplementedLedgerServiceServer
	l *ledger.Ledger
	// SubmitBatchBytesMax bounds a SubmitBatch request's encoded size
	// (0: SubmitBatchBytesMaxDefault).
	SubmitBatchBytesMax int
	// ExportPollInterval and ExportStreamDurationMax tune following feed
	// streams (0: the defaults).
	ExportPollInterval      time.Duration
	ExportStreamDurationMax time.Duration
	// ExportFollowStreamsPerKeyMax and ExportFollowStreamsMax cap following
	// feed streams per API key and per server (0: the defaults).
	ExportFollowStreamsPerKeyMax int
	ExportFollowStreamsMax       int
	// Logger receives the feed watcher's warnings (nil: slog.Default).
	Logger *slog.Logger

	hubOnce sync.Once
	hub     *feedHub
}

// NewServer returns a LedgerService backed by l.
func NewServer(l *ledger.Ledger) *Server { return &Server{l: l} }

// feed returns the server's one feed watcher, made at first use from the
// fields above.
func (s *Server) feed() *feedHub {
	s.hubOnce.Do(func() {
		poll, perKey, max, log := s.ExportPollInterval, s.ExportFollowStreamsPerKeyMax, s.ExportFollowStreamsMax, s.Logger
		if poll <= 0 {
			poll = ExportPollIntervalDefault
		}
		if perKey <= 0 {
			perKey = ExportFollowStreamsPerKeyMaxDefault
		}
		if max <= 0 {
			max = ExportFollowStreamsMaxDefault
		}
		if log == nil {
			log = slog.Default()
		}
		s.hub = newFeedHub(s.l, poll, perKey, max, log)
	})
	return s.hub
}

// FeedReads is how many queries the feed watcher has made (every caught-up
// follower shares them).
func (s *Server) FeedReads() int64 { return s.feed().reads.Load() }

// scope returns the idempotency scope of the caller: its client id, so that
// two clients never see each other's keys while every key of one client
// (rotated keys included) shares one scope. Without authentication
// (--insecure-no-auth) every caller shares the global scope "".
func scope(ctx context.Context) string {
	if p, ok := auth.FromContext(ctx); ok {
		return p.Scope()
	}
	return ""
}

// moveRequest fills in the caller's scope and the audit trail.
func moveRequest(ctx context.Context, r ledger.MoveRequest) ledger.MoveRequest {
	r.Scope = scope(ctx)
	if p, ok := auth.FromContext(ctx); ok {
		r.CreatedByClient, r.CreatedByKey = p.ClientID, p.KeyID
		r.Restrict = restrictOf(p.Role)
	}
	return r
}

// restrictOf is what a role may act on beyond the method table: a charger
// refunds, captures and releases only its own client's charges and holds;
// support changes customer accounts only (freezing a default system
// account would stop every credit and refund of its currency).
func restrictOf(role auth.Role) ledger.Restrict {
	switch role {
	case auth.RoleCharger:
		return ledger.Restrict{OwnObjects: true}
	case auth.RoleSupport:
		return ledger.Restrict{CustomerAccounts: true}
	}
	return ledger.Restrict{}
}

// apply builds a money-moving request from a proto request, adds the
// caller's scope and audit trail, runs it, and turns ledger errors into
// statuses: the one path every money-moving handler takes.
func apply[R any](ctx context.Context, s *Server, r R, build func(R) (ledger.MoveRequest, error)) (ledger.TransferResult, error) {
	m, err := build(r)
	if err != nil {
		return ledger.TransferResult{}, err
	}
	res, err := s.l.Apply(ctx, moveRequest(ctx, m))
	if err != nil {
		return ledger.TransferResult{}, statusError(err)
	}
	return res, nil
}

// ownOnly reports whether the caller may see only its own transfers.
func ownOnly(ctx context.Context) (auth.Principal, bool) {
	p, ok := auth.FromContext(ctx)
	return p, ok && p.Role == auth.RoleCharger
}

// CreateAccount implements LedgerService.
func (s *Server) CreateAccount(ctx context.Context, r *tallyv1.CreateAccountRequest) (*tallyv1.Account, error) {
	id, err := parseID("account_id", r.GetAccountId(), false)
	if err != nil {
		return nil, err
	}
	a, err := s.l.CreateAccount(ctx, ledger.CreateAccountRequest{
		ID: id, Currency: r.GetCurrency(), Type: ledger.AccountType(r.GetType()), ExternalRef: r.GetExternalRef(),
		Floor: ledger.Floor(r.GetFloor()), CreditLimit: r.GetCreditLimit(), Metadata: r.GetMetadata(),
	})
	if err != nil {
		return nil, statusError(err)
	}
	return accountPB(a), nil
}

// GetAccount implements LedgerService.
func (s *Server) GetAccount(ctx context.Context, r *tallyv1.GetAccountRequest) (*tallyv1.Account, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	a, err := s.l.GetAccount(ctx, id)
	if err != nil {
		return nil, statusError(err)
	}
	return accountPB(a), nil
}

// FindAccounts implements LedgerService.
func (s *Server) FindAccounts(ctx context.Context, r *tallyv1.FindAccountsRequest) (*tallyv1.FindAccountsResponse, error) {
	accts, next, err := s.l.FindAccounts(ctx, ledger.AccountQuery{
		ExternalRef: r.GetExternalRef(), Currency: r.GetCurrency(), Type: ledger.AccountType(r.GetType()),
		PageSize: int(r.GetPageSize()), PageToken: r.GetPageToken(),
	})
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.FindAccountsResponse{NextPageToken: next}
	for _, a := range accts {
		out.Accounts = append(out.Accounts, accountPB(a))
	}
	return out, nil
}

// Charge implements LedgerService.
func (s *Server) Charge(ctx context.Context, r *tallyv1.ChargeRequest) (*tallyv1.TransferResult, error) {
	res, err := apply(ctx, s, r, chargeMove)
	if err != nil {
		return nil, err
	}
	return resultPB(res), nil
}

func chargeMove(r *tallyv1.ChargeRequest) (ledger.MoveRequest, error) {
	acct, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	rev, err := parseID("revenue_account_id", r.GetRevenueAccountId(), false)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindCharge, AccountID: acct, Counterparty: rev, Amount: r.GetAmount(),
		IdempotencyKey: r.GetIdempotencyKey(), Description: r.GetDescription(), Metadata: r.GetMetadata()}, nil
}

// Credit implements LedgerService.
func (s *Server) Credit(ctx context.Context, r *tallyv1.CreditRequest) (*tallyv1.TransferResult, error) {
	res, err := apply(ctx, s, r, creditMove)
	if err != nil {
		return nil, err
	}
	return resultPB(res), nil
}

func creditMove(r *tallyv1.CreditRequest) (ledger.MoveRequest, error) {
	acct, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	fund, err := parseID("funding_account_id", r.GetFundingAccountId(), false)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindCredit, AccountID: acct, Counterparty: fund, Amount: r.GetAmount(),
		IdempotencyKey: r.GetIdempotencyKey(), Description: r.GetDescription(), Metadata: r.GetMetadata()}, nil
}

// Transfer implements LedgerService.
func (s *Server) Transfer(ctx context.Context, r *tallyv1.TransferRequest) (*tallyv1.TransferResult, error) {
	res, err := apply(ctx, s, r, transferMove)
	if err != nil {
		return nil, err
	}
	return resultPB(res), nil
}

func transferMove(r *tallyv1.TransferRequest) (ledger.MoveRequest, error) {
	debit, err := parseID("debit_account_id", r.GetDebitAccountId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	credit, err := parseID("credit_account_id", r.GetCreditAccountId(), true)
	if err != nil {
		return ledger.MoveRequest{}, err
	}
	return ledger.MoveRequest{Kind: ledger.KindTransfer, AccountID: debit, Counterparty: credit, Amount: r.GetAmount(),
		IdempotencyKey: r.GetIdempotencyKey(), Description: r.GetDescription(), Metadata: r.GetMetadata()}, nil
}

// GetBalance implements LedgerService.
func (s *Server) GetBalance(ctx context.Context, r *tallyv1.GetBalanceRequest) (*tallyv1.Balance, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	var c ledger.Consistency
	switch r.GetConsistency() {
	case tallyv1.Consistency_CONSISTENCY_UNSPECIFIED, tallyv1.Consistency_CONSISTENCY_CACHED:
		c = ledger.ConsistencyCached
	case tallyv1.Consistency_CONSISTENCY_STRONG:
		c = ledger.ConsistencyStrong
	default:
		return nil, invalidArg("consistency", "unknown consistency")
	}
	if r.GetAt() != nil {
		if r.GetMinVersion() != 0 || r.GetConsistency() == tallyv1.Consistency_CONSISTENCY_CACHED {
			return nil, invalidArg("at", "at reads history from PostgreSQL; it takes no min_version or CACHED consistency")
		}
		at, err := parseTime("at", r.GetAt())
		if err != nil {
			return nil, err
		}
		b, err := s.l.GetBalanceAt(ctx, id, *at)
		if err != nil {
			return nil, statusError(err)
		}
		return balancePB(b), nil
	}
	b, err := s.l.GetBalance(ctx, id, c, r.GetMinVersion())
	if err != nil {
		return nil, statusError(err)
	}
	return balancePB(b), nil
}

// GetTransfer implements LedgerService. By idempotency_key it looks in the
// caller's own client scope, or in client_id's (every role but charger may
// name another client). By transfer_id a charger sees only transfers its own
// client created; any other is NOT_FOUND, exactly as if it did not exist.
func (s *Server) GetTransfer(ctx context.Context, r *tallyv1.GetTransferRequest) (*tallyv1.Transfer, error) {
	if (r.GetTransferId() == "") == (r.GetIdempotencyKey() == "") {
		return nil, invalidArg("transfer_id", "give exactly one of transfer_id and idempotency_key")
	}
	me, chargerOnly := ownOnly(ctx)
	var t ledger.Transfer
	var err error
	if r.GetTransferId() != "" {
		if r.GetClientId() != "" {
			return nil, invalidArg("client_id", "client_id applies to idempotency_key only")
		}
		id, perr := parseID("transfer_id", r.GetTransferId(), true)
		if perr != nil {
			return nil, perr
		}
		t, err = s.l.GetTransfer(ctx, id)
		if err == nil && chargerOnly && t.CreatedByClient != me.ClientID {
			return nil, statusError(&ledger.Error{Code: ledger.CodeNotFound, Reason: ledger.ReasonTransferNotFound,
				Message: "transfer " + id.String() + " not found"})
		}
	} else {
		sc := scope(ctx)
		if r.GetClientId() != "" {
			cid, perr := parseID("client_id", r.GetClientId(), true)
			if perr != nil {
				return nil, perr
			}
			if chargerOnly && cid != me.ClientID {
				return nil, newStatus(codes.PermissionDenied, ReasonPermissionDenied,
					"role charger may only read its own client's idempotency keys", nil)
			}
			sc = cid.String()
		}
		t, err = s.l.GetTransferByKey(ctx, sc, r.GetIdempotencyKey())
	}
	if err != nil {
		return nil, statusError(err)
	}
	return transferPB(t), nil
}

// ListEntries implements LedgerService.
func (s *Server) ListEntries(ctx context.Context, r *tallyv1.ListEntriesRequest) (*tallyv1.ListEntriesResponse, error) {
	id, err := parseID("account_id", r.GetAccountId(), true)
	if err != nil {
		return nil, err
	}
	start, err := parseTime("start_time", r.GetStartTime())
	if err != nil {
		return nil, err
	}
	end, err := parseTime("end_time", r.GetEndTime())
	if err != nil {
		return nil, err
	}
	var kinds []ledger.Kind
	for _, k := range r.GetKinds() {
		kinds = append(kinds, ledger.Kind(k))
	}
	entries, next, err := s.l.ListEntries(ctx, ledger.EntryQuery{
		AccountID: id, PageSize: int(r.GetPageSize()), PageToken: r.GetPageToken(), Start: start, End: end, Kinds: kinds,
		NewestFirst: r.GetNewestFirst(),
	})
	if err != nil {
		return nil, statusError(err)
	}
	out := &tallyv1.ListEntriesResponse{NextPageToken: next}
	for _, e := range entries {
		out.Entries = append(out.Entries, entryPB(e))
	}
	return out, nil
}
