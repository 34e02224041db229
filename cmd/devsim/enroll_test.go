package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func devsim(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), args, strings.NewReader(""), &out, &errb)
	return out.String(), errb.String(), code
}

func TestEnrollRenewCLI(t *testing.T) {
	env := esttest.Start(t, nil)
	sw := swtpmtest.Start(t)
	root := filepath.Join(env.Dir, ca.RootCertFile)
	for _, ks := range []string{"file", "tpmsim:" + filepath.Join(t.TempDir(), "sim"), "swtpm:" + sw.Addr} {
		t.Run(strings.SplitN(ks, ":", 2)[0], func(t *testing.T) {
			id := "cli-" + strings.SplitN(ks, ":", 2)[0]
			dir := filepath.Join(t.TempDir(), "id")
			tokFile := filepath.Join(t.TempDir(), "token")
			os.WriteFile(tokFile, []byte(env.Token(t, id, "", time.Hour)+"\n"), 0o600)
			out, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", id, "--token-file", tokFile, "--keystore", ks, "--out", dir)
			if code != 0 || !strings.Contains(out, "enrolled "+id) {
				t.Fatalf("enroll: %d %s %s", code, out, errs)
			}
			cfg, err := device.ReadConfig(dir)
			if err != nil || cfg.DeviceID != id || cfg.EST != env.URL {
				t.Fatalf("identity.json = %+v, %v", cfg, err)
			}
			for _, args := range [][]string{{"renew", "--identity", dir}, {"renew", "--identity", dir, "--rekey"}} {
				out, errs, code := devsim(t, args...)
				if code != 0 || !strings.Contains(out, "renewed "+id) {
					t.Fatalf("%v: %d %s %s", args, code, out, errs)
				}
			}
		})
	}
}

func TestEnrollCLIErrors(t *testing.T) {
	env := esttest.Start(t, nil)
	root := filepath.Join(env.Dir, ca.RootCertFile)
	dir := filepath.Join(t.TempDir(), "id")
	cases := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"enroll", "--est", env.URL, "--ca", root, "--device", "d", "--token", "wrong", "--out", dir}, 1, "token refused: registry: unknown device or wrong token"},
		{[]string{"enroll", "--est", env.URL, "--ca", root, "--device", "a/b", "--token", "x", "--out", dir}, 1, "invalid device ID"},
		{[]string{"enroll", "--est", env.URL, "--ca", root, "--device", "d", "--token", "x", "--keystore", "pkcs11", "--out", dir}, 1, "accepted forms"},
		{[]string{"enroll", "--est", env.URL, "--ca", "/nonexistent.crt", "--device", "d", "--token", "x", "--out", dir}, 1, "no such file"},
		{[]string{"enroll", "--est", env.URL, "--device", "d", "--out", dir}, 2, "required"},
		{[]string{"renew", "--identity", filepath.Join(t.TempDir(), "none")}, 1, "no identity"},
	}
	for _, c := range cases {
		_, errs, code := devsim(t, c.args...)
		if code != c.code || !strings.Contains(errs, c.msg) {
			t.Errorf("devsim %v: exit %d %q, want %d with %q", c.args, code, errs, c.code, c.msg)
		}
	}
}

// enroll --keystore mem is refused before the token is spent: the key would
// vanish at exit, leaving an identity nobody can use.
func TestEnrollRefusesMemKeystore(t *testing.T) {
	env := esttest.Start(t, nil)
	root := filepath.Join(env.Dir, ca.RootCertFile)
	tokFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokFile, []byte(env.Token(t, "dev-1", "", time.Hour)), 0o600)
	dir := filepath.Join(t.TempDir(), "id")
	_, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", "dev-1", "--token-file", tokFile, "--keystore", "mem", "--out", dir)
	if code != 2 || !strings.Contains(errs, "vanish") {
		t.Fatalf("enroll --keystore mem: exit %d %q, want 2 saying the key would vanish", code, errs)
	}
	// the token is still good
	if out, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", "dev-1", "--token-file", tokFile, "--out", dir); code != 0 {
		t.Fatalf("enroll with the same token afterwards: %d %s %s", code, out, errs)
	}
}

// A retried enrollment that finds a key of another algorithm than --alg
// (left by an attempt that failed) says so, naming --alg and the key,
// instead of silently reusing it.
func TestEnrollKeyOfAnotherAlg(t *testing.T) {
	env := esttest.Start(t, nil)
	root := filepath.Join(env.Dir, ca.RootCertFile)
	dir := filepath.Join(t.TempDir(), "id")
	// an attempt with a wrong token leaves a P-256 key behind
	if _, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", "dev-1", "--token", "wrong", "--out", dir); code != 1 {
		t.Fatalf("enroll with a wrong token: %d %q", code, errs)
	}
	tokFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokFile, []byte(env.Token(t, "dev-1", "", time.Hour)), 0o600)
	_, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", "dev-1", "--token-file", tokFile, "--alg", "rsa-2048", "--out", dir)
	if code != 1 || !strings.Contains(errs, "--alg rsa-2048") || !strings.Contains(errs, `key "device"`) || !strings.Contains(errs, "ecdsa-p256") {
		t.Fatalf("enroll --alg rsa-2048 over a P-256 key: exit %d %q, want an error naming --alg, the key and its algorithm", code, errs)
	}
	// the same algorithm reuses the key, with the token still unspent
	if out, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", root, "--device", "dev-1", "--token-file", tokFile, "--out", dir); code != 0 {
		t.Fatalf("enroll with the key's algorithm: %d %s %s", code, out, errs)
	}
}
