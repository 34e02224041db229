package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// roomForQoS0 rejects a QoS 0 publish (ErrRejectPacket) when every live
// subscriber's queue is full; Mochi returns before retainMessage, so a
// retained QoS 0 "last known state" (or a retained clear) is lost for
// every future subscriber, not just withheld from the stalled one.
func TestQoS0RejectLosesRetainedUpdate(t *testing.T) {
	env := backendEnv(t, func(c *broker.Config) { c.MaxWritesPending = 8 })
	dev := mustDial(t, env, env.Device(t, "dev-a", 0))
	wait(t, dev.Publish("devices/dev-a/telemetry", 0, true, "state=1"))

	// a subscriber that stops reading (same identity, it may subscribe)
	be := env.Device(t, "backend-1", 0, "backend")
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, be))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: 4}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: be.ID, Keepalive: 60, Clean: true}})
	c.read()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/+/telemetry", Qos: 0}}})
	c.read()
	// fill its TCP buffers and then its outbound queue
	big := bytes.Repeat([]byte("x"), 200<<10)
	testtool.Eventually(t, 20*time.Second, "subscriber queue full", func() bool {
		dev.Publish("devices/dev-a/telemetry", 0, false, big)
		return broker.OutboundLen(env.Broker, be.ID) >= 7
	})
	// the device's retained state changes while the backend is slow
	wait(t, dev.Publish("devices/dev-a/telemetry", 0, true, "state=2"))
	wait(t, dev.Publish("devices/dev-a/telemetry", 1, false, "flush")) // QoS 1: handled after the QoS 0 one

	viewer := mustDial(t, env, env.Device(t, "backend-2", 0, "backend"))
	_, ch := subscribe(t, viewer, "devices/dev-a/telemetry", 0)
	select {
	case m := <-ch:
		if m != "devices/dev-a/telemetry state=2" {
			t.Fatalf("new subscriber got retained %q, want state=2", m[:min(len(m), 60)])
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the retained update state=2 was dropped: a new subscriber gets no retained message")
	}
}
