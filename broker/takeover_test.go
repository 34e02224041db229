package broker_test

import (
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// Client-ID patterns let two identities share a client ID namespace
// ("{cn}-*": device "plant" may use "plant-1", which is device plant-1's
// own ID). Mochi then hands the victim's persistent session to the other
// identity: its queued QoS 1 messages are resent without any ACL check.
func TestCrossIdentityTakeoverLeaksQueue(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: own-namespace
    match: {cn: "*"}
    client_ids: ["{cn}", "{cn}-*"]
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
  - name: backend
    match: {ou: "backend"}
    publish: ["devices/+/commands/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	env := brokertest.Start(t, func(c *broker.Config) { c.Policy = pol })
	victim := env.Device(t, "plant-1", 0)
	v := mustDial(t, env, victim, persistent)
	if q, _ := subscribe(t, v, "devices/plant-1/commands/#", 1); q != 1 {
		t.Fatalf("subscribe granted %#x", q)
	}
	v.Disconnect(100)

	be := mustDial(t, env, env.Device(t, "svc", 0, "backend"))
	if err := wait(t, be.Publish("devices/plant-1/commands/unlock", 1, false, "code=4711")); err != nil {
		t.Fatal(err)
	}

	// Another device, whose policy never allows devices/plant-1/#.
	ch := make(chan string, 10)
	if _, err := dial(t, env, env.Device(t, "plant", 0), withID("plant-1"), persistent, collect(ch)); err == nil {
		t.Error("device plant connected with the client ID of device plant-1's session")
	}
	if got := metricLabel(t, env, "mqtls_connects_refused_total", "reason", "client_id_in_use"); got != 1 {
		t.Errorf("client_id_in_use refusals = %v, want 1", got)
	}
	select {
	case m := <-ch:
		t.Fatalf("device plant received %q from plant-1's session", m)
	case <-time.After(2 * time.Second):
	}
}

// The same takeover kicks the victim's live connection, as often as the
// attacker likes.
func TestCrossIdentityTakeoverKicksVictim(t *testing.T) {
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
	v := mustDial(t, env, env.Device(t, "plant-1", 0))
	if _, err := dial(t, env, env.Device(t, "plant", 0), withID("plant-1")); err != nil {
		t.Logf("attacker refused: %v", err)
	}
	select {
	case err := <-v.lost:
		t.Fatalf("device plant-1 disconnected by device plant using its client ID: %v", err)
	case <-time.After(time.Second):
	}
}
