package ledger

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"

	"github.com/google/uuid"
)

// Page tokens are opaque to callers: base64url of a small JSON cursor plus a
// checksum over the cursor and the query it belongs to. A garbled token, or a
// token replayed against a different query, is INVALID_ARGUMENT. They are not
// secret (they only hold a position), so no server key is needed and any
// tallyd replica accepts any other's tokens.
type pageCursor struct {
	V     int    `json:"v"`
	After string `json:"a"`
	Seq   int64  `json:"s,omitempty"`
	Sum   string `json:"c"`
}

// tokenVersion is the cursor format. Version 1 checksummed the cursor's JSON
// re-encoding, which is not canonical (encoding/json rewrites invalid UTF-8),
// as fuzzing found; version 2 checksums a length-prefixed binary encoding.
const tokenVersion = 2

// checksum binds a cursor to its query. It hashes a canonical, length-
// prefixed encoding of the query and every cursor field, so no two
// (query, cursor) pairs share an input and JSON's spelling does not matter.
func checksum(query string, c pageCursor) string {
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
	writeStr("tally.pagetoken")
	writeStr(query)
	writeInt(int64(c.V))
	writeStr(c.After)
	writeInt(c.Seq)
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil)[:12])
}

func encodeToken(query string, c pageCursor) string {
	c.V, c.Sum = tokenVersion, ""
	// Checksum the cursor as the decoder will see it: JSON replaces invalid
	// UTF-8, so round-trip it first (a no-op for the ids and sequences the
	// ledger puts in cursors).
	b, _ := json.Marshal(c)
	_ = json.Unmarshal(b, &c)
	c.Sum = checksum(query, c)
	b, _ = json.Marshal(c)
	return base64.RawURLEncoding.EncodeToString(b)
}

func decodeToken(query, tok string) (pageCursor, error) {
	bad := invalid("page_token", "page_token is malformed or belongs to another query")
	if len(tok) > 512 {
		return pageCursor{}, bad
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return pageCursor{}, bad
	}
	var c pageCursor
	if err := json.Unmarshal(b, &c); err != nil || c.V != tokenVersion || c.Sum != checksum(query, c) {
		return pageCursor{}, bad
	}
	return c, nil
}

// accountsCursor decodes a FindAccounts page token: the account id to
// continue after.
func accountsCursor(query, tok string) (uuid.UUID, error) {
	c, err := decodeToken(query, tok)
	if err != nil {
		return uuid.Nil, err
	}
	after, err := uuid.Parse(c.After)
	if err != nil || len(c.After) != 36 {
		return uuid.Nil, invalid("page_token", "page_token is malformed or belongs to another query")
	}
	return after, nil
}

// entriesCursor decodes a ListEntries page token: the sequence to continue
// after.
func entriesCursor(query, tok string) (int64, error) {
	c, err := decodeToken(query, tok)
	if err != nil {
		return 0, err
	}
	if c.Seq < 0 {
		return 0, invalid("page_token", "page_token is malformed or belongs to another query")
	}
	return c.Seq, nil
}
