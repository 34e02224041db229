package registry_test

import (
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/mqtls/mqtls/provisioning/registry"
)

func open(t *testing.T, path string) *registry.Registry {
	t.Helper()
	r, err := registry.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestOpenModeAndWAL(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	open(t, path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("registry mode %04o, want 0600", fi.Mode().Perm())
	}
	db, _ := sql.Open("sqlite", path)
	defer db.Close()
	var mode string
	var version int
	db.QueryRow("PRAGMA journal_mode").Scan(&mode)
	db.QueryRow("PRAGMA user_version").Scan(&version)
	if mode != "wal" || version < 1 {
		t.Fatalf("journal_mode %q, user_version %d; want wal and a migrated schema", mode, version)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	open(t, path).Close()
	db, _ := sql.Open("sqlite", path)
	db.Exec("PRAGMA user_version = 999")
	db.Close()
	_, err := registry.Open(path)
	if err == nil || !strings.Contains(err.Error(), "newer than this program") {
		t.Fatalf("Open(newer schema) = %v", err)
	}
}

// Tokens are stored hashed: the database never holds the token itself.
func TestTokenStoredHashed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	r := open(t, path)
	tok, err := r.CreateToken(t.Context(), "dev", "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	for _, f := range []string{path, path + "-wal"} {
		data, _ := os.ReadFile(f)
		if strings.Contains(string(data), tok) {
			t.Fatalf("%s contains the token in clear", f)
		}
	}
}

func TestTokens(t *testing.T) {
	r := open(t, filepath.Join(t.TempDir(), "registry.db"))
	ctx := t.Context()
	tok, _ := r.CreateToken(ctx, "dev", "g", time.Hour)
	if _, err := r.CheckToken(ctx, "dev", tok+"x"); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("wrong token: %v", err)
	}
	if _, err := r.CheckToken(ctx, "other", tok); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("token of another device: %v", err)
	}
	g, err := r.CheckToken(ctx, "dev", tok)
	if err != nil || g.Group != "g" {
		t.Fatalf("CheckToken = %+v, %v", g, err)
	}
	cert := registry.Cert{Serial: "abc", DeviceID: "dev", SPKISHA256: "00", NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	if err := r.Enrolled(ctx, g, cert, "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Enrolled(ctx, g, registry.Cert{Serial: "abd", DeviceID: "dev", SPKISHA256: "00"}, ""); !errors.Is(err, registry.ErrTokenUsed) {
		t.Fatalf("second Enrolled with one grant = %v, want ErrTokenUsed", err)
	}
	if _, err := r.CheckToken(ctx, "dev", tok); !errors.Is(err, registry.ErrTokenUsed) {
		t.Errorf("used token: %v", err)
	}
	short, _ := r.CreateToken(ctx, "dev2", "", time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	if _, err := r.CheckToken(ctx, "dev2", short); !errors.Is(err, registry.ErrTokenExpired) {
		t.Errorf("expired token: %v", err)
	}
	if _, err := r.CreateToken(ctx, "dev3", "", 0); err == nil {
		t.Error("token with zero lifetime accepted")
	}
}

// A revocation by another process (another Registry on the same file) is
// seen at once.
func TestRevokeAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	a, b := open(t, path), open(t, path)
	ctx := t.Context()
	tok, _ := a.CreateToken(ctx, "dev", "", time.Hour)
	g, _ := a.CheckToken(ctx, "dev", tok)
	if err := a.Enrolled(ctx, g, registry.Cert{Serial: "s1", DeviceID: "dev", SPKISHA256: "00", NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}, ""); err != nil {
		t.Fatal(err)
	}
	since := time.Now().Add(-time.Second)
	if n, err := b.Revoke(ctx, "dev", "stolen"); err != nil || n != 1 {
		t.Fatalf("Revoke = %d, %v", n, err)
	}
	c, err := a.Certificate(ctx, "s1")
	if err != nil || c.Status != registry.StatusRevoked || c.RevocationReason != "stolen" {
		t.Fatalf("certificate after revoke = %+v, %v", c, err)
	}
	revoked, err := a.RevokedSince(ctx, since)
	if err != nil || len(revoked) != 1 || revoked[0].Serial != "s1" {
		t.Fatalf("RevokedSince = %+v, %v", revoked, err)
	}
	if _, err := b.Revoke(ctx, "ghost", ""); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Revoke(unknown) = %v", err)
	}
}
