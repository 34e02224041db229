package keystores

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// Every URI form opens its backend, and a key made through it signs.
func TestOpen(t *testing.T) {
	sw := swtpmtest.Start(t)
	base := t.TempDir()
	for _, uri := range []string{"file", "file:" + filepath.Join(base, "keys"), "mem", "swtpm:" + sw.Addr, "tpmsim:" + filepath.Join(base, "sim")} {
		t.Run(uri, func(t *testing.T) {
			u, err := keystore.ParseURI(uri)
			if err != nil {
				t.Fatal(err)
			}
			id := filepath.Join(t.TempDir(), "identity")
			s, err := Open(t.Context(), u, id)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			signer, err := s.Generate(t.Context(), "device", "")
			if err != nil {
				t.Fatal(err)
			}
			keystoretest.CheckSigns(t, signer)
			switch u.Kind {
			case keystore.KindFile:
				want := filepath.Join(id, "device.key")
				if u.Path != "" {
					want = filepath.Join(u.Path, "device.key")
				}
				if _, err := os.Stat(want); err != nil {
					t.Errorf("key file: %v", err)
				}
			case keystore.KindSWTPM, keystore.KindTPMSim:
				if _, err := os.Stat(filepath.Join(id, "device.tpmkey")); err != nil {
					t.Errorf("key blob: %v", err)
				}
			}
		})
	}
}

func TestOpenNoTPM(t *testing.T) {
	u, _ := keystore.ParseURI("tpm:/dev/tpm-missing")
	_, err := Open(t.Context(), u, filepath.Join(t.TempDir(), "id"))
	if !errors.Is(err, tpm.ErrNoDevice) {
		t.Fatalf("Open(tpm:/dev/tpm-missing) = %v, want ErrNoDevice", err)
	}
}

// A binary built without cgo says that tpmsim is unavailable and why.
func TestNoCgoSaysTPMSimUnavailable(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds a test binary with CGO_ENABLED=0 (-short)")
	}
	out := runNoCgo(t, "TestHelperOpenSim")
	if !strings.Contains(out, "tpmsim: unavailable") || !strings.Contains(out, "CGO_ENABLED=0") {
		t.Fatalf("no-cgo tpmsim error does not explain itself:\n%s", out)
	}
}

// TestHelperOpenSim prints what opening tpmsim does in this binary.
func TestHelperOpenSim(t *testing.T) {
	u, _ := keystore.ParseURI("tpmsim:" + t.TempDir())
	s, err := Open(t.Context(), u, filepath.Join(t.TempDir(), "id"))
	if err == nil {
		s.Close()
		t.Log("tpmsim: available")
		return
	}
	t.Log(err)
}
