package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

func persistent(o *paho.ClientOptions) { o.SetCleanSession(false) }

// collect routes every message a (re)connected persistent session gets.
func collect(ch chan string) func(*paho.ClientOptions) {
	return func(o *paho.ClientOptions) {
		o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { ch <- m.Topic() + " " + string(m.Payload()) })
	}
}

// receiveSet waits for n distinct messages.
func receiveSet(t *testing.T, ch chan string, n int) map[string]bool {
	t.Helper()
	got := map[string]bool{}
	for len(got) < n {
		select {
		case m := <-ch:
			got[m] = true
		case <-time.After(10 * time.Second):
			t.Fatalf("received %d of %d messages: %v", len(got), n, got)
		}
	}
	return got
}

// A persistent session keeps its identity while the client is away: QoS 1
// messages published meanwhile are queued and delivered on reconnect.
func TestOfflineSessionReceivesQoS1(t *testing.T) {
	env := backendEnv(t, nil)
	dev := env.Device(t, "dev-a", 0)
	a := mustDial(t, env, dev, persistent)
	if q, _ := subscribe(t, a, "devices/dev-a/commands/#", 1); q != 1 {
		t.Fatalf("subscribe granted %#x", q)
	}
	a.Disconnect(100)
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	for i := range 5 {
		if err := wait(t, be.Publish("devices/dev-a/commands/reboot", 1, false, fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	ch := make(chan string, 100)
	mustDial(t, env, dev, persistent, collect(ch))
	got := receiveSet(t, ch, 5)
	for i := range 5 {
		if !got[fmt.Sprintf("devices/dev-a/commands/reboot %d", i)] {
			t.Errorf("message %d not delivered after reconnect: %v", i, got)
		}
	}
	// the old connection's end may be processed after the new session is
	// live; then it is released as superseded
	testtool.Eventually(t, 5*time.Second, "sessions: 2 live, none offline", func() bool {
		live, offline := broker.SessionCounts(env.Broker)
		return live == 2 && offline == 0
	})
}

// Past the queue bound an offline session's messages are dropped, counted
// and logged, not silently lost.
func TestOfflineQueueBoundCounted(t *testing.T) {
	env := backendEnv(t, func(c *broker.Config) { c.MaxQueuedMessages = 10 })
	dev := env.Device(t, "dev-a", 0)
	a := mustDial(t, env, dev, persistent)
	subscribe(t, a, "devices/dev-a/commands/#", 1)
	a.Disconnect(100)
	testtool.Eventually(t, 5*time.Second, "session offline", func() bool {
		_, offline := broker.SessionCounts(env.Broker)
		return offline == 1
	})
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	for i := range 15 {
		wait(t, be.Publish("devices/dev-a/commands/x", 1, false, fmt.Sprint(i)))
	}
	if got := metricLabel(t, env, "mqtls_deliveries_dropped_total", "reason", "offline_queue_full"); got != 5 {
		t.Errorf("offline drops counted = %v, want 5", got)
	}
	ch := make(chan string, 100)
	mustDial(t, env, dev, persistent, collect(ch))
	receiveSet(t, ch, 10)
	expectNone(t, ch, 200*time.Millisecond)
}

// A session that ends cleanly (clean session) leaves nothing behind; one
// that expires is released too.
func TestSessionExpiryReleasesIdentity(t *testing.T) {
	env := backendEnv(t, func(c *broker.Config) { c.MaxSessionExpiry = time.Second })
	dev := env.Device(t, "dev-a", 0)
	a := mustDial(t, env, dev, persistent)
	subscribe(t, a, "devices/dev-a/commands/#", 1)
	a.Disconnect(100)
	testtool.Eventually(t, 10*time.Second, "expired session released", func() bool {
		live, offline := broker.SessionCounts(env.Broker)
		return live == 0 && offline == 0
	})
}

// A CONNACK that cannot be written (v5 Maximum Packet Size 4) makes Mochi
// skip OnDisconnect; nothing may leak from such connections.
func TestConnackFailureLeaksNothing(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	cfg := env.TLS(t, dev)
	var buf bytes.Buffer
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect:    packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "dev-a", Keepalive: 30, Clean: true},
		Properties: packets.Properties{MaximumPacketSize: 4}}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	const n = 1000
	var wg sync.WaitGroup
	work := make(chan int)
	for range 4 {
		wg.Go(func() {
			for range work {
				conn, err := tls.Dial("tcp", env.Addr, cfg)
				if err != nil {
					t.Error(err)
					return
				}
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				conn.Write(buf.Bytes())
				bufio.NewReader(conn).ReadByte() // the broker closes
				conn.Close()
			}
		})
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	testtool.Eventually(t, 5*time.Second, "gauge and session map back to zero", func() bool {
		live, offline := broker.SessionCounts(env.Broker)
		return metric(t, env, "mqtls_connections") == 0 && live == 0 && offline == 0 && broker.MochiClients(env.Broker) == 0
	})
}

// A revocation that lands while a CONNECT is being admitted (after its
// revocation check) still closes the session.
func TestRevocationDuringConnect(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	serial := dev.Leaf.SerialNumber.Text(16)
	broker.SetConnectPause(env.Broker, func() {
		if _, err := env.Registry.Revoke(t.Context(), "dev-a", "stolen"); err != nil {
			t.Error(err)
		}
		testtool.Eventually(t, 5*time.Second, "revocation seen by the broker", func() bool { return broker.Revoked(env.Broker, serial) })
	})
	c, err := dial(t, env, dev)
	if err != nil {
		return // refused or closed before CONNACK: fine
	}
	select {
	case <-c.lost:
	case <-time.After(2 * time.Second):
		t.Fatal("session admitted during a revocation is still alive")
	}
}

// rawConnect opens a 3.1.1 session with a Will and returns the conn.
func rawConnect(t *testing.T, env *brokertest.Env, d *brokertest.Device, willTopic string) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, d))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var buf bytes.Buffer
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: d.ID, Keepalive: 30, Clean: true,
			WillFlag: willTopic != "", WillTopic: willTopic, WillPayload: []byte("gone"), WillQos: 1}}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	if _, err := conn.Read(ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK %x: %v", ack, err)
	}
	conn.SetDeadline(time.Time{})
	return conn
}

