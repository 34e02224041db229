package broker_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// chainCert issues a clientAuth leaf for cn with key, under n extra
// intermediates below env's issuing CA.
func chainCert(t *testing.T, env *brokertest.Env, cn string, key crypto.Signer, n int) tls.Certificate {
	t.Helper()
	return chainUnder(t, env.CA.Issuing, issuingKey(t, env), cn, key, n)
}

// chainUnder issues a leaf under n intermediates below parent (sent with
// the chain unless it is self-signed).
func chainUnder(t *testing.T, parent *x509.Certificate, parentKey crypto.Signer, cn string, key crypto.Signer, n int) tls.Certificate {
	t.Helper()
	var chain [][]byte
	if !bytes.Equal(parent.RawIssuer, parent.RawSubject) {
		chain = [][]byte{parent.Raw}
	}
	serial := func() *big.Int { s, _ := rand.Int(rand.Reader, big.NewInt(1<<62)); return s }
	for i := range n {
		k := testpki.NewKey(t)
		tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: "intermediate " + string(rune('A'+i))},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, k.Public(), parentKey)
		if err != nil {
			t.Fatal(err)
		}
		parent, _ = x509.ParseCertificate(der)
		parentKey = k
		chain = append([][]byte{der}, chain...)
	}
	tmpl := &x509.Certificate{SerialNumber: serial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	// not keystore.TLSCertificate: it refuses the weak keys tested here
	return tls.Certificate{Certificate: append([][]byte{der}, chain...), PrivateKey: key}
}

// The broker holds client chains to the issuance rules: RSA >= 2048,
// ECDSA P-256/P-384, and at most MaxIntermediates below the root.
func TestWeakAndDeepChainsRefused(t *testing.T) {
	env := brokertest.Start(t, nil)
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	// An adopted root without path length limits (ours limits it).
	rootKey := testpki.NewKey(t)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "adopted root"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	adopted, _ := x509.ParseCertificate(der)
	deepEnv := brokertest.Start(t, func(c *broker.Config) { c.Root = adopted })
	for _, tc := range []struct {
		name  string
		env   *brokertest.Env
		cert  tls.Certificate
		label string
	}{
		{"RSA-1024 leaf", env, chainCert(t, env, "dev-a", rsa1024, 0), "weak_key"},
		{"3 intermediates", deepEnv, chainUnder(t, adopted, rootKey, "dev-a", testpki.NewKey(t), 3), "chain_too_deep"},
		{"8 intermediates", deepEnv, chainUnder(t, adopted, rootKey, "dev-a", testpki.NewKey(t), 8), "chain_too_deep"},
	} {
		env := tc.env
		t.Run(tc.name, func(t *testing.T) {
			before := metricLabel(t, env, "mqtls_connects_refused_total", "reason", tc.label)
			if err := connectWith(t, env, tc.cert, "dev-a"); err == nil || !strings.Contains(err.Error(), "not Authorized") {
				t.Fatalf("connect = %v, want not authorized", err)
			}
			if got := metricLabel(t, env, "mqtls_connects_refused_total", "reason", tc.label); got != before+1 {
				t.Errorf("refusals labelled %s = %v, want %v", tc.label, got, before+1)
			}
		})
	}
	// the limits themselves are accepted
	if err := connectWith(t, deepEnv, chainUnder(t, adopted, rootKey, "dev-a", testpki.NewKey(t), 2), "dev-a"); err != nil {
		t.Errorf("root + 2 intermediates refused: %v", err)
	}
	rsa2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	if err := connectWith(t, env, chainCert(t, env, "dev-a", rsa2048, 0), "dev-a"); err != nil {
		t.Errorf("RSA-2048 refused: %v", err)
	}
}

// A revoked device ID is refused whatever certificate carries it, also one
// issued outside the registry (an adopted root, another issuing CA).
func TestRevokedDeviceIDRefused(t *testing.T) {
	env := brokertest.Start(t, nil)
	env.Device(t, "dev-a", 0) // known to the registry
	other := chainCert(t, env, "dev-a", testpki.NewKey(t), 0)
	cfg := env.TLS(t, nil)
	cfg.Certificates = []tls.Certificate{other}
	c := mustDialTLS(t, env, cfg, "dev-a")
	if _, err := env.Registry.Revoke(t.Context(), "dev-a", "stolen"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.lost:
	case <-time.After(2 * time.Second):
		t.Fatal("session of a revoked device ID (unrecorded certificate) still alive")
	}
	if err := connectWith(t, env, other, "dev-a"); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		t.Fatalf("reconnect = %v, want not authorized", err)
	}
}

