package broker_test

import (
	"bufio"
	"crypto/tls"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// A device that reads its QoS 1 deliveries but never acknowledges them
// fills its inflight store; reserve() then parks the *publisher's* read
// loop for the whole StallTimeout (default 30 s), so one misbehaving
// device delays the backend's commands to every other device. It can
// repeat this after each reconnect (its full inflight store is resent and
// inherited).
func TestNonAckingSubscriberStallsPublisher(t *testing.T) {
	const stall = 5 * time.Second
	env := backendEnv(t, func(c *broker.Config) { c.MaxQueuedMessages = 10; c.StallTimeout = stall })
	bad := env.Device(t, "dev-bad", 0)
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, bad))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: 4}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: bad.ID, Keepalive: 60, Clean: true}})
	if ack, err := c.read(); err != nil || ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %v", err)
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/dev-bad/#", Qos: 1}}})
	if ack, err := c.read(); err != nil || ack.FixedHeader.Type != packets.Suback {
		t.Fatalf("SUBACK %v", err)
	}
	// fill its own inflight store: publish to itself, never acknowledge
	for i := range 9 {
		c.send(publish(uint16(10+i), 1, "devices/dev-bad/self", 0))
	}
	go func() { // read everything, acknowledge nothing
		for {
			if _, err := c.read(); err != nil {
				return
			}
		}
	}()

	good := mustDial(t, env, env.Device(t, "dev-good", 0))
	_, ch := subscribe(t, good, "devices/dev-good/commands/#", 1)
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	testtool.Eventually(t, 5*time.Second, "dev-bad's inflight store full", func() bool { return broker.Inflight(env.Broker, bad.ID) >= 9 })
	be.Publish("devices/dev-bad/commands/x", 1, false, "one command")
	start := time.Now()
	wait(t, be.Publish("devices/dev-good/commands/reboot", 1, false, "now"))
	select {
	case m := <-ch:
		if d := time.Since(start); d > 2*time.Second { // bounded by the ack wait (1 s), not the stall timeout
			t.Fatalf("command to dev-good (%s) delivered after %v: stalled behind dev-bad", m, d.Round(time.Millisecond))
		}
	case <-time.After(2 * stall):
		t.Fatal("not delivered")
	}
}
