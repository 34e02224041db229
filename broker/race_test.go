package broker_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// Two CONNECTs with one client ID racing: the broker orders takeovers by
// OnSessionEstablish, Mochi by inheritClientSession/Clients.Add, and the
// two orders can differ. The session Mochi keeps is then marked
// superseded and released at disconnect while Mochi keeps it as an
// offline persistent session: its identity is gone and every queued
// message is refused.
func TestConcurrentSameIDKeepsSession(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: own-namespace
    match: {cn: "*"}
    client_ids: ["{cn}", "{cn}-*"]
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	env := brokertest.Start(t, func(c *broker.Config) { c.Policy = pol })
	dev := env.Device(t, "dev", 0)
	const n = 300
	for i := range n {
		id := fmt.Sprintf("dev-%d", i)
		var conns [2]*tls.Conn
		for j := range conns {
			c, err := tls.Dial("tcp", env.Addr, env.TLS(t, dev))
			if err != nil {
				t.Fatal(err)
			}
			c.Handshake()
			conns[j] = c
		}
		var wg sync.WaitGroup
		for _, c := range conns {
			wg.Go(func() {
				r := &raw{t: t, conn: c, r: bufio.NewReader(c), v: 4}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
					Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: id, Keepalive: 30, Clean: false}})
				r.read()
			})
		}
		wg.Wait() // both CONNACKs (or refusals) read
		for _, c := range conns {
			c.Close()
		}
	}
	// every client ID: one offline persistent session in Mochi, and its identity kept
	testtool.Eventually(t, 10*time.Second, "all disconnected", func() bool {
		live, _ := broker.SessionCounts(env.Broker)
		return live == 0
	})
	if g := metric(t, env, "mqtls_connections"); g != 0 {
		t.Errorf("mqtls_connections = %v with no client connected", g)
	}
	// lost: Mochi holds the client, the broker has no session for it (every
	// delivery to it is refused); leaked: the broker keeps a session for a
	// client Mochi no longer holds (released only if that ID ever returns).
	if lost, leaked := broker.SessionConsistency(env.Broker); lost+leaked > 0 {
		t.Fatalf("of %d persistent sessions: %d lost their identity, %d broker sessions leaked", broker.MochiClients(env.Broker), lost, leaked)
	}
}
