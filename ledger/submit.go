package ledger

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// BatchMode says how a SubmitBatch applies its operations.
type BatchMode int16

// Batch modes (numbers match the proto enum and the batches table).
const (
	// BatchAtomic: all operations apply or none does.
	BatchAtomic BatchMode = 1
	// BatchIndependent: each operation succeeds or fails on its own, exactly
	// as if they had been sent one by one in order.
	BatchIndependent BatchMode = 2
)

// BatchRequest is a SubmitBatch call.
type BatchRequest struct {
	Scope string
	// Key makes the batch itself idempotent: a retry returns the same
	// per-item results.
	Key  string
	Mode BatchMode
	// Items are Charge, Credit, Transfer, Hold, CaptureHold, ReleaseHold or
	// Refund requests (Kind set), each with its own idempotency key.
	Items []MoveRequest
}

// BatchItemResult is one operation's outcome: a result or an error.
type BatchItemResult struct {
	Result *TransferResult `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
}

// BatchResult is a SubmitBatch outcome.
type BatchResult struct {
	// Applied is false when an ATOMIC batch failed: nothing was written.
	Applied bool
	// FailedIndex is the first failed item of an ATOMIC batch, or -1.
	FailedIndex int
	Items       []BatchItemResult
	// Replayed: the batch key was used before and this is its stored outcome.
	Replayed bool
}

// storedError is how an Error is kept in a batch's stored results.
type storedError struct {
	Code     Code   `json:"code"`
	Reason   string `json:"reason"`
	Message  string `json:"message"`
	Field    string `json:"field,omitempty"`
	Replayed bool   `json:"replayed,omitempty"`
}

type storedItem struct {
	Result *TransferResult `json:"result,omitempty"`
	Error  *storedError    `json:"error,omitempty"`
}

func encodeResults(results []itemResult) []byte {
	out := make([]storedItem, len(results))
	for i, r := range results {
		if r.err != nil {
			var le *Error
			if !errors.As(r.err, &le) {
				panic(fmt.Sprintf("ledger: batch item error of type %T", r.err))
			}
			out[i].Error = &storedError{Code: le.Code, Reason: le.Reason, Message: le.Message, Field: le.Field, Replayed: le.Replayed}
			continue
		}
		res := r.res
		out[i].Result = &res
	}
	b, err := json.Marshal(out)
	if err != nil {
		panic(fmt.Sprintf("ledger: encoding batch results: %v", err))
	}
	return b
}

func decodeResults(b []byte) ([]BatchItemResult, error) {
	var in []storedItem
	if err := json.Unmarshal(b, &in); err != nil {
		return nil, fromStore(fmt.Errorf("stored batch results: %v: %w", err, store.ErrInternal))
	}
	out := make([]BatchItemResult, len(in))
	for i, it := range in {
		if it.Error != nil {
			e := it.Error
			out[i].Error = &Error{Code: e.Code, Reason: e.Reason, Message: e.Message, Field: e.Field, Replayed: e.Replayed}
			continue
		}
		out[i].Result = it.Result
	}
	return out, nil
}

func batchFingerprint(mode BatchMode, items []*item) []byte {
	h := sha256.New()
	var buf [8]byte
	h.Write([]byte("tally.batch.v1"))
	binary.BigEndian.PutUint64(buf[:], uint64(mode))
	h.Write(buf[:])
	for _, it := range items {
		binary.BigEndian.PutUint64(buf[:], uint64(it.r.Kind))
		h.Write(buf[:])
		h.Write([]byte(it.r.IdempotencyKey))
		h.Write([]byte{0})
		h.Write(it.fp)
	}
	return h.Sum(nil)
}

// SubmitBatch applies up to Limits.SubmitBatchItemsMax operations in one
// PostgreSQL transaction, through the same locking, rules and writes as
// group commit. The batch key's outcome (per-item results) is stored in the
// same transaction, so a retry returns it unchanged.
func (l *Ledger) SubmitBatch(ctx context.Context, r BatchRequest) (BatchResult, error) {
	if err := validateKey(r.Key); err != nil {
		var le *Error
		if errors.As(err, &le) {
			le.Field, le.Message = "batch_key", "batch_key: "+le.Message
		}
		return BatchResult{}, err
	}
	if r.Mode != BatchAtomic && r.Mode != BatchIndependent {
		return BatchResult{}, invalid("mode", "mode must be ATOMIC or INDEPENDENT")
	}
	if len(r.Items) == 0 {
		return BatchResult{}, invalid("items", "a batch needs at least one operation")
	}
	if len(r.Items) > l.limits.SubmitBatchItemsMax {
		return BatchResult{}, invalid("items", "a batch holds at most %d operations", l.limits.SubmitBatchItemsMax)
	}
	items := make([]*item, len(r.Items))
	for i, m := range r.Items {
		if !m.Kind.keyed() {
			return BatchResult{}, invalid("items", "item %d: unsupported operation", i)
		}
		m.Scope = r.Scope
		if err := l.validateMove(m); err != nil {
			var le *Error
			if errors.As(err, &le) {
				le.Message = fmt.Sprintf("item %d: %s", i, le.Message)
				le.Field = fmt.Sprintf("items[%d].%s", i, le.Field)
			}
			return BatchResult{}, err
		}
		items[i] = &item{r: m, fp: fingerprint(m)}
	}
	fp := batchFingerprint(r.Mode, items)
	ctx, cancel := context.WithTimeout(ctx, l.batch.cfg.Timeout)
	defer cancel()
	// A SubmitBatch posts to the system shards of a committer chosen by its
	// key, so retries and its batch key land on the same shard.
	lane := laneOf(uuid.NewSHA1(uuid.NameSpaceOID, []byte(r.Scope+"\x00"+r.Key)), l.batch.cfg.WorkersMax)
	for attempt := 0; ; attempt++ {
		sb := &submitBatch{scope: r.Scope, key: r.Key, fp: fp, mode: r.Mode}
		results, applied, post, err := l.commitItems(ctx, items, sb, lane)
		var missing *systemMissingError
		// Each attempt can find one more currency whose default system
		// accounts this process has not met yet: at most one per item.
		if errors.As(err, &missing) && attempt < len(items) {
			if err := l.ensureSystemAccounts(ctx, missing.currency); err != nil {
				return BatchResult{}, err
			}
			continue
		}
		if err != nil {
			return BatchResult{}, fromStore(err)
		}
		l.refresh.begin(post.balances)
		l.batch.afterCommit(func(ctx context.Context) {
			l.refreshCache(ctx, post.balances)
			l.refresh.end(post.balances)
		})
		if sb.stored != nil {
			if string(sb.stored.Fingerprint) != string(fp) || BatchMode(sb.stored.Mode) != r.Mode {
				return BatchResult{}, rejection(CodeAlreadyExists, ReasonIdempotencyKeyReused,
					"batch_key was already used for a different batch")
			}
			out, err := decodeResults(sb.stored.Results)
			if err != nil {
				return BatchResult{}, err
			}
			return finishBatch(out, sb.stored.Applied, true), nil
		}
		out := make([]BatchItemResult, len(results))
		for i, res := range results {
			if res.err != nil {
				var le *Error
				if !errors.As(res.err, &le) {
					panic(fmt.Sprintf("ledger: batch item error of type %T", res.err))
				}
				out[i].Error = le
				continue
			}
			rr := res.res
			out[i].Result = &rr
		}
		return finishBatch(out, applied, false), nil
	}
}

func finishBatch(items []BatchItemResult, applied, replayed bool) BatchResult {
	res := BatchResult{Applied: applied, FailedIndex: -1, Items: items, Replayed: replayed}
	if !applied {
		for i, it := range items {
			if it.Error != nil && it.Error.Reason != ReasonNotApplied {
				res.FailedIndex = i
				break
			}
		}
	}
	return res
}
