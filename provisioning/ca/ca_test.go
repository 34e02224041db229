package ca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func TestInitProfile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{Hosts: []string{"broker.example", "10.1.2.3"}}); err != nil {
		t.Fatal(err)
	}
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Root.IsCA || c.Root.NotAfter.Sub(time.Now()) < 19*365*24*time.Hour {
		t.Errorf("root: CA=%v until %v, want a ~20 year CA", c.Root.IsCA, c.Root.NotAfter)
	}
	if !c.Issuing.IsCA || c.Issuing.MaxPathLen != 0 || !c.Issuing.MaxPathLenZero || c.Issuing.NotAfter.Sub(time.Now()) < 4*365*24*time.Hour {
		t.Errorf("issuing: CA=%v pathlen=%d until %v, want a ~5 year CA with pathlen 0", c.Issuing.IsCA, c.Issuing.MaxPathLen, c.Issuing.NotAfter)
	}
	srv, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if len(srv.Certificate) != 2 {
		t.Fatalf("server chain has %d certificates, want leaf + issuing", len(srv.Certificate))
	}
	inter := x509.NewCertPool()
	inter.AddCert(c.Issuing)
	for _, host := range []string{"broker.example", "10.1.2.3"} {
		if _, err := srv.Leaf.Verify(x509.VerifyOptions{DNSName: host, Roots: c.Pool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("server certificate for %s: %v", host, err)
		}
	}
	if _, err := srv.Leaf.Verify(x509.VerifyOptions{Roots: c.Pool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Error("server certificate is valid for client auth")
	}
	for _, f := range []string{ca.RootKeyFile, ca.IssuingKeyFile, ca.ServerKeyFile} {
		if fi, _ := os.Stat(filepath.Join(dir, f)); fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %04o", f, fi.Mode().Perm())
		}
	}
	for _, d := range []string{"ca", "tls"} {
		if fi, _ := os.Stat(filepath.Join(dir, d)); fi.Mode().Perm() != 0o700 {
			t.Errorf("%s/ mode %04o", d, fi.Mode().Perm())
		}
	}
}

func TestInitRefusesOverwrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, ca.RootCertFile))
	if err := ca.Init(dir, ca.InitConfig{}); !errors.Is(err, ca.ErrExists) {
		t.Fatalf("second Init = %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, ca.RootCertFile))
	if string(before) != string(after) {
		t.Fatal("root certificate changed")
	}
}

// An init interrupted after the CA but before the server certificate is
// finished by the next init, with the same CA.
func TestInitResumes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatal(err)
	}
	root, _ := os.ReadFile(filepath.Join(dir, ca.RootCertFile))
	os.RemoveAll(filepath.Join(dir, "tls"))
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatalf("resume: %v", err)
	}
	again, _ := os.ReadFile(filepath.Join(dir, ca.RootCertFile))
	if string(root) != string(again) {
		t.Fatal("resumed init replaced the CA")
	}
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ServerCertificate(); err != nil {
		t.Fatal(err)
	}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Users with their own PKI adopt a root (creating the issuing CA under
// it) or a root and an issuing CA.
func TestInitAdopt(t *testing.T) {
	own := testpki.New(t)
	files := t.TempDir()
	rootKey, _ := x509.MarshalECPrivateKey(own.RootKey.(*ecdsa.PrivateKey))
	issKey, _ := x509.MarshalPKCS8PrivateKey(own.IssuingKey)
	writePEM(t, filepath.Join(files, "root.crt"), "CERTIFICATE", own.Root.Raw)
	writePEM(t, filepath.Join(files, "root.key"), "EC PRIVATE KEY", rootKey)
	writePEM(t, filepath.Join(files, "iss.crt"), "CERTIFICATE", own.Issuing.Raw)
	writePEM(t, filepath.Join(files, "iss.key"), "PRIVATE KEY", issKey)
	j := func(n string) string { return filepath.Join(files, n) }

	t.Run("root", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		if err := ca.Init(dir, ca.InitConfig{RootCert: j("root.crt"), RootKey: j("root.key")}); err != nil {
			t.Fatal(err)
		}
		c, err := ca.Load(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Root.Equal(own.Root) || c.Issuing.CheckSignatureFrom(own.Root) != nil {
			t.Fatal("issuing CA not created under the adopted root")
		}
	})
	t.Run("root+issuing", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		if err := ca.Init(dir, ca.InitConfig{RootCert: j("root.crt"), IssuingCert: j("iss.crt"), IssuingKey: j("iss.key")}); err != nil {
			t.Fatal(err)
		}
		c, err := ca.Load(dir)
		if err != nil {
			t.Fatal(err)
		}
		if !c.Issuing.Equal(own.Issuing) {
			t.Fatal("issuing CA not adopted")
		}
		if _, err := os.Stat(filepath.Join(dir, ca.RootKeyFile)); !errors.Is(err, os.ErrNotExist) {
			t.Fatal("root key written although none was given")
		}
	})
	t.Run("mismatched key", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		err := ca.Init(dir, ca.InitConfig{RootCert: j("root.crt"), IssuingCert: j("iss.crt"), IssuingKey: j("root.key")})
		if err == nil {
			t.Fatal("adopted an issuing CA with the wrong key")
		}
		if _, err := os.Stat(filepath.Join(dir, "ca")); !errors.Is(err, os.ErrNotExist) {
			t.Fatal("a failed init left ca/ behind")
		}
	})
	t.Run("issuing without root", func(t *testing.T) {
		if err := ca.Init(filepath.Join(t.TempDir(), "d"), ca.InitConfig{IssuingCert: j("iss.crt"), IssuingKey: j("iss.key")}); err == nil {
			t.Fatal("adopted an issuing CA without its root")
		}
	})
}

