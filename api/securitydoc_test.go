package api_test

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/auth"
)

// roleTable parses the role table of docs/SECURITY.md ("## Roles and
// permissions"): RPC name → the roles whose cell is not empty. A row may
// name several RPCs separated by commas.
func roleTable(doc string) (map[string][]auth.Role, error) {
	_, section, ok := strings.Cut(doc, "## Roles and permissions")
	if !ok {
		return nil, fmt.Errorf("no \"## Roles and permissions\" section")
	}
	var roles []auth.Role
	out := map[string][]auth.Role{}
	for _, line := range strings.Split(section, "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "## ") {
			break
		}
		if !strings.HasPrefix(line, "|") {
			if len(roles) > 0 && len(out) > 0 {
				break // the table ended
			}
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		switch {
		case cells[0] == "RPC":
			for _, c := range cells[1:] {
				roles = append(roles, auth.Role(c))
			}
			continue
		case strings.HasPrefix(cells[0], ":-") || strings.HasPrefix(cells[0], "-"):
			continue
		case strings.HasPrefix(cells[0], "grpc."):
			continue // open services, not in the table of the code
		}
		if len(cells)-1 != len(roles) {
			return nil, fmt.Errorf("row %q has %d role cells, the header %d", line, len(cells)-1, len(roles))
		}
		var allowed []auth.Role
		for i, c := range cells[1:] {
			if c != "" {
				allowed = append(allowed, roles[i])
			}
		}
		for _, name := range strings.Split(cells[0], ",") {
			out[strings.TrimSpace(name)] = allowed
		}
	}
	if len(roles) == 0 {
		return nil, fmt.Errorf("no table header")
	}
	return out, nil
}

// roleTableDiff lists every difference between the documented table and
// api.MethodRoles.
func roleTableDiff(doc string) ([]string, error) {
	table, err := roleTable(doc)
	if err != nil {
		return nil, err
	}
	norm := func(rs []auth.Role) string {
		s := make([]string, len(rs))
		for i, r := range rs {
			s[i] = string(r)
		}
		sort.Strings(s)
		return strings.Join(s, ",")
	}
	var diffs []string
	seen := map[string]bool{}
	for method, roles := range api.MethodRoles {
		name := method[strings.LastIndex(method, "/")+1:]
		seen[name] = true
		got, ok := table[name]
		switch {
		case !ok:
			diffs = append(diffs, name+": missing from docs/SECURITY.md")
		case norm(got) != norm(roles):
			diffs = append(diffs, fmt.Sprintf("%s: docs say %s, the code %s", name, norm(got), norm(roles)))
		}
	}
	for name := range table {
		if !seen[name] {
			diffs = append(diffs, name+": documented but not in api.MethodRoles")
		}
	}
	sort.Strings(diffs)
	return diffs, nil
}

// The role table in docs/SECURITY.md is the code's table: every RPC of
// api.MethodRoles appears with exactly its roles.
func TestSecurityDocRoleTableMatchesCode(t *testing.T) {
	doc, err := os.ReadFile("../docs/SECURITY.md")
	if err != nil {
		t.Fatal(err)
	}
	diffs, err := roleTableDiff(string(doc))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range diffs {
		t.Error(d)
	}
	// The check can fail: a row with a role too many, and a missing row.
	bad := strings.Replace(string(doc), "| Credit | | | | | ✓ |", "| Credit | ✓ | | | | ✓ |", 1)
	if bad == string(doc) {
		t.Fatal("the Credit row was not found to tamper with")
	}
	if diffs, err := roleTableDiff(bad); err != nil || len(diffs) != 1 || !strings.HasPrefix(diffs[0], "Credit:") {
		t.Errorf("a tampered Credit row gave %v, %v", diffs, err)
	}
	bad = strings.Replace(string(doc), "| Transfer | | | | | ✓ |\n", "", 1)
	if diffs, err := roleTableDiff(bad); err != nil || len(diffs) != 1 || !strings.Contains(diffs[0], "missing") {
		t.Errorf("a missing Transfer row gave %v, %v", diffs, err)
	}
}
