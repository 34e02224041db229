package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/keystore"
)

// clientFlags are the flags pub and sub share, long and mosquitto-short.
type clientFlags struct {
	brokers   stringList
	dir       string
	qos       int
	timeout   time.Duration
	wait      time.Duration
	logFormat string
	logLevel  string
}

func (f *clientFlags) register(fs *flag.FlagSet, timeoutUsage string) {
	fs.Var(&f.brokers, "broker", "broker, mqtts://HOST:PORT (repeatable: the nodes of a cluster)")
	fs.StringVar(&f.dir, "identity", "", "identity directory (from devsim enroll); its certificate's CN is the client ID")
	fs.StringVar(&f.dir, "i", "", "short for --identity")
	fs.IntVar(&f.qos, "qos", 1, "QoS 0 or 1 (pub and sub alike)")
	fs.IntVar(&f.qos, "q", 1, "short for --qos")
	durationFlag(fs, &f.timeout, "timeout", "W", timeoutUsage)
	f.wait = 10 * time.Second
	durationFlag(fs, &f.wait, "wait", "", "how long to wait for a broker that refuses connections (still starting) (default 10s)")
	fs.StringVar(&f.logFormat, "log-format", "", "write the client's log (connection lost, reconnects, refusals) to stderr: text or json")
	fs.StringVar(&f.logLevel, "log-level", "", "debug, info, warn or error (default: no log; info with --log-format)")
}

// logger is the client's log: none unless --log-format or --log-level asks
// for one.
func (f *clientFlags) logger(stderr io.Writer) (*slog.Logger, error) {
	if f.logFormat == "" && f.logLevel == "" {
		return slog.New(slog.DiscardHandler), nil
	}
	level := f.logLevel
	if level == "" {
		level = "info"
	}
	return cli.NewLogger(stderr, f.logFormat, level)
}

// events are what pub and sub watch on a connected client.
type events struct {
	stopped chan struct{} // closed when the client stops for good (refused: revoked; expired)
	lost    chan struct{} // a value per connection loss (dropped when nobody reads)
	once    sync.Once
}

func newEvents() *events {
	return &events{stopped: make(chan struct{}), lost: make(chan struct{}, 1)}
}

// openClient loads the identity in dir and connects to broker, waiting up
// to wait for a broker that is still starting.
func openClient(ctx context.Context, stderr io.Writer, f clientFlags, connectTimeout time.Duration, ev *events) (*device.Client, func(), error) {
	log, err := f.logger(stderr)
	if err != nil {
		return nil, nil, err
	}
	cfg, err := device.ReadConfig(f.dir)
	if err != nil {
		return nil, nil, err
	}
	u, err := keystore.ParseURI(cfg.Keystore)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", device.ConfigFile, err)
	}
	store, err := keystores.Open(ctx, u, f.dir)
	if err != nil {
		return nil, nil, err
	}
	id, err := device.Load(ctx, f.dir, store)
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	if time.Now().After(id.Leaf().NotAfter) {
		store.Close()
		return nil, nil, fmt.Errorf("%w at %s: enroll again", device.ErrExpired, id.Leaf().NotAfter.UTC().Format(time.RFC3339))
	}
	c, err := device.New(device.Config{
		Brokers: f.brokers, Identity: id, Store: store, DisableRenewal: true, ConnectTimeout: connectTimeout, Logger: log,
		OnStateChange: func(s device.State) {
			if s == device.StateRefused || s == device.StateExpired {
				ev.once.Do(func() { close(ev.stopped) })
			}
		},
		OnConnectionLost: func(error) {
			select {
			case ev.lost <- struct{}{}:
			default:
			}
		},
	})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	err = waitFor(ctx, stderr, "the broker at "+f.brokers.String(), f.wait, func() error {
		cctx, cancel := context.WithTimeout(ctx, connectTimeout)
		defer cancel()
		return c.Connect(cctx)
	})
	if err != nil {
		c.Close()
		store.Close()
		return nil, nil, err
	}
	return c, func() { c.Close(); store.Close() }, nil
}

const pubUsage = `usage: devsim pub --broker mqtts://HOST:PORT [--broker ...] -i DIR -t TOPIC (-m MSG | -f FILE | -s | -l) [-q 0|1] [-r]

Publishes with the device identity in DIR (like mosquitto_pub). At QoS 1 it
exits 0 once the broker has acknowledged every message.
`

