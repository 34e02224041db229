package policy_test

import (
	"fmt"

	"github.com/mqtls/mqtls/broker/policy"
)

// Permissions are compiled once per client and then checked per message.
func ExamplePerms_Allow() {
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		panic(err)
	}
	device := pol.Compile(policy.Identity{CN: "sensor-1"})
	backend := pol.Compile(policy.Identity{CN: "ops", OUs: []string{"backend"}})
	fmt.Println(device.Allow("devices/sensor-1/telemetry", policy.Publish))
	fmt.Println(device.Allow("devices/sensor-2/telemetry", policy.Publish))
	fmt.Println(device.AllowFilter("devices/#"))
	fmt.Println(backend.Allow("devices/sensor-1/commands/reboot", policy.Publish))
	fmt.Println(backend.AllowFilter("devices/+/telemetry"))
	// Output:
	// true
	// false
	// false
	// true
	// true
}
