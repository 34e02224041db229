package broker_test

import (
	"crypto/tls"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// TLS handshakes finishing while the broker closes: Mochi's Close waits on
// its clients' WaitGroup while EstablishConnection adds to it; under -race
// that was reported. Each connection is counted before Close can wait.
func TestCloseRacesHandshakes(t *testing.T) {
	for range 5 {
		env := brokertest.Start(t, nil)
		dev := env.Device(t, "dev-a", 0)
		cfg := env.TLS(t, dev)
		dialled, stop := churn(env.Addr, cfg, false)
		testtool.Eventually(t, 5*time.Second, "handshakes under way", func() bool { return dialled.Load() >= 16 })
		env.Broker.Close()
		stop()
	}
}

// Clients connecting and leaving while the broker closes: Mochi's own
// closer reads Clients.GetByListener, which takes the clients' read lock
// twice; a client added or removed in between waits for the write lock,
// blocks the second read lock, and Close never returns (seen once in CI).
func TestCloseRacesConnects(t *testing.T) {
	for range 20 {
		env := brokertest.Start(t, nil)
		dev := env.Device(t, "dev-a", 0)
		cfg := env.TLS(t, dev)
		connected, stop := churn(env.Addr, cfg, true)
		testtool.Eventually(t, 10*time.Second, "clients connecting", func() bool { return connected.Load() >= 16 })
		closed := make(chan struct{})
		go func() { env.Broker.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(20 * time.Second):
			t.Fatal("Broker.Close did not return within 20 s while clients connected and left")
		}
		stop()
	}
}

// churn runs 8 dialers that connect as dev-a and hang up, again and again,
// until the broker refuses them or stop is called; the count is of
// handshakes, or of CONNACKs (the client added to Mochi's clients) with
// readConnack.
func churn(addr string, cfg *tls.Config, readConnack bool) (count *atomic.Int64, stop func()) {
	count = new(atomic.Int64)
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			buf := make([]byte, 4)
			for {
				select {
				case <-done:
					return
				default:
				}
				c, err := tls.Dial("tcp", addr, cfg)
				if err != nil {
					return // closed
				}
				c.SetDeadline(time.Now().Add(2 * time.Second))
				c.Write(connectPacket("dev-a"))
				if !readConnack {
					count.Add(1)
				} else if _, err := c.Read(buf); err == nil {
					count.Add(1)
				}
				c.Close()
			}
		})
	}
	return count, func() { close(done); wg.Wait() }
}
