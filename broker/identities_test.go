package broker_test

import (
	"fmt"
	"strings"
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

// identitiesPolicy is the README's identities example.
const identitiesPolicy = `rules:
  - name: own-namespace
    match: {cn: "*"}
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
  - name: backend
    match: {ou: "backend"}
    client_ids: ["{cn}", "{cn}-*", assigned]
    max_sessions: 3
    publish: ["devices/+/commands/#"]
    subscribe: ["devices/+/telemetry"]
  - name: all-but-secret
    match: {ou: "auditor"}
    overlap: filter
    subscribe: ["#"]
    deny: ["secret/#", "devices/+/commands/#"]
`

func identitiesEnv(t *testing.T) *brokertest.Env {
	t.Helper()
	pol, err := policy.Parse([]byte(identitiesPolicy))
	if err != nil {
		t.Fatal(err)
	}
	return brokertest.Start(t, func(c *broker.Config) { c.Policy = pol })
}

func withID(id string) func(*paho.ClientOptions) {
	return func(o *paho.ClientOptions) { o.SetClientID(id) }
}

// Client IDs follow the policy's patterns; max_sessions bounds one
// certificate's concurrent sessions; the same ID takes over, not adds.
func TestClientIDPatternsAndMaxSessions(t *testing.T) {
	env := identitiesEnv(t)
	be := env.Device(t, "svc", 0, "backend")
	for _, id := range []string{"svc-1", "svc-2", "svc"} {
		mustDial(t, env, be, withID(id))
	}
	if _, err := dial(t, env, be, withID("svc-4")); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		t.Fatalf("fourth session = %v, want refused (max_sessions 3)", err)
	}
	if got := metricLabel(t, env, "mqtls_connects_refused_total", "reason", "max_sessions"); got != 1 {
		t.Errorf("max_sessions refusals = %v", got)
	}
	mustDial(t, env, be, withID("svc-1")) // same ID: a takeover, allowed
	for _, id := range []string{"myclientid", "svc1", "other-1"} {
		if _, err := dial(t, env, be, withID(id)); err == nil {
			t.Errorf("client ID %q admitted", id)
		}
	}
	dev := env.Device(t, "dev-a", 0)
	if _, err := dial(t, env, dev, withID("dev-a-2")); err == nil {
		t.Error("a device used a client ID other than its CN by default")
	}
}

// An empty client ID is refused with "identifier rejected" unless a rule
// allows assigned IDs; then the broker assigns {cn}-<random> and tells a v5
// client.
func TestEmptyClientID(t *testing.T) {
	env := identitiesEnv(t)
	dev := env.Device(t, "dev-a", 0)
	for _, v := range []byte{4, 5} {
		c := &raw{t: t, v: v}
		conn := rawDial(t, env, dev)
		c.conn, c.r = conn, newReader(conn)
		c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 30, Clean: true}})
		ack, err := c.read()
		want := packets.ErrClientIdentifierNotValid.Code
		if v == 4 {
			want = packets.Err3ClientIdentifierNotValid.Code
		}
		if err != nil || ack.ReasonCode != want {
			t.Errorf("v%d empty client ID: CONNACK %#x %v, want %#x", v, ack.ReasonCode, err, want)
		}
	}
	be := env.Device(t, "svc", 0, "backend")
	c := &raw{t: t, v: 5}
	conn := rawDial(t, env, be)
	c.conn, c.r = conn, newReader(conn)
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect},
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Keepalive: 30, Clean: true}})
	ack, err := c.read()
	if err != nil || ack.ReasonCode != 0 || !strings.HasPrefix(ack.Properties.AssignedClientID, "svc-") || len(ack.Properties.AssignedClientID) != len("svc-")+16 {
		t.Fatalf("assigned ID: CONNACK %#x %q %v", ack.ReasonCode, ack.Properties.AssignedClientID, err)
	}
}

// Three replicas of one backend identity share the telemetry: every one of
// 3,000 QoS 1 messages from 30 devices reaches exactly one replica.
func TestSharedSubscriptionReplicas(t *testing.T) {
	const devices, per = 30, 100
	env := identitiesEnv(t)
	be := env.Device(t, "svc", 0, "backend")
	var mu sync.Mutex
	seen := map[string]int{}
	perReplica := map[string]int{}
	for _, id := range []string{"svc-a", "svc-b", "svc-c"} {
		r := mustDial(t, env, be, withID(id))
		tok := r.Subscribe("$share/workers/devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
			mu.Lock()
			seen[string(m.Payload())]++
			perReplica[id]++
			mu.Unlock()
		})
		// paho keys the result by the filter without its $share/GROUP/ prefix
		if err := wait(t, tok); err != nil || tok.(*paho.SubscribeToken).Result()["devices/+/telemetry"] != 1 {
			t.Fatalf("%s shared subscribe: %v %v", id, err, tok.(*paho.SubscribeToken).Result())
		}
	}
	var wg sync.WaitGroup
	for d := range devices {
		id := fmt.Sprintf("dev-%02d", d)
		c := mustDial(t, env, env.Device(t, id, 0))
		wg.Go(func() {
			for i := range per {
				wait(t, c.Publish("devices/"+id+"/telemetry", 1, false, fmt.Sprintf("%s-%d", id, i)))
			}
		})
	}
	wg.Wait()
	testtool.Eventually(t, 20*time.Second, "every message delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) == devices*per
	})
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != devices*per {
		t.Fatalf("%d of %d messages delivered", len(seen), devices*per)
	}
	for m, n := range seen {
		if n != 1 {
			t.Fatalf("message %s delivered %d times", m, n)
		}
	}
	for id, n := range perReplica {
		if n == 0 {
			t.Errorf("replica %s got nothing: %v", id, perReplica)
		}
	}
	t.Logf("per replica: %v", perReplica)
}

// overlap: filter grants '#' over a deny and withholds the denied topics,
// retained ones included.
func TestAllButX(t *testing.T) {
	env := identitiesEnv(t)
	be := mustDial(t, env, env.Device(t, "svc", 0, "backend"))
	wait(t, be.Publish("devices/dev-a/commands/reboot", 1, true, "secret-ish"))
	aud := mustDial(t, env, env.Device(t, "aud", 0, "auditor"))
	q, ch := subscribe(t, aud, "#", 1)
	if q != 1 {
		t.Fatalf("'#' over a deny under overlap: filter granted %#x", q)
	}
	dev := mustDial(t, env, env.Device(t, "dev-a", 0))
	wait(t, dev.Publish("devices/dev-a/telemetry", 1, false, "21"))
	expect(t, ch, "devices/dev-a/telemetry 21")
	wait(t, be.Publish("devices/dev-a/commands/x", 1, false, "no"))
	wait(t, dev.Publish("devices/dev-a/telemetry", 1, false, "22"))
	expect(t, ch, "devices/dev-a/telemetry 22") // the command and the retained one were withheld
	if got := metricLabel(t, env, "mqtls_acl_denied_total", "action", "withheld"); got < 2 {
		t.Errorf("withheld deliveries counted = %v, want >= 2", got)
	}
	if q, _ := subscribe(t, aud, "secret/#", 1); q != 0x80 {
		t.Errorf("a filter wholly inside a deny granted %#x", q)
	}
}
