package ledger

import (
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/uuid"
)

// Fuzz targets for hostile input. `go test` runs their seeds (below and in
// testdata/fuzz); `go test -run '^$' -fuzz FuzzName ./ledger` explores.

func idFrom(b []byte) uuid.UUID {
	var id uuid.UUID
	copy(id[:], b)
	return id
}

// FuzzValidateMove: validation never panics; what it rejects is
// INVALID_ARGUMENT naming a field; what it accepts fits every bound the
// schema enforces; and the fingerprint is canonical (map order does not
// matter, the caller's scope and key do not enter it, any field does).
func FuzzValidateMove(f *testing.F) {
	a, b := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	f.Add(uint8(1), a[:], []byte{}, int64(250), "order-1", "", "k", "v", "k2", "v2")
	f.Add(uint8(2), a[:], b[:], int64(1), "topup-1", "top up", "", "", "", "")
	f.Add(uint8(3), a[:], a[:], int64(5), "same-account", "", "", "", "", "")
	f.Add(uint8(3), a[:], b[:], int64(-5), "neg", "d", "x", "1", "x", "2")
	f.Add(uint8(1), a[:], []byte{}, int64(9223372036854775807), strings.Repeat("k", 129), "\x00", "\xff", "v", "", "")
	f.Fuzz(func(t *testing.T, kind uint8, acct, counter []byte, amount int64, key, desc, mk1, mv1, mk2, mv2 string) {
		l := &Ledger{limits: DefaultLimits()}
		md := map[string]string{}
		if mk1 != "" || mv1 != "" {
			md[mk1] = mv1
		}
		if mk2 != "" || mv2 != "" {
			md[mk2] = mv2
		}
		r := MoveRequest{Kind: Kind(kind%4 + 1), AccountID: idFrom(acct), Counterparty: idFrom(counter), Amount: amount,
			IdempotencyKey: key, Description: desc, Metadata: md}
		err := l.validateMove(r)
		if err != nil {
			var le *Error
			if !errors.As(err, &le) || le.Code != CodeInvalid || (le.Reason != ReasonInvalidArgument && le.Reason != ReasonSelfPosting) || le.Field == "" {
				t.Fatalf("rejection is not INVALID_ARGUMENT with a field: %#v", err)
			}
			return
		}
		// Accepted: every bound the schema and the API promise holds.
		if r.AccountID == uuid.Nil || r.AccountID == r.Counterparty || r.Amount <= 0 {
			t.Fatalf("accepted bad accounts or amount: %+v", r)
		}
		if n := len(r.IdempotencyKey); n < 1 || n > IdempotencyKeyBytesMax {
			t.Fatalf("accepted key of %d bytes", n)
		}
		for i := 0; i < len(r.IdempotencyKey); i++ {
			if c := r.IdempotencyKey[i]; c < 0x20 || c > 0x7e {
				t.Fatalf("accepted non-printable key %q", r.IdempotencyKey)
			}
		}
		if len(r.Description) > DescriptionBytesMaxDefault || !utf8.ValidString(r.Description) || strings.ContainsRune(r.Description, 0) {
			t.Fatalf("accepted description %q", r.Description)
		}
		for k, v := range r.Metadata {
			if k == "" || len(k) > MetadataKeyBytesMaxDefault || len(v) > MetadataValueBytesMaxDefault ||
				!utf8.ValidString(k+v) || strings.ContainsRune(k+v, 0) {
				t.Fatalf("accepted metadata %q=%q", k, v)
			}
		}
		// The fingerprint is canonical.
		fp := fingerprint(r)
		copyMD := map[string]string{}
		keys := make([]string, 0, len(md))
		for k := range md {
			keys = append(keys, k)
		}
		for i := len(keys) - 1; i >= 0; i-- {
			copyMD[keys[i]] = md[keys[i]]
		}
		same := r
		same.Metadata = copyMD
		same.Scope, same.CreatedByClient, same.CreatedByKey = "other-client", uuid.New(), "otherkeyid12"
		same.IdempotencyKey = key + "-retry"
		if string(fingerprint(same)) != string(fp) {
			t.Fatal("fingerprint depends on map order, scope, principal or key")
		}
		// ...and every field of the request is in it.
		for i, mutate := range []func(*MoveRequest){
			func(m *MoveRequest) { m.Kind = m.Kind%3 + 1 },
			func(m *MoveRequest) { m.AccountID[0] ^= 1 },
			func(m *MoveRequest) { m.Counterparty[15] ^= 1 },
			func(m *MoveRequest) { m.Amount ^= 1 },
			func(m *MoveRequest) { m.Description += "x" },
			func(m *MoveRequest) {
				more := map[string]string{}
				for k, v := range md {
					more[k] = v
				}
				k := "m"
				for _, taken := more[k]; taken; _, taken = more[k] {
					k += "m"
				}
				more[k] = ""
				m.Metadata = more
			},
		} {
			m := r
			m.Metadata = md
			mutate(&m)
			if string(fingerprint(m)) == string(fp) {
				t.Fatalf("mutation %d does not change the fingerprint", i)
			}
		}
	})
}

