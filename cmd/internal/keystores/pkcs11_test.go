package keystores

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/keystore"
)

// A binary built without cgo says that pkcs11: is unavailable and why.
func TestNoCgoSaysPKCS11Unavailable(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds a test binary with CGO_ENABLED=0 (-short)")
	}
	out := runNoCgo(t, "TestHelperOpenPKCS11")
	for _, want := range []string{"pkcs11: unavailable in this build", "CGO_ENABLED=0", "ErrUnavailable=true"} {
		if !strings.Contains(out, want) {
			t.Fatalf("no-cgo pkcs11 error does not say %q:\n%s", want, out)
		}
	}
}

var noCgo struct {
	sync.Once
	bin string
	err error
	out []byte
}

// runNoCgo runs the helper test of this package in a test binary built
// once with CGO_ENABLED=0 and returns its output.
func runNoCgo(t *testing.T, helper string) string {
	t.Helper()
	noCgo.Do(func() {
		dir, err := os.MkdirTemp("", "keystores-nocgo")
		if err != nil {
			noCgo.err = err
			return
		}
		noCgo.bin = filepath.Join(dir, "keystores.test")
		build := exec.Command("go", "test", "-c", "-o", noCgo.bin, ".")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		noCgo.out, noCgo.err = build.CombinedOutput()
	})
	if noCgo.err != nil {
		t.Fatalf("CGO_ENABLED=0 build: %v\n%s", noCgo.err, noCgo.out)
	}
	out, err := exec.Command(noCgo.bin, "-test.run", "^"+helper+"$", "-test.v").CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", helper, err, out)
	}
	return string(out)
}

func TestMain(m *testing.M) {
	code := m.Run()
	if noCgo.bin != "" {
		os.RemoveAll(filepath.Dir(noCgo.bin))
	}
	os.Exit(code)
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
