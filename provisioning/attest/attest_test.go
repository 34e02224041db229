package attest_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"crypto/x509"

	"github.com/google/go-tpm/tpm2"

	"github.com/mqtls/mqtls/internal/testing/ektest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/provisioning/attest"
)

// crypto/x509 leaves a critical SAN holding only a directoryName (as TCG
// EK certificates have) unhandled, so Verify fails; ParseEKCertificate
// works around it. When this test fails, crypto/x509 changed: drop the
// workaround.
func TestGoLeavesTCGSANUnhandled(t *testing.T) {
	m := ektest.NewManufacturer(t)
	der := m.EKCert(t, testpki.NewKey(t).Public())
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if len(c.UnhandledCriticalExtensions) != 1 || !c.UnhandledCriticalExtensions[0].Equal([]int{2, 5, 29, 17}) {
		t.Fatalf("crypto/x509 unhandled critical extensions = %v: the TCG SAN workaround may be obsolete", c.UnhandledCriticalExtensions)
	}
	roots, inter := m.Pools()
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Fatal("crypto/x509 verifies an EK certificate with the TCG SAN: the workaround is obsolete")
	}
	ek, err := attest.ParseEKCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ek.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("EK certificate after the workaround: %v", err)
	}
}

func TestLoadRootsFailsClosed(t *testing.T) {
	m := ektest.NewManufacturer(t)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o700)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pemOf := func(c *x509.Certificate) []byte {
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	empty := t.TempDir()
	leaf := m.EKCert(t, testpki.NewKey(t).Public())
	for _, tc := range []struct{ name, path, want string }{
		{"missing", filepath.Join(dir, "nope"), "no such file"},
		{"empty directory", empty, "no TPM CA certificate"},
		{"garbage", write("garbage.pem", []byte("not a certificate")), "neither PEM certificates nor one DER"},
		{"garbage in a directory", filepath.Dir(write("x/garbage.crt", []byte("not a certificate"))), "neither PEM certificates nor one DER"},
		{"not a CA", write("leaf.der", leaf), "is not a CA certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := attest.LoadRoots(tc.path); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("LoadRoots = %v, want %q", err, tc.want)
			}
		})
	}
	good := t.TempDir()
	os.WriteFile(filepath.Join(good, "root.pem"), append(pemOf(m.Root), pemOf(m.Issuing)...), 0o600)
	os.WriteFile(filepath.Join(good, "issuing.der"), m.Issuing.Raw, 0o600)
	os.WriteFile(filepath.Join(good, "signkey.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")}), 0o600)
	os.WriteFile(filepath.Join(good, ".lock"), nil, 0o600)
	os.WriteFile(filepath.Join(good, "certserial"), []byte("3"), 0o600)
	if _, n, err := attest.LoadRoots(good); err != nil || n != 3 {
		t.Fatalf("LoadRoots(good) = %d, %v", n, err)
	}
}

