package registry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"strings"
	"time"

	"modernc.org/sqlite" // database/sql driver "sqlite"
)

// SQLite is the embedded registry: one file (plus SQLite's -wal and -shm
// files), mode 0600.
type SQLite struct {
	sqlDB
}

var _ Registry = (*SQLite)(nil)

var sqliteDialect = &dialect{
	name: "sqlite",
	migrations: [][]string{
		{`CREATE TABLE devices (
			id          TEXT PRIMARY KEY,
			grp         TEXT NOT NULL DEFAULT '',
			status      TEXT NOT NULL DEFAULT 'pending',
			created_at  INTEGER NOT NULL,
			enrolled_at INTEGER
		);
		CREATE TABLE tokens (
			hash       BLOB PRIMARY KEY,
			device_id  TEXT NOT NULL REFERENCES devices(id),
			grp        TEXT NOT NULL DEFAULT '',
			created_at INTEGER NOT NULL,
			expires_at INTEGER NOT NULL,
			used_at    INTEGER
		);
		CREATE INDEX tokens_device ON tokens(device_id);
		CREATE TABLE certificates (
			serial            TEXT PRIMARY KEY,
			device_id         TEXT NOT NULL REFERENCES devices(id),
			spki_sha256       TEXT NOT NULL,
			not_before        INTEGER NOT NULL,
			not_after         INTEGER NOT NULL,
			issued_at         INTEGER NOT NULL,
			status            TEXT NOT NULL DEFAULT 'valid',
			revoked_at        INTEGER,
			revocation_reason TEXT
		);
		CREATE INDEX certificates_device ON certificates(device_id);
		CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL;
		CREATE TABLE audit (
			id        INTEGER PRIMARY KEY AUTOINCREMENT,
			at        INTEGER NOT NULL,
			event     TEXT NOT NULL,
			device_id TEXT NOT NULL DEFAULT '',
			serial    TEXT NOT NULL DEFAULT '',
			remote    TEXT NOT NULL DEFAULT '',
			reason    TEXT NOT NULL DEFAULT ''
		);`},
		// 2: CA binding, token → certificate (replay), burned tokens,
		// certificate DER, aggregated audit records.
		{`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
			`ALTER TABLE tokens ADD COLUMN serial TEXT`,
			`ALTER TABLE tokens ADD COLUMN revoked_at INTEGER`,
			`ALTER TABLE certificates ADD COLUMN der BLOB`,
			`ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1`,
			`ALTER TABLE audit ADD COLUMN last_at INTEGER`,
			`CREATE INDEX audit_aggregate ON audit(event, device_id, remote, reason, id)`,
			`CREATE INDEX audit_at ON audit(at)`},
		// 3: the devices a gateway speaks for.
		{`CREATE TABLE gateways (id TEXT PRIMARY KEY, children TEXT NOT NULL, updated_at INTEGER NOT NULL)`,
			`CREATE INDEX gateways_updated ON gateways(updated_at)`},
		// 4: TPM attestation: the policy of a token, the EK behind a
		// certificate, one EK per device and one device per EK.
		{`ALTER TABLE tokens ADD COLUMN attest TEXT NOT NULL DEFAULT ''`,
			`ALTER TABLE certificates ADD COLUMN ek_sha256 TEXT`,
			`CREATE TABLE endorsement_keys (ek_sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL UNIQUE REFERENCES devices(id), issuer TEXT NOT NULL, serial TEXT NOT NULL, bound_at INTEGER NOT NULL)`},
		// 5: pending attestation challenges, shared by the servers of a
		// registry.
		{`CREATE TABLE attest_challenges (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, expires INTEGER NOT NULL, data BLOB NOT NULL)`,
			`CREATE INDEX attest_challenges_device ON attest_challenges(device_id)`,
			`CREATE INDEX attest_challenges_expires ON attest_challenges(expires)`},
	},
	placeholder: func(q string) string { return q },
	oneWriter:   true,
	version: func(ctx context.Context, tx *sql.Tx) (int, error) {
		var v int
		if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
			return 0, fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		return v, nil
	},
	setVersion: func(ctx context.Context, tx *sql.Tx, v int) error {
		_, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v))
		return err
	},
	integrity: func(ctx context.Context, db *sql.DB) error {
		rows, err := db.QueryContext(ctx, "PRAGMA quick_check")
		if err != nil {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		defer rows.Close()
		var problems []string
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				return fmt.Errorf("%w: %v", ErrCorrupt, err)
			}
			if s != "ok" && len(problems) < 3 {
				problems = append(problems, s)
			}
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("%w: %v", ErrCorrupt, err)
		}
		if len(problems) > 0 {
			return fmt.Errorf("%w: %s", ErrCorrupt, strings.Join(problems, "; "))
		}
		return nil
	},
}

// CreateSQLite creates a new registry file at path (mode 0600; an existing
// file is refused with ErrExists) bound to the root CA whose certificate
// has SHA-256 fingerprint rootSHA256 (hex).
func CreateSQLite(ctx context.Context, path, rootSHA256 string) (*SQLite, error) {
	if rootSHA256 == "" {
		return nil, errors.New("registry: create: the root CA fingerprint is required")
	}
	// Create the file ourselves so it (and the -wal/-shm files SQLite
	// derives from it) is 0600: it holds token hashes and the audit trail.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %s", ErrExists, path)
	}
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	f.Close()
	r, err := openSQLite(ctx, path, true)
	if err == nil {
		err = r.bind(ctx, rootSHA256)
	}
	if err != nil {
		if r != nil {
			r.Close()
		}
		os.Remove(path)
		return nil, err
	}
	return r, nil
}

// OpenSQLite opens the existing registry at path, migrating an older
// schema. It never creates a file: a missing one is ErrMissing, a 0-byte
// one ErrEmpty, one that is not a registry ErrCorrupt or
// ErrNotInitialised. Servers then call Check.
func OpenSQLite(ctx context.Context, path string) (*SQLite, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s does not exist", ErrMissing, path)
	}
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrCorrupt, path)
	}
	if fi.Size() == 0 {
		return nil, fmt.Errorf("%w: %s", ErrEmpty, path)
	}
	return openSQLite(ctx, path, false)
}

func openSQLite(ctx context.Context, path string, create bool) (*SQLite, error) {
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	q.Set("mode", "rw") // never create the file
	db, err := sql.Open("sqlite", "file:"+(&url.URL{Path: path}).EscapedPath()+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("registry: open %s: %w", path, err)
	}
	r := &SQLite{sqlDB{db: db, d: sqliteDialect, name: path, now: time.Now}}
	if err := r.migrate(ctx, create); err != nil {
		db.Close()
		if !errors.Is(err, ErrNotInitialised) && !errors.Is(err, ErrNewerSchema) && isNotADatabase(err) {
			return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
		}
		return nil, err
	}
	return r, nil
}

// isNotADatabase reports SQLite's SQLITE_CORRUPT and SQLITE_NOTADB.
func isNotADatabase(err error) bool {
	var e *sqlite.Error
	if !errors.As(err, &e) {
		return false
	}
	const corrupt, notADB = 11, 26 // sqlite3.h primary result codes
	c := e.Code() & 0xff
	return c == corrupt || c == notADB
}

// ChangePoll is how often SQLite.Changes looks for commits by others.
const ChangePoll = 100 * time.Millisecond

// Changes returns a channel that receives a value soon (within
// ChangePoll) after another connection or process commits to the
// registry, and is closed when ctx ends. It asks SQLite's PRAGMA
// data_version on one connection, which changes exactly when someone
// else committed: the cheap cross-process signal SQLite has. Signals may
// be coalesced; one is sent at the start.
func (r *SQLite) Changes(ctx context.Context) <-chan struct{} {
	return changes(func(signal func()) {
		t := time.NewTicker(ChangePoll)
		defer t.Stop()
		var conn *sql.Conn
		defer func() {
			if conn != nil {
				conn.Close()
			}
		}()
		last := int64(-1)
		for {
			if conn == nil {
				conn, _ = r.db.Conn(ctx) // nil on failure: retried at the next tick
			}
			if conn != nil {
				var v int64
				if err := conn.QueryRowContext(ctx, "PRAGMA data_version").Scan(&v); err != nil {
					conn.Close()
					conn = nil
				} else if v != last {
					last = v
					signal()
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
}
