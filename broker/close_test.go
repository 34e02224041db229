package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testtool"
)

// Broker.Close -> Mochi closeListenerClients -> DisconnectClient blocks on
// the stalled v5 client's write lock: shutdown hangs.
func TestStalledV5ClientBlocksClose(t *testing.T) {
	env := backendEnv(t, nil)
	evil := env.Device(t, "dev-evil", 0)
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, evil))
	if err != nil {
		t.Fatal(err)
	}
	c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: 5}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: evil.ID, Keepalive: 1200, Clean: true}})
	c.read()
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/dev-evil/#", Qos: 0}}})
	c.read()
	big := bytes.Repeat([]byte("x"), 200<<10)
	testtool.Eventually(t, 30*time.Second, "own queue full", func() bool {
		pk := publish(0, 0, "devices/dev-evil/x", 0)
		pk.Payload = big
		c.send(pk)
		return broker.OutboundLen(env.Broker, evil.ID) >= 63
	})
	done := make(chan struct{})
	go func() { env.Broker.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		conn.Close() // let the test end
		t.Fatal("Broker.Close blocked for 5 s by one stalled v5 client")
	}
}
