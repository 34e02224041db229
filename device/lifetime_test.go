package device_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
)

// blackhole accepts connections (completing a TLS handshake if cert is
// set) and never answers. It starts no goroutine per connection, so the
// test's goroutine count does not depend on how many it holds.
type blackhole struct {
	addr  string
	mu    sync.Mutex
	conns []net.Conn
}

func startBlackhole(t *testing.T, addr string, cert *tls.Certificate) *blackhole {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	b := &blackhole{addr: ln.Addr().String()}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if cert != nil {
				tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*cert}})
				tc.SetDeadline(time.Now().Add(5 * time.Second))
				if tc.Handshake() == nil {
					tc.SetDeadline(time.Time{})
				}
				c = tc
			}
			b.mu.Lock()
			b.conns = append(b.conns, c)
			b.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, c := range b.conns {
			c.Close()
		}
	})
	return b
}

// settles waits until the number of goroutines is back to base (within
// 1 s), and fails naming what is left.
func settles(t *testing.T, base int, what string) {
	t.Helper()
	if !testtool.Poll(time.Second, func() bool { return runtime.NumGoroutine() <= base }) {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		t.Fatalf("%s: %d goroutines 1s later, %d before:\n%s", what, runtime.NumGoroutine(), base, buf)
	}
}

// Every goroutine the client starts ends within 1 s of Close or of the
// cancellation of Connect's context, whatever the broker (or the EST
// server) does - here: never answer.
func TestGoroutinesEndWithCloseAndContext(t *testing.T) {
	f := startFleet(t, 0)
	id, store := f.enroll(t, "dev-1", "", nil)
	srv, err := f.broker.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	fast := func(c *device.Config) {
		c.DisableRenewal = true
		c.ConnectTimeout = 10 * time.Second // paho's own wait would last this long
	}

	t.Run("connect cancelled: no TLS answer", func(t *testing.T) {
		bh := startBlackhole(t, "127.0.0.1:0", nil)
		base := runtime.NumGoroutine()
		c := f.client(t, id, store, func(c *device.Config) { fast(c); c.Broker = "mqtts://" + bh.addr })
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := c.Connect(ctx); !errors.Is(err, device.ErrTimeout) {
			t.Fatalf("Connect = %v, want ErrTimeout", err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("Connect returned %v after its context ended", d)
		}
		settles(t, base, "after a cancelled connect (no Close)")
		c.Close()
	})

	t.Run("connect cancelled: no CONNACK", func(t *testing.T) {
		bh := startBlackhole(t, "127.0.0.1:0", &srv)
		base := runtime.NumGoroutine()
		c := f.client(t, id, store, func(c *device.Config) { fast(c); c.Broker = "mqtts://" + bh.addr })
		ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
		defer cancel()
		if err := c.Connect(ctx); !errors.Is(err, device.ErrTimeout) {
			t.Fatalf("Connect = %v, want ErrTimeout", err)
		}
		settles(t, base, "after a cancelled connect (no Close)")
		c.Close()
	})

	t.Run("close while reconnecting to a broker that never answers", func(t *testing.T) {
		p := startProxy(t, f.broker.Addr)
		base := runtime.NumGoroutine()
		reconnecting := make(chan struct{}, 1)
		c := f.client(t, id, store, func(c *device.Config) {
			fast(c)
			c.Broker = "mqtts://" + p.addr
			c.MinBackoff, c.MaxBackoff = time.Millisecond, 10*time.Millisecond
			c.OnConnectionLost = func(error) { reconnecting <- struct{}{} }
		})
		connect(t, c)
		p.stop()
		startBlackhole(t, p.addr, &srv) // the same address now never answers
		base++                          // its accept loop
		<-reconnecting
		testtool.Eventually(t, 5*time.Second, "a reconnect attempt under way", func() bool { return c.ReconnectAttempts() > 0 })
		start := time.Now()
		c.Close()
		if d := time.Since(start); d > time.Second {
			t.Fatalf("Close took %v", d)
		}
		settles(t, base, "after Close")
	})

	t.Run("close while renewing against an EST server that never answers", func(t *testing.T) {
		bh := startBlackhole(t, "127.0.0.1:0", &srv)
		d := f.broker.Device(t, "dev-2", 2*time.Second)
		ident := identityFor(t, f, d)
		ident.Config.EST = "https://" + bh.addr
		base := runtime.NumGoroutine()
		c := f.client(t, ident, nil, func(c *device.Config) {
			c.Store = keystore.NewMemory() // renewal needs a store; without rekey it is not used
			c.RenewAt = 0.1                // at once
		})
		connect(t, c)
		testtool.Eventually(t, 5*time.Second, "the renewal under way", func() bool {
			bh.mu.Lock()
			defer bh.mu.Unlock()
			return len(bh.conns) > 0
		})
		start := time.Now()
		c.Close()
		if d := time.Since(start); d > time.Second {
			t.Fatalf("Close took %v", d)
		}
		settles(t, base, "after Close")
	})
}
