package main

import (
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tallyledger/tally/internal/flagenv"
)

// mutuallyExclusive is the annotation cobra's MarkFlagsMutuallyExclusive
// puts on each flag of a group (one entry per group: the names, space
// separated).
const mutuallyExclusive = "cobra_annotation_mutually_exclusive"

// enum is a string flag that takes one of a fixed set of values (in any
// case); Set refuses any other and names the valid ones. optional allows
// the empty string (the flag's "not given" default).
type enum struct {
	value    *string
	allowed  []string
	optional bool
}

func (e *enum) String() string { return *e.value }

// Type names the flag's value in the help text.
func (e *enum) Type() string { return "string" }

// Set accepts one of the allowed values.
func (e *enum) Set(s string) error {
	s = strings.ToLower(strings.TrimSpace(s))
	if !slices.Contains(e.allowed, s) && (s != "" || !e.optional) {
		return fmt.Errorf("must be one of %s", strings.Join(e.allowed, ", "))
	}
	*e.value = s
	return nil
}

// enumList is a comma-separated (or repeated) list of enum values.
type enumList struct {
	values  *[]string
	allowed []string
}

func (e *enumList) String() string { return strings.Join(*e.values, ",") }

// Type names the flag's value in the help text.
func (e *enumList) Type() string { return "strings" }

// Set appends each comma-separated value, refusing any not allowed.
func (e *enumList) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.ToLower(strings.TrimSpace(v)); v == "" {
			continue
		}
		if !slices.Contains(e.allowed, v) {
			return fmt.Errorf("%q is not one of %s", v, strings.Join(e.allowed, ", "))
		}
		*e.values = append(*e.values, v)
	}
	return nil
}

// enumFlag defines an enum flag on cmd, with shell completion of its values.
func enumFlag(cmd *cobra.Command, p *string, name, def string, allowed []string, usage string) {
	*p = def
	cmd.Flags().Var(&enum{value: p, allowed: allowed, optional: def == ""}, name, usage+": "+strings.Join(allowed, ", "))
	completeWith(cmd, name, allowed)
}

// enumListFlag defines a list-of-enum flag on cmd.
func enumListFlag(cmd *cobra.Command, p *[]string, name string, allowed []string, usage string) {
	cmd.Flags().Var(&enumList{values: p, allowed: allowed}, name, usage+": "+strings.Join(allowed, ", "))
	completeWith(cmd, name, allowed)
}

func completeWith(cmd *cobra.Command, name string, values []string) {
	if err := cmd.RegisterFlagCompletionFunc(name, cobra.FixedCompletions(values, cobra.ShellCompDirectiveNoFileComp)); err != nil {
		panic(err) // a programming error: the flag was just defined
	}
}

// protoEnum lists a generated enum's value names, lower case, without
// prefix and without the zero (unspecified) value, in number order:
// AccountType_value, "ACCOUNT_TYPE_" → customer, revenue, funding.
func protoEnum(values map[string]int32, prefix string) []string {
	names := make([]string, 0, len(values))
	for name, n := range values {
		if n != 0 {
			names = append(names, name)
		}
	}
	sort.Slice(names, func(i, j int) bool { return values[names[i]] < values[names[j]] })
	for i, name := range names {
		names[i] = strings.ToLower(strings.TrimPrefix(name, prefix))
	}
	return names
}

// require marks flags required; a missing one is bad usage (exit 2).
func require(cmd *cobra.Command, names ...string) {
	for _, n := range names {
		if err := cmd.MarkFlagRequired(n); err != nil {
			panic(err) // a programming error: no such flag
		}
	}
}

// fillFromEnv gives every flag not set on the command line the value of its
// environment variable (--api-key: $TALLY_API_KEY). A flag is not filled
// when another flag of its mutually exclusive group was given.
func fillFromEnv(fs *pflag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *pflag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || given[f.Name] || f.Name == "help" || exclusiveGiven(f, given) {
			return
		}
		name := flagenv.EnvName(f.Name)
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("$%s: %w", name, e)
			}
		}
	})
	return err
}

func exclusiveGiven(f *pflag.Flag, given map[string]bool) bool {
	for _, group := range f.Annotations[mutuallyExclusive] {
		for _, other := range strings.Fields(group) {
			if given[other] {
				return true
			}
		}
	}
	return false
}

// annotateEnv names each flag's environment variable in its help text, in
// cmd and every command below it.
func annotateEnv(cmd *cobra.Command) {
	cmd.LocalFlags().VisitAll(func(f *pflag.Flag) {
		if f.Name != "help" && !strings.Contains(f.Usage, "$TALLY_") {
			f.Usage += " ($" + flagenv.EnvName(f.Name) + ")"
		}
	})
	for _, c := range cmd.Commands() {
		annotateEnv(c)
	}
}

// parseAt parses an RFC 3339 instant of flag name; "" is none.
func parseAt(name, s string) (*timestamppb.Timestamp, error) {
	if s == "" {
		return nil, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return nil, fmt.Errorf("--%s wants an RFC 3339 time such as 2026-10-31T23:59:59Z: %v", name, err)
	}
	return timestamppb.New(t), nil
}

// parseMeta parses repeated --meta key=value flags.
func parseMeta(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("--meta wants key=value, got %q", kv)
		}
		m[k] = v
	}
	return m, nil
}
