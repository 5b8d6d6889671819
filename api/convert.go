package api

import (
	"time"

	"github.com/google/uuid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
)

// parseID parses a canonical 36-character UUID. Other spellings that
// uuid.Parse would accept (braces, urn:, no dashes) are rejected so that one
// account has one spelling in idempotency fingerprints and logs.
func parseID(field, s string, required bool) (uuid.UUID, error) {
	if s == "" {
		if required {
			return uuid.Nil, invalidArg(field, field+" is required")
		}
		return uuid.Nil, nil
	}
	if len(s) != 36 {
		return uuid.Nil, invalidArg(field, field+" must be a UUID")
	}
	id, err := uuid.Parse(s)
	if err != nil || id == uuid.Nil {
		return uuid.Nil, invalidArg(field, field+" must be a UUID")
	}
	return id, nil
}

func parseTime(field string, ts *timestamppb.Timestamp) (*time.Time, error) {
	if ts == nil {
		return nil, nil
	}
	if err := ts.CheckValid(); err != nil {
		return nil, invalidArg(field, field+" is not a valid timestamp")
	}
	t := ts.AsTime()
	return &t, nil
}

func idString(id uuid.UUID) string {
	if id == uuid.Nil {
		return ""
	}
	return id.String()
}

func accountPB(a ledger.Account) *tallyv1.Account {
	return &tallyv1.Account{
		AccountId: a.ID.String(), Currency: a.Currency, Type: tallyv1.AccountType(a.Type),
		ExternalRef: a.ExternalRef, Floor: tallyv1.Floor(a.Floor), CreditLimit: a.CreditLimit,
		Status: tallyv1.AccountStatus(a.Status), Metadata: a.Metadata, CreatedAt: timestamppb.New(a.CreatedAt),
		Version: a.Version, LowBalanceThreshold: a.LowBalanceThreshold,
		ShardOf: idString(a.ShardOf), ShardCount: a.ShardCount,
	}
}

func transferPB(t ledger.Transfer) *tallyv1.Transfer {
	return &tallyv1.Transfer{
		TransferId: t.ID.String(), IdempotencyKey: t.IdempotencyKey, Kind: tallyv1.TransferKind(t.Kind),
		DebitAccountId: t.DebitAccountID.String(), CreditAccountId: t.CreditAccountID.String(),
		Amount: t.Amount, Currency: t.Currency, Description: t.Description, Metadata: t.Metadata,
		CreatedAt:         timestamppb.New(t.CreatedAt),
		CreatedByClientId: idString(t.CreatedByClient), CreatedByKeyId: t.CreatedByKey,
		RefundOf: idString(t.RefundOf), HoldId: idString(t.HoldID), RefundedAmount: t.Refunded,
		ThresholdCrossed: t.ThresholdCrossed,
		DebitShardId:     idString(t.DebitShardID), CreditShardId: idString(t.CreditShardID),
	}
}

func balancePB(b ledger.Balance) *tallyv1.Balance {
	src := tallyv1.BalanceSource_BALANCE_SOURCE_STORE
	if b.Source == ledger.SourceCache {
		src = tallyv1.BalanceSource_BALANCE_SOURCE_CACHE
	}
	return &tallyv1.Balance{
		AccountId: b.AccountID.String(), Currency: b.Currency, Balance: b.Balance, Available: b.Available,
		CreditLimit: b.CreditLimit, Version: b.Version, Source: src, AsOf: timestamppb.New(b.AsOf),
		Held: b.Held, Final: b.Final,
	}
}

func resultPB(r ledger.TransferResult) *tallyv1.TransferResult {
	return &tallyv1.TransferResult{Transfer: transferPB(r.Transfer), Balance: balancePB(r.Balance), Replayed: r.Replayed,
		ThresholdCrossed: r.ThresholdCrossed}
}

func entryPB(e ledger.Entry) *tallyv1.Entry {
	return &tallyv1.Entry{
		TransferId: e.TransferID.String(), AccountId: e.AccountID.String(), Sequence: e.Sequence, Amount: e.Amount,
		BalanceAfter: e.BalanceAfter, VersionAfter: e.VersionAfter, CreatedAt: timestamppb.New(e.CreatedAt),
		CreatedByClientId: idString(e.CreatedByClient), CreatedByKeyId: e.CreatedByKey,
		Kind: tallyv1.TransferKind(e.Kind),
	}
}
