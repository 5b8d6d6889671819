package ledger

import "errors"

// Reply sizes. A reply larger than the gRPC message limit cannot be sent:
// the caller would get a transport error for a call that may have
// committed. So the ledger bounds what it answers, in bytes, before the
// answer exists: a SubmitBatch whose reply could pass BatchReplyBytesMax is
// refused before COMMIT (nothing applied, the batch key not used), and a page
// stops early, with a next-page token, when its items reach PageBytesMax.
//
// The ledger knows nothing of protobuf, so it estimates. Every estimate is
// an upper bound of the protobuf encoding the api package makes of the same
// value (api tests check it): each string field counts its length plus
// stringOverhead (a tag of at most 2 bytes and a length varint of at most 5
// for anything under 32 GiB), each map entry its key and value plus
// mapEntryOverhead (the entry's own tag and length, then its two string
// fields), each scalar scalarBytes (a tag and a 64-bit varint of at most 10
// bytes), each timestamp timestampBytes (a message of two varints), and each
// message header messageOverhead. Ids are counted at 36 bytes even when
// empty.

// Defaults of the reply bounds. Each has a tallyd flag.
const (
	// BatchReplyBytesMaxDefault bounds a SubmitBatch reply: 4 MiB (the
	// default --msg-bytes-max) less 128 KiB. Keep it at most the message
	// limit.
	BatchReplyBytesMaxDefault = 4<<20 - 128<<10
	// PageBytesMaxDefault bounds one page of FindAccounts or ListEntries,
	// and the reply of a GetBalances.
	PageBytesMaxDefault = 3 << 20
)

const (
	stringOverhead   = 8
	mapEntryOverhead = 3*stringOverhead + 8
	scalarBytes      = 12
	timestampBytes   = 24
	messageOverhead  = 8
	idBytes          = 36 + stringOverhead
)

func stringBytes(s string) int { return len(s) + stringOverhead }

func metadataBytes(m map[string]string) int {
	n := 0
	for k, v := range m {
		n += len(k) + len(v) + mapEntryOverhead
	}
	return n
}

// transferBytes bounds a tally.v1.Transfer: 6 ids, 4 other strings, 4
// scalars, 1 timestamp and the metadata.
func transferBytes(t Transfer) int {
	return messageOverhead + 6*idBytes + stringBytes(t.IdempotencyKey) + stringBytes(t.Currency) +
		stringBytes(t.Description) + stringBytes(t.CreatedByKey) + 4*scalarBytes + timestampBytes + metadataBytes(t.Metadata)
}

// holdBytes bounds a tally.v1.Hold: 5 ids, 4 other strings, 3 scalars, 3
// timestamps and the metadata.
func holdBytes(h Hold) int {
	return messageOverhead + 5*idBytes + stringBytes(h.IdempotencyKey) + stringBytes(h.Currency) +
		stringBytes(h.Description) + stringBytes(h.CreatedByKey) + 3*scalarBytes + 3*timestampBytes + metadataBytes(h.Metadata)
}

// balanceBytesMax bounds a tally.v1.Balance: an id, a currency (at most 16
// bytes), 7 scalars and a timestamp.
const balanceBytesMax = messageOverhead + idBytes + 16 + stringOverhead + 7*scalarBytes + timestampBytes

// accountBytes bounds a tally.v1.Account: an id, 2 strings, 6 scalars, a
// timestamp and the metadata.
func accountBytes(a Account) int {
	return messageOverhead + idBytes + stringBytes(a.Currency) + stringBytes(a.ExternalRef) + 6*scalarBytes +
		timestampBytes + metadataBytes(a.Metadata)
}

// entryBytes bounds a tally.v1.Entry: 3 ids, a key id, 5 scalars and a
// timestamp.
func entryBytes(e Entry) int {
	return messageOverhead + 3*idBytes + stringBytes(e.CreatedByKey) + 5*scalarBytes + timestampBytes
}

// ResultBytes bounds the encoding of a TransferResult as the reply of a
// money-moving call (tally.v1.TransferResult or tally.v1.HoldResult: the
// transfer, the balance, the hold and the account when present, and 2
// flags).
func ResultBytes(r TransferResult) int {
	n := messageOverhead + transferBytes(r.Transfer) + balanceBytesMax + 2*scalarBytes
	if r.Hold != nil {
		n += holdBytes(*r.Hold)
	}
	if r.Account != nil {
		n += accountBytes(*r.Account)
	}
	return n
}

// errorBytes bounds a tally.v1.BatchError.
func errorBytes(e *Error) int {
	return messageOverhead + scalarBytes + stringBytes(e.Reason) + stringBytes(e.Message)
}

// batchReplyBytes bounds a SubmitBatch reply made of results: each result
// in its oneof wrapper, and the reply's 3 scalars.
func batchReplyBytes(results []itemResult) int {
	n := messageOverhead + 3*scalarBytes
	for _, r := range results {
		n += 2 * messageOverhead
		var le *Error
		switch {
		case r.err != nil && errors.As(r.err, &le):
			n += errorBytes(le)
		case r.err != nil:
			n += messageOverhead + scalarBytes + 2*stringOverhead + len(r.err.Error())
		default:
			n += ResultBytes(r.res)
		}
	}
	return n
}

// AccountBytes and EntryBytes are the page estimates (exported for the api
// tests that check they are upper bounds).
func AccountBytes(a Account) int { return accountBytes(a) }

// EntryBytes: see AccountBytes.
func EntryBytes(e Entry) int { return entryBytes(e) }

// BalanceBytesMax bounds the encoding of one Balance.
const BalanceBytesMax = balanceBytesMax

// checkBatchReply refuses a batch whose reply could pass the limit. It runs
// inside the transaction, before COMMIT: returning the error rolls back
// every write of the batch, its batch key included.
func (l *Ledger) checkBatchReply(results []itemResult) error {
	n := batchReplyBytes(results)
	if n <= l.limits.BatchReplyBytesMax {
		return nil
	}
	return rejection(CodeFailedPrecondition, ReasonBatchReplyTooLarge,
		"not applied: the reply to this batch of %d operations would take up to %d bytes, more than the limit of %d "+
			"(--batch-reply-bytes-max; the results carry each hold's and transfer's metadata and description); "+
			"nothing was written and the batch_key was not used: send the operations in smaller batches",
		len(results), n, l.limits.BatchReplyBytesMax)
}

// pageCut returns how many of sizes fit in max bytes: at least one (a
// single item always fits the message limit: metadata and descriptions are
// bounded far below it).
func pageCut(n int, size func(i int) int, max int) int {
	total := 0
	for i := 0; i < n; i++ {
		total += size(i) + messageOverhead
		if total > max && i > 0 {
			return i
		}
	}
	return n
}
