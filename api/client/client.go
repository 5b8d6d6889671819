// Package client is the Go client for Tally, and the one home of its retry
// contract:
//
//   - UNAVAILABLE and DEADLINE_EXCEEDED: the outcome is unknown; resend the
//     same request with the same idempotency key, with backoff. A dropped
//     connection surfaces as UNAVAILABLE.
//   - RESOURCE_EXHAUSTED: the same, after a longer backoff.
//   - every other code is final: retrying it returns the same answer.
//
// Retrying with the same key is always safe: the server applies a key at most
// once and replays its stored outcome. The tally CLI, the torture test and
// the benchmark all use this package; product services can import it.
package client

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// Defaults of Config. Each is a flag of the tally CLI.
const (
	AddrDefault             = "127.0.0.1:7070"
	CallTimeoutDefault      = 5 * time.Second
	RetryAttemptsMaxDefault = 8
	BackoffBaseDefault      = 50 * time.Millisecond
	BackoffMaxDefault       = 2 * time.Second
	// ExhaustedBackoffBaseDefault is the first backoff after RESOURCE_EXHAUSTED.
	ExhaustedBackoffBaseDefault = 500 * time.Millisecond
	MsgBytesMaxDefault          = 4 << 20
)

// Policy bounds retries.
type Policy struct {
	// CallTimeout bounds each attempt.
	CallTimeout time.Duration
	// RetryAttemptsMax bounds attempts (the first call included).
	RetryAttemptsMax int
	// BackoffBase is the first backoff; it doubles up to BackoffMax, with jitter.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// ExhaustedBackoffBase replaces BackoffBase after RESOURCE_EXHAUSTED.
	ExhaustedBackoffBase time.Duration
}

// DefaultPolicy returns the default retry policy.
func DefaultPolicy() Policy {
	return Policy{
		CallTimeout: CallTimeoutDefault, RetryAttemptsMax: RetryAttemptsMaxDefault,
		BackoffBase: BackoffBaseDefault, BackoffMax: BackoffMaxDefault, ExhaustedBackoffBase: ExhaustedBackoffBaseDefault,
	}
}

func (p *Policy) fill() {
	d := DefaultPolicy()
	if p.CallTimeout <= 0 {
		p.CallTimeout = d.CallTimeout
	}
	if p.RetryAttemptsMax <= 0 {
		p.RetryAttemptsMax = d.RetryAttemptsMax
	}
	if p.BackoffBase <= 0 {
		p.BackoffBase = d.BackoffBase
	}
	if p.BackoffMax <= 0 {
		p.BackoffMax = d.BackoffMax
	}
	if p.ExhaustedBackoffBase <= 0 {
		p.ExhaustedBackoffBase = d.ExhaustedBackoffBase
	}
}

// Retryable classifies an error by the retry contract: retry says whether
// the same request may be resent with the same key; slow asks for the longer
// RESOURCE_EXHAUSTED backoff.
func Retryable(err error) (retry, slow bool) {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true, false
	case codes.ResourceExhausted:
		return true, true
	}
	return false, false
}

// Retry calls fn until it returns nil or a final error, the attempts run out,
// or ctx ends. Each attempt gets its own CallTimeout. fn must resend the very
// same request (same idempotency key) every time.
func Retry(ctx context.Context, p Policy, fn func(ctx context.Context) error) error {
	p.fill()
	var err error
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, p.CallTimeout)
		err = fn(actx)
		cancel()
		retry, slow := Retryable(err)
		if err == nil || !retry || attempt >= p.RetryAttemptsMax {
			return err
		}
		base := p.BackoffBase
		if slow {
			base = p.ExhaustedBackoffBase
		}
		wait := base << min(attempt-1, 16)
		if wait > p.BackoffMax || wait <= 0 {
			wait = p.BackoffMax
		}
		// Full jitter in [wait/2, wait) keeps retrying clients from
		// synchronizing after an outage.
		wait = wait/2 + rand.N(wait/2+1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return errors.Join(err, ctx.Err())
		case <-t.C:
		}
	}
}

// NewIdempotencyKey returns a fresh key (a UUIDv7: unique, and sortable by
// creation time, which keeps the key index compact).
func NewIdempotencyKey() string { return uuid.Must(uuid.NewV7()).String() }

