package broker_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

const gatewayPolicy = policy.Example + `  - name: gateways
    match: {ou: "gateway"}
    publish: ["devices/{child}/#"]
    subscribe: ["devices/{child}/commands/#"]
`

// A gateway publishes for the children the registry lists under it and
// receives their commands; nothing else; a change of children reaches its
// live session without a reconnect.
func TestGatewayChildren(t *testing.T) {
	pol, err := policy.Parse([]byte(gatewayPolicy))
	if err != nil {
		t.Fatal(err)
	}
	env := brokertest.Start(t, func(c *broker.Config) { c.Policy = pol })
	gwDev := env.Device(t, "gw-1", 0, "gateway")
	children := make([]string, 50)
	for i := range children {
		children[i] = fmt.Sprintf("child-%02d", i)
	}
	if err := env.Registry.SetChildren(t.Context(), "gw-1", children); err != nil {
		t.Fatal(err)
	}
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	_, tel := subscribe(t, be, "devices/+/telemetry", 1)
	gw := mustDial(t, env, gwDev)

	for _, c := range []string{"child-00", "child-49"} {
		if err := wait(t, gw.Publish("devices/"+c+"/telemetry", 1, false, "21")); err != nil {
			t.Fatal(err)
		}
		expect(t, tel, "devices/"+c+"/telemetry 21")
	}
	if q, _ := subscribe(t, gw, "devices/child-07/telemetry", 1); q != 0x80 {
		t.Errorf("gateway may read its child's telemetry: %#x", q)
	}
	if q, _ := subscribe(t, gw, "devices/+/commands/#", 1); q != 0x80 {
		t.Errorf("gateway may read every device's commands: %#x", q)
	}
	q, cmds := subscribe(t, gw, "devices/child-07/commands/#", 1)
	if q != 1 {
		t.Fatalf("gateway subscribe to its child's commands: %#x", q)
	}
	wait(t, be.Publish("devices/child-07/commands/reboot", 1, false, "now"))
	expect(t, cmds, "devices/child-07/commands/reboot now")
	// not a child: refused (3.1.1 closes the connection)
	if err := wait(t, gw.Publish("devices/child-50/telemetry", 1, false, "x")); err == nil {
		select {
		case <-gw.lost:
		case <-time.After(2 * time.Second):
			t.Fatal("publish for a device that is not its child accepted")
		}
	}

	// child-07 leaves the gateway: the live session loses it
	gw = mustDial(t, env, gwDev)
	_, cmds = subscribe(t, gw, "devices/child-07/commands/#", 1)
	if err := env.Registry.SetChildren(t.Context(), "gw-1", children[8:]); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 5*time.Second, "subscription of a former child removed", func() bool {
		return !broker.Subscribed(env.Broker, "gw-1", "devices/child-07/commands/#")
	})
	wait(t, be.Publish("devices/child-07/commands/reboot", 1, false, "again"))
	expectNone(t, cmds, 300*time.Millisecond)
	if err := wait(t, gw.Publish("devices/child-10/telemetry", 1, false, "still")); err != nil {
		t.Fatal(err)
	}
	expect(t, tel, "devices/child-10/telemetry still")
}
