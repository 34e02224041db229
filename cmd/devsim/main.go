// Command devsim is the device side of mqtls: it enrolls device identities
// and renews them (and, later, publishes, subscribes and simulates fleets).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/mqtls/mqtls/keystore"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage: devsim <command> [flags]

commands:
  enroll  create a device identity: key in a keystore, certificate over EST
  renew   renew an identity's certificate over EST (optionally with a new key)
  pub     publish one message with an identity (like mosquitto_pub)
  sub     subscribe with an identity and print "topic payload" lines (like mosquitto_sub)
  run     simulate a fleet: enroll N devices over EST, connect, publish, report
  bench   the same scenario against broker serve and mosquitto, with ratios
  demo    broker, CA, EST, registry and devices in one process: the whole system in ~15 s

Keystore URIs (--keystore): ` + keystore.URIForms + `
Run "devsim <command> -h" for its flags.
`

type command func(ctx context.Context, args []string, stdout, stderr io.Writer) error

var commands = map[string]command{
	"enroll": cmdEnroll,
	"renew":  cmdRenew,
	"pub":    cmdPub,
	"run":    cmdRun,
	"bench":  cmdBench,
	"sub":    cmdSub,
	"demo":   cmdDemo,
}

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "devsim: unknown command %q\n%s", args[0], usage)
		return 2
	}
	err := cmd(ctx, args[1:], stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "devsim %s: %v\n", args[0], err)
		return 2
	}
	fmt.Fprintf(stderr, "devsim %s: %v\n", args[0], err)
	return 1
}

var errUsage = errors.New("usage")

func usageErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, a...))
}

func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("devsim "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return usageErr("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	return nil
}