// Config configures New.
type Config struct {
	// Addr is host:port of a tallyd (default 127.0.0.1:7070).
	Addr string
	// APIKey, when set, is sent as "authorization: Bearer <key>".
	APIKey string
	Policy Policy
	// DialOptions replace the default insecure transport when set.
	DialOptions []grpc.DialOption
}

// Client is a LedgerService client whose calls follow the retry contract.
type Client struct {
	conn   *grpc.ClientConn
	raw    tallyv1.LedgerServiceClient
	policy Policy
}

// New creates a client. It connects lazily.
func New(cfg Config) (*Client, error) {
	if cfg.Addr == "" {
		cfg.Addr = AddrDefault
	}
	cfg.Policy.fill()
	opts := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MsgBytesMaxDefault)),
	}
	if len(cfg.DialOptions) == 0 {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	} else {
		opts = append(opts, cfg.DialOptions...)
	}
	if cfg.APIKey != "" {
		key := cfg.APIKey
		opts = append(opts, grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
			cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
			return invoker(ctx, method, req, reply, cc, o...)
		}), grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
			method string, streamer grpc.Streamer, o ...grpc.CallOption) (grpc.ClientStream, error) {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
			return streamer(ctx, desc, cc, method, o...)
		}))
	}
	conn, err := grpc.NewClient(cfg.Addr, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, raw: tallyv1.NewLedgerServiceClient(conn), policy: cfg.Policy}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Raw returns the underlying generated client, without retries.
func (c *Client) Raw() tallyv1.LedgerServiceClient { return c.raw }

// Policy returns the client's retry policy.
func (c *Client) Policy() Policy { return c.policy }

func call[Req, Resp any](ctx context.Context, c *Client, fn func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	var resp Resp
	err := Retry(ctx, c.policy, func(ctx context.Context) error {
		var err error
		resp, err = fn(ctx, req)
		return err
	})
	return resp, err
}

// CreateAccount creates an account. When r.AccountId is empty the client
// fills in a fresh UUIDv7 first, so that retries are idempotent.
func (c *Client) CreateAccount(ctx context.Context, r *tallyv1.CreateAccountRequest) (*tallyv1.Account, error) {
	if r.GetAccountId() == "" {
		r.AccountId = uuid.Must(uuid.NewV7()).String()
	}
	return call(ctx, c, c.raw.CreateAccount, r)
}

// GetAccount returns one account.
func (c *Client) GetAccount(ctx context.Context, r *tallyv1.GetAccountRequest) (*tallyv1.Account, error) {
	return call(ctx, c, c.raw.GetAccount, r)
}

// FindAccounts lists accounts.
func (c *Client) FindAccounts(ctx context.Context, r *tallyv1.FindAccountsRequest) (*tallyv1.FindAccountsResponse, error) {
	return call(ctx, c, c.raw.FindAccounts, r)
}

// Charge debits an account; r.IdempotencyKey must be set (see NewIdempotencyKey).
func (c *Client) Charge(ctx context.Context, r *tallyv1.ChargeRequest) (*tallyv1.TransferResult, error) {
	return call(ctx, c, c.raw.Charge, r)
}

// Credit credits an account; r.IdempotencyKey must be set.
func (c *Client) Credit(ctx context.Context, r *tallyv1.CreditRequest) (*tallyv1.TransferResult, error) {
	return call(ctx, c, c.raw.Credit, r)
}

// Transfer moves money between accounts; r.IdempotencyKey must be set.
func (c *Client) Transfer(ctx context.Context, r *tallyv1.TransferRequest) (*tallyv1.TransferResult, error) {
	return call(ctx, c, c.raw.Transfer, r)
}

// GetBalance reads a balance.
func (c *Client) GetBalance(ctx context.Context, r *tallyv1.GetBalanceRequest) (*tallyv1.Balance, error) {
	return call(ctx, c, c.raw.GetBalance, r)
}

// GetTransfer reads a transfer, or the stored outcome of a key.
func (c *Client) GetTransfer(ctx context.Context, r *tallyv1.GetTransferRequest) (*tallyv1.Transfer, error) {
	return call(ctx, c, c.raw.GetTransfer, r)
}

// ListEntries reads a page of an account's statement.
func (c *Client) ListEntries(ctx context.Context, r *tallyv1.ListEntriesRequest) (*tallyv1.ListEntriesResponse, error) {
	return call(ctx, c, c.raw.ListEntries, r)
}

// Refund refunds a charge; r.IdempotencyKey must be set.
func (c *Client) Refund(ctx context.Context, r *tallyv1.RefundRequest) (*tallyv1.TransferResult, error) {
	return call(ctx, c, c.raw.Refund, r)
}

