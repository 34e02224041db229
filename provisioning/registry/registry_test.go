package registry_test

import (
	"crypto/rand"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite"

	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/registry/postgres"
	"github.com/mqtls/mqtls/provisioning/registry/registrytest"
)

func create(t *testing.T, path string) *registry.SQLite {
	t.Helper()
	r, err := registry.CreateSQLite(t.Context(), path, registrytest.Root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func sqliteBackend() registrytest.Backend {
	return registrytest.Backend{Create: func(t *testing.T, root string) (registry.Registry, func(*testing.T) registry.Registry) {
		path := filepath.Join(t.TempDir(), "registry.db")
		r, err := registry.CreateSQLite(t.Context(), path, root)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r, func(t *testing.T) registry.Registry {
			o, err := registry.OpenSQLite(t.Context(), path)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { o.Close() })
			return o
		}
	}}
}

func TestConformanceSQLite(t *testing.T) { registrytest.Run(t, sqliteBackend()) }

// The same suite on a real PostgreSQL server (Debian's postgresql package).
func TestConformancePostgres(t *testing.T) {
	srv := pgtest.Start(t)
	registrytest.Run(t, registrytest.Backend{Create: func(t *testing.T, root string) (registry.Registry, func(*testing.T) registry.Registry) {
		url := srv.URL(srv.NewDatabase(t))
		r, err := postgres.Create(t.Context(), url, root)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r, func(t *testing.T) registry.Registry {
			o, err := postgres.Open(t.Context(), url)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { o.Close() })
			return o
		}
	}})
}

func TestPostgresOpenCreateAndSchema(t *testing.T) {
	srv := pgtest.Start(t)
	ctx := t.Context()
	db := srv.NewDatabase(t)
	// Open never creates the schema
	if _, err := postgres.Open(ctx, srv.URL(db)); !errors.Is(err, registry.ErrNotInitialised) {
		t.Fatalf("postgres.Open(empty database) = %v, want ErrNotInitialised", err)
	}
	// the password from an option, not the URL; a wrong one is refused
	// without showing it
	if _, err := postgres.Create(ctx, srv.URLNoPassword(db), registrytest.Root, postgres.WithPassword("wrong-secret")); err == nil || strings.Contains(err.Error(), "wrong-secret") {
		t.Fatalf("postgres.Create(wrong password) = %v", err)
	}
	r, err := postgres.Create(ctx, srv.URLNoPassword(db), registrytest.Root, postgres.WithPassword(srv.Password))
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	// or from PGPASSFILE
	pass := filepath.Join(t.TempDir(), "pgpass")
	host, port, _ := strings.Cut(srv.Addr, ":")
	os.WriteFile(pass, []byte(host+":"+port+":*:"+srv.User+":"+srv.Password+"\n"), 0o600)
	t.Setenv("PGPASSFILE", pass)
	if r, err = postgres.Open(ctx, srv.URLNoPassword(db)); err != nil {
		t.Fatalf("OpenPostgres with the password in PGPASSFILE: %v", err)
	}
	r.Close()
	// init again with the same CA is fine, with another refused
	if r, err = postgres.Create(ctx, srv.URL(db), registrytest.Root); err != nil {
		t.Fatal(err)
	}
	r.Close()
	if _, err := postgres.Create(ctx, srv.URL(db), "ff"+registrytest.Root[2:]); !errors.Is(err, registry.ErrForeign) {
		t.Fatalf("postgres.Create(another CA) = %v, want ErrForeign", err)
	}
	// a newer schema is refused with both versions
	conn, _ := sql.Open("pgx", srv.URL(db))
	defer conn.Close()
	if _, err := conn.Exec("UPDATE schema_version SET version = 999"); err != nil {
		t.Fatal(err)
	}
	_, err = postgres.Open(ctx, srv.URL(db))
	if !errors.Is(err, registry.ErrNewerSchema) || !strings.Contains(err.Error(), "999") || !strings.Contains(err.Error(), "up to 4") {
		t.Fatalf("postgres.Open(newer schema) = %v", err)
	}
}

