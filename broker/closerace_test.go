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
		stop := make(chan struct{})
		var dialled atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					c, err := tls.Dial("tcp", env.Addr, cfg)
					if err != nil {
						return // closed
					}
					dialled.Add(1)
					c.SetDeadline(time.Now().Add(2 * time.Second))
					c.Write(connectPacket("dev-a"))
					c.Close()
				}
			})
		}
		testtool.Eventually(t, 5*time.Second, "handshakes under way", func() bool { return dialled.Load() >= 16 })
		env.Broker.Close()
		close(stop)
		wg.Wait()
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
		stop := make(chan struct{})
		var connected atomic.Int64
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				buf := make([]byte, 4)
				for {
					select {
					case <-stop:
						return
					default:
					}
					c, err := tls.Dial("tcp", env.Addr, cfg)
					if err != nil {
						return // closed
					}
					c.SetDeadline(time.Now().Add(2 * time.Second))
					c.Write(connectPacket("dev-a"))
					if _, err := c.Read(buf); err == nil {
						connected.Add(1) // CONNACK: added to Mochi's clients
					}
					c.Close() // removed again
				}
			})
		}
		testtool.Eventually(t, 10*time.Second, "clients connecting", func() bool { return connected.Load() >= 16 })
		closed := make(chan struct{})
		go func() { env.Broker.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(20 * time.Second):
			t.Fatal("Broker.Close did not return within 20 s while clients connected and left")
		}
		close(stop)
		wg.Wait()
	}
}
