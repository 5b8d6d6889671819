package ledger

import (
	"crypto/sha256"
	"encoding/binary"
	"regexp"
	"sort"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits bounds every input. Each field has a default and a tallyd flag.
type Limits struct {
	PageSizeMax           int
	PageSizeDefault       int
	MetadataKeysMax       int
	MetadataKeyBytesMax   int
	MetadataValueBytesMax int
	DescriptionBytesMax   int
	ExternalRefBytesMax   int
	CreditLimitMax        int64
	// HoldExpiryDefault is a hold's lifetime when the request sets none;
	// HoldExpiryMax the longest one allowed.
	HoldExpiryDefault time.Duration
	HoldExpiryMax     time.Duration
	// SubmitBatchItemsMax bounds the operations of one SubmitBatch.
	SubmitBatchItemsMax int
	// BalancesAccountsMax bounds the accounts of one GetBalances.
	BalancesAccountsMax int
	// HistorySettleWindow: a balance at an instant closer to now than this
	// is not final (a transaction dated before it may still commit). It must
	// exceed the batch timeout.
	HistorySettleWindow time.Duration
	// UsageRowsMax bounds the rows of one SummarizeUsage answer;
	// UsageRangeDaysMax the days of its time range.
	UsageRowsMax      int
	UsageRangeDaysMax int
	// ReconcileStatementTimeout bounds each ledger-wide reconcile check.
	ReconcileStatementTimeout time.Duration
	// BatchReplyBytesMax bounds a SubmitBatch reply (estimated before
	// COMMIT); PageBytesMax one page of FindAccounts or ListEntries and a
	// GetBalances reply (replysize.go). Both stay below the message limit.
	BatchReplyBytesMax int
	PageBytesMax       int
}

// Default limits.
const (
	PageSizeMaxDefault           = 1000
	PageSizeDefaultDefault       = 100
	MetadataKeysMaxDefault       = 32
	MetadataKeyBytesMaxDefault   = 64
	MetadataValueBytesMaxDefault = 512
	DescriptionBytesMaxDefault   = 1024
	// ExternalRefBytesMax is fixed by a CHECK constraint in the schema.
	ExternalRefBytesMax = 256
	// CreditLimitMax is fixed by a CHECK constraint in the schema.
	CreditLimitMax = int64(1_000_000_000_000_000_000)
	// IdempotencyKeyBytesMax is part of the API contract and the schema.
	IdempotencyKeyBytesMax   = 128
	HoldExpiryDefaultDefault = 24 * time.Hour
	HoldExpiryMaxDefault     = 30 * 24 * time.Hour
	// SubmitBatchItemsMaxDefault is the 1,000 operations.
	SubmitBatchItemsMaxDefault = 1000
	BalancesAccountsMaxDefault = 10000
	HistorySettleWindowDefault = 60 * time.Second
	// UsageRowsMaxDefault bounds a SummarizeUsage answer (a support screen
	// or a CSV, not a data export: the change feed is that).
	UsageRowsMaxDefault = 10000
	// UsageRangeDaysMaxDefault is a bit over a year, so a yearly report by
	// month fits in one call.
	UsageRangeDaysMaxDefault = 400
)

// DefaultLimits returns the default limits.
func DefaultLimits() Limits {
	return Limits{
		PageSizeMax:               PageSizeMaxDefault,
		PageSizeDefault:           PageSizeDefaultDefault,
		MetadataKeysMax:           MetadataKeysMaxDefault,
		MetadataKeyBytesMax:       MetadataKeyBytesMaxDefault,
		MetadataValueBytesMax:     MetadataValueBytesMaxDefault,
		DescriptionBytesMax:       DescriptionBytesMaxDefault,
		ExternalRefBytesMax:       ExternalRefBytesMax,
		CreditLimitMax:            CreditLimitMax,
		HoldExpiryDefault:         HoldExpiryDefaultDefault,
		HoldExpiryMax:             HoldExpiryMaxDefault,
		SubmitBatchItemsMax:       SubmitBatchItemsMaxDefault,
		BalancesAccountsMax:       BalancesAccountsMaxDefault,
		HistorySettleWindow:       HistorySettleWindowDefault,
		ReconcileStatementTimeout: ReconcileStatementTimeoutDefault,
		UsageRowsMax:              UsageRowsMaxDefault,
		UsageRangeDaysMax:         UsageRangeDaysMaxDefault,
		BatchReplyBytesMax:        BatchReplyBytesMaxDefault,
		PageBytesMax:              PageBytesMaxDefault,
	}
}

func (l *Limits) fill() {
	d := DefaultLimits()
	if l.PageSizeMax <= 0 {
		l.PageSizeMax = d.PageSizeMax
	}
	if l.PageSizeDefault <= 0 || l.PageSizeDefault > l.PageSizeMax {
		l.PageSizeDefault = min(d.PageSizeDefault, l.PageSizeMax)
	}
	if l.MetadataKeysMax <= 0 {
		l.MetadataKeysMax = d.MetadataKeysMax
	}
	if l.MetadataKeyBytesMax <= 0 {
		l.MetadataKeyBytesMax = d.MetadataKeyBytesMax
	}
	if l.MetadataValueBytesMax <= 0 {
		l.MetadataValueBytesMax = d.MetadataValueBytesMax
	}
	if l.DescriptionBytesMax <= 0 {
		l.DescriptionBytesMax = d.DescriptionBytesMax
	}
	// These two are enforced by the schema too; never allow more.
	if l.ExternalRefBytesMax <= 0 || l.ExternalRefBytesMax > ExternalRefBytesMax {
		l.ExternalRefBytesMax = ExternalRefBytesMax
	}
	if l.CreditLimitMax <= 0 || l.CreditLimitMax > CreditLimitMax {
		l.CreditLimitMax = CreditLimitMax
	}
	if l.HoldExpiryMax <= 0 {
		l.HoldExpiryMax = d.HoldExpiryMax
	}
	if l.HoldExpiryDefault <= 0 || l.HoldExpiryDefault > l.HoldExpiryMax {
		l.HoldExpiryDefault = min(d.HoldExpiryDefault, l.HoldExpiryMax)
	}
	if l.SubmitBatchItemsMax <= 0 {
		l.SubmitBatchItemsMax = d.SubmitBatchItemsMax
	}
	if l.BalancesAccountsMax <= 0 {
		l.BalancesAccountsMax = d.BalancesAccountsMax
	}
	if l.HistorySettleWindow <= 0 {
		l.HistorySettleWindow = d.HistorySettleWindow
	}
	if l.ReconcileStatementTimeout <= 0 {
		l.ReconcileStatementTimeout = d.ReconcileStatementTimeout
	}
	if l.UsageRowsMax <= 0 {
		l.UsageRowsMax = d.UsageRowsMax
	}
	if l.UsageRangeDaysMax <= 0 {
		l.UsageRangeDaysMax = d.UsageRangeDaysMax
	}
	if l.BatchReplyBytesMax <= 0 {
		l.BatchReplyBytesMax = d.BatchReplyBytesMax
	}
	if l.PageBytesMax <= 0 {
		l.PageBytesMax = d.PageBytesMax
	}
}

var currencyRe = regexp.MustCompile(`^[A-Z0-9_]{1,16}$`)

func validateCurrency(c string) error {
	if !currencyRe.MatchString(c) {
		return invalid("currency", "currency must be 1-16 characters of A-Z, 0-9 and _")
	}
	return nil
}

// validateKey enforces 1-128 printable ASCII characters.
func validateKey(k string) error {
	if k == "" {
		return invalid("idempotency_key", "idempotency_key is required")
	}
	if len(k) > IdempotencyKeyBytesMax {
		return invalid("idempotency_key", "idempotency_key is longer than %d characters", IdempotencyKeyBytesMax)
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return invalid("idempotency_key", "idempotency_key must be printable ASCII")
		}
	}
	return nil
}

