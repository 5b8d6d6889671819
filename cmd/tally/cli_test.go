package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/tallyledger/tally/internal/tallytest"
)

// runMainEnv makes the test binary run main() instead of the tests, so that
// tests can check the real process exit code.
const runMainEnv = "TALLY_CLI_TEST_RUN_MAIN"

// tallyExec runs tally (the test binary as main) and returns its exit code,
// standard output and standard error.
func tallyExec(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), runMainEnv+"=1"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

// tallyIn runs tally in this process, as main does, and returns its exit
// code, standard output and standard error.
func tallyIn(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := execute(args, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

// closedAddr returns a loopback address nothing listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// commandPaths lists the path (without "tally") of every command.
func commandPaths(cmd *cobra.Command, prefix []string) [][]string {
	var paths [][]string
	for _, c := range cmd.Commands() {
		p := append(prefix[:len(prefix):len(prefix)], c.Name())
		paths = append(paths, p)
		paths = append(paths, commandPaths(c, p)...)
	}
	return paths
}

// --help (and -h) exits 0 for every command and prints its generated usage
// on standard output.
func TestHelpExitsZero(t *testing.T) {
	paths := commandPaths(newApp(nil, nil, nil).newRoot(), nil)
	paths = append(paths, nil, []string{"help"})
	if len(paths) < 25 {
		t.Fatalf("only %d commands found", len(paths))
	}
	for _, p := range paths {
		for _, h := range []string{"--help", "-h"} {
			code, out, errOut := tallyIn(append(p, h)...)
			if code != exitOK || !strings.Contains(out, "Usage:") || errOut != "" {
				t.Errorf("tally %s %s: exit %d, stdout %q, stderr %q", strings.Join(p, " "), h, code, out, errOut)
			}
		}
	}
	code, out, _ := tallyExec(t, nil, "reconcile", "--help")
	if code != 0 || !strings.Contains(out, "tally reconcile [flags]") || !strings.Contains(out, "--repair-cache") {
		t.Fatalf("tally reconcile --help: exit %d:\n%s", code, out)
	}
}

// An unknown enum value exits 2 and names the valid values; nothing is
// sent (no server runs here).
func TestBadEnumExitsTwo(t *testing.T) {
	for _, c := range []struct {
		args  []string
		valid string
	}{
		{[]string{"account", "create", "--currency", "USD", "--type", "revnue"}, "customer, revenue, funding"},
		{[]string{"account", "create", "--currency", "USD", "--floor", "zero"}, "non_negative, none"},
		{[]string{"account", "find", "--type", "customers"}, "customer, revenue, funding"},
		{[]string{"batch", "--mode", "all"}, "atomic, independent"},
		{[]string{"export", "--format", "json"}, "jsonl, csv"},
		{[]string{"entries", "--account", "a", "--kind", "charge,refnd"}, "charge, credit, transfer, refund"},
		{[]string{"bench", "--scenario", "charge"}, "charge-uniform, charge-hot"},
		{[]string{"bench", "--consistency", "eventual"}, "cached, strong"},
	} {
		code, out, errOut := tallyIn(c.args...)
		if code != exitUsage || out != "" || !strings.Contains(errOut, c.valid) || !strings.Contains(errOut, "--help") {
			t.Errorf("tally %s: exit %d, stdout %q, stderr %q; want 2 naming %q", strings.Join(c.args, " "), code, out, errOut, c.valid)
		}
	}
	code, _, errOut := tallyExec(t, nil, "account", "create", "--currency", "USD", "--type", "revnue", "--addr", closedAddr(t))
	if code != 2 || !strings.Contains(errOut, `invalid argument "revnue" for "--type" flag: must be one of customer, revenue, funding`) {
		t.Fatalf("tally account create --type revnue: exit %d: %s", code, errOut)
	}
	// Any case of a valid value is accepted (it gets as far as dialing).
	if code, _, errOut := tallyIn("account", "create", "--currency", "USD", "--type", "REVENUE", "--addr", closedAddr(t),
		"--retry-attempts-max", "1"); code != exitUnreachable {
		t.Fatalf("--type REVENUE: exit %d: %s", code, errOut)
	}
}

// Bad usage of every other kind exits 2: a missing required flag, flags
// that exclude each other, an unknown command, flag or argument, a value
// that does not parse, a bad $TALLY_ value.
func TestBadUsageExitsTwo(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"balance"}, `required flag(s) "account" not set`},
		{[]string{"account", "create"}, `required flag(s) "currency" not set`},
		{[]string{"hold", "create", "--account", "a"}, `required flag(s) "amount" not set`},
		{[]string{"transfer", "create", "--amount", "1"}, `required flag(s) "from", "to" not set`},
		{[]string{"bench-usage", "--from", "2026-01-01"}, `required flag(s) "to" not set`},
		{[]string{"show"}, "[account external-ref] is required"},
		{[]string{"transfer", "get"}, "[id key] is required"},
		{[]string{"balances"}, "[account file] is required"},
		{[]string{"show", "--account", "a", "--external-ref", "r"}, "none of the others can be"},
		{[]string{"hold", "create", "--account", "a", "--amount", "1", "--expires-in", "1m", "--expires-at", "2030-01-01T00:00:00Z"}, "none of the others can be"},
		{[]string{"balance", "--account", "a", "--tls-cert", "c.pem"}, "[tls-cert tls-key]"},
		{[]string{"transfer", "get", "--id", "x", "--client-id", "c"}, "--client-id needs --key"},
		{[]string{"account", "update", "--account", "a", "--meta", "k=v"}, "--meta needs --replace-meta"},
		{[]string{"account", "update", "--account", "a", "--low-balance-threshold", "lots"}, "an integer or none"},
		{[]string{"balance", "--account", "a", "--at", "yesterday"}, "--at wants an RFC 3339 time"},
		{[]string{"charge", "--account", "a", "--amount", "ten"}, `invalid argument "ten" for "--amount"`},
		{[]string{"charge", "--account", "a", "--amount", "1", "--meta", "novalue"}, "--meta wants key=value"},
		{[]string{"bench", "--server-pid", "x"}, `--server-pid: bad pid "x"`},
		{[]string{"acount", "create"}, `unknown command "acount" for "tally"; did you mean account?`},
		{[]string{"hold", "crate"}, `unknown command "crate" for "tally hold"; did you mean create?`},
		{[]string{"usage", "extra"}, `unknown command "extra" for "tally usage"`},
		{[]string{"balance", "--acount", "a"}, "unknown flag: --acount"},
		{[]string{"account"}, "a command is required"},
		{nil, "a command is required"},
	} {
		code, out, errOut := tallyIn(c.args...)
		if code != exitUsage || out != "" || !strings.Contains(errOut, c.want) {
			t.Errorf("tally %s: exit %d, stdout %q, stderr %q; want 2 and %q", strings.Join(c.args, " "), code, out, errOut, c.want)
		}
	}
	code, _, errOut := tallyExec(t, nil, "balance")
	if code != 2 || !strings.Contains(errOut, `required flag(s) "account" not set`) {
		t.Fatalf("tally balance: exit %d: %s", code, errOut)
	}
	t.Setenv("TALLY_TIMEOUT", "soon")
	if code, _, errOut := tallyIn("balance", "--account", "a"); code != exitUsage || !strings.Contains(errOut, "$TALLY_TIMEOUT") {
		t.Errorf("$TALLY_TIMEOUT=soon: exit %d: %s", code, errOut)
	}
}

