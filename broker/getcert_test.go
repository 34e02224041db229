package broker_test

import (
	"crypto/tls"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/brokertest"
)

// With Config.GetCertificate the listener serves whatever certificate it
// returns at each handshake: one re-issued with a new name is used
// without restarting the broker, and a client that dialled before keeps
// its connection.
func TestGetCertificateServesReissued(t *testing.T) {
	var cur atomic.Pointer[tls.Certificate]
	env := brokertest.Start(t, func(c *broker.Config) {
		cert := c.Certificate
		cur.Store(&cert)
		c.Certificate = tls.Certificate{}
		c.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cur.Load(), nil }
	})
	dev := env.Device(t, "dev-1", 0)
	dial := func(name string) (*tls.Conn, error) {
		cfg := env.TLS(t, dev)
		cfg.ServerName = name
		return tls.Dial("tcp", env.Addr, cfg)
	}
	const name = "mqtt.example.test"
	before, err := dial("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	if _, err := dial(name); err == nil || !strings.Contains(err.Error(), "not "+name) {
		t.Fatalf("dial %s before re-issue: %v, want a hostname error", name, err)
	}
	if _, err := env.CA.ReissueServer([]string{name}); err != nil {
		t.Fatal(err)
	}
	next, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	cur.Store(&next)
	conn, err := dial(name)
	if err != nil {
		t.Fatalf("dial %s after re-issue: %v", name, err)
	}
	conn.Close()
	if _, err := dial("127.0.0.1"); err == nil {
		t.Error("a name the re-issued certificate dropped still verifies")
	}
	if err := before.Handshake(); err != nil || !before.ConnectionState().HandshakeComplete {
		t.Errorf("the connection made before: %v", err)
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
