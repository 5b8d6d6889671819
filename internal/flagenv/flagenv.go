// Package flagenv gives every command-line flag a matching environment
// variable: --database-url falls back to TALLY_DATABASE_URL. A flag given on
// the command line wins over the environment. Parse serves the standard
// library's flag package (tallyd); the tally CLI (cobra) applies the same
// EnvName rule to its pflag flags.
package flagenv

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

// EnvName returns the environment variable of a flag: "database-url" →
// "TALLY_DATABASE_URL".
func EnvName(flagName string) string {
	return "TALLY_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// Parse parses args into fs, then fills every flag not given on the command
// line from its environment variable.
func Parse(fs *flag.FlagSet, args []string) error {
	// Mention the variable in each flag's help text.
	fs.VisitAll(func(f *flag.Flag) {
		if !strings.Contains(f.Usage, "$TALLY_") {
			f.Usage += " ($" + EnvName(f.Name) + ")"
		}
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("$%s: %w", EnvName(f.Name), e)
			}
		}
	})
	return err
}
