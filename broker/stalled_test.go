package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// disconnect() writes a v5 DISCONNECT before closing. A stalled client's
// Mochi writer holds cl.Lock() while blocked in conn.Write, so
// DisconnectClient -> WritePacket blocks the caller until that write's
// deadline, which the client keeps pushing back by sending QoS 0
// PUBLISHes. Revoking such a device blocks the revocation poller forever:
// it keeps publishing, and later revocations never take effect.
func TestStalledV5ClientBlocksRevocationsIndefinitely(t *testing.T) {
	env := backendEnv(t, nil)
	evil := env.Device(t, "dev-evil", 0)
	// Stop reading; publish big QoS 0 messages to itself until its writer is
	// stuck in a TCP write and its queue is full.
	c := stalledV5(t, env, evil, 10)

	victim := mustDial(t, env, env.Device(t, "dev-b", 0))
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	_, tel := subscribe(t, be, "devices/+/telemetry", 0)
	if _, err := env.Registry.Revoke(t.Context(), "dev-evil", "compromised"); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 5*time.Second, "revocation seen by the broker", func() bool {
		return broker.Revoked(env.Broker, evil.Leaf.SerialNumber.Text(16))
	})
	// the revoked device still publishes
	c.send(publish(0, 0, "devices/dev-evil/telemetry", 0))
	select {
	case m := <-tel:
		t.Errorf("backend received %q from dev-evil 1 s after its revocation", m)
	case <-time.After(time.Second):
	}
	if _, err := env.Registry.Revoke(t.Context(), "dev-b", "stolen"); err != nil {
		t.Fatal(err)
	}
	// Keepalive 10 s: the stuck write's deadline is 15 s away, but each
	// QoS 0 PUBLISH the device sends (to a topic nobody reads: no write
	// back) refreshes the connection deadline, write side included.
	for end := time.Now().Add(25 * time.Second); time.Now().Before(end); {
		c.send(publish(0, 0, "devices/dev-evil/nobody", 0))
		select {
		case <-victim.lost:
			return
		case <-time.After(2 * time.Second):
		}
	}
	t.Fatal("dev-b revoked 25 s ago (> 1.5 x keepalive) is still connected: the poller is stuck for as long as dev-evil keeps publishing")
}

// Broker.Close -> Mochi closeListenerClients -> DisconnectClient blocks on
// the stalled v5 client's write lock: shutdown hangs.
func TestStalledV5ClientBlocksClose(t *testing.T) {
	env := backendEnv(t, nil)
	evil := env.Device(t, "dev-evil", 0)
	c := stalledV5(t, env, evil, 1200)
	done := make(chan struct{})
	go func() { env.Broker.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.conn.Close() // let the test end
		t.Fatal("Broker.Close blocked for 5 s by one stalled v5 client")
	}
}

// stalledV5 connects a v5 client as evil with keepalive ka, subscribes it
// to its own namespace and fills its queue until Mochi's writer is stuck
// on it (the client never reads).
func stalledV5(t *testing.T, env *brokertest.Env, evil *brokertest.Device, ka uint16) *raw {
	t.Helper()
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, evil))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: 5}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: evil.ID, Keepalive: ka, Clean: true}})
	if ack, err := c.read(); err != nil || ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %v", err)
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/" + evil.ID + "/#", Qos: 0}}})
	c.read()
	big := bytes.Repeat([]byte("x"), 200<<10)
	testtool.Eventually(t, 30*time.Second, "own queue full", func() bool {
		pk := publish(0, 0, "devices/"+evil.ID+"/x", 0)
		pk.Payload = big
		c.send(pk)
		return broker.OutboundLen(env.Broker, evil.ID) >= 63
	})
	return c
}
