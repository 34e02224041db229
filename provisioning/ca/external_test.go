package ca_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// hsmURI stands for a hardware keystore: the ca package records the URI
// and never opens it (the caller does).
const hsmURI = "pkcs11:token=ca;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mqtls/ca.pin"

func memSigner(t *testing.T) crypto.Signer {
	t.Helper()
	s, err := keystore.NewMemory().Generate(t.Context(), "issuing-ca", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// An issuing key held outside the data directory: bad configurations are
// refused before anything is written.
func TestInitExternalKeyRefused(t *testing.T) {
	own := testpki.New(t)
	files := t.TempDir()
	rootKey, _ := x509.MarshalPKCS8PrivateKey(own.RootKey)
	writePEM(t, filepath.Join(files, "root.crt"), "CERTIFICATE", own.Root.Raw)
	writePEM(t, filepath.Join(files, "root.key"), "PRIVATE KEY", rootKey)
	writePEM(t, filepath.Join(files, "iss.crt"), "CERTIFICATE", own.Issuing.Raw)
	issKey, _ := x509.MarshalPKCS8PrivateKey(own.IssuingKey)
	writePEM(t, filepath.Join(files, "iss.key"), "PRIVATE KEY", issKey)
	j := func(n string) string { return filepath.Join(files, n) }

	for _, tc := range []struct {
		name string
		cfg  ca.InitConfig
		want error  // errors.Is, if set
		says string // in the message
	}{
		{"signer without URI", ca.InitConfig{IssuingSigner: memSigner(t)}, nil, "IssuingKeyURI"},
		{"URI without signer", ca.InitConfig{IssuingKeyURI: hsmURI}, nil, "IssuingSigner"},
		{"URI with a PIN", ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: "pkcs11:token=ca?module-path=/m.so&pin-value=1234"}, keystore.ErrBadURI, "pin-value"},
		{"bad URI", ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: "nope:x"}, keystore.ErrBadURI, "accepted forms"},
		{"signer and key file", ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: hsmURI, RootCert: j("root.crt"), IssuingCert: j("iss.crt"), IssuingKey: j("iss.key")}, nil, "--issuing-key"},
		{"signer not the issuing certificate's key", ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: hsmURI, RootCert: j("root.crt"), IssuingCert: j("iss.crt")}, ca.ErrKeyMismatch, "iss.crt"},
		{"signer without a root key", ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: hsmURI, RootCert: j("root.crt")}, nil, "root key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			err := ca.Init(dir, tc.cfg)
			if err == nil {
				t.Fatal("Init accepted it")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not mention %q", err, tc.says)
			}
			if strings.Contains(err.Error(), "1234") {
				t.Errorf("error %q quotes the PIN", err)
			}
			if _, err := os.Stat(filepath.Join(dir, "ca")); !errors.Is(err, os.ErrNotExist) {
				t.Error("a refused init left ca/ behind")
			}
		})
	}
}

// Load needs the external key from its caller, and only that key.
func TestLoadExternalKeyRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: hsmURI}); err != nil {
		t.Fatal(err)
	}
	_, err := ca.Load(dir)
	if !errors.Is(err, ca.ErrExternalKey) || !strings.Contains(err.Error(), "token=ca") || !strings.Contains(err.Error(), ca.IssuingKeyURIFile) {
		t.Fatalf("Load without the signer: %v, want ErrExternalKey naming the URI and %s", err, ca.IssuingKeyURIFile)
	}
	if _, err := ca.Load(dir, ca.WithIssuingSigner(memSigner(t))); !errors.Is(err, ca.ErrKeyMismatch) {
		t.Fatalf("Load with another key: %v, want ErrKeyMismatch", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ca.IssuingKeyURIFile), []byte("pkcs11:token=ca?module-path=/m.so&pin-value=1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.IssuingKeyURI(dir); !errors.Is(err, keystore.ErrBadURI) || strings.Contains(err.Error(), "1234") {
		t.Fatalf("IssuingKeyURI of a URI holding a PIN: %v, want ErrBadURI without the PIN", err)
	}
}

