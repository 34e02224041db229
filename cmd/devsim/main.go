// Command devsim is the device side of mqtls: it enrolls and renews device
// identities, publishes and subscribes with them, simulates fleets, runs
// the demo and the side-by-side benchmark.
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/keystore"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
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

` + exitCodes

func commands(stdin io.Reader) map[string]cli.Command {
	return map[string]cli.Command{
		"enroll":        cmdEnroll,
		"renew":         cmdRenew,
		"pub":           cmdPub(stdin),
		"run":           cmdRun,
		"bench":         cmdBench,
		"bench-raw-tls": cmdBenchRawTLS, // hidden: devsim bench's reference server
		"sub":           cmdSub,
		"demo":          cmdDemo,
	}
}

// run is main without the process: it returns the exit code (see
// exitCodes).
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var cmdErr error
	cmds := commands(stdin)
	for name, cmd := range cmds {
		cmds[name] = func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
			cmdErr = cmd(ctx, args, stdout, stderr)
			return cmdErr
		}
	}
	code := cli.Run(ctx, "devsim", usage, cmds, args, stdout, stderr)
	if code == exitError {
		code = exitCode(cmdErr)
	}
	return code
}
