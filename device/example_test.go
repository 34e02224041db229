package device_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/keystore"
)

// Enroll a device at the factory: the key is created in the TPM and never
// leaves it; the certificate comes from the EST server.
func ExampleEnroll() {
	ctx := context.Background()
	dir := "/var/lib/device/identity"
	store, err := tpm.Open(ctx, keystore.DefaultTPMDevice, dir)
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	roots, err := device.ReadCertFile("/etc/device/root.crt")
	if err != nil {
		log.Fatal(err)
	}
	id, err := device.Enroll(ctx, device.EnrollConfig{
		Dir: dir, DeviceID: "sensor-0042", Token: "one-time-token-from-the-factory",
		EST: "https://est.example.com:8443", Root: roots[0],
		Store: store, Keystore: "tpm",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("enrolled", id.Leaf().Subject.CommonName)
}

// Connect with the identity, publish telemetry and take commands. The
// client reconnects, queues QoS 1 messages while offline and renews its
// certificate by itself.
func ExampleNew() {
	ctx := context.Background()
	dir := "/var/lib/device/identity"
	store, err := tpm.Open(ctx, keystore.DefaultTPMDevice, dir)
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	id, err := device.Load(ctx, dir, store)
	if err != nil {
		log.Fatal(err)
	}
	c, err := device.New(device.Config{Broker: "mqtts://mqtt.example.com:8883", Identity: id, Store: store})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	if err := c.Connect(ctx); err != nil {
		log.Fatal(err) // device.ErrNotAuthorized, device.ErrTLS, device.ErrTimeout...
	}
	err = c.Subscribe(ctx, "devices/sensor-0042/commands/#", 1, func(topic string, payload []byte) {
		fmt.Printf("command %s: %s\n", topic, payload)
	})
	if err != nil {
		log.Fatal(err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.Publish(pctx, "devices/sensor-0042/telemetry", []byte(`{"t":21.5}`), 1, false); err != nil {
		log.Fatal(err)
	}
}
