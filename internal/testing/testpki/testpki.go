// Package testpki builds throwaway certificate authorities for tests: a
// root, an issuing CA under it, and leaves for any public key. Keys are
// generated at test time and never written to the source tree.
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
)

// CA is a root plus an issuing (intermediate) CA, both ECDSA P-256.
type CA struct {
	Root, Issuing       *x509.Certificate
	RootKey, IssuingKey crypto.Signer
}

// New creates a fresh two-level CA.
func New(t testing.TB) *CA {
	t.Helper()
	rootKey := newKey(t)
	now := time.Now()
	root := create(t, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test root CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}, nil, rootKey.Public(), rootKey)
	issKey := newKey(t)
	iss := create(t, &x509.Certificate{
		Subject:               pkix.Name{CommonName: "test issuing CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}, root, issKey.Public(), rootKey)
	return &CA{Root: root, Issuing: iss, RootKey: rootKey, IssuingKey: issKey}
}

// Pool returns a pool holding the root only.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Root)
	return p
}

// Client issues a client-auth leaf for pub with the given CN and returns the
// chain leaf + issuing CA as DER.
func (ca *CA) Client(t testing.TB, cn string, pub crypto.PublicKey) [][]byte {
	t.Helper()
	return ca.leaf(t, cn, pub, x509.ExtKeyUsageClientAuth, nil)
}

// Server issues a server-auth leaf for pub valid for hosts (DNS names or IP
// addresses) and returns the chain leaf + issuing CA as DER.
func (ca *CA) Server(t testing.TB, pub crypto.PublicKey, hosts ...string) [][]byte {
	t.Helper()
	return ca.leaf(t, hosts[0], pub, x509.ExtKeyUsageServerAuth, hosts)
}

func (ca *CA) leaf(t testing.TB, cn string, pub crypto.PublicKey, eku x509.ExtKeyUsage, hosts []string) [][]byte {
	t.Helper()
	now := time.Now()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{eku},
	}
	if _, ok := pub.(*ecdsa.PublicKey); !ok {
		tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	leaf := create(t, tmpl, ca.Issuing, pub, ca.IssuingKey)
	return [][]byte{leaf.Raw, ca.Issuing.Raw}
}

// NewKey returns a fresh ECDSA P-256 key.
func NewKey(t testing.TB) crypto.Signer { t.Helper(); return newKey(t) }

func newKey(t testing.TB) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func create(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
