package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/keystore"
)

// openClient loads the identity in dir and returns a client for broker.
func openClient(ctx context.Context, broker, dir string, timeout time.Duration) (*device.Client, func(), error) {
	cfg, err := device.ReadConfig(dir)
	if err != nil {
		return nil, nil, err
	}
	u, err := keystore.ParseURI(cfg.Keystore)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", device.ConfigFile, err)
	}
	store, err := keystores.Open(ctx, u, dir)
	if err != nil {
		return nil, nil, err
	}
	id, err := device.Load(ctx, dir, store)
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	if time.Now().After(id.Leaf().NotAfter) {
		store.Close()
		return nil, nil, fmt.Errorf("%w at %s: enroll again", device.ErrExpired, id.Leaf().NotAfter.UTC().Format(time.RFC3339))
	}
	c, err := device.New(device.Config{Broker: broker, Identity: id, Store: store, DisableRenewal: true, ConnectTimeout: timeout})
	if err != nil {
		store.Close()
		return nil, nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := c.Connect(cctx); err != nil {
		c.Close()
		store.Close()
		return nil, nil, err
	}
	return c, func() { c.Close(); store.Close() }, nil
}

func cmdPub(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("pub", stderr)
	broker := fs.String("broker", "", "broker, mqtts://HOST:PORT")
	dir := fs.String("identity", "", "identity directory (from devsim enroll)")
	topic := fs.String("topic", "", "topic to publish to")
	msg := fs.String("message", "", "payload")
	file := fs.String("file", "", "read the payload from this file (- for stdin)")
	qos := fs.Int("qos", 0, "QoS 0 or 1")
	retain := fs.Bool("retain", false, "retain the message")
	timeout := fs.Duration("timeout", 15*time.Second, "connect and publish timeout")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *broker == "" || *dir == "" || *topic == "" {
		return usageErr("--broker, --identity and --topic are required")
	}
	if isSet(fs, "message") == (*file != "") {
		return usageErr("give --message M or --file F")
	}
	if *qos != 0 && *qos != 1 {
		return usageErr("--qos must be 0 or 1")
	}
	payload := []byte(*msg)
	if *file != "" {
		var err error
		if *file == "-" {
			payload, err = io.ReadAll(io.LimitReader(os.Stdin, 256<<10))
		} else {
			payload, err = os.ReadFile(*file)
		}
		if err != nil {
			return err
		}
	}
	c, done, err := openClient(ctx, *broker, *dir, *timeout)
	if err != nil {
		return err
	}
	defer done()
	pctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	return c.Publish(pctx, *topic, payload, byte(*qos), *retain)
}

func isSet(fs *flag.FlagSet, name string) bool { return cli.IsSet(fs, name) }

func cmdSub(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("sub", stderr)
	broker := fs.String("broker", "", "broker, mqtts://HOST:PORT")
	dir := fs.String("identity", "", "identity directory (from devsim enroll)")
	filter := fs.String("topic", "", "topic filter to subscribe to")
	qos := fs.Int("qos", 1, "QoS 0 or 1")
	count := fs.Int("count", 0, "exit after N messages (0: run until --timeout or interrupted)")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: none); with --count, not receiving N messages in time is an error")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *broker == "" || *dir == "" || *filter == "" {
		return usageErr("--broker, --identity and --topic are required")
	}
	connectTimeout := 15 * time.Second
	if *timeout > 0 {
		connectTimeout = min(connectTimeout, *timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	c, done, err := openClient(ctx, *broker, *dir, connectTimeout)
	if err != nil {
		return err
	}
	defer done()
	var mu sync.Mutex
	got := 0
	enough := make(chan struct{})
	err = c.Subscribe(ctx, *filter, byte(*qos), func(topic string, payload []byte) {
		mu.Lock()
		defer mu.Unlock()
		if *count > 0 && got >= *count {
			return
		}
		fmt.Fprintf(stdout, "%s %s\n", topic, payload)
		got++
		if got == *count {
			close(enough)
		}
	})
	if err != nil {
		return err
	}
	select {
	case <-enough:
		return nil
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	if *count > 0 && got < *count && *timeout > 0 && ctx.Err() == context.DeadlineExceeded {
		return fmt.Errorf("%w: received %d of %d messages within %v", device.ErrTimeout, got, *count, *timeout)
	}
	return nil
}
