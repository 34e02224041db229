//go:build cgo

package keystores

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// Black box: the devsim binary enrolls over EST with its key in a SoftHSM
// token (--keystore pkcs11:...), then publishes and subscribes over mutual
// TLS with that key; the identity directory holds no key and the PIN is
// nowhere in what devsim wrote or printed.
func TestDevsimEnrollPKCS11(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds cmd/devsim (-short)")
	}
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "mqtls")
	tokB := hsm.InitToken(t, "mqtls-b") // SoftHSM sees tokens made before it loads
	bin := filepath.Join(t.TempDir(), "devsim")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/mqtls/mqtls/cmd/devsim").CombinedOutput(); err != nil {
		t.Fatalf("go build devsim: %v\n%s", err, out)
	}
	devsim := func(args ...string) (string, error) {
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+hsm.Conf)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		if strings.Contains(out.String(), tok.PIN) || strings.Contains(out.String(), tokB.PIN) {
			t.Errorf("devsim %s printed the PIN", args[0])
		}
		return out.String(), err
	}

	est := esttest.Start(t, nil)
	br := brokertest.StartOn(t, est.Dir, est.Registry, nil)
	root := filepath.Join(est.Dir, ca.RootCertFile)
	dir := filepath.Join(t.TempDir(), "dev-p11")
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, []byte(est.Token(t, "dev-p11", "", time.Hour)), 0o600); err != nil {
		t.Fatal(err)
	}
	uri := "pkcs11:token=mqtls;object=device?module-path=" + softhsmtest.Module + "&pin-source=file:" + tok.PINFile

	// Wrong PIN first: enrollment fails before the token is burned.
	wrong := filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(wrong, []byte("00000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	badURI := strings.Replace(uri, tok.PINFile, wrong, 1)
	if out, err := devsim("enroll", "--est", est.URL, "--ca", root, "--device", "dev-p11", "--token-file", tokFile, "--keystore", badURI, "--out", dir); err == nil || !strings.Contains(out, "wrong PIN") {
		t.Fatalf("enroll with a wrong PIN: %v\n%s", err, out)
	}

	out, err := devsim("enroll", "--est", est.URL, "--ca", root, "--device", "dev-p11", "--token-file", tokFile, "--keystore", uri, "--out", dir)
	if err != nil || !strings.Contains(out, "enrolled dev-p11") {
		t.Fatalf("enroll: %v\n%s", err, out)
	}
	cfg, err := device.ReadConfig(dir)
	if err != nil || !strings.HasPrefix(cfg.Keystore, "pkcs11:token=mqtls;object=device?") {
		t.Fatalf("identity.json keystore = %q, %v", cfg.Keystore, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".key") || strings.HasSuffix(e.Name(), ".tpmkey") {
			t.Errorf("identity directory holds a key file: %s", e.Name())
		}
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		if bytes.Contains(b, []byte(tok.PIN)) {
			t.Errorf("%s holds the PIN", e.Name())
		}
	}

	url := "mqtts://" + br.Addr
	if out, err := devsim("pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-p11/status", "--message", "on-hsm", "--qos", "1", "--retain"); err != nil {
		t.Fatalf("pub: %v\n%s", err, out)
	}
	out, err = devsim("sub", "--broker", url, "--identity", dir, "--topic", "devices/dev-p11/#", "--count", "1", "--timeout", "10s", "-v")
	if err != nil || !slices.Contains(strings.Split(out, "\n"), "devices/dev-p11/status on-hsm") {
		t.Fatalf("sub: %v\n%s", err, out)
	}

	// Renewal keeps the key; a new key needs a URI without object=
	// (the new key is made as device-next, then renamed to device).
	if out, err := devsim("renew", "--identity", dir); err != nil || !strings.Contains(out, "renewed dev-p11") {
		t.Fatalf("renew: %v\n%s", err, out)
	}
	if out, err := devsim("renew", "--identity", dir, "--rekey"); err == nil || !strings.Contains(out, "object=device") {
		t.Fatalf("renew --rekey with object=device: %v\n%s", err, out)
	}
	dirB := filepath.Join(t.TempDir(), "dev-p11b")
	if err := os.WriteFile(tokFile, []byte(est.Token(t, "dev-p11b", "", time.Hour)), 0o600); err != nil {
		t.Fatal(err)
	}
	uriB := "pkcs11:token=mqtls-b?module-path=" + softhsmtest.Module + "&pin-source=file:" + tokB.PINFile
	if out, err := devsim("enroll", "--est", est.URL, "--ca", root, "--device", "dev-p11b", "--token-file", tokFile, "--keystore", uriB, "--out", dirB); err != nil {
		t.Fatalf("enroll dev-p11b: %v\n%s", err, out)
	}
	spki := func() []byte {
		certs, err := device.ReadCertFile(filepath.Join(dirB, device.CertFile))
		if err != nil {
			t.Fatal(err)
		}
		return certs[0].RawSubjectPublicKeyInfo
	}
	before := spki()
	if out, err := devsim("renew", "--identity", dirB, "--rekey"); err != nil || !strings.Contains(out, "renewed dev-p11b") {
		t.Fatalf("renew --rekey: %v\n%s", err, out)
	}
	if bytes.Equal(spki(), before) {
		t.Fatal("renew --rekey kept the old key")
	}
	if out, err := devsim("pub", "--broker", url, "--identity", dirB, "--topic", "devices/dev-p11b/status", "--message", "rekeyed", "--qos", "1"); err != nil {
		t.Fatalf("pub after rekey: %v\n%s", err, out)
	}
}
