package broker_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
)

// A delayed Will (v5 Will Delay Interval) of a persistent session is
// published from Mochi's event loop; OnSelectSubscribers reserves a slot
// at the chosen shared-subscription member and files it under the
// disconnected publisher's session, which never releases it (OnPublished
// does not run for Wills, OnDisconnect has already run). After
// MaxWritesPending-1 such Wills the member looks full forever: every QoS 1
// message to it waits the stall timeout and the member is disconnected.
func TestDelayedWillLeaksSharedReservation(t *testing.T) {
	env := backendEnv(t, func(c *broker.Config) { c.MaxWritesPending = 8; c.StallTimeout = time.Second })
	replica := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	got := make(chan string, 100)
	tok := replica.Subscribe("$share/w/devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + " " + string(m.Payload()) })
	if err := wait(t, tok); err != nil {
		t.Fatal(err)
	}
	for i := range 7 { // MaxWritesPending-1
		d := env.Device(t, fmt.Sprintf("dev-%d", i), 0)
		conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, d))
		if err != nil {
			t.Fatal(err)
		}
		c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: 5}
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Properties: packets.Properties{SessionExpiryInterval: 300, SessionExpiryIntervalFlag: true},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: d.ID, Keepalive: 30,
				WillFlag: true, WillTopic: "devices/" + d.ID + "/telemetry", WillPayload: []byte("gone"), WillQos: 1,
				WillProperties: packets.Properties{WillDelayInterval: 1}}})
		if ack, err := c.read(); err != nil || ack.ReasonCode != 0 {
			t.Fatalf("CONNACK %#x %v", ack.ReasonCode, err)
		}
		conn.Close() // abrupt: the Will is due in 1 s
	}
	for range 7 {
		select {
		case m := <-got:
			t.Logf("will: %s", m)
		case <-time.After(10 * time.Second):
			t.Fatal("delayed Will not delivered")
		}
	}
	// The replica's queue is empty; a live device now publishes QoS 1.
	dev := mustDial(t, env, env.Device(t, "dev-live", 0))
	start := time.Now()
	if err := wait(t, dev.Publish("devices/dev-live/telemetry", 1, false, "21")); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("QoS 1 publish to an idle shared subscriber took %v (leaked reservations)", d)
	}
	select {
	case err := <-replica.lost:
		t.Fatalf("idle replica disconnected as stalled: %v", err)
	case m := <-got:
		t.Logf("delivered: %s", m)
	case <-time.After(3 * time.Second):
		t.Fatal("not delivered")
	}
}
