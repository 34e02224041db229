package broker_test

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/keystore"
)

// issue signs a leaf under env's issuing CA with whatever the template says.
func issue(t *testing.T, env *brokertest.Env, tmpl *x509.Certificate) tls.Certificate {
	t.Helper()
	key := testpki.NewKey(t)
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Minute), time.Now().Add(time.Hour)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, env.CA.Issuing, key.Public(), issuingKey(t, env))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := keystore.TLSCertificate([][]byte{der, env.CA.Issuing.Raw}, key)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func connectWith(t *testing.T, env *brokertest.Env, cert tls.Certificate, clientID string) error {
	t.Helper()
	cfg := env.TLS(t, nil)
	cfg.Certificates = []tls.Certificate{cert}
	c := paho.NewClient(options(env, cfg, clientID))
	err := wait(t, c.Connect())
	if err == nil {
		c.Disconnect(0)
	}
	return err
}

// Certificates our CA signed but that must not identify a device.
func TestLeafRules(t *testing.T) {
	env := brokertest.Start(t, nil)
	cases := []struct {
		name, cn string
		tmpl     *x509.Certificate
		want     string
	}{
		{"no EKU at all (Go accepts any usage)", "dev-x", &x509.Certificate{Subject: pkix.Name{CommonName: "dev-x"}, KeyUsage: x509.KeyUsageDigitalSignature}, "not Authorized"},
		{"serverAuth only", "dev-s", &x509.Certificate{Subject: pkix.Name{CommonName: "dev-s"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, "certificate"},
		{"CN with +", "a+b", &x509.Certificate{Subject: pkix.Name{CommonName: "a+b"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, "not Authorized"},
		{"CN with #", "a#", &x509.Certificate{Subject: pkix.Name{CommonName: "a#"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, "not Authorized"},
		{"CN with /", "a/b", &x509.Certificate{Subject: pkix.Name{CommonName: "a/b"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, "not Authorized"},
		{"CN of 65 characters", strings.Repeat("a", 65), &x509.Certificate{Subject: pkix.Name{CommonName: strings.Repeat("a", 65)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, "not Authorized"},
	}
	for _, c := range cases {
		err := connectWith(t, env, issue(t, env, c.tmpl), c.cn)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: connect = %v, want a refusal (%s)", c.name, err, c.want)
		}
	}
	if got := metric(t, env, "mqtls_connects_accepted_total"); got != 0 {
		t.Fatalf("%v connects accepted", got)
	}
}

// A CRL (for certificates issued outside the registry) refuses and closes
// sessions; a CRL from another CA is refused and the old one stays.
func TestCRL(t *testing.T) {
	crlFile := filepath.Join(t.TempDir(), "extra.crl")
	var env *brokertest.Env
	writeCRL := func(serials ...*big.Int) {
		t.Helper()
		var entries []x509.RevocationListEntry
		for _, s := range serials {
			entries = append(entries, x509.RevocationListEntry{SerialNumber: s, RevocationTime: time.Now()})
		}
		der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
			Number: big.NewInt(time.Now().UnixNano()), ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour),
			RevokedCertificateEntries: entries,
		}, env.CA.Issuing, issuingKey(t, env))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(crlFile+".tmp", pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o600)
		os.Rename(crlFile+".tmp", crlFile)
	}
	// start with an empty CRL signed by a CA the broker knows
	env = brokertest.Start(t, nil)
	env.Broker.Close()
	writeCRL()
	env = brokertest.StartOn(t, env.Dir, env.Registry, func(c *broker.Config) { c.CRLFile, c.Issuers = crlFile, []*x509.Certificate{env.CA.Issuing} })
	// certificates issued behind the registry's back: only the CRL covers them
	a := issue(t, env, &x509.Certificate{Subject: pkix.Name{CommonName: "ext-a"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	b := issue(t, env, &x509.Certificate{Subject: pkix.Name{CommonName: "ext-b"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	cfg := env.TLS(t, nil)
	cfg.Certificates = []tls.Certificate{a}
	lost := make(chan error, 1)
	live := paho.NewClient(options(env, cfg, "ext-a").SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
	if err := wait(t, live.Connect()); err != nil {
		t.Fatal(err)
	}
	defer live.Disconnect(0)
	time.Sleep(1100 * time.Millisecond) // mtime granularity
	writeCRL(a.Leaf.SerialNumber)
	select {
	case <-lost:
	case <-time.After(3 * time.Second):
		t.Fatal("session of a certificate on the new CRL still open")
	}
	if err := connectWith(t, env, a, "ext-a"); err == nil {
		t.Fatal("certificate on the CRL connected")
	}
	// a CRL signed by a foreign CA is refused; the previous one stays
	foreign := testpki.New(t)
	der, _ := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: time.Now(), NextUpdate: time.Now().Add(time.Hour)}, foreign.Issuing, foreign.IssuingKey)
	time.Sleep(1100 * time.Millisecond)
	os.WriteFile(crlFile, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o600)
	time.Sleep(500 * time.Millisecond)
	if err := connectWith(t, env, a, "ext-a"); err == nil {
		t.Fatal("a foreign CRL replaced the trusted one")
	}
	if err := connectWith(t, env, b, "ext-b"); err != nil {
		t.Fatalf("certificate not on the CRL: %v", err)
	}
}
