package device_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// recorder sits between a device and the broker (it terminates the
// device's TLS with a server certificate of the same CA and opens its own
// mutual-TLS connection to the broker with the device's certificate), reads
// the MQTT packets both ways and records which QoS 1 PUBLISHes the broker
// acknowledged. That is what a device can be held to, independently of
// what the broker then does with the message. It can also keep the device
// out (every connection is closed at once) while the test restarts the
// broker.
type recorder struct {
	addr, target string
	server       *tls.Config // presented to the device
	client       *tls.Config // presented to the broker
	ln           net.Listener
	blocked      atomic.Bool

	mu    sync.Mutex
	acked map[string]int // payload -> PUBACKs seen
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

func startRecorder(t *testing.T, target string, server, client tls.Certificate, f *fleet) *recorder {
	t.Helper()
	r := &recorder{
		target: target, acked: map[string]int{}, conns: map[net.Conn]bool{},
		server: &tls.Config{Certificates: []tls.Certificate{server}},
		client: &tls.Config{Certificates: []tls.Certificate{client}, RootCAs: f.broker.CA.Pool(), ServerName: "127.0.0.1"},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.ln, r.addr = ln, ln.Addr().String()
	r.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if r.blocked.Load() {
				c.Close()
				continue
			}
			r.wg.Go(func() { r.relay(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		r.mu.Lock()
		for c := range r.conns {
			c.Close()
		}
		r.mu.Unlock()
		r.wg.Wait()
	})
	return r
}

func (r *recorder) track(c net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns[c] = true
	return true
}

// relay forwards one device connection, packet by packet.
func (r *recorder) relay(raw net.Conn) {
	dev := tls.Server(raw, r.server)
	r.track(dev)
	defer dev.Close()
	up, err := tls.Dial("tcp", r.target, r.client)
	if err != nil {
		return
	}
	r.track(up)
	defer up.Close()
	var mu sync.Mutex
	pending := map[uint16]string{} // message ID -> payload, on this connection
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer dev.Close()
		for {
			pk, err := packets.ReadPacket(up)
			if err != nil {
				return
			}
			if ack, ok := pk.(*packets.PubackPacket); ok {
				mu.Lock()
				if p, ok := pending[ack.MessageID]; ok {
					r.mu.Lock()
					r.acked[p]++
					r.mu.Unlock()
					delete(pending, ack.MessageID)
				}
				mu.Unlock()
			}
			if pk.Write(dev) != nil {
				return
			}
		}
	}()
	for {
		pk, err := packets.ReadPacket(dev)
		if err != nil {
			break
		}
		if pub, ok := pk.(*packets.PublishPacket); ok && pub.Qos == 1 {
			mu.Lock()
			pending[pub.MessageID] = string(pub.Payload)
			mu.Unlock()
		}
		if pk.Write(up) != nil {
			break
		}
	}
	up.Close()
	<-done
}

func (r *recorder) ackedPayloads() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for p := range r.acked {
		out = append(out, p)
	}
	return out
}

func (r *recorder) ackedCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.acked)
}

// closeAll cuts every relayed connection.
func (r *recorder) closeAll() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		c.Close()
	}
	clear(r.conns)
}

// The broker restarts 5 times while a device publishes 2,000
// sequence-numbered QoS 1 messages, and each time the device's connection
// drops with a message in flight: no publish is reported as refused or
// failed, the broker acknowledges every number, and a subscriber with a
// persistent session receives every number at least once. (Before the
// fix the SDK took a connection closed within 2 s of a publish for a
// refusal, deleted the message and returned ErrNotAuthorized.)
func TestBrokerRestartsLoseNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: restarts the broker 5 times (-short)")
	}
	const total, restarts = 2000, 5
	f := startFleet(t, 0)
	devID, devStore := f.enroll(t, "dev-1", "", nil)
	subID, subStore := f.enroll(t, "backend-1", "backend", nil)
	srvCert, err := f.broker.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	devCert, err := devID.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	// The device reaches the broker through the recorder, which also keeps
	// it away after each restart until the subscriber has subscribed again
	// (the restarted broker has no sessions: a message arriving before the
	// subscription would have nobody to go to).
	rec := startRecorder(t, f.broker.Addr, srvCert, devCert, f)
	var subReconnects atomic.Int32
	dev := f.client(t, devID, devStore, func(c *device.Config) {
		c.Broker = "mqtts://" + rec.addr
		c.DisableRenewal = true
		c.MinBackoff, c.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
		c.QueueSize = total // what is published while the broker is down waits in the offline queue
	})
	sub := f.client(t, subID, subStore, func(c *device.Config) {
		c.DisableRenewal = true
		c.MinBackoff, c.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
		c.OnReconnected = func() { subReconnects.Add(1) }
	})
	connect(t, sub)
	connect(t, dev)
	var mu sync.Mutex
	got := map[int]int{}
	if err := sub.Subscribe(t.Context(), "devices/dev-1/telemetry", 1, func(_ string, p []byte) {
		n, _ := strconv.Atoi(string(p))
		mu.Lock()
		got[n]++
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}

	errs := make(chan error, total)
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		for i := range total {
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			if err := dev.Publish(ctx, "devices/dev-1/telemetry", []byte(strconv.Itoa(i)), 1, false); err != nil {
				errs <- fmt.Errorf("publish %d: %w", i, err)
			}
			cancel()
		}
	}()
	for k := range restarts {
		// restart while messages are in flight, spread over the run
		testtool.Eventually(t, 30*time.Second, "publishing progresses", func() bool {
			return rec.ackedCount() >= (k+1)*total/(restarts+1)
		})
		// The device's link drops with a message in flight (and the device
		// stays out until the restarted broker has the subscription back).
		rec.blocked.Store(true)
		rec.closeAll()
		// The broker keeps sessions and queues in memory and acknowledges
		// a PUBLISH before it routes it (Mochi): what it holds when it
		// stops is gone. Let it deliver what it acknowledged first, so the
		// count below measures the device, not the broker's restart.
		testtool.Eventually(t, 10*time.Second, "acknowledged messages delivered before the restart", func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, p := range rec.ackedPayloads() {
				n, _ := strconv.Atoi(p)
				if got[n] == 0 {
					return false
				}
			}
			return true
		})
		f.broker.Stop()
		f.broker.Restart(t)
		testtool.Eventually(t, 15*time.Second, "subscriber back", func() bool { return subReconnects.Load() == int32(k+1) })
		rec.blocked.Store(false)
	}
	select {
	case <-pubDone:
	case <-time.After(60 * time.Second):
		t.Fatal("publisher did not finish")
	}
	close(errs)
	refused := 0
	for err := range errs {
		if errors.Is(err, device.ErrNotAuthorized) {
			refused++
		}
		t.Error(err)
	}
	if refused > 0 {
		t.Fatalf("%d publishes reported as refused after a broker restart", refused)
	}
	testtool.Eventually(t, 20*time.Second, "the broker acknowledged every number", func() bool { return rec.ackedCount() == total })
	testtool.Eventually(t, 20*time.Second, "the subscriber received every number", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) == total
	})
	mu.Lock()
	dups := 0
	for _, n := range got {
		dups += n - 1
	}
	mu.Unlock()
	t.Logf("%d restarts, %d messages acknowledged and received, %d received more than once, %d device reconnect attempts",
		restarts, total, dups, dev.ReconnectAttempts())
}
