// Command devsim is the device side of mqtls: it enrolls device identities,
// publishes and subscribes with them, and simulates fleets.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
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
  demo    broker, CA, registry and devices in one process (not built yet)

Keystore URIs (--keystore): ` + keystore.URIForms + `
`

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	switch args[0] {
	case "demo":
		fmt.Fprintln(stderr, "devsim demo: not built yet: it arrives with the broker, provisioning and device SDK (see README, Status)")
		return 2
	}
	fmt.Fprintf(stderr, "devsim: unknown command %q\n%s", args[0], usage)
	return 2
}
