package device_test

import (
	"crypto"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
)

func simStore(t *testing.T, dir string) keystore.Store {
	t.Helper()
	tr, err := tpmsim.OpenSeed(42)
	if err != nil {
		t.Fatal(err)
	}
	s, err := tpm.New(t.Context(), tr, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func fileStore(t *testing.T, dir string) keystore.Store {
	t.Helper()
	s, err := keystore.NewFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// opensslVerify checks a stored chain with openssl against the root only.
func opensslVerify(t *testing.T, dir string) {
	t.Helper()
	out, err := exec.Command(testtool.Require(t, "openssl"), "verify", "-purpose", "sslclient",
		"-CAfile", filepath.Join(dir, device.RootFile), "-untrusted", filepath.Join(dir, device.CertFile),
		filepath.Join(dir, device.CertFile)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), ": OK") {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
}

// The full path for each key location: key in the keystore, CSR, EST over
// HTTPS, verified chain, identity on disk; then renewal with the same key
// and with a new one.
func TestEnrollRenewFullPath(t *testing.T) {
	env := esttest.Start(t, nil)
	sw := swtpmtest.Start(t)
	backends := map[string]struct {
		uri  string
		open func(t *testing.T, dir string) keystore.Store
		file string
	}{
		"file":      {"file", fileStore, "device.key"},
		"simulator": {"tpmsim:/unused", simStore, "device.tpmkey"},
		"swtpm": {"swtpm:" + sw.Addr, func(t *testing.T, dir string) keystore.Store {
			s, err := tpm.OpenSWTPM(t.Context(), sw.Addr, dir)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		}, "device.tpmkey"},
	}
	for name, b := range backends {
		t.Run(name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "id")
			store := b.open(t, dir)
			id, err := device.Enroll(t.Context(), device.EnrollConfig{
				Dir: dir, DeviceID: "dev-" + name, Token: env.Token(t, "dev-"+name, "", time.Hour),
				EST: env.URL, Root: env.CA.Root, Store: store, Keystore: b.uri,
			})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{device.CertFile, device.RootFile, device.ConfigFile, b.file} {
				if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
					t.Errorf("identity file: %v", err)
				}
			}
			if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
				t.Errorf("identity dir mode %04o, want 0700", fi.Mode().Perm())
			}
			if name == "file" {
				if fi, _ := os.Stat(filepath.Join(dir, "device.key")); fi.Mode().Perm() != 0o600 {
					t.Errorf("device.key mode %04o, want 0600", fi.Mode().Perm())
				}
			}
			opensslVerify(t, dir)

			loaded, err := device.Load(t.Context(), dir, store)
			if err != nil {
				t.Fatal(err)
			}
			if loaded.Config.Keystore != b.uri || loaded.Config.EST != env.URL || !loaded.Leaf().Equal(id.Leaf()) {
				t.Fatalf("loaded identity differs: %+v", loaded.Config)
			}

			same, err := device.Renew(t.Context(), loaded, store, device.RenewConfig{})
			if err != nil {
				t.Fatalf("renew: %v", err)
			}
			if same.Leaf().SerialNumber.Cmp(id.Leaf().SerialNumber) == 0 || !samePub(same.Leaf(), id.Leaf()) {
				t.Fatal("renew without rekey: want a new certificate for the same key")
			}
			rekeyed, err := device.Renew(t.Context(), same, store, device.RenewConfig{Rekey: true})
			if err != nil {
				t.Fatalf("renew --rekey: %v", err)
			}
			if samePub(rekeyed.Leaf(), id.Leaf()) {
				t.Fatal("renew with rekey kept the old key")
			}
			again, err := device.Load(t.Context(), dir, store)
			if err != nil {
				t.Fatal(err)
			}
			if !again.Leaf().Equal(rekeyed.Leaf()) {
				t.Fatal("identity on disk is not the renewed one")
			}
			keys, _ := store.List(t.Context())
			if len(keys) != 1 || keys[0] != device.KeyName {
				t.Fatalf("keystore holds %v after rekey, want only %q", keys, device.KeyName)
			}
			opensslVerify(t, dir)
		})
	}
}

func samePub(a, b *x509.Certificate) bool {
	return string(a.RawSubjectPublicKeyInfo) == string(b.RawSubjectPublicKeyInfo)
}