// Only an EK certificate vouches for a TPM: another certificate of the
// manufacturer CA (a TLS server's, a CA's) names a key that may live
// anywhere, so the credential made for it proves nothing. EKs of a
// template the verifier does not know are refused.
func TestChallengeRefusesNonEKCertificates(t *testing.T) {
	m := ektest.NewManufacturer(t)
	roots, inter := m.Pools()
	v, err := attest.New(attest.Config{Roots: roots, Intermediates: inter, Store: ektest.Registry(t, "dev")})
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey := testpki.NewKey(t).Public()
	ecKey384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecKey521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		pub   crypto.PublicKey
		tweak func(*x509.Certificate)
		label string // "": accepted
	}{
		{"RSA EK certificate", &rsaKey.PublicKey, func(*x509.Certificate) {}, ""},
		{"ECC EK certificate", ecKey, func(*x509.Certificate) {}, ""},
		{"ECC P-384 EK certificate", &ecKey384.PublicKey, func(*x509.Certificate) {}, ""},
		{"ECC P-521 EK certificate (no template here)", &ecKey521.PublicKey, func(*x509.Certificate) {}, "ek_unsupported"},
		{"EK certificate without EKU or key usage", ecKey, func(c *x509.Certificate) { c.UnknownExtKeyUsage, c.KeyUsage = nil, 0 }, ""},
		{"TLS server certificate", &rsaKey.PublicKey, func(c *x509.Certificate) {
			c.UnknownExtKeyUsage, c.ExtKeyUsage = nil, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		}, "ek_usage"},
		{"CA certificate", &rsaKey.PublicKey, func(c *x509.Certificate) { c.IsCA, c.KeyUsage = true, c.KeyUsage|x509.KeyUsageCertSign }, "ek_usage"},
		{"RSA signing key", &rsaKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageDigitalSignature }, "ek_usage"},
		{"ECC key without keyAgreement", ecKey, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }, "ek_usage"},
		{"expired EK certificate", ecKey, func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)
		}, "ek_untrusted"},
		{"EK certificate not yet valid", ecKey, func(c *x509.Certificate) { c.NotBefore = time.Now().Add(time.Hour) }, "ek_untrusted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := v.Challenge(t.Context(), "dev", attest.Binding("tok"), m.EKCert(t, tc.pub, tc.tweak), ektest.ForeignAK(t))
			var ae *attest.Error
			switch {
			case tc.label == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.label != "" && (!errors.As(err, &ae) || ae.Label != tc.label):
				t.Fatalf("got %v; want refusal %q", err, tc.label)
			}
		})
	}
}

// An AK whose name is a SHA-1 digest is refused: names bind the credential
// and the certified key, and SHA-1 collides.
func TestChallengeRefusesSHA1AK(t *testing.T) {
	m := ektest.NewManufacturer(t)
	roots, inter := m.Pools()
	v, err := attest.New(attest.Config{Roots: roots, Intermediates: inter, Store: ektest.Registry(t, "dev")})
	if err != nil {
		t.Fatal(err)
	}
	ek := m.EKCert(t, testpki.NewKey(t).Public())
	for _, alg := range []tpm2.TPMAlgID{tpm2.TPMAlgSHA256, tpm2.TPMAlgSHA1} {
		ak, err := tpm2.Unmarshal[tpm2.TPM2BPublic](ektest.ForeignAK(t))
		if err != nil {
			t.Fatal(err)
		}
		p, err := ak.Contents()
		if err != nil {
			t.Fatal(err)
		}
		p.NameAlg = alg
		_, err = v.Challenge(t.Context(), "dev", attest.Binding("tok"), ek, tpm2.Marshal(tpm2.New2B(*p)))
		var ae *attest.Error
		switch {
		case alg == tpm2.TPMAlgSHA256 && err != nil:
			t.Fatalf("SHA-256 AK refused: %v", err)
		case alg == tpm2.TPMAlgSHA1 && (!errors.As(err, &ae) || ae.Label != "ak_attributes"):
			t.Fatalf("SHA-1 AK: %v, want ak_attributes", err)
		}
	}
}

// A device has at most Config.PerDevice challenges pending: a token
// holder cannot fill the registry.
func TestChallengesBoundedPerDevice(t *testing.T) {
	m := ektest.NewManufacturer(t)
	roots, inter := m.Pools()
	v, err := attest.New(attest.Config{Roots: roots, Intermediates: inter, Store: ektest.Registry(t, "dev", "other"), PerDevice: 2})
	if err != nil {
		t.Fatal(err)
	}
	ek, ak := m.EKCert(t, testpki.NewKey(t).Public()), ektest.ForeignAK(t)
	for i := range 2 {
		if _, err := v.Challenge(t.Context(), "dev", attest.Binding("tok"), ek, ak); err != nil {
			t.Fatalf("challenge %d: %v", i, err)
		}
	}
	var ae *attest.Error
	if _, err := v.Challenge(t.Context(), "dev", attest.Binding("tok"), ek, ak); !errors.As(err, &ae) || ae.Label != "attest_busy" {
		t.Fatalf("third pending challenge: %v, want attest_busy", err)
	}
	if _, err := v.Challenge(t.Context(), "other", attest.Binding("tok2"), ek, ak); err != nil {
		t.Fatalf("another device: %v", err)
	}
}