func cmdPub(stdin io.Reader) cli.Command {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fs := cli.NewFlags("devsim pub", stderr)
		var f clientFlags
		var topic, msg, file string
		var retain, whole, lines bool
		f.register(fs, "give up connecting and publishing after this long (10s or 10) (default 15s)")
		fs.StringVar(&topic, "topic", "", "topic to publish to")
		fs.StringVar(&topic, "t", "", "short for --topic")
		fs.StringVar(&msg, "message", "", "payload")
		fs.StringVar(&msg, "m", "", "short for --message")
		fs.StringVar(&file, "file", "", "read the payload from this file")
		fs.StringVar(&file, "f", "", "short for --file")
		fs.BoolVar(&whole, "s", false, "read the payload from stdin (all of it: one message)")
		fs.BoolVar(&lines, "l", false, "read messages from stdin, one per line")
		fs.BoolVar(&retain, "retain", false, "retain the message")
		fs.BoolVar(&retain, "r", false, "short for --retain")
		setUsage(fs, stderr, pubUsage)
		if err := cli.Parse(fs, args); err != nil {
			return err
		}
		if len(f.brokers) == 0 || f.dir == "" || topic == "" {
			return cli.Usagef("--broker, --identity (-i) and --topic (-t) are required")
		}
		sources := 0
		for _, set := range []bool{isSet(fs, "message") || isSet(fs, "m"), file != "", whole, lines} {
			if set {
				sources++
			}
		}
		if sources != 1 {
			return cli.Usagef("give one of -m MSG, -f FILE, -s (stdin) or -l (stdin, a message per line)")
		}
		if f.qos != 0 && f.qos != 1 {
			return cli.Usagef("--qos must be 0 or 1")
		}
		if f.timeout == 0 {
			f.timeout = 15 * time.Second
		}
		var payloads [][]byte
		switch {
		case lines:
		case whole:
			p, err := io.ReadAll(io.LimitReader(stdin, device.MaxMessage))
			if err != nil {
				return err
			}
			payloads = [][]byte{p}
		case file != "":
			p, err := os.ReadFile(file)
			if err != nil {
				return err
			}
			payloads = [][]byte{p}
		default:
			payloads = [][]byte{[]byte(msg)}
		}
		ev := newEvents()
		c, done, err := openClient(ctx, stderr, f, f.timeout, ev)
		if err != nil {
			return err
		}
		defer done()
		publish := func(p []byte) error {
			pctx, cancel := context.WithTimeout(ctx, f.timeout)
			defer cancel()
			// pub sends on one connection: if the broker closes it before the
			// PUBACK (a 3.1.1 broker's only way to refuse a publish), say so
			// now rather than resend until the timeout.
			errc := make(chan error, 1)
			go func() { errc <- c.Publish(pctx, topic, p, byte(f.qos), retain) }()
			select {
			case err := <-errc:
				return err
			case <-ev.lost:
				cancel()
				if err := <-errc; err == nil {
					return nil // acknowledged just before the loss
				}
				if err := c.Err(); err != nil {
					return err
				}
				return fmt.Errorf("publish to %q not acknowledged: %w (a 3.1.1 broker's way to refuse a publish: is the topic allowed for this device?)", topic, device.ErrLostInFlight)
			case <-ev.stopped:
				cancel()
				if err := <-errc; err == nil {
					return nil
				}
				return c.Err()
			}
		}
		if !lines {
			return publish(payloads[0])
		}
		sc := bufio.NewScanner(stdin)
		sc.Buffer(make([]byte, 64<<10), 256<<10)
		for sc.Scan() {
			if err := publish(sc.Bytes()); err != nil {
				return err
			}
		}
		return sc.Err()
	}
}

func isSet(fs *flag.FlagSet, name string) bool { return cli.IsSet(fs, name) }

const subUsage = `usage: devsim sub --broker mqtts://HOST:PORT [--broker ...] -i DIR -t FILTER [-t FILTER]... [-q 0|1] [-C N] [-W D] [-v]

Subscribes with the device identity in DIR (like mosquitto_sub) and prints
each message's payload (with -v: "topic payload") on a line. It reconnects
after a dropped connection and exits when the broker refuses it (revoked:
exit 5), after -C messages, or after -W.
`

func cmdSub(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim sub", stderr)
	var f clientFlags
	var filters stringList
	var count int
	var verbose bool
	f.register(fs, "give up after this long (10s or 10; 0: never); with -C, not receiving N messages in time is an error")
	fs.Var(&filters, "topic", "topic filter to subscribe to (repeatable)")
	fs.Var(&filters, "t", "short for --topic")
	fs.IntVar(&count, "count", 0, "exit after N messages (0: run until -W or interrupted)")
	fs.IntVar(&count, "C", 0, "short for --count")
	fs.BoolVar(&verbose, "verbose", false, `print "topic payload" (default: the payload alone)`)
	fs.BoolVar(&verbose, "v", false, "short for --verbose")
	setUsage(fs, stderr, subUsage)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if len(f.brokers) == 0 || f.dir == "" || len(filters) == 0 {
		return cli.Usagef("--broker, --identity (-i) and --topic (-t) are required")
	}
	if f.qos != 0 && f.qos != 1 {
		return cli.Usagef("--qos must be 0 or 1")
	}
	connectTimeout := 15 * time.Second
	if f.timeout > 0 {
		connectTimeout = min(connectTimeout, f.timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.timeout)
		defer cancel()
	}
	ev := newEvents()
	c, done, err := openClient(ctx, stderr, f, connectTimeout, ev)
	if err != nil {
		return err
	}
	defer done()
	var mu sync.Mutex
	got := 0
	enough := make(chan struct{})
	handler := func(topic string, payload []byte) {
		mu.Lock()
		defer mu.Unlock()
		if count > 0 && got >= count {
			return
		}
		if verbose {
			fmt.Fprintf(stdout, "%s %s\n", topic, payload)
		} else {
			fmt.Fprintf(stdout, "%s\n", payload)
		}
		got++
		if got == count {
			close(enough)
		}
	}
	for _, filter := range filters {
		if err := c.Subscribe(ctx, filter, byte(f.qos), handler); err != nil {
			return err
		}
	}
	select {
	case <-enough:
		return nil
	case <-ev.stopped:
		return c.Err()
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	if count > 0 && got < count && f.timeout > 0 && ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("%w: received %d of %d messages within %v", device.ErrTimeout, got, count, f.timeout)
	}
	return nil
}

// setUsage prints head, the flags and the exit codes for -h.
func setUsage(fs *flag.FlagSet, w io.Writer, head string) {
	fs.Usage = func() {
		fmt.Fprint(w, head, "\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprint(w, "\n", exitCodes)
	}
}
