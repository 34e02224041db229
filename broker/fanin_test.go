package broker_test

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

func backendEnv(t testing.TB, tweak func(*broker.Config)) *brokertest.Env {
	t.Helper()
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		t.Fatal(err)
	}
	return brokertest.Start(t, func(c *broker.Config) {
		c.Policy = pol
		if tweak != nil {
			tweak(c)
		}
	})
}

// 50 publishers fan in to one slow QoS 1 subscriber. Mochi alone drops
// deliveries when the subscriber's queue is full (25 % measured); with the
// broker's backpressure every sequence number arrives and nothing is
// dropped.
func TestFanInNoQoS1Loss(t *testing.T) {
	const publishers, perPublisher = 50, 100
	env := backendEnv(t, nil)
	sub := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"), func(o *paho.ClientOptions) { o.SetOrderMatters(true) })
	var mu sync.Mutex
	seen := map[string]bool{}
	done := make(chan struct{})
	tok := sub.Subscribe("devices/+/telemetry", 1, func(_ paho.Client, m paho.Message) {
		time.Sleep(200 * time.Microsecond) // a slow consumer
		mu.Lock()
		defer mu.Unlock()
		seen[string(m.Payload())] = true
		if len(seen) == publishers*perPublisher {
			close(done)
		}
	})
	if err := wait(t, tok); err != nil || tok.(*paho.SubscribeToken).Result()["devices/+/telemetry"] != 1 {
		t.Fatalf("subscribe: %v %v", err, tok.(*paho.SubscribeToken).Result())
	}
	var wg sync.WaitGroup
	for p := range publishers {
		id := fmt.Sprintf("dev-%02d", p)
		c := mustDial(t, env, env.Device(t, id, 0), func(o *paho.ClientOptions) { o.SetWriteTimeout(time.Minute) })
		wg.Go(func() {
			var toks []paho.Token
			for i := range perPublisher {
				toks = append(toks, c.Publish("devices/"+id+"/telemetry", 1, false, fmt.Sprintf("%s/%d", id, i)))
			}
			for _, tk := range toks {
				if err := wait(t, tk); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
	}
	mu.Lock()
	got := len(seen)
	var missing []string
	for p := range publishers {
		for i := range perPublisher {
			if k := fmt.Sprintf("dev-%02d/%d", p, i); !seen[k] && len(missing) < 10 {
				missing = append(missing, k)
			}
		}
	}
	mu.Unlock()
	dropped := metric(t, env, "mqtls_deliveries_dropped_total")
	waits := metric(t, env, "mqtls_publisher_waits_total")
	t.Logf("received %d/%d, dropped %v, publisher waits %v", got, publishers*perPublisher, dropped, waits)
	if got != publishers*perPublisher || dropped != 0 {
		t.Fatalf("lost QoS 1 messages: received %d of %d (missing e.g. %s), dropped %v", got, publishers*perPublisher, strings.Join(missing, " "), dropped)
	}
	if waits == 0 {
		t.Fatal("the subscriber was never full: the test did not overload it")
	}
}

// A device commanded by another through a policy that allows it.
func TestBackendCommandsDevice(t *testing.T) {
	env := backendEnv(t, nil)
	dev := mustDial(t, env, env.Device(t, "dev-1", 0))
	_, cmds := subscribe(t, dev, "devices/dev-1/commands/#", 1)
	be := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	_, tel := subscribe(t, be, "devices/+/telemetry", 1)
	if err := wait(t, be.Publish("devices/dev-1/commands/reboot", 1, false, "now")); err != nil {
		t.Fatal(err)
	}
	expect(t, cmds, "devices/dev-1/commands/reboot now")
	wait(t, dev.Publish("devices/dev-1/telemetry", 1, false, "ok"))
	expect(t, tel, "devices/dev-1/telemetry ok")
	// but a device cannot command another, nor the backend read commands
	if q, _ := subscribe(t, be, "devices/+/commands/#", 1); q != 0x80 {
		t.Fatalf("backend subscribe to commands granted %#x", q)
	}
}

// Under a QoS 0 flood into one slow subscriber every message is either
// delivered or counted as dropped, exactly once (the early drop before
// routing and Mochi's own drop on a full queue do not overlap).
func TestQoS0OverloadAccounted(t *testing.T) {
	const publishers, perPublisher = 20, 500
	env := backendEnv(t, nil)
	sub := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	var got atomic.Int64
	tok := sub.Subscribe("devices/+/telemetry", 0, func(_ paho.Client, m paho.Message) {
		time.Sleep(100 * time.Microsecond) // a slow consumer
		got.Add(1)
	})
	if err := wait(t, tok); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for p := range publishers {
		c := mustDial(t, env, env.Device(t, fmt.Sprintf("dev-%02d", p), 0))
		wg.Go(func() {
			for i := range perPublisher {
				c.Publish(fmt.Sprintf("devices/dev-%02d/telemetry", p), 0, false, fmt.Sprint(i))
			}
			wait(t, c.Publish(fmt.Sprintf("devices/dev-%02d/telemetry", p), 1, false, "last"))
		})
	}
	wg.Wait()
	// QoS 1 "last" messages are never dropped; every QoS 0 one is
	// delivered or counted.
	testtool.Eventually(t, 20*time.Second, "every message delivered or counted", func() bool {
		return got.Load()+int64(metric(t, env, "mqtls_deliveries_dropped_total")) == publishers*(perPublisher+1)
	})
	if q1 := metricLabel(t, env, "mqtls_deliveries_dropped_total", "reason", "queue_full_qos1"); q1 != 0 {
		t.Errorf("QoS 1 drops: %v", q1)
	}
	t.Logf("delivered %d, dropped %v", got.Load(), metric(t, env, "mqtls_deliveries_dropped_total"))
}

// The flow control reads Mochi's unexported outbound queue length (Mochi
// v2.7.9 has no API for it; checked at New). This fails loudly if a Mochi
// upgrade changes what that field means: a subscriber that stops reading
// must show a full queue.
func TestOutboundQueueLengthRead(t *testing.T) {
	env := backendEnv(t, func(c *broker.Config) { c.StallTimeout = time.Minute })
	dev := env.Device(t, "dev-a", 0)
	c, _ := dialRaw(t, env, dev, 4)
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/dev-a/#", Qos: 0}}})
	if _, err := c.read(); err != nil { // SUBACK; then never read again
		t.Fatal(err)
	}
	pub := mustDial(t, env, env.Device(t, "backend-1", 0, "backend"))
	payload := strings.Repeat("x", 200<<10)
	testtool.Eventually(t, 30*time.Second, "the stalled subscriber's outbound queue seen full", func() bool {
		for range 16 {
			pub.Publish("devices/dev-a/commands/x", 0, false, payload)
		}
		return broker.OutboundLen(env.Broker, "dev-a") >= 32
	})
}