func TestCheckKey(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	r1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	r2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, k := range []any{p256.Public(), p384.Public(), r2048.Public()} {
		if err := ca.CheckKey(k); err != nil {
			t.Errorf("CheckKey(%T) = %v", k, err)
		}
	}
	for _, k := range []any{p521.Public(), r1024.Public(), "not a key"} {
		if err := ca.CheckKey(k); !errors.Is(err, ca.ErrPolicy) {
			t.Errorf("CheckKey(%T) = %v, want ErrPolicy", k, err)
		}
	}
}

// ReissueServer replaces the server certificate (new names, same key,
// mode 0600, no temporary file left) and refuses empty host lists.
func TestReissueServer(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatal(err)
	}
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	before, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReissueServer(nil); err == nil {
		t.Error("ReissueServer(nil) accepted")
	}
	if _, err := c.ReissueServer([]string{"a.example", ""}); err == nil {
		t.Error("ReissueServer with an empty host accepted")
	}
	leaf, err := c.ReissueServer([]string{"mqtt.example", "10.0.0.7"})
	if err != nil {
		t.Fatal(err)
	}
	after, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	if !after.Leaf.Equal(leaf) || after.Leaf.Equal(before.Leaf) {
		t.Error("ServerCertificate does not return the re-issued certificate")
	}
	if after.Leaf.Subject.CommonName != "mqtt.example" || after.Leaf.VerifyHostname("10.0.0.7") != nil || after.Leaf.VerifyHostname("localhost") == nil {
		t.Errorf("re-issued names: CN %q, DNS %v, IP %v", after.Leaf.Subject.CommonName, after.Leaf.DNSNames, after.Leaf.IPAddresses)
	}
	if !after.Leaf.PublicKey.(*ecdsa.PublicKey).Equal(before.Leaf.PublicKey) {
		t.Error("the server key changed")
	}
	if fi, err := os.Stat(filepath.Join(dir, ca.ServerCertFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("server certificate: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "tls")); len(ents) != 2 {
		t.Errorf("tls/ holds %d entries, want server.crt and server.key", len(ents))
	}
}
