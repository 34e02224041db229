package device_test

import (
	"errors"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// A topic no broker accepts for a PUBLISH is refused locally, at QoS 0
// and 1, with ErrInvalidTopic; the connection is not touched. (Before,
// QoS 0 "succeeded" while the broker dropped the connection for a
// protocol violation, and QoS 1 reported "not authorized".)
func TestPublishRefusesInvalidTopics(t *testing.T) {
	f := startFleet(t, 0)
	id, store := f.enroll(t, "dev-1", "", nil)
	be, beStore := f.enroll(t, "backend-1", "backend", nil)
	c := f.client(t, id, store, func(c *device.Config) { c.DisableRenewal = true })
	sub := f.client(t, be, beStore, func(c *device.Config) { c.DisableRenewal = true })
	connect(t, c)
	connect(t, sub)
	got := newCollector()
	if err := sub.Subscribe(t.Context(), "devices/+/telemetry", 1, got.handle); err != nil {
		t.Fatal(err)
	}
	for _, topic := range []string{"devices/dev-1/+", "devices/dev-1/#", "devices/+/x", "#", "devices/dev-1/a\x00b", "", "devices/dev-1/\xff"} {
		for _, qos := range []byte{0, 1} {
			if err := c.Publish(t.Context(), topic, []byte("x"), qos, false); !errors.Is(err, device.ErrInvalidTopic) {
				t.Errorf("publish to %q at QoS %d = %v, want ErrInvalidTopic", topic, qos, err)
			}
		}
	}
	if err := c.Publish(t.Context(), "devices/dev-1/telemetry", []byte("after"), 0, false); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 5*time.Second, "a QoS 0 publish after the refusals delivered", func() bool { return got.has("after") })
	if n := c.ReconnectAttempts(); n != 0 || c.State() != device.StateConnected {
		t.Fatalf("state %v after %d reconnects: the invalid topics reached the broker", c.State(), n)
	}
}

// A message larger than MQTT allows is refused at Publish with
// ErrTooLarge, also when it would go to the (persistent) offline queue.
func TestPublishRefusesOversize(t *testing.T) {
	f := startFleet(t, 0)
	id, store := f.enroll(t, "dev-1", "", nil)
	c := f.client(t, id, store, func(c *device.Config) { c.PersistentQueue = true })
	// not connected: a QoS 1 publish goes to the offline queue
	big := make([]byte, device.MaxMessage)
	if err := c.Publish(t.Context(), "devices/dev-1/t", big, 1, false); !errors.Is(err, device.ErrTooLarge) {
		t.Fatalf("offline publish of %d bytes = %v, want ErrTooLarge", len(big), err)
	}
	if err := c.Publish(t.Context(), "devices/dev-1/t", []byte("ok"), 1, false); err != nil {
		t.Fatalf("offline publish = %v, want queued", err)
	}
}