// A refused enrollment writes no certificate; running it again with a good
// token reuses the key generated the first time.
func TestEnrollRetryReusesKey(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := filepath.Join(t.TempDir(), "id")
	store := fileStore(t, dir)
	cfg := device.EnrollConfig{Dir: dir, DeviceID: "dev", Token: "wrong", EST: env.URL, Root: env.CA.Root, Store: store, Keystore: "file"}
	if _, err := device.Enroll(t.Context(), cfg); !errors.Is(err, provisioning.ErrUnauthorized) {
		t.Fatalf("enroll with a wrong token = %v, want ErrUnauthorized", err)
	}
	if _, err := os.Stat(filepath.Join(dir, device.CertFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a refused enrollment left device.crt")
	}
	if _, err := device.Load(t.Context(), dir, store); !errors.Is(err, device.ErrNoIdentity) {
		t.Fatalf("Load after refused enrollment = %v, want ErrNoIdentity", err)
	}
	first, err := store.Signer(t.Context(), device.KeyName)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Token = env.Token(t, "dev", "", time.Hour)
	id, err := device.Enroll(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !id.Signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(first.Public()) {
		t.Fatal("retry generated a new key instead of reusing the first")
	}
	if _, err := device.Enroll(t.Context(), cfg); !errors.Is(err, device.ErrIdentityExists) {
		t.Fatalf("enroll over an identity = %v, want ErrIdentityExists", err)
	}
}

// A refused renewal (revoked) leaves the previous identity as it was.
func TestRenewRefusedKeepsIdentity(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := filepath.Join(t.TempDir(), "id")
	store := fileStore(t, dir)
	id, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: dir, DeviceID: "dev", Token: env.Token(t, "dev", "", time.Hour), EST: env.URL, Root: env.CA.Root, Store: store, Keystore: "file"})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, device.CertFile))
	keyBefore, _ := os.ReadFile(filepath.Join(dir, "device.key"))
	if _, err := env.Registry.Revoke(t.Context(), "dev", "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := device.Renew(t.Context(), id, store, device.RenewConfig{Rekey: true}); !errors.Is(err, provisioning.ErrUnauthorized) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("renew of a revoked device = %v, want ErrUnauthorized naming the revocation", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, device.CertFile))
	keyAfter, _ := os.ReadFile(filepath.Join(dir, "device.key"))
	if string(before) != string(after) || string(keyBefore) != string(keyAfter) {
		t.Fatal("a refused renewal changed the identity")
	}
	if _, err := device.Load(t.Context(), dir, store); err != nil {
		t.Fatalf("identity after a refused renewal: %v", err)
	}
}

// A renewal interrupted after its commit point (device.crt written, key
// not yet renamed) is completed by Load.
func TestRenewCrashAfterCommit(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := filepath.Join(t.TempDir(), "id")
	store := fileStore(t, dir)
	id, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: dir, DeviceID: "dev", Token: env.Token(t, "dev", "", time.Hour), EST: env.URL, Root: env.CA.Root, Store: store, Keystore: "file"})
	if err != nil {
		t.Fatal(err)
	}
	// Do by hand what Renew does up to its commit point.
	next, err := store.Generate(t.Context(), "device-next", "")
	if err != nil {
		t.Fatal(err)
	}
	cur, _ := id.TLSCertificate()
	c, _ := provisioning.NewClient(env.URL, env.CA.Root)
	chain, err := c.Reenroll(t.Context(), cur, next)
	if err != nil {
		t.Fatal(err)
	}
	var pemData []byte
	for _, cert := range chain {
		pemData = append(pemData, pemCert(cert)...)
	}
	if err := os.WriteFile(filepath.Join(dir, device.CertFile), pemData, 0o644); err != nil {
		t.Fatal(err)
	}
	loaded, err := device.Load(t.Context(), dir, store)
	if err != nil {
		t.Fatalf("Load after a crash past the commit point: %v", err)
	}
	if !loaded.Signer.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(next.Public()) {
		t.Fatal("Load did not pick the new key")
	}
	if keys, _ := store.List(t.Context()); len(keys) != 1 || keys[0] != device.KeyName {
		t.Fatalf("keystore after recovery = %v, want only %q", keys, device.KeyName)
	}
}

// An expired identity loads (so the device can say so) but does not renew.
func TestRenewExpired(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := filepath.Join(t.TempDir(), "id")
	store := fileStore(t, dir)
	id, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: dir, DeviceID: "dev", Token: env.Token(t, "dev", "", time.Hour), EST: env.URL, Root: env.CA.Root, Store: store, Keystore: "file"})
	if err != nil {
		t.Fatal(err)
	}
	id.Chain[0].NotAfter = time.Now().Add(-time.Minute) // as if time had passed
	_, err = device.Renew(t.Context(), id, store, device.RenewConfig{})
	if !errors.Is(err, device.ErrExpired) {
		t.Fatalf("renew of an expired identity = %v, want ErrExpired", err)
	}
}

// Attestation asked of a keystore that cannot attest is refused before
// anything is written or the token is spent.
func TestEnrollAttestNeedsTPM(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := filepath.Join(t.TempDir(), "id")
	tok := env.Token(t, "dev", "", time.Hour)
	cfg := device.EnrollConfig{Dir: dir, DeviceID: "dev", Token: tok, EST: env.URL, Root: env.CA.Root, Store: fileStore(t, dir), Keystore: "file", Attest: true}
	if _, err := device.Enroll(t.Context(), cfg); !errors.Is(err, device.ErrNoAttestation) {
		t.Fatalf("Enroll(Attest, file keystore) = %v, want ErrNoAttestation", err)
	}
	if _, err := os.Stat(filepath.Join(dir, device.CertFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a refused enrollment left device.crt")
	}
	if _, err := env.Registry.CheckToken(t.Context(), "dev", tok); err != nil {
		t.Fatalf("token after the refusal: %v", err)
	}
}