// Hold reserves funds; r.IdempotencyKey must be set.
func (c *Client) Hold(ctx context.Context, r *tallyv1.HoldRequest) (*tallyv1.HoldResult, error) {
	return call(ctx, c, c.raw.Hold, r)
}

// CaptureHold charges a hold; r.IdempotencyKey must be set.
func (c *Client) CaptureHold(ctx context.Context, r *tallyv1.CaptureHoldRequest) (*tallyv1.HoldResult, error) {
	return call(ctx, c, c.raw.CaptureHold, r)
}

// ReleaseHold frees a hold; r.IdempotencyKey must be set.
func (c *Client) ReleaseHold(ctx context.Context, r *tallyv1.ReleaseHoldRequest) (*tallyv1.HoldResult, error) {
	return call(ctx, c, c.raw.ReleaseHold, r)
}

// GetHold reads a hold.
func (c *Client) GetHold(ctx context.Context, r *tallyv1.GetHoldRequest) (*tallyv1.Hold, error) {
	return call(ctx, c, c.raw.GetHold, r)
}

// SubmitBatch applies a batch; r.BatchKey and every operation's key must be
// set, so a retried batch replays.
func (c *Client) SubmitBatch(ctx context.Context, r *tallyv1.SubmitBatchRequest) (*tallyv1.SubmitBatchResponse, error) {
	return call(ctx, c, c.raw.SubmitBatch, r)
}

// FreezeAccount freezes an account (retrying is safe: freezing a frozen
// account changes nothing).
func (c *Client) FreezeAccount(ctx context.Context, r *tallyv1.FreezeAccountRequest) (*tallyv1.Account, error) {
	return call(ctx, c, c.raw.FreezeAccount, r)
}

// UnfreezeAccount unfreezes an account.
func (c *Client) UnfreezeAccount(ctx context.Context, r *tallyv1.UnfreezeAccountRequest) (*tallyv1.Account, error) {
	return call(ctx, c, c.raw.UnfreezeAccount, r)
}

// CloseAccount closes an empty account.
func (c *Client) CloseAccount(ctx context.Context, r *tallyv1.CloseAccountRequest) (*tallyv1.Account, error) {
	return call(ctx, c, c.raw.CloseAccount, r)
}

// UpdateAccount changes an account's settings (an overwrite: retrying is safe).
func (c *Client) UpdateAccount(ctx context.Context, r *tallyv1.UpdateAccountRequest) (*tallyv1.Account, error) {
	return call(ctx, c, c.raw.UpdateAccount, r)
}

// GetBalances reads many balances, current or at an instant.
func (c *Client) GetBalances(ctx context.Context, r *tallyv1.GetBalancesRequest) (*tallyv1.GetBalancesResponse, error) {
	return call(ctx, c, c.raw.GetBalances, r)
}

// SummarizeUsage returns a spend breakdown (a read: retried like one).
func (c *Client) SummarizeUsage(ctx context.Context, r *tallyv1.SummarizeUsageRequest) (*tallyv1.SummarizeUsageResponse, error) {
	return call(ctx, c, c.raw.SummarizeUsage, r)
}

// SetAutoTopUp sets an account's auto top-up rule (a whole overwrite:
// retrying is safe).
func (c *Client) SetAutoTopUp(ctx context.Context, r *tallyv1.SetAutoTopUpRequest) (*tallyv1.AutoTopUp, error) {
	return call(ctx, c, c.raw.SetAutoTopUp, r)
}

// GetAutoTopUp reads an account's auto top-up rule.
func (c *Client) GetAutoTopUp(ctx context.Context, r *tallyv1.GetAutoTopUpRequest) (*tallyv1.AutoTopUp, error) {
	return call(ctx, c, c.raw.GetAutoTopUp, r)
}

// ListTopUps reads a page of an account's top-ups.
func (c *Client) ListTopUps(ctx context.Context, r *tallyv1.ListTopUpsRequest) (*tallyv1.ListTopUpsResponse, error) {
	return call(ctx, c, c.raw.ListTopUps, r)
}

// GetStatement returns one page of an account's statement.
func (c *Client) GetStatement(ctx context.Context, r *tallyv1.GetStatementRequest) (*tallyv1.Statement, error) {
	return call(ctx, c, c.raw.GetStatement, r)
}
