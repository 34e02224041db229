package device_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// With several brokers, a fleet spreads over them (an unreachable one is
// skipped at Connect), and the devices of a broker that stops reconnect to
// the others.
func TestSeveralBrokers(t *testing.T) {
	f := startFleet(t, 0)
	b2 := brokertest.StartOn(t, f.est.Dir, f.est.Registry, nil)
	dead := "mqtts://" + testtool.FreeAddr(t) // nothing listens there
	urls := []string{dead, "mqtts://" + f.broker.Addr, "mqtts://" + b2.Addr}
	const n = 40
	var clients []*device.Client
	for i := range n {
		d := f.broker.Device(t, fmt.Sprintf("dev-%03d", i), time.Hour)
		c := f.client(t, identityFor(t, f, d), nil, func(c *device.Config) {
			c.Broker, c.Brokers = "", urls
			c.DisableRenewal = true
			c.MinBackoff, c.MaxBackoff = 200*time.Millisecond, 2*time.Second
		})
		connect(t, c)
		clients = append(clients, c)
	}
	var on1, on2 int
	testtool.Poll(5*time.Second, func() bool { // counted just after the CONNACK
		on1, on2 = f.broker.Broker.Sessions(), b2.Broker.Sessions()
		return on1+on2 == n
	})
	t.Logf("sessions: %d on broker 1, %d on broker 2", on1, on2)
	if on1 == 0 || on2 == 0 || on1+on2 != n {
		t.Fatalf("sessions %d + %d, want %d spread over both brokers", on1, on2, n)
	}
	for _, c := range clients {
		if c.Broker() != f.broker.Addr && c.Broker() != b2.Addr {
			t.Fatalf("client reports broker %s", c.Broker())
		}
	}

	f.broker.Stop()
	testtool.Eventually(t, 30*time.Second, "every device on broker 2", func() bool { return b2.Broker.Sessions() == n })
	for _, c := range clients {
		if c.State() != device.StateConnected || c.Broker() != b2.Addr {
			t.Errorf("client %s on %s", c.State(), c.Broker())
		}
	}
}

func TestBrokersConfig(t *testing.T) {
	f := startFleet(t, 0)
	id := identityFor(t, f, f.broker.Device(t, "dev-1", time.Hour))
	for _, cfg := range []device.Config{
		{Identity: id},
		{Identity: id, Broker: "mqtts://127.0.0.1:1", Brokers: []string{"mqtts://127.0.0.1:2"}},
		{Identity: id, Brokers: []string{"mqtts://127.0.0.1:2", "tcp://127.0.0.1:3"}},
	} {
		if _, err := device.New(cfg); err == nil {
			t.Errorf("New(%q, %q) accepted", cfg.Broker, cfg.Brokers)
		}
	}
}
