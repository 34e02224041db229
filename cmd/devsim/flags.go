package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mqtls/mqtls/device"
)

// Exit codes of devsim (documented in --help and the README). pub and sub
// use mosquitto_pub/mosquitto_sub's code for a refused connection.
const (
	exitOK            = 0
	exitError         = 1 // anything else: TLS, timeout, broker unreachable, I/O
	exitUsage         = 2
	exitNotAuthorized = 5 // CONNACK 5: revoked, expired or unknown certificate; a refused subscription
)

const exitCodes = `Exit status:
  0  success
  1  error: TLS (wrong CA, host name), timeout, broker or EST server unreachable, a publish not acknowledged
  2  usage error
  5  not authorised: the broker refused the connection (revoked, expired or unknown certificate,
     client ID or Will not allowed; mosquitto_pub/sub's code for CONNACK 5), or refused a subscription
`

// exitCode maps a command's error to the exit status.
func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, device.ErrNotAuthorized):
		return exitNotAuthorized
	}
	return exitError
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// seconds is a duration flag that also takes a plain number of seconds
// (mosquitto's -W 5).
type seconds struct{ d *time.Duration }

func (s seconds) String() string {
	if s.d == nil {
		return ""
	}
	return s.d.String()
}

func (s seconds) Set(v string) error {
	if n, err := strconv.ParseFloat(v, 64); err == nil {
		*s.d = time.Duration(n * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("want a duration (10s) or seconds (10)")
	}
	*s.d = d
	return nil
}

// waitFor retries attempt while the server refuses connections (it is
// still starting: `broker serve &` then a command), for at most wait,
// saying so once on stderr.
func waitFor(ctx context.Context, stderr io.Writer, what string, wait time.Duration, attempt func() error) error {
	deadline := time.Now().Add(wait)
	said := false
	for {
		err := attempt()
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			if err != nil && said && errors.Is(err, syscall.ECONNREFUSED) {
				return fmt.Errorf("%w (waited %v for %s; --wait to wait longer)", err, wait, what)
			}
			return err
		}
		if !said {
			fmt.Fprintf(stderr, "devsim: %s refuses connections; waiting up to %v for it to start (--wait)\n", what, wait)
			said = true
		}
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// durationFlag registers a duration flag (seconds accepted) under a long
// and, if given, a short name.
func durationFlag(fs *flag.FlagSet, d *time.Duration, long, short, usage string) {
	fs.Var(seconds{d}, long, usage)
	if short != "" {
		fs.Var(seconds{d}, short, "short for --"+long)
	}
}