// A tallyd that cannot be reached exits 3, after the retries of api/client;
// $TALLY_ADDR is honored and --addr wins over it.
func TestUnreachableExitsThree(t *testing.T) {
	addr := closedAddr(t)
	code, _, errOut := tallyExec(t, nil, "charge", "--account", "a", "--amount", "1", "--key", "k", "--addr", addr, "--retry-attempts-max", "2")
	if code != 3 || !strings.Contains(errOut, "Unavailable") || !strings.Contains(errOut, "same --key") {
		t.Fatalf("charge against %s: exit %d: %s", addr, code, errOut)
	}
	env := []string{"TALLY_ADDR=" + addr, "TALLY_RETRY_ATTEMPTS_MAX=1"}
	if code, _, errOut := tallyExec(t, env, "balance", "--account", "a"); code != 3 || !strings.Contains(errOut, addr) {
		t.Fatalf("balance with $TALLY_ADDR=%s: exit %d: %s", addr, code, errOut)
	}
	if code, _, errOut := tallyExec(t, env, "reconcile"); code != 3 {
		t.Fatalf("reconcile with $TALLY_ADDR=%s: exit %d: %s", addr, code, errOut)
	}
	// A refusal by a server that answers is 1, not 3.
	srv := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	code, _, errOut = tallyExec(t, env, "balance", "--account", "not-a-uuid", "--addr", srv.Addr, "--api-key", srv.AdminKey)
	if code != 1 || !strings.Contains(errOut, "InvalidArgument") {
		t.Fatalf("balance of a bad id from a running server (--addr over $TALLY_ADDR): exit %d: %s", code, errOut)
	}
}