// FuzzPageToken: decoding never panics; a bad token is INVALID_ARGUMENT on
// the page_token field; a token accepted for one query is refused for any
// other (so a token cannot be replayed against another account or filter);
// and the cursors the ledger acts on are well formed.
func FuzzPageToken(f *testing.F) {
	acct := uuid.Must(uuid.NewV7()).String()
	q1 := "entries|" + acct + "|-|-"
	f.Add(q1, encodeToken(q1, pageCursor{Seq: 42}), "entries|"+uuid.Must(uuid.NewV7()).String()+"|-|-")
	q2 := `accounts|""|"USD"|1`
	f.Add(q2, encodeToken(q2, pageCursor{After: acct}), `accounts|""|"EUR"|1`)
	f.Add(q1, "eyJ2IjoxLCJzIjotMSwiYyI6IiJ9", q2)
	f.Add("", "", "x")
	f.Add(q1, strings.Repeat("A", 513), q2)
	f.Fuzz(func(t *testing.T, query, tok, other string) {
		c, err := decodeToken(query, tok)
		if err != nil {
			var le *Error
			if !errors.As(err, &le) || le.Code != CodeInvalid || le.Field != "page_token" {
				t.Fatalf("bad token error: %#v", err)
			}
		} else {
			if c.V != tokenVersion || len(tok) > 512 {
				t.Fatalf("accepted %+v from %q", c, tok)
			}
			if other != query {
				if _, err := decodeToken(other, tok); err == nil {
					t.Fatalf("token for %q accepted for %q", query, other)
				}
			}
		}
		if seq, err := entriesCursor(query, tok); err == nil && seq < 0 {
			t.Fatalf("negative sequence %d accepted", seq)
		}
		if id, err := accountsCursor(query, tok); err == nil && id.String() != c.After {
			t.Fatalf("account cursor %q decoded to %s", c.After, id)
		}
		// Tokens the server makes round-trip for their query only (a cursor
		// string that is not UTF-8 comes back with U+FFFD, as JSON has it;
		// found by fuzzing, testdata/fuzz/FuzzPageToken/e0c36e2c762c1428).
		for _, cur := range []pageCursor{{Seq: int64(len(tok))}, {After: query}} {
			good := encodeToken(query, cur)
			got, err := decodeToken(query, good)
			if err != nil || got.Seq != cur.Seq || (utf8.ValidString(cur.After) && got.After != cur.After) {
				if len(good) <= 512 {
					t.Fatalf("round trip of %+v: %+v %v", cur, got, err)
				}
			}
			if other != query {
				if _, err := decodeToken(other, good); err == nil {
					t.Fatalf("server token for %q accepted for %q", query, other)
				}
			}
		}
	})
}
