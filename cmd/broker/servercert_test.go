package main

import (
	"bytes"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/provisioning/ca"
)

// Issue 12 item 5: init on an existing data directory refuses, leaves the
// server certificate alone, and names the command that changes its host
// names.
func TestInitRefusesExistingDataDir(t *testing.T) {
	data := initData(t)
	crt, _ := os.ReadFile(filepath.Join(data, ca.ServerCertFile))
	key, _ := os.ReadFile(filepath.Join(data, ca.ServerKeyFile))
	for _, args := range [][]string{{"--host", "mqtt.example.com"}, nil} {
		_, errs, code := brokerCLI(t, append([]string{"init", "--data", data}, args...)...)
		want := "broker server-cert --data " + data + " --host"
		if code != 1 || !strings.Contains(errs, "already") || !strings.Contains(errs, want) {
			t.Errorf("init %v on an existing data dir: exit %d, stderr %q; want 1 and %q", args, code, errs, want)
		}
		if args != nil && !strings.Contains(errs, "--host mqtt.example.com") {
			t.Errorf("init %v: stderr %q does not repeat the host names asked for", args, errs)
		}
	}
	crt2, _ := os.ReadFile(filepath.Join(data, ca.ServerCertFile))
	key2, _ := os.ReadFile(filepath.Join(data, ca.ServerKeyFile))
	if !bytes.Equal(crt, crt2) || !bytes.Equal(key, key2) {
		t.Error("a refused init changed the server certificate or key")
	}
}

// serverCert reads the data directory's server certificate (the leaf).
func serverCert(t *testing.T, data string) *x509.Certificate {
	t.Helper()
	c, err := ca.Load(data)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	return tc.Leaf
}

// broker server-cert re-issues the server certificate from the issuing CA
// with the names given, replacing the file atomically (0600 key, no
// temporary files left) and keeping the CA.
func TestServerCertReissue(t *testing.T) {
	data := initData(t)
	old := serverCert(t, data)
	out, errs, code := brokerCLI(t, "server-cert", "--data", data, "--host", "mqtt.example.com", "--host", "127.0.0.2")
	if code != 0 {
		t.Fatalf("server-cert: exit %d\n%s", code, errs)
	}
	leaf := serverCert(t, data)
	if !slices.Equal(leaf.DNSNames, []string{"mqtt.example.com"}) || len(leaf.IPAddresses) != 1 || leaf.IPAddresses[0].String() != "127.0.0.2" {
		t.Errorf("new certificate names %v %v, want mqtt.example.com and 127.0.0.2", leaf.DNSNames, leaf.IPAddresses)
	}
	if leaf.SerialNumber.Cmp(old.SerialNumber) == 0 {
		t.Error("the certificate was not re-issued")
	}
	for _, want := range []string{"mqtt.example.com", "127.0.0.2", leaf.SerialNumber.Text(16)} {
		if !strings.Contains(out, want) {
			t.Errorf("server-cert output %q lacks %q", out, want)
		}
	}
	c, err := ca.Load(data)
	if err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	inter.AddCert(c.Issuing)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.Pool(), Intermediates: inter, DNSName: "mqtt.example.com"}); err != nil {
		t.Errorf("re-issued certificate does not verify: %v", err)
	}
	for name, want := range map[string]os.FileMode{ca.ServerKeyFile: 0o600, ca.ServerCertFile: 0o600} {
		fi, err := os.Stat(filepath.Join(data, name))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v mode %v, want %v", name, err, fi.Mode().Perm(), want)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(data, "tls"))
	for _, e := range ents {
		if e.Name() != "server.crt" && e.Name() != "server.key" {
			t.Errorf("left behind in tls/: %s", e.Name())
		}
	}
	if _, errs, code := brokerCLI(t, "server-cert", "--data", data); code != 2 || !strings.Contains(errs, "--host") {
		t.Errorf("server-cert without --host: exit %d, %q; want 2 and a word on --host", code, errs)
	}
}
