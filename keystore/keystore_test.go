package keystore_test

import (
	"context"
	"crypto"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

func newFile(t *testing.T, dir string) *keystore.FileStore {
	t.Helper()
	s, err := keystore.NewFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestFileConformance(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Store {
		return newFile(t, filepath.Join(t.TempDir(), "keys"))
	}, keystoretest.Config{
		Reopen: func(t *testing.T, s keystore.Store) keystore.Store {
			fs := s.(*keystore.FileStore)
			fs.Close()
			return newFile(t, fs.Dir())
		},
	})
}

func TestMemoryConformance(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return keystore.NewMemory() }, keystoretest.Config{})
}

func TestFileModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	s := newFile(t, dir)
	if _, err := s.Generate(t.Context(), "device", ""); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{dir: 0o700, s.Path("device"): 0o600} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s mode = %04o, want %04o", path, got, want)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("key directory holds %d entries, want only device.key (temporary files left behind?)", len(entries))
	}
	data, _ := os.ReadFile(s.Path("device"))
	if !strings.HasPrefix(string(data), "-----BEGIN PRIVATE KEY-----") {
		t.Errorf("key file is not PKCS#8 PEM: %.30q", data)
	}
}

func TestFileWorldReadableRefused(t *testing.T) {
	s := newFile(t, filepath.Join(t.TempDir(), "keys"))
	if _, err := s.Generate(t.Context(), "device", ""); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604} {
		if err := os.Chmod(s.Path("device"), mode); err != nil {
			t.Fatal(err)
		}
		_, err := s.Signer(t.Context(), "device")
		if !errors.Is(err, keystore.ErrInsecurePermissions) {
			t.Fatalf("mode %04o: Signer = %v, want ErrInsecurePermissions", mode, err)
		}
		if msg := err.Error(); !strings.Contains(msg, s.Path("device")) || !strings.Contains(msg, "chmod 600") {
			t.Errorf("error does not name the file and the fix: %v", err)
		}
	}
}

func TestFileInsecureDirRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := keystore.NewFile(dir)
	if !errors.Is(err, keystore.ErrInsecurePermissions) || !strings.Contains(err.Error(), "chmod 700") {
		t.Fatalf("NewFile(0755 dir) = %v, want ErrInsecurePermissions naming the fix", err)
	}
}

func TestFileCorrupt(t *testing.T) {
	s := newFile(t, filepath.Join(t.TempDir(), "keys"))
	cases := map[string]string{
		"empty":     "",
		"garbage":   "not a key\n",
		"wrongtype": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
		"badder":    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
	}
	for name, content := range cases {
		if err := os.WriteFile(s.Path(name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := s.Signer(t.Context(), name)
		if !errors.Is(err, keystore.ErrCorrupt) {
			t.Errorf("%s: Signer = %v, want ErrCorrupt", name, err)
		} else if !strings.Contains(err.Error(), s.Path(name)) {
			t.Errorf("%s: error does not name the file: %v", name, err)
		}
	}
}

// Concurrent Generate calls for one name: exactly one wins, the others get
// ErrExists, and the stored key is the winner's.
func TestFileGenerateRace(t *testing.T) {
	s := newFile(t, filepath.Join(t.TempDir(), "keys"))
	var wins atomic.Int32
	var wg sync.WaitGroup
	pubs := make(chan any, 8)
	for range 8 {
		wg.Go(func() {
			signer, err := s.Generate(t.Context(), "race", "")
			switch {
			case err == nil:
				wins.Add(1)
				pubs <- signer.Public()
			case !errors.Is(err, keystore.ErrExists):
				t.Errorf("Generate: %v", err)
			}
		})
	}
	wg.Wait()
	close(pubs)
	if wins.Load() != 1 {
		t.Fatalf("%d Generate calls succeeded, want 1", wins.Load())
	}
	kept, err := s.Signer(t.Context(), "race")
	if err != nil {
		t.Fatal(err)
	}
	if !kept.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(<-pubs) {
		t.Fatal("stored key is not the winner's")
	}
}

func TestSignerHidesKey(t *testing.T) {
	for name, s := range map[string]keystore.Store{"file": newFile(t, filepath.Join(t.TempDir(), "k")), "mem": keystore.NewMemory()} {
		signer, err := s.Generate(context.Background(), "k", "")
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := signer.(interface{ Equal(crypto.PublicKey) bool }); ok {
			t.Errorf("%s: signer %T exposes the private key type", name, signer)
		}
	}
}

func TestParseURI(t *testing.T) {
	good := map[string]keystore.URI{
		"file":                 {Kind: "file"},
		"file:/var/lib/k":      {Kind: "file", Path: "/var/lib/k"},
		"mem":                  {Kind: "mem"},
		"tpm":                  {Kind: "tpm", Path: "/dev/tpmrm0"},
		"tpm:/dev/tpm0":        {Kind: "tpm", Path: "/dev/tpm0"},
		"swtpm:127.0.0.1:2321": {Kind: "swtpm", Addr: "127.0.0.1:2321"},
		"swtpm:[::1]:2321":     {Kind: "swtpm", Addr: "[::1]:2321"},
		"tpmsim:sim":           {Kind: "tpmsim", Path: "sim"},
	}
	for in, want := range good {
		got, err := keystore.ParseURI(in)
		if err != nil || got != want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", in, got, err, want)
			continue
		}
		if back, _ := keystore.ParseURI(got.String()); back != got {
			t.Errorf("String() of %q = %q does not round-trip", in, got.String())
		}
	}
	for _, in := range []string{"", "pkcs11", "file:", "mem:x", "tpm:tpm0", "tpm:/etc/passwd", "tpm:/dev/../etc/x", "swtpm", "swtpm:host", "swtpm::2321", "tpmsim", "tpmsim:"} {
		_, err := keystore.ParseURI(in)
		if !errors.Is(err, keystore.ErrBadURI) {
			t.Errorf("ParseURI(%q) = %v, want ErrBadURI", in, err)
			continue
		}
		if !strings.Contains(err.Error(), keystore.URIForms) {
			t.Errorf("ParseURI(%q) error does not list the accepted forms: %v", in, err)
		}
	}
}