// $TALLY_ flags fill what the command line leaves unset, except a flag
// whose mutually exclusive partner was given.
func TestEnvFillsFlags(t *testing.T) {
	env := tallytest.Start(t, tallytest.Options{DatabaseURL: dbURL})
	t.Setenv("TALLY_ADDR", env.Addr)
	t.Setenv("TALLY_API_KEY", env.AdminKey)
	t.Setenv("TALLY_CURRENCY", "ENV")
	ref := "env-" + tallytest.RandomSuffix()
	var out bytes.Buffer
	if err := run([]string{"account", "create", "--external-ref", ref, "--quiet"}, &out); err != nil {
		t.Fatal(describe(err))
	}
	acct := strings.TrimSpace(out.String())
	t.Setenv("TALLY_ACCOUNT", acct)
	out.Reset()
	if err := run([]string{"show", "--external-ref", ref}, &out); err != nil {
		t.Fatalf("show --external-ref with $TALLY_ACCOUNT set: %s", describe(err))
	}
	mustContain(t, out.String(), "Account "+acct, "Customer "+ref, "Balance 0 ENV")
	out.Reset()
	if err := run([]string{"balance", "--json"}, &out); err != nil {
		t.Fatal(describe(err))
	}
	mustContain(t, out.String(), `"currency": "ENV"`)
}

// tally completion prints a script for each shell.
func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{"bash": "# bash completion V2 for tally", "zsh": "#compdef tally", "fish": "# fish completion for tally"} {
		code, out, errOut := tallyIn("completion", shell)
		if code != exitOK || !strings.Contains(out, want) || errOut != "" {
			t.Errorf("tally completion %s: exit %d, stderr %q, stdout starts %.80q", shell, code, errOut, out)
		}
	}
	code, out, _ := tallyExec(t, nil, "completion", "bash")
	if code != 0 || !strings.Contains(out, "__start_tally") {
		t.Fatalf("tally completion bash: exit %d, %d bytes", code, len(out))
	}
	// Enum flags complete their values.
	code, out, _ = tallyIn("__complete", "account", "create", "--type", "")
	if code != exitOK || !strings.Contains(out, "customer\nrevenue\nfunding\n") {
		t.Fatalf("completing --type: exit %d:\n%s", code, out)
	}
	for _, args := range [][]string{{"completion", "tcsh"}, {"completion"}} {
		if code, _, errOut := tallyIn(args...); code != exitUsage {
			t.Fatalf("tally %s: exit %d, want 2: %s", strings.Join(args, " "), code, errOut)
		}
	}
}

// The client is built once per run and shared by the calls of a command.
func TestClientBuiltOnce(t *testing.T) {
	a := newApp(nil, nil, nil)
	a.conn.addr = closedAddr(t)
	c1, ctx1, err := a.client()
	if err != nil {
		t.Fatal(err)
	}
	c2, ctx2, err := a.client()
	if err != nil {
		t.Fatal(err)
	}
	if c1 != c2 || ctx1 != ctx2 {
		t.Fatal("a second client() built a new client")
	}
	a.close()
}
