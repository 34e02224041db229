// Package brokertest runs a real broker (mTLS on loopback, PKI from
// provisioning/ca, SQLite registry) and issues device certificates for
// tests.
package brokertest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// Env is a running broker with its PKI and registry.
type Env struct {
	Dir      string
	CA       *ca.CA
	Registry registry.Registry
	Broker   *broker.Broker
	Metrics  *prometheus.Registry
	Addr     string // 127.0.0.1:PORT
	cfg      broker.Config
}

// Start runs a broker with a fresh PKI until the test ends; tweak adjusts
// its config.
func Start(t testing.TB, tweak func(*broker.Config)) *Env {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatal(err)
	}
	root, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.CreateSQLite(t.Context(), filepath.Join(dir, "registry.db"), ca.Fingerprint(root.Root))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	return StartOn(t, dir, reg, tweak)
}

// StartOn runs a broker over an existing data directory and registry (for
// example an esttest.Env's, so devices enroll over EST and then connect).
func StartOn(t testing.TB, dir string, reg registry.Registry, tweak func(*broker.Config)) *Env {
	t.Helper()
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	m := prometheus.NewRegistry()
	cfg := broker.Config{
		Addr: "127.0.0.1:0", Certificate: srv, Root: c.Root, Issuers: []*x509.Certificate{c.Issuing}, Registry: reg,
		RevocationPoll: 100 * time.Millisecond, Metrics: m,
		Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	}
	if tweak != nil {
		tweak(&cfg)
	}
	b, err := broker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	env := &Env{Dir: dir, CA: c, Registry: reg, Broker: b, Metrics: m, Addr: b.Addr().String(), cfg: cfg}
	t.Cleanup(func() { env.Broker.Close() })
	return env
}

// Stop closes the broker (clients see the connection drop).
func (e *Env) Stop() { e.Broker.Close() }

// Restart starts a new broker on the same address after Stop (sessions
// are gone, as after a real restart).
func (e *Env) Restart(t testing.TB) {
	t.Helper()
	cfg := e.cfg
	cfg.Metrics = prometheus.NewRegistry()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if ln, err = net.Listen("tcp", e.Addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	cfg.Listener = ln
	b, err := broker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	e.Broker, e.Metrics = b, cfg.Metrics.(*prometheus.Registry)
}

// Device is an issued identity.
type Device struct {
	ID    string
	Key   crypto.Signer
	Leaf  *x509.Certificate
	Chain [][]byte
}

// Device issues a client certificate for id (recorded in the registry so
// it can be revoked) with OU groups and the given validity (0: 1 hour).
func (e *Env) Device(t testing.TB, id string, validity time.Duration, groups ...string) *Device {
	t.Helper()
	return e.device(t, e.CA.IssueDevice, id, validity, groups)
}

// AttestedDevice is Device with a certificate carrying the attested
// marker (as a TPM-attested enrollment gets).
func (e *Env) AttestedDevice(t testing.TB, id string) *Device {
	t.Helper()
	return e.device(t, e.CA.IssueAttestedDevice, id, 0, nil)
}

func (e *Env) device(t testing.TB, issue func(crypto.PublicKey, string, []string, time.Duration) (*x509.Certificate, error), id string, validity time.Duration, groups []string) *Device {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if validity == 0 {
		validity = time.Hour
	}
	leaf, err := issue(key.Public(), id, groups, validity)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := e.Registry.CreateToken(t.Context(), id, "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	g, err := e.Registry.CheckToken(t.Context(), id, tok)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Registry.Enrolled(t.Context(), g, registry.Cert{Serial: leaf.SerialNumber.Text(16), DeviceID: id, SPKISHA256: ca.SPKIFingerprint(leaf), NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}, ""); err != nil {
		t.Fatal(err)
	}
	return &Device{ID: id, Key: key, Leaf: leaf, Chain: [][]byte{leaf.Raw, e.CA.Issuing.Raw}}
}

// TLS returns a client TLS config for d (nil d: no client certificate).
func (e *Env) TLS(t testing.TB, d *Device) *tls.Config {
	t.Helper()
	cfg := &tls.Config{RootCAs: e.CA.Pool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if d != nil {
		cert, err := keystore.TLSCertificate(d.Chain, d.Key)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg
}

// WriteFiles writes d's chain, key and the root as PEM files for external
// clients (mosquitto_pub, openssl) and returns their paths.
func (e *Env) WriteFiles(t testing.TB, d *Device) (cert, key, root string) {
	t.Helper()
	dir := t.TempDir()
	var chain []byte
	for _, c := range d.Chain {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(d.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, key, root = filepath.Join(dir, d.ID+".crt"), filepath.Join(dir, d.ID+".key"), filepath.Join(dir, "root.crt")
	for path, data := range map[string][]byte{
		cert: chain,
		key:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		root: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: e.CA.Root.Raw}),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return cert, key, root
}

// Metric sums the series of metric name in g (gauges and counters).
func Metric(t testing.TB, g prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var v float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				v += m.GetGauge().GetValue() + m.GetCounter().GetValue()
			}
		}
	}
	return v
}