func (l *Limits) validateMetadata(m map[string]string) error {
	if len(m) > l.MetadataKeysMax {
		return invalid("metadata", "metadata has more than %d keys", l.MetadataKeysMax)
	}
	for k, v := range m {
		if k == "" || len(k) > l.MetadataKeyBytesMax {
			return invalid("metadata", "metadata keys must be 1-%d bytes", l.MetadataKeyBytesMax)
		}
		if len(v) > l.MetadataValueBytesMax {
			return invalid("metadata", "metadata values must be at most %d bytes", l.MetadataValueBytesMax)
		}
		if !validText(k) || !validText(v) {
			return invalid("metadata", "metadata must be valid UTF-8 without NUL characters")
		}
	}
	return nil
}

// validateDescription checks a description; field is the request's name
// for it ("description", or "reason" for a refund).
func (l *Limits) validateDescription(field, d string) error {
	if len(d) > l.DescriptionBytesMax {
		return invalid(field, "%s is longer than %d bytes", field, l.DescriptionBytesMax)
	}
	if !validText(d) {
		return invalid(field, "%s must be valid UTF-8 without NUL characters", field)
	}
	return nil
}

func (l *Limits) pageSize(n int) (int, error) {
	switch {
	case n < 0:
		return 0, invalid("page_size", "page_size must not be negative")
	case n == 0:
		return l.PageSizeDefault, nil
	case n > l.PageSizeMax:
		return 0, invalid("page_size", "page_size must be at most %d", l.PageSizeMax)
	}
	return n, nil
}

// fingerprint is a canonical hash of everything a money-moving request says,
// so a retry can be told apart from a different request under the same key.
// Maps are sorted (proto maps have no order) and every field is length-prefixed
// so that no two requests share an encoding.
func fingerprint(r MoveRequest) []byte {
	h := sha256.New()
	var buf [8]byte
	writeInt := func(v int64) {
		binary.BigEndian.PutUint64(buf[:], uint64(v))
		h.Write(buf[:])
	}
	writeStr := func(s string) {
		writeInt(int64(len(s)))
		h.Write([]byte(s))
	}
	writeStr("tally.fingerprint.v1")
	writeInt(int64(r.Kind))
	h.Write(r.AccountID[:])
	h.Write(r.Counterparty[:])
	writeInt(r.Amount)
	writeStr(r.Description)
	keys := make([]string, 0, len(r.Metadata))
	for k := range r.Metadata {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	writeInt(int64(len(keys)))
	for _, k := range keys {
		writeStr(k)
		writeStr(r.Metadata[k])
	}
	// Fields of the kinds added later are hashed only for them, so keys
	// stored before they existed keep their fingerprints.
	if r.Kind >= KindRefund {
		h.Write(r.HoldID[:])
		h.Write(r.ChargeID[:])
		if r.ExpiresAt != nil {
			writeInt(1)
			writeInt(r.ExpiresAt.UnixNano())
		} else {
			writeInt(0)
		}
		writeInt(int64(r.ExpiresIn))
	}
	return h.Sum(nil)
}

// validText accepts what PostgreSQL text and jsonb can store: valid UTF-8
// without NUL.
func validText(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}
