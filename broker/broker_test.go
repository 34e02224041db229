package broker_test

import (
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

type conn struct {
	paho.Client
	lost chan error
}

func options(env *brokertest.Env, tlsCfg *tls.Config, clientID string) *paho.ClientOptions {
	return paho.NewClientOptions().
		AddBroker("ssl://" + env.Addr).
		SetClientID(clientID).
		SetTLSConfig(tlsCfg).
		SetProtocolVersion(4).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).
		SetCleanSession(true)
}

func wait(t testing.TB, tok paho.Token) error {
	t.Helper()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-time.After(15 * time.Second):
		t.Fatal("MQTT operation timed out")
		return nil
	}
}

// dial connects with the device's certificate and client ID = CN.
func dial(t testing.TB, env *brokertest.Env, d *brokertest.Device, tweak ...func(*paho.ClientOptions)) (*conn, error) {
	t.Helper()
	c := &conn{lost: make(chan error, 1)}
	o := options(env, env.TLS(t, d), d.ID).SetConnectionLostHandler(func(_ paho.Client, err error) { c.lost <- err })
	for _, f := range tweak {
		f(o)
	}
	c.Client = paho.NewClient(o)
	if err := wait(t, c.Connect()); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func mustDial(t testing.TB, env *brokertest.Env, d *brokertest.Device, tweak ...func(*paho.ClientOptions)) *conn {
	t.Helper()
	c, err := dial(t, env, d, tweak...)
	if err != nil {
		t.Fatalf("connect %s: %v", d.ID, err)
	}
	return c
}

// subscribe returns the granted QoS (0x80 = refused) and a channel of
// received "topic payload" strings.
func subscribe(t testing.TB, c *conn, filter string, qos byte) (byte, chan string) {
	t.Helper()
	ch := make(chan string, 10000)
	tok := c.Subscribe(filter, qos, func(_ paho.Client, m paho.Message) { ch <- m.Topic() + " " + string(m.Payload()) })
	if err := wait(t, tok); err != nil {
		t.Fatalf("subscribe %s: %v", filter, err)
	}
	return tok.(*paho.SubscribeToken).Result()[filter], ch
}

func expectNone(t testing.TB, ch chan string, d time.Duration) {
	t.Helper()
	select {
	case m := <-ch:
		t.Fatalf("received %q, want nothing", m)
	case <-time.After(d):
	}
}

func expect(t testing.TB, ch chan string, want string) {
	t.Helper()
	select {
	case m := <-ch:
		if m != want {
			t.Fatalf("received %q, want %q", m, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("did not receive %q", want)
	}
}

func TestOwnTopicsRoundTrip(t *testing.T) {
	env := brokertest.Start(t, nil)
	a := mustDial(t, env, env.Device(t, "dev-a", 0))
	if q, ch := subscribe(t, a, "devices/dev-a/#", 1); q != 1 {
		t.Fatalf("own subscription granted %#x", q)
	} else {
		if err := wait(t, a.Publish("devices/dev-a/telemetry", 1, false, "21.5")); err != nil {
			t.Fatal(err)
		}
		expect(t, ch, "devices/dev-a/telemetry 21.5")
	}
	if got := metric(t, env, "mqtls_connections"); got != 1 {
		t.Errorf("mqtls_connections = %v", got)
	}
}

// metric sums a metric's series.
func metric(t testing.TB, env *brokertest.Env, name string) float64 {
	return brokertest.Metric(t, env.Metrics, name)
}

func issuingKey(t testing.TB, env *brokertest.Env) crypto.Signer {
	t.Helper()
	ks, err := keystore.NewFile(filepath.Join(env.Dir, "ca"))
	if err != nil {
		t.Fatal(err)
	}
	defer ks.Close()
	k, err := ks.Signer(t.Context(), "issuing")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestCrossNamespaceRefused(t *testing.T) {
	env := brokertest.Start(t, nil)
	b := mustDial(t, env, env.Device(t, "dev-b", 0))
	_, bch := subscribe(t, b, "devices/dev-b/#", 1)
	a := mustDial(t, env, env.Device(t, "dev-a", 0))
	// QoS 0 into another namespace: dropped, never delivered.
	wait(t, a.Publish("devices/dev-b/commands", 0, false, "evil"))
	expectNone(t, bch, 300*time.Millisecond)
	// QoS 1 from a 3.1.1 client: the broker disconnects it.
	a.Publish("devices/dev-b/commands", 1, false, "evil")
	select {
	case <-a.lost:
	case <-time.After(5 * time.Second):
		t.Fatal("3.1.1 client publishing QoS 1 outside its namespace was not disconnected")
	}
	expectNone(t, bch, 300*time.Millisecond)
}

func TestSubscribeRefusals(t *testing.T) {
	env := brokertest.Start(t, nil)
	env.Device(t, "dev-b", 0)
	a := mustDial(t, env, env.Device(t, "dev-a", 0))
	for _, f := range []string{"#", "devices/#", "devices/+/telemetry", "$SYS/#", "devices/dev-b/#", "+/#", "devices/dev-b/telemetry"} {
		if q, _ := subscribe(t, a, f, 1); q != 0x80 {
			t.Errorf("subscribe %q granted %#x, want 0x80", f, q)
		}
	}
	for _, f := range []string{"devices/dev-a/#", "devices/dev-a/+/x", "devices/dev-a"} {
		if q, _ := subscribe(t, a, f, 1); q != 1 {
			t.Errorf("subscribe %q got %#x, want 1", f, q)
		}
	}
}

func TestConnectRefusals(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	cases := map[string]func(*paho.ClientOptions){
		"client ID is not the CN": func(o *paho.ClientOptions) { o.SetClientID("dev-b") },
		"Will in another namespace": func(o *paho.ClientOptions) {
			o.SetWill("devices/dev-b/status", "offline", 1, false)
		},
	}
	for name, tweak := range cases {
		_, err := dial(t, env, dev, tweak)
		if err == nil || !strings.Contains(err.Error(), "not Authorized") {
			t.Errorf("%s: connect = %v, want CONNACK not authorized", name, err)
		}
	}
	if _, err := dial(t, env, dev, func(o *paho.ClientOptions) { o.SetWill("devices/dev-a/status", "offline", 1, false) }); err != nil {
		t.Errorf("own Will refused: %v", err)
	}
}

func TestHandshakeRefusals(t *testing.T) {
	env := brokertest.Start(t, nil)
	foreign := testpki.New(t)
	fkey := testpki.NewKey(t)
	fcert, _ := keystore.TLSCertificate(foreign.Client(t, "dev-a", fkey.Public()), fkey)
	expired := env.Device(t, "dev-old", time.Nanosecond)
	cases := map[string]*tls.Config{
		"no certificate": env.TLS(t, nil),
		"foreign CA":     func() *tls.Config { c := env.TLS(t, nil); c.Certificates = []tls.Certificate{fcert}; return c }(),
		"expired":        env.TLS(t, expired),
	}
	for name, cfg := range cases {
		c := paho.NewClient(options(env, cfg, "dev-a"))
		if err := wait(t, c.Connect()); err == nil {
			c.Disconnect(0)
			t.Errorf("%s: connected, want a handshake failure", name)
		}
	}
	// A CA certificate is accepted by Go's verifier as a client leaf (no
	// EKU): the broker refuses it at CONNECT.
	caCert, _ := keystore.TLSCertificate([][]byte{env.CA.Issuing.Raw}, issuingKey(t, env))
	cfg := env.TLS(t, nil)
	cfg.Certificates = []tls.Certificate{caCert}
	c := paho.NewClient(options(env, cfg, "mqtls issuing CA"))
	if err := wait(t, c.Connect()); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		t.Errorf("CA certificate as client: %v, want not authorized", err)
	}
}

func TestRevocationClosesLiveSession(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	c := mustDial(t, env, dev)
	start := time.Now()
	if _, err := env.Registry.Revoke(t.Context(), "dev-a", "stolen"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.lost:
		t.Logf("session closed %v after revocation", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("revoked device still connected after 2s")
	}
	if _, err := dial(t, env, dev); err == nil || !strings.Contains(err.Error(), "not Authorized") {
		t.Fatalf("reconnect after revocation = %v, want not authorized", err)
	}
}

func TestExpiryClosesSession(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 2*time.Second)
	c := mustDial(t, env, dev)
	select {
	case <-c.lost:
	case <-time.After(5 * time.Second):
		t.Fatal("session outlived its certificate")
	}
}

func TestHandshakeDeadline(t *testing.T) {
	env := brokertest.Start(t, func(c *broker.Config) { c.HandshakeTimeout = 300 * time.Millisecond })
	for name, send := range map[string][]byte{"idle": nil, "partial": {0x16, 0x03, 0x01}} {
		conn, err := net.Dial("tcp", env.Addr)
		if err != nil {
			t.Fatal(err)
		}
		conn.Write(send)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		_, err = conn.Read(make([]byte, 1))
		if err == nil || isTimeout(err) || time.Since(start) > 3*time.Second {
			t.Errorf("%s connection not cut by the deadline: %v after %v", name, err, time.Since(start))
		}
		conn.Close()
	}
	// TLS done, CONNECT never sent: cut too.
	dev := env.Device(t, "dev-a", 0)
	tc, err := tls.Dial("tcp", env.Addr, env.TLS(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := tc.Read(make([]byte, 1)); err == nil || time.Since(start) > 3*time.Second {
		t.Errorf("TLS without CONNECT not cut: %v after %v", err, time.Since(start))
	}
	testtool.Eventually(t, 2*time.Second, "TLS without CONNECT counted", func() bool {
		return metricLabel(t, env, "mqtls_connects_refused_total", "reason", "connect_timeout") == 1
	})
}

// isTimeout: our own read deadline fired, i.e. the broker did not close.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Accept errors (EMFILE) must not stop the listener.
func TestListenerSurvivesAcceptErrors(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	flaky := &flakyListener{Listener: inner, failures: 5}
	env := brokertest.Start(t, func(c *broker.Config) { c.Listener = flaky })
	mustDial(t, env, env.Device(t, "dev-a", 0))
	if got := metric(t, env, "mqtls_accept_errors_total"); got != 5 {
		t.Errorf("accept errors counted = %v, want 5", got)
	}
}

type flakyListener struct {
	net.Listener
	mu       sync.Mutex
	failures int
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.failures > 0 {
		l.failures--
		l.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: fmt.Errorf("accept4: too many open files")}
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func TestPolicyReload(t *testing.T) {
	env := brokertest.Start(t, nil)
	a := mustDial(t, env, env.Device(t, "dev-a", 0))
	_, ch := subscribe(t, a, "devices/dev-a/#", 1)
	strict, _ := policy.Parse([]byte("rules:\n  - name: pub-only\n    match: {cn: \"*\"}\n    publish: [\"devices/{cn}/#\"]\n"))
	if err := env.Broker.SetPolicy(strict); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, a.Publish("devices/dev-a/x", 1, false, "1")); err != nil {
		t.Fatal(err)
	}
	expectNone(t, ch, 300*time.Millisecond)
	if q, _ := subscribe(t, a, "devices/dev-a/#", 1); q != 0x80 {
		t.Fatalf("re-subscribe after reload granted %#x", q)
	}
	if err := env.Broker.SetPolicy(policy.Default()); err != nil {
		t.Fatal(err)
	}
	if q, ch := subscribe(t, a, "devices/dev-a/#", 1); q != 1 {
		t.Fatalf("subscribe after restoring default: %#x", q)
	} else {
		wait(t, a.Publish("devices/dev-a/x", 1, false, "2"))
		expect(t, ch, "devices/dev-a/x 2")
	}
}

// MQTT: '#' includes the parent level, so a retained message on X reaches
// a new subscription to X/# (Mochi v2.7.9 misses it; the broker adds it).
func TestRetainedParentLevel(t *testing.T) {
	env := brokertest.Start(t, nil)
	a := mustDial(t, env, env.Device(t, "dev-a", 0))
	wait(t, a.Publish("devices/dev-a/status", 1, true, "online"))
	wait(t, a.Publish("devices/dev-a/status/battery", 1, true, "80"))
	_, ch := subscribe(t, a, "devices/dev-a/status/#", 1)
	got := map[string]bool{}
	for range 2 {
		select {
		case m := <-ch:
			got[m] = true
		case <-time.After(5 * time.Second):
			t.Fatalf("retained messages received: %v", got)
		}
	}
	if !got["devices/dev-a/status online"] || !got["devices/dev-a/status/battery 80"] {
		t.Fatalf("retained messages received: %v", got)
	}
	expectNone(t, ch, 200*time.Millisecond)
}

func TestCloneCounted(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	mustDial(t, env, dev)
	mustDial(t, env, dev) // takes the session over; counted as a clone
	if got := metric(t, env, "mqtls_certificate_clones_total"); got != 1 {
		t.Fatalf("clones = %v, want 1", got)
	}
}

// A rule matching {attested: true} grants only to certificates with the
// attested marker: the same topic is refused to a plain certificate.
func TestAttestedRule(t *testing.T) {
	env := brokertest.Start(t, nil)
	pol, err := policy.Parse([]byte(`rules:
  - name: own
    match: {cn: "*"}
    publish: ["devices/{cn}/telemetry"]
  - name: observer
    match: {cn: "obs"}
    subscribe: ["devices/#"]
  - name: firmware-ack
    match: {attested: true}
    publish: ["devices/{cn}/firmware-ack"]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Broker.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	obs := mustDial(t, env, env.Device(t, "obs", 0))
	q, ch := subscribe(t, obs, "devices/#", 1)
	if q != 1 {
		t.Fatalf("observer subscription: %#x", q)
	}
	att := mustDial(t, env, env.AttestedDevice(t, "tpm-dev"))
	if err := wait(t, att.Publish("devices/tpm-dev/firmware-ack", 1, false, "ok")); err != nil {
		t.Fatal(err)
	}
	expect(t, ch, "devices/tpm-dev/firmware-ack ok")
	plain := mustDial(t, env, env.Device(t, "soft-dev", 0))
	wait(t, plain.Publish("devices/soft-dev/firmware-ack", 0, false, "forged"))
	expectNone(t, ch, 300*time.Millisecond)
	plain.Publish("devices/soft-dev/firmware-ack", 1, false, "forged")
	select {
	case <-plain.lost:
	case <-time.After(5 * time.Second):
		t.Fatal("a plain certificate published QoS 1 to a topic only attested devices may use and was not disconnected")
	}
	if err := wait(t, att.Publish("devices/tpm-dev/telemetry", 1, false, "t")); err != nil {
		t.Fatal(err)
	}
	expect(t, ch, "devices/tpm-dev/telemetry t")
}

// The attested marker counts only from the deployment's issuing CA: a
// certificate of another CA under the same root (an adopted enterprise
// root has many) carrying the same policy OIDs is not attested.
func TestAttestedMarkerOnlyFromIssuingCA(t *testing.T) {
	env := brokertest.Start(t, nil)
	pol, err := policy.Parse([]byte(`rules:
  - name: own
    match: {cn: "*"}
    publish: ["devices/{cn}/telemetry"]
  - name: attested
    match: {attested: true}
    subscribe: ["attested/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Broker.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	if q, _ := subscribe(t, mustDial(t, env, env.AttestedDevice(t, "tpm-dev")), "attested/#", 1); q != 1 {
		t.Fatalf("attested device from the issuing CA: SUBACK %#x, want granted", q)
	}

	data, err := os.ReadFile(filepath.Join(env.Dir, ca.RootKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	rootKey, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	otherKey := testpki.NewKey(t)
	other, err := x509.ParseCertificate(otherCA(t, env.CA.Root, rootKey.(crypto.Signer), otherKey.Public()))
	if err != nil {
		t.Fatal(err)
	}
	key := testpki.NewKey(t)
	leaf, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "rogue-dev"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		Policies: []x509.OID{ca.OIDVerifiedTPMResidency, ca.OIDVerifiedTPMFixed},
	}, other, key.Public(), otherKey)
	if err != nil {
		t.Fatal(err)
	}
	rogue := &brokertest.Device{ID: "rogue-dev", Key: key, Chain: [][]byte{leaf, other.Raw}}
	if q, _ := subscribe(t, mustDial(t, env, rogue), "attested/#", 1); q == 1 {
		t.Fatal("a certificate of another CA under the root with the attested policy OIDs was treated as attested")
	}
}

func otherCA(t *testing.T, root *x509.Certificate, rootKey crypto.Signer, pub crypto.PublicKey) []byte {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(8), Subject: pkix.Name{CommonName: "another CA under the root"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}, root, pub, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
