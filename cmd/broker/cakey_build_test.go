package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A broker built with CGO_ENABLED=0 answers a pkcs11: issuing key with
// the cause and the fix, and writes no CA.
func TestInitIssuingKeyNoCgo(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "broker")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build: %v\n%s", err, out)
	}
	data := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(bin, "init", "--data", data, "--issuing-key-uri", "pkcs11:token=ca?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:MQTLS_CA_PIN")
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("init: %v, want exit 1\n%s", err, out)
	}
	for _, want := range []string{"issuing CA key pkcs11:token=ca", "pkcs11: unavailable in this build", "run a broker built with cgo"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(filepath.Join(data, "ca")); !errors.Is(err, os.ErrNotExist) {
		t.Error("a refused init left ca/ behind")
	}
}