// Messages without an expiry of their own do not expire by default (Mochi
// would drop them after 24 h); an operator's MaxMessageExpiry does.
func TestMessagesDoNotExpireByDefault(t *testing.T) {
	short := backendEnv(t, func(c *broker.Config) { c.MaxMessageExpiry = time.Second })
	def := backendEnv(t, nil)
	for _, env := range []*brokertest.Env{short, def} {
		a := mustDial(t, env, env.Device(t, "dev-a", 0))
		if err := wait(t, a.Publish("devices/dev-a/state", 1, true, "on")); err != nil {
			t.Fatal(err)
		}
	}
	testtool.Eventually(t, 10*time.Second, "retained message expired with MaxMessageExpiry 1s", func() bool {
		return broker.RetainedCount(short.Broker) == 0
	})
	if n := broker.RetainedCount(def.Broker); n != 1 {
		t.Fatalf("retained messages with the default configuration: %d, want 1", n)
	}
	a := mustDial(t, def, def.Device(t, "dev-b", 0))
	if _, ch := subscribe(t, a, "devices/dev-b/#", 1); ch != nil {
		expectNone(t, ch, 10*time.Millisecond)
	}
}

// A 3.1.1 client's keepalive is the one enforced (MQTT-3.1.2-24): the
// broker cannot tell it otherwise, so a short one is not raised.
func TestKeepalive311Honoured(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pkt := connectPacket("dev-a")
	pkt[len(pkt)-len("dev-a")-3] = 2 // keepalive 2 s (LSB)
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	conn.Write(pkt)
	ack := make([]byte, 4)
	if _, err := conn.Read(ack); err != nil || ack[3] != 0 {
		t.Fatalf("CONNACK %x: %v", ack, err)
	}
	start := time.Now()
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatal("unexpected data")
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("silent 3.1.1 client with keepalive 2s cut after %v, want about 3s", d)
	}
}

func mustDialTLS(t *testing.T, env *brokertest.Env, cfg *tls.Config, clientID string) *conn {
	t.Helper()
	c := &conn{lost: make(chan error, 1)}
	o := options(env, cfg, clientID).SetConnectionLostHandler(func(_ paho.Client, err error) { c.lost <- err })
	c.Client = paho.NewClient(o)
	if err := wait(t, c.Connect()); err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

// faultyRegistry is the real registry with a switch that makes its reads
// fail, as a corrupted or unreachable database would.
type faultyRegistry struct {
	broker.Registry
	fail atomic.Bool
}

var errUnreadable = errors.New("database disk image is malformed")

func (r *faultyRegistry) RevokedSince(ctx context.Context, t time.Time) ([]registry.Cert, error) {
	if r.fail.Load() {
		return nil, errUnreadable
	}
	return r.Registry.RevokedSince(ctx, t)
}

func (r *faultyRegistry) RevokedDevices(ctx context.Context) ([]string, error) {
	if r.fail.Load() {
		return nil, errUnreadable
	}
	return r.Registry.RevokedDevices(ctx)
}

// A registry that becomes unreadable while serving: live sessions stay,
// new CONNECTs are refused (fail closed) unless AdmitWhenRegistryDown, and
// the metric says so; service resumes when it is readable again.
func TestRegistryUnreadableFailsClosed(t *testing.T) {
	for _, admit := range []bool{false, true} {
		t.Run(fmt.Sprintf("AdmitWhenRegistryDown=%v", admit), func(t *testing.T) {
			var reg *faultyRegistry
			env := brokertest.Start(t, func(c *broker.Config) {
				reg = &faultyRegistry{Registry: c.Registry}
				c.Registry, c.AdmitWhenRegistryDown = reg, admit
			})
			a := env.Device(t, "dev-a", 0)
			live := mustDial(t, env, a)
			reg.fail.Store(true)
			testtool.Eventually(t, 5*time.Second, "registry marked down", func() bool { return metric(t, env, "mqtls_registry_up") == 0 })
			_, err := dial(t, env, env.Device(t, "dev-b", 0))
			if admit && err != nil {
				t.Fatalf("AdmitWhenRegistryDown: connect refused: %v", err)
			}
			if !admit {
				if err == nil || !strings.Contains(err.Error(), "not Authorized") {
					t.Fatalf("connect while the registry is unreadable = %v, want not authorized", err)
				}
				if got := metricLabel(t, env, "mqtls_connects_refused_total", "reason", "registry_unavailable"); got != 1 {
					t.Errorf("registry_unavailable refusals = %v, want 1", got)
				}
			}
			if err := wait(t, live.Publish("devices/dev-a/x", 1, false, "still here")); err != nil || !live.IsConnectionOpen() {
				t.Fatalf("live session lost while the registry was down: %v", err)
			}
			reg.fail.Store(false)
			testtool.Eventually(t, 5*time.Second, "registry up again", func() bool { return metric(t, env, "mqtls_registry_up") == 1 })
			mustDial(t, env, env.Device(t, "dev-c", 0))
		})
	}
}
