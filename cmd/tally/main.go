// Command tally is the command-line client of the Tally ledger. Run
// `tally --help` for its commands and `tally COMMAND --help` for a command's
// flags; cobra generates both from the command definitions in this package.
//
// Every flag --name also reads $TALLY_NAME when not given (--addr:
// $TALLY_ADDR, --api-key: $TALLY_API_KEY). Money-moving commands retry
// UNAVAILABLE and DEADLINE_EXCEEDED with the same idempotency key (package
// api/client); a missing --key gets a fresh one, printed so the call can be
// repeated safely.
//
// Exit codes:
//
//	0  success
//	1  findings (tally reconcile), an operation the server refused, or another failure
//	2  bad usage: unknown command or flag, a bad or missing value, conflicting flags
//	3  tallyd unreachable: UNAVAILABLE or DEADLINE_EXCEEDED after the retries; the
//	   outcome is unknown, so repeat the command with the same --key
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
)

// Exit codes of tally.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnreachable = 3
)

func main() {
	os.Exit(execute(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// execute runs tally with args, prints any error to errOut and returns the
// exit code.
func execute(args []string, in io.Reader, out, errOut io.Writer) int {
	cmd, err := newApp(in, out, errOut).execute(args)
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(errOut, "tally:", describe(err))
	code := exitCode(err)
	switch {
	case code == exitUsage && cmd != nil && !errors.Is(err, errMissingCommand):
		fmt.Fprintf(errOut, "Run '%s --help' for usage.\n", cmd.CommandPath())
	case code == exitUnreachable:
		fmt.Fprintln(errOut, "tally: no answer from tallyd: a change may or may not have been made; repeating the command with the same --key is safe")
	}
	return code
}

// run runs tally with args, writing its output to out (the tests' entry
// point).
func run(args []string, out io.Writer) error {
	_, err := newApp(os.Stdin, out, os.Stderr).execute(args)
	return err
}

// usageError is bad usage: an error found before a command began its work.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errMissingCommand is returned by a command that only groups others.
var errMissingCommand = errors.New("a command is required")

// exitCode maps an error to tally's exit code.
func exitCode(err error) int {
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	}
	if retry, slow := client.Retryable(err); retry && !slow {
		return exitUnreachable
	}
	return exitFailed
}

// describe renders an error for a person: a gRPC status as its code, the
// reason from its ErrorInfo and its message.
func describe(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	s := fmt.Sprintf("%s: %s", st.Code(), st.Message())
	if info, ok := api.ErrorInfo(err); ok {
		s = fmt.Sprintf("%s %s: %s", st.Code(), info.GetReason(), st.Message())
		if info.GetMetadata()["replayed"] == "true" {
			s += " (replayed: this key's stored outcome)"
		}
	}
	return s
}

// app is one run of tally: its streams, the connection flags the client
// commands share, and the client, built once on first use.
type app struct {
	in          io.Reader
	out, errOut io.Writer
	conn        connFlags
	cmd         *cobra.Command // the command being run
	started     bool           // a command began its work: later errors are not usage errors

	cl     *client.Client
	ctx    context.Context
	cancel context.CancelFunc
}

func newApp(in io.Reader, out, errOut io.Writer) *app {
	return &app{in: in, out: out, errOut: errOut}
}

// execute builds the command tree, runs the command args name and closes
// the client. It returns the command found and its error; an error before
// the command began its work is a usageError.
func (a *app) execute(args []string) (*cobra.Command, error) {
	root := a.newRoot()
	root.SetArgs(append([]string{}, args...)) // never nil: cobra reads os.Args for nil
	cmd, err := root.ExecuteC()
	a.close()
	if err != nil && !a.started {
		err = usageError{err}
	}
	return cmd, err
}

// client returns the client and the context of the command's calls (with
// the --timeout deadline), connecting on the first call.
func (a *app) client() (*client.Client, context.Context, error) {
	if a.cl != nil {
		return a.cl, a.ctx, nil
	}
	cl, err := a.conn.dial()
	if err != nil {
		return nil, nil, err
	}
	a.cl = cl
	if a.conn.timeout <= 0 {
		// No overall deadline (long jobs); Ctrl-C still stops the process.
		a.ctx, a.cancel = context.WithCancel(context.Background())
	} else {
		a.ctx, a.cancel = context.WithTimeout(context.Background(), a.conn.timeout)
	}
	return a.cl, a.ctx, nil
}

func (a *app) close() {
	if a.cl != nil {
		a.cancel()
		a.cl.Close()
		a.cl = nil
	}
}

// command is a leaf command's options, in the manner of River's CLI:
// Validate checks them before anything is sent (a failure is bad usage),
// run does the work.
type command interface {
	Validate() error
	run(a *app) error
}

// runE returns the cobra RunE of a leaf command.
func (a *app) runE(c command) func(*cobra.Command, []string) error {
	return func(*cobra.Command, []string) error {
		if err := c.Validate(); err != nil {
			return err
		}
		a.started = true
		return c.run(a)
	}
}

func (a *app) newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "tally",
		Short: "The command-line client of the Tally ledger",
		Long: strings.TrimSpace(`
The command-line client of the Tally ledger: accounts, credits, charges,
holds, refunds and batches; balances, entries and the change feed;
reconciliation, usage reports and load tests against a running tallyd.

Every flag --name also reads $TALLY_NAME when not given (--addr: $TALLY_ADDR,
--api-key: $TALLY_API_KEY).

Exit codes: 0 success; 1 findings (reconcile), an operation the server
refused, or another failure; 2 bad usage; 3 tallyd unreachable (UNAVAILABLE
or DEADLINE_EXCEEDED after the retries: repeat with the same --key).`),
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			a.cmd = cmd
			return fillFromEnv(cmd.Flags())
		},
	}
	group(root)
	root.SetIn(a.in)
	root.SetOut(a.out)
	root.SetErr(a.errOut)
	root.AddCommand(a.newAccountCmd(), a.newCreditCmd(), a.newChargeCmd(), a.newRefundCmd(), a.newHoldCmd(),
		a.newBatchCmd(), a.newTransferCmd(), a.newBalanceCmd(), a.newBalancesCmd(), a.newEntriesCmd(),
		a.newExportCmd(), a.newShowCmd(), a.newStatementCmd(), a.newReconcileCmd(), a.newUsageCmd(), a.newBenchCmd(),
		a.newBenchUsageCmd(), a.newTopUpCmd())
	// cobra's own `completion bash|zsh|fish|powershell`, made a group so
	// that an unknown shell is bad usage rather than help.
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		if c.Name() == "completion" {
			group(c)
		}
	}
	annotateEnv(root)
	return root
}

// group makes cmd a command that only groups others: run alone it prints
// its usage and fails; an unknown subcommand is named, with suggestions.
func group(cmd *cobra.Command) *cobra.Command {
	cmd.SuggestionsMinimumDistance = 2
	cmd.Args = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return nil
		}
		msg := fmt.Sprintf("unknown command %q for %q", args[0], cmd.CommandPath())
		if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
			msg += "; did you mean " + strings.Join(s, " or ") + "?"
		}
		return errors.New(msg)
	}
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		fmt.Fprint(cmd.ErrOrStderr(), cmd.UsageString())
		return errMissingCommand
	}
	return cmd
}