// With the issuing key in a caller's store, no issuing key file is
// written, the URI is recorded (0600), and the CA issues with that key.
func TestInitExternalKey(t *testing.T) {
	own := testpki.New(t)
	files := t.TempDir()
	rootKey, _ := x509.MarshalPKCS8PrivateKey(own.RootKey)
	writePEM(t, filepath.Join(files, "root.crt"), "CERTIFICATE", own.Root.Raw)
	writePEM(t, filepath.Join(files, "root.key"), "PRIVATE KEY", rootKey)
	writePEM(t, filepath.Join(files, "iss.crt"), "CERTIFICATE", own.Issuing.Raw)
	adopted := own.IssuingKey
	for _, tc := range []struct {
		name   string
		cfg    ca.InitConfig
		signer crypto.Signer
	}{
		{"new PKI", ca.InitConfig{}, memSigner(t)},
		{"adopted root", ca.InitConfig{RootCert: filepath.Join(files, "root.crt"), RootKey: filepath.Join(files, "root.key")}, memSigner(t)},
		{"adopted issuing CA", ca.InitConfig{RootCert: filepath.Join(files, "root.crt"), IssuingCert: filepath.Join(files, "iss.crt")}, adopted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			cfg := tc.cfg
			cfg.IssuingSigner, cfg.IssuingKeyURI = tc.signer, hsmURI
			if err := ca.Init(dir, cfg); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(dir, ca.IssuingKeyFile)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("%s written: %v", ca.IssuingKeyFile, err)
			}
			fi, err := os.Stat(filepath.Join(dir, ca.IssuingKeyURIFile))
			if err != nil || fi.Mode().Perm() != 0o600 {
				t.Fatalf("%s: %v, mode %v, want 0600", ca.IssuingKeyURIFile, err, fi)
			}
			got, err := ca.IssuingKeyURI(dir)
			if err != nil || got != hsmURI {
				t.Fatalf("IssuingKeyURI = %q, %v; want %q", got, err, hsmURI)
			}
			c, err := ca.Load(dir, ca.WithIssuingSigner(tc.signer))
			if err != nil {
				t.Fatal(err)
			}
			if !publicEqual(c.Issuing.PublicKey, tc.signer.Public()) {
				t.Fatal("issuing certificate is not for the caller's key")
			}
			srv, err := c.ServerCertificate()
			if err != nil {
				t.Fatal(err)
			}
			leaf, _ := x509.ParseCertificate(srv.Certificate[0])
			if err := leaf.CheckSignatureFrom(c.Issuing); err != nil {
				t.Fatalf("server certificate not signed by the external key: %v", err)
			}
			dev, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			cert, err := c.IssueDevice(dev.Public(), "dev-1", nil, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			inter := x509.NewCertPool()
			inter.AddCert(c.Issuing)
			if _, err := cert.Verify(x509.VerifyOptions{Roots: c.Pool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("file key has no URI", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		if err := ca.Init(dir, ca.InitConfig{}); err != nil {
			t.Fatal(err)
		}
		if u, err := ca.IssuingKeyURI(dir); err != nil || u != "" {
			t.Fatalf("IssuingKeyURI = %q, %v; want \"\", nil", u, err)
		}
	})
}

// An init interrupted before the server certificate resumes with the
// caller's key.
func TestInitExternalKeyResumes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	s := memSigner(t)
	if err := ca.Init(dir, ca.InitConfig{IssuingSigner: s, IssuingKeyURI: hsmURI}); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "tls")); err != nil {
		t.Fatal(err)
	}
	if err := ca.Init(dir, ca.InitConfig{IssuingSigner: memSigner(t), IssuingKeyURI: hsmURI}); !errors.Is(err, ca.ErrKeyMismatch) {
		t.Fatalf("resume with another key: %v, want ErrKeyMismatch", err)
	}
	if err := ca.Init(dir, ca.InitConfig{IssuingSigner: s, IssuingKeyURI: hsmURI}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ca.ServerCertFile)); err != nil {
		t.Fatal(err)
	}
}

func publicEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