func TestCreateModeAndWAL(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	create(t, path)
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
	if mode != "wal" || version != 5 {
		t.Fatalf("journal_mode %q, user_version %d; want wal and schema 5", mode, version)
	}
	if _, err := registry.CreateSQLite(t.Context(), path, registrytest.Root); !errors.Is(err, registry.ErrExists) {
		t.Fatalf("CreateSQLite over an existing registry = %v, want ErrExists", err)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	create(t, path).Close()
	db, _ := sql.Open("sqlite", path)
	db.Exec("PRAGMA user_version = 999")
	db.Close()
	_, err := registry.OpenSQLite(t.Context(), path)
	if !errors.Is(err, registry.ErrNewerSchema) || !strings.Contains(err.Error(), "999") {
		t.Fatalf("Open(newer schema) = %v", err)
	}
}

// Issue 9 item 5: opening never creates a registry, and a damaged one is
// refused by Open or Check.
func TestOpenRefusesUntrustworthy(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.db")
	if _, err := registry.OpenSQLite(ctx, missing); !errors.Is(err, registry.ErrMissing) {
		t.Errorf("Open(missing) = %v, want ErrMissing", err)
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) created %s", missing)
	}
	empty := filepath.Join(dir, "empty.db")
	os.WriteFile(empty, nil, 0o600)
	if _, err := registry.OpenSQLite(ctx, empty); !errors.Is(err, registry.ErrEmpty) {
		t.Errorf("Open(0 bytes) = %v, want ErrEmpty", err)
	}
	garbage := filepath.Join(dir, "garbage.db")
	junk := make([]byte, 8192)
	rand.Read(junk)
	os.WriteFile(garbage, junk, 0o600)
	if _, err := registry.OpenSQLite(ctx, garbage); !errors.Is(err, registry.ErrCorrupt) {
		t.Errorf("Open(random bytes) = %v, want ErrCorrupt", err)
	}
	// a plain SQLite database that is not a registry
	plain := filepath.Join(dir, "plain.db")
	db, _ := sql.Open("sqlite", plain)
	db.Exec("CREATE TABLE x (y)")
	db.Close()
	if _, err := registry.OpenSQLite(ctx, plain); !errors.Is(err, registry.ErrNotInitialised) {
		t.Errorf("Open(plain SQLite) = %v, want ErrNotInitialised", err)
	}
}

// Tokens are stored hashed: the database never holds the token itself.
func TestTokenStoredHashed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	r := create(t, path)
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

// A registry made by the previous release (schema 1) is migrated with its
// data, then refused as unbound until it is bound to its CA.
func TestMigrateSchema1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE devices (id TEXT PRIMARY KEY, grp TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT 'pending', created_at INTEGER NOT NULL, enrolled_at INTEGER)`,
		`CREATE TABLE tokens (hash BLOB PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id), grp TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, used_at INTEGER)`,
		`CREATE INDEX tokens_device ON tokens(device_id)`,
		`CREATE TABLE certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(id), spki_sha256 TEXT NOT NULL, not_before INTEGER NOT NULL, not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'valid', revoked_at INTEGER, revocation_reason TEXT)`,
		`CREATE INDEX certificates_device ON certificates(device_id)`,
		`CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL`,
		`CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, event TEXT NOT NULL, device_id TEXT NOT NULL DEFAULT '', serial TEXT NOT NULL DEFAULT '', remote TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '')`,
		`INSERT INTO devices (id, status, created_at) VALUES ('old-dev', 'revoked', 1)`,
		`INSERT INTO certificates (serial, device_id, spki_sha256, not_before, not_after, issued_at, status, revoked_at, revocation_reason) VALUES ('ab', 'old-dev', '00', 1, 2, 1, 'revoked', 5, 'lost')`,
		`PRAGMA user_version = 1`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	r, err := registry.OpenSQLite(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if c, err := r.Certificate(t.Context(), "ab"); err != nil || c.Status != registry.StatusRevoked || c.RevocationReason != "lost" {
		t.Fatalf("certificate after migration = %+v, %v", c, err)
	}
	if ids, _ := r.RevokedDevices(t.Context()); len(ids) != 1 || ids[0] != "old-dev" {
		t.Fatalf("RevokedDevices after migration = %v", ids)
	}
	if err := r.Check(t.Context(), registrytest.Root); !errors.Is(err, registry.ErrUnbound) {
		t.Fatalf("Check(unbound) = %v, want ErrUnbound", err)
	}
	if err := r.Bind(t.Context(), registrytest.Root); err != nil {
		t.Fatal(err)
	}
	if err := r.Check(t.Context(), registrytest.Root); err != nil {
		t.Fatalf("Check after Bind = %v", err)
	}
	if err := r.Bind(t.Context(), "ff"+registrytest.Root[2:]); !errors.Is(err, registry.ErrForeign) {
		t.Fatalf("Bind(another CA) = %v, want ErrForeign", err)
	}
}
