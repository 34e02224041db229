package keystores

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/keystore"
)

// A binary built without cgo says that pkcs11: is unavailable and why.
func TestNoCgoSaysPKCS11Unavailable(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds a test binary with CGO_ENABLED=0 (-short)")
	}
	bin := filepath.Join(t.TempDir(), "keystores.test")
	build := exec.Command("go", "test", "-c", "-o", bin, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "-test.run", "^TestHelperOpenPKCS11$", "-test.v").CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	for _, want := range []string{"pkcs11: unavailable in this build", "CGO_ENABLED=0", "ErrUnavailable=true"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("no-cgo pkcs11 error does not say %q:\n%s", want, out)
		}
	}
}

// TestHelperOpenPKCS11 prints what opening a pkcs11: URI does in this
// binary (the module does not exist: a cgo build says so).
func TestHelperOpenPKCS11(t *testing.T) {
	u, err := keystore.ParseURI("pkcs11:token=t?module-path=/nonexistent/p11.so&pin-source=env:MQTLS_HELPER_PIN")
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(t.Context(), u, filepath.Join(t.TempDir(), "id"))
	if err == nil {
		s.Close()
		t.Fatal("opened a token of a module that does not exist")
	}
	t.Logf("%v (ErrUnavailable=%v)", err, errors.Is(err, pkcs11.ErrUnavailable))
}
