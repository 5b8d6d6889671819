package ledger

import (
	"strings"
	"testing"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

func TestFingerprintIsCanonical(t *testing.T) {
	a, b := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	base := MoveRequest{Kind: KindCharge, AccountID: a, Amount: 5, Description: "d", Metadata: map[string]string{"x": "1", "y": "2", "z": "3"}}
	same := base
	same.Metadata = map[string]string{"z": "3", "y": "2", "x": "1"}
	for range 20 { // map iteration order varies between runs
		if string(fingerprint(base)) != string(fingerprint(same)) {
			t.Fatal("fingerprint depends on map order")
		}
	}
	diffs := []func(r *MoveRequest){
		func(r *MoveRequest) { r.Kind = KindCredit },
		func(r *MoveRequest) { r.AccountID = b },
		func(r *MoveRequest) { r.Counterparty = b },
		func(r *MoveRequest) { r.Amount = 6 },
		func(r *MoveRequest) { r.Description = "e" },
		func(r *MoveRequest) { r.Metadata = map[string]string{"x": "1", "y": "2"} },
		// Length prefixes: moving bytes between fields changes the hash.
		func(r *MoveRequest) { r.Metadata = map[string]string{"x": "1", "y": "2", "z3": ""} },
		func(r *MoveRequest) {
			r.Description = ""
			r.Metadata = map[string]string{"dx": "1", "y": "2", "z": "3"}
		},
	}
	for i, d := range diffs {
		r := base
		r.Metadata = map[string]string{"x": "1", "y": "2", "z": "3"}
		d(&r)
		if string(fingerprint(r)) == string(fingerprint(base)) {
			t.Errorf("change %d does not change the fingerprint", i)
		}
	}
}

func TestPageTokens(t *testing.T) {
	tok := encodeToken("q1", pageCursor{After: "abc", Seq: 7})
	c, err := decodeToken("q1", tok)
	if err != nil || c.After != "abc" || c.Seq != 7 {
		t.Fatalf("round trip: %+v %v", c, err)
	}
	for name, bad := range map[string]string{
		"other query": tok,
		"garbled":     tok[:len(tok)-2] + "zz",
		"not base64":  "%%%",
		"huge":        strings.Repeat("a", 600),
		"empty json":  "e30",
	} {
		q := "q1"
		if name == "other query" {
			q = "q2"
		}
		if _, err := decodeToken(q, bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestValidateKey(t *testing.T) {
	for k, ok := range map[string]bool{
		"a": true, strings.Repeat("k", 128): true, "order-1 ~!": true,
		"": false, strings.Repeat("k", 129): false, "tab\tkey": false, "é": false, "del\x7f": false,
	} {
		if err := validateKey(k); (err == nil) != ok {
			t.Errorf("validateKey(%q) = %v", k, err)
		}
	}
}

// A broken posting invariant is a bug: assertPosting panics so that the
// batch is never committed.
func TestAssertPostingPanicsOnBrokenInvariant(t *testing.T) {
	a, b, id := uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7()), uuid.Must(uuid.NewV7())
	type posting struct {
		tr     store.Transfer
		e      [2]store.Entry
		before [2]store.Account
	}
	good := func() *posting {
		return &posting{
			tr: store.Transfer{ID: id, Amount: 5, DebitAccountID: a, CreditAccountID: b},
			e: [2]store.Entry{
				{AccountID: a, Sequence: 1, Amount: -5, BalanceAfter: -5, VersionAfter: 1},
				{AccountID: b, Sequence: 3, Amount: 5, BalanceAfter: 9, VersionAfter: 4},
			},
			before: [2]store.Account{
				{ID: a, Balance: 0, Version: 0, LastSequence: 0},
				{ID: b, Balance: 4, Version: 3, LastSequence: 2},
			},
		}
	}
	p := good()
	assertPosting(p.tr, p.e, p.before) // must not panic
	for name, breakIt := range map[string]func(p *posting){
		"unbalanced":        func(p *posting) { p.e[1].Amount = 6 },
		"same account":      func(p *posting) { p.e[1].AccountID = a },
		"balance mismatch":  func(p *posting) { p.e[0].BalanceAfter = -4 },
		"sequence gap":      func(p *posting) { p.e[1].Sequence = 4 },
		"version skip":      func(p *posting) { p.e[1].VersionAfter = 5 },
		"sides swapped":     func(p *posting) { p.tr.DebitAccountID = b },
		"stale prior state": func(p *posting) { p.before[1].Balance = 3 },
	} {
		p := good()
		breakIt(p)
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			assertPosting(p.tr, p.e, p.before)
		}()
	}
}