// A Will the current policy no longer allows is not published, and a
// policy reload racing client disconnects does not touch Mochi's client
// state (run with -race).
func TestWillCheckedWhenSent(t *testing.T) {
	env := backendEnv(t, nil)
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	_, ch := subscribe(t, be, "devices/+/telemetry", 1)
	dev := env.Device(t, "dev-a", 0)
	noWill, err := policy.Parse([]byte(policy.Example + "\n  - name: no-telemetry\n    match: {cn: \"dev-*\"}\n    deny: [\"devices/{cn}/telemetry\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	example, _ := policy.Parse([]byte(policy.Example))

	// allowed: the Will is published
	rawConnect(t, env, dev, "devices/dev-a/telemetry").Close()
	expect(t, ch, "devices/dev-a/telemetry gone")

	// denied after the connection was admitted: not published
	conn := rawConnect(t, env, dev, "devices/dev-a/telemetry")
	if err := env.Broker.SetPolicy(noWill); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	expectNone(t, ch, 300*time.Millisecond)

	// reloads racing abrupt closes
	env.Broker.SetPolicy(example)
	for range 20 {
		conn := rawConnect(t, env, dev, "devices/dev-a/telemetry")
		var wg sync.WaitGroup
		wg.Go(func() { env.Broker.SetPolicy(noWill) })
		wg.Go(func() { conn.Close() })
		wg.Wait()
		env.Broker.SetPolicy(example)
	}
}

// metricLabel returns the value of name's series whose label has value.
func metricLabel(t testing.TB, env *brokertest.Env, name, label, value string) float64 {
	t.Helper()
	mfs, err := env.Metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetGauge().GetValue() + m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// A suppressed Will goes to a reserved topic that no delivery passes, even
// to an identity whose policy grants '$mqtls/#' or everything.
func TestSuppressedWillReachesNobody(t *testing.T) {
	src := policy.Example + "  - name: sees-all\n    match: {ou: \"auditor\"}\n    subscribe: [\"$mqtls/#\", \"devices/#\"]\n"
	pol, err := policy.Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	env := backendEnv(t, func(c *broker.Config) { c.Policy = pol })
	aud := mustDial(t, env, env.Device(t, "aud", 0, "auditor"))
	_, all := subscribe(t, aud, "$mqtls/#", 1)
	_, dev := subscribe(t, aud, "devices/#", 1)
	conn := rawConnect(t, env, env.Device(t, "dev-a", 0), "devices/dev-a/telemetry")
	noWill, _ := policy.Parse([]byte(src + "  - name: no-telemetry\n    match: {cn: \"dev-*\"}\n    deny: [\"devices/{cn}/telemetry\"]\n"))
	if err := env.Broker.SetPolicy(noWill); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	testtool.Eventually(t, 5*time.Second, "dev-a's session over (its Will handled)", func() bool {
		live, offline := broker.SessionCounts(env.Broker)
		return live == 1 && offline == 0
	})
	expectNone(t, all, 300*time.Millisecond)
	expectNone(t, dev, 10*time.Millisecond)
}
