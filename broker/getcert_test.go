package broker_test

import (
	"crypto/tls"
	"strings"
	"sync/atomic"
	"testing"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// With Config.GetCertificate the listener serves whatever certificate it
// returns at each handshake: one re-issued with a new name is used
// without restarting the broker, and a client connected before keeps its
// session.
func TestGetCertificateServesReissued(t *testing.T) {
	var cur atomic.Pointer[tls.Certificate]
	env := brokertest.Start(t, func(c *broker.Config) {
		cert := c.Certificate
		cur.Store(&cert)
		c.Certificate = tls.Certificate{}
		c.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cur.Load(), nil }
	})
	dev := env.Device(t, "dev-1", 0)
	by := func(name string) func(*paho.ClientOptions) {
		return func(o *paho.ClientOptions) {
			cfg := env.TLS(t, dev)
			cfg.ServerName = name
			o.SetTLSConfig(cfg)
		}
	}
	const name = "mqtt.example.test"
	before := mustDial(t, env, dev, by("127.0.0.1"))
	if _, err := dial(t, env, dev, by(name)); err == nil || !strings.Contains(err.Error(), "not "+name) {
		t.Fatalf("connect by %s before re-issue: %v, want a hostname error", name, err)
	}
	if _, err := env.CA.ReissueServer([]string{name}); err != nil {
		t.Fatal(err)
	}
	next, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(&next)
	other := env.Device(t, "dev-2", 0)
	after, err := dial(t, env, other, func(o *paho.ClientOptions) {
		cfg := env.TLS(t, other)
		cfg.ServerName = name
		o.SetTLSConfig(cfg)
	})
	if err != nil {
		t.Fatalf("connect by %s after re-issue: %v", name, err)
	}
	after.Disconnect(0)
	if _, err := dial(t, env, other, func(o *paho.ClientOptions) { o.SetTLSConfig(env.TLS(t, other)) }); err == nil {
		t.Error("a name the re-issued certificate dropped (127.0.0.1) still verifies")
	}
	if err := wait(t, before.Publish("devices/dev-1/t", 1, false, "x")); err != nil {
		t.Errorf("the client connected before: %v", err)
	}
}

// Config.Certificate and Config.GetCertificate exclude each other; one is
// required.
func TestCertificateConfig(t *testing.T) {
	env := brokertest.Start(t, nil)
	cert, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	get := func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil }
	for name, cfg := range map[string]broker.Config{
		"neither": {Root: env.CA.Root},
		"both":    {Root: env.CA.Root, Certificate: cert, GetCertificate: get},
	} {
		if _, err := broker.New(cfg); err == nil {
			t.Errorf("%s: New accepted", name)
		}
	}
	if _, err := broker.New(broker.Config{Root: env.CA.Root, GetCertificate: get}); err != nil {
		t.Errorf("GetCertificate alone: %v", err)
	}
}
