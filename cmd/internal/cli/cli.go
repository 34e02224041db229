// Package cli is what the commands share: subcommand dispatch, flag
// parsing and exit codes (0 ok, 1 failure, 2 usage).
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Command is one subcommand.
type Command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

// ErrUsage marks a usage error (exit 2).
var ErrUsage = errors.New("usage")

// Usagef returns a usage error.
func Usagef(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, a...))
}

// Run dispatches args to a command of prog and returns the exit code.
// No command at all prints usage to stderr and returns 2; "-h", "--help"
// and "help" print it to stdout and return 0.
// Besides commands, every prog answers "version", "--version" and
// "-version" (see Version).
func Run(ctx context.Context, prog, usage string, commands map[string]Command, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 { // no command: a usage error
		fmt.Fprint(stderr, usage)
		return 2
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		fmt.Fprintf(stdout, "%q or %q prints the version, VCS revision and Go version.\n", prog+" version", prog+" --version")
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok && isVersion(args[0]) {
		cmd, ok = versionCommand(prog), true
	}
	if !ok {
		fmt.Fprintf(stderr, "%s: unknown command %q\n%s", prog, args[0], usage)
		return 2
	}
	err := cmd(ctx, args[1:], stdout, stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, ErrUsage):
		fmt.Fprintf(stderr, "%s %s: %v\n", prog, args[0], err)
		return 2
	}
	fmt.Fprintf(stderr, "%s %s: %v\n", prog, args[0], err)
	return 1
}

// NewFlags returns a flag set that reports to stderr and returns errors.
func NewFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// Parse parses args and refuses positional arguments.
func Parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return Usagef("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	return nil
}

// IsSet reports whether flag name was given.
func IsSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
