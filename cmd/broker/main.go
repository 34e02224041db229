// Command broker runs the fleet's backend: the PKI (init), enrollment
// tokens, the EST server, revocation and the device registry.
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/mqtls/mqtls/cmd/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage: broker <command> [flags]

commands:
  init     create the root CA, issuing CA, server certificate and registry
  server-cert  re-issue the server certificate with new host names (serve reloads it)
  token    mint one-time enrollment tokens
  serve    run the broker: MQTT over mutual TLS, EST enrollment, metrics
  revoke   revoke every certificate of a device
  devices  list the registry
  policy   check what a policy allows an identity (policy check)
  gateway  list or set the devices a gateway speaks for
  ek       release a device's TPM endorsement key binding (ek release)

Run "broker <command> -h" for its flags.
`

var commands = map[string]cli.Command{
	"init":        cmdInit,
	"server-cert": cmdServerCert,
	"token":       cmdToken,
	"serve":       cmdServe,
	"revoke":      cmdRevoke,
	"devices":     cmdDevices,
	"policy":      cmdPolicy,
	"gateway":     cmdGateway,
	"ek":          cmdEK,
}

// run is main without the process: it returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return cli.Run(ctx, "broker", usage, commands, args, stdout, stderr)
}

// listFlag collects a repeated string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }
