package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// The whole flow black-box: swtpm manufactured by swtpm_setup
// --create-ek-cert, `broker serve --tpm-ca` trusting swtpm's local CA, a
// token requiring attestation, `devsim enroll --attest --keystore
// swtpm:...`; openssl shows the attested marker. A software key with such
// a token is refused.
func TestAttestedEnrollAgainstBrokerServe(t *testing.T) {
	openssl := testtool.Require(t, "openssl")
	sw := swtpmtest.StartManufactured(t)
	bin := buildBroker(t)
	data := filepath.Join(t.TempDir(), "data")
	if out, err := exec.Command(bin, "init", "--data", data).CombinedOutput(); err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	token := func(id string) string {
		t.Helper()
		out, err := exec.Command(bin, "token", "--data", data, "--device", id, "--attest", "required").Output()
		if err != nil {
			t.Fatalf("token %s: %v", id, err)
		}
		f := filepath.Join(t.TempDir(), id+".token")
		os.WriteFile(f, out, 0o600)
		return f
	}
	tpmTok, softTok := token("tpm-dev-1"), token("soft-dev-1")
	_, est, _ := serveBroker(t, bin, data, "--tpm-ca", sw.CADir)
	root := filepath.Join(data, "ca", "root.crt")

	dir := filepath.Join(t.TempDir(), "tpm-id")
	out, errs, code := devsim(t, "enroll", "--est", "https://"+est, "--ca", root, "--device", "tpm-dev-1", "--token-file", tpmTok,
		"--keystore", "swtpm:"+sw.Addr, "--out", dir, "--attest")
	if code != 0 || !strings.Contains(out, "attested:") {
		t.Fatalf("devsim enroll --attest: %d\n%s\n%s", code, out, errs)
	}
	text, err := exec.Command(openssl, "x509", "-in", filepath.Join(dir, "device.crt"), "-noout", "-text").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, text)
	}
	for _, want := range []string{"X509v3 Certificate Policies", "Policy: 2.23.133.11.1.1", "Policy: 2.23.133.11.1.2", "Subject: CN = tpm-dev-1"} {
		if !strings.Contains(string(text), want) {
			t.Fatalf("openssl x509 -text lacks %q:\n%s", want, text)
		}
	}
	devices, err := exec.Command(bin, "devices", "--data", data, "--json").CombinedOutput()
	if err != nil || !strings.Contains(string(devices), `"ek_sha256"`) {
		t.Fatalf("broker devices: %v\n%s", err, devices)
	}

	out, errs, code = devsim(t, "enroll", "--est", "https://"+est, "--ca", root, "--device", "soft-dev-1", "--token-file", softTok,
		"--keystore", "file", "--out", filepath.Join(t.TempDir(), "soft-id"))
	if code == 0 || !strings.Contains(errs, "403") || !strings.Contains(errs, "requires TPM key attestation") {
		t.Fatalf("software key with an attestation-required token: %d\n%s\n%s", code, out, errs)
	}
	_, errs, code = devsim(t, "enroll", "--est", "https://"+est, "--ca", root, "--device", "soft-dev-1", "--token-file", softTok,
		"--keystore", "file", "--out", filepath.Join(t.TempDir(), "soft-id2"), "--attest")
	if code == 0 || !strings.Contains(errs, "--attest needs a TPM keystore") {
		t.Fatalf("--attest with a file keystore: %d %s", code, errs)
	}
}
