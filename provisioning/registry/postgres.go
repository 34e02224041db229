package registry

import (
	"context"
	"database/sql"
	"fmt"
	"time"
)

// Postgres is the registry in a PostgreSQL database, the one several
// broker nodes share; package registry/postgres opens it through pgx (kept
// apart so that programs using only SQLite do not build pgx). Revocations
// are announced with NOTIFY on the channel [NotifyChannel];
// [Postgres.Changes] listens to it.
type Postgres struct {
	sqlDB
	listen func(ctx context.Context, signal func())
}

var _ Registry = (*Postgres)(nil)

// NotifyChannel is the PostgreSQL channel a revocation or reinstatement
// is announced on (payload empty).
const NotifyChannel = "mqtls_registry"

// migrationLock is the advisory lock key migrations hold ("mqtls" in hex).
const migrationLock = 0x6d71746c73

var postgresDialect = &dialect{
	name: "postgres",
	migrations: [][]string{
		{`CREATE TABLE schema_version (version INTEGER NOT NULL)`,
			`INSERT INTO schema_version (version) VALUES (0)`,
			`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
			`CREATE TABLE devices (
				id          TEXT PRIMARY KEY,
				grp         TEXT NOT NULL DEFAULT '',
				status      TEXT NOT NULL DEFAULT 'pending',
				created_at  BIGINT NOT NULL,
				enrolled_at BIGINT
			)`,
			`CREATE TABLE tokens (
				hash       BYTEA PRIMARY KEY,
				device_id  TEXT NOT NULL REFERENCES devices(id),
				grp        TEXT NOT NULL DEFAULT '',
				created_at BIGINT NOT NULL,
				expires_at BIGINT NOT NULL,
				used_at    BIGINT,
				serial     TEXT,
				revoked_at BIGINT
			)`,
			`CREATE INDEX tokens_device ON tokens(device_id)`,
			`CREATE TABLE certificates (
				serial            TEXT PRIMARY KEY,
				device_id         TEXT NOT NULL REFERENCES devices(id),
				spki_sha256       TEXT NOT NULL,
				not_before        BIGINT NOT NULL,
				not_after         BIGINT NOT NULL,
				issued_at         BIGINT NOT NULL,
				status            TEXT NOT NULL DEFAULT 'valid',
				revoked_at        BIGINT,
				revocation_reason TEXT,
				der               BYTEA
			)`,
			`CREATE INDEX certificates_device ON certificates(device_id)`,
			`CREATE INDEX certificates_revoked ON certificates(revoked_at) WHERE revoked_at IS NOT NULL`,
			`CREATE TABLE audit (
				id        BIGSERIAL PRIMARY KEY,
				at        BIGINT NOT NULL,
				event     TEXT NOT NULL,
				device_id TEXT NOT NULL DEFAULT '',
				serial    TEXT NOT NULL DEFAULT '',
				remote    TEXT NOT NULL DEFAULT '',
				reason    TEXT NOT NULL DEFAULT '',
				count     INTEGER NOT NULL DEFAULT 1,
				last_at   BIGINT
			)`,
			`CREATE INDEX audit_aggregate ON audit(event, device_id, remote, reason, id)`,
			`CREATE INDEX audit_at ON audit(at)`,
			`CREATE INDEX devices_revoked ON devices(id) WHERE status = 'revoked'`},
		// 2: the devices a gateway speaks for.
		{`CREATE TABLE gateways (id TEXT PRIMARY KEY, children TEXT NOT NULL, updated_at BIGINT NOT NULL)`,
			`CREATE INDEX gateways_updated ON gateways(updated_at)`},
		// 3: TPM attestation (see the SQLite migration 4).
		{`ALTER TABLE tokens ADD COLUMN attest TEXT NOT NULL DEFAULT ''`,
			`ALTER TABLE certificates ADD COLUMN ek_sha256 TEXT`,
			`CREATE TABLE endorsement_keys (ek_sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL UNIQUE REFERENCES devices(id), issuer TEXT NOT NULL, serial TEXT NOT NULL, bound_at BIGINT NOT NULL)`},
		// 4: pending attestation challenges (see the SQLite migration 5).
		{`CREATE TABLE attest_challenges (id TEXT PRIMARY KEY, device_id TEXT NOT NULL, expires BIGINT NOT NULL, data BYTEA NOT NULL)`,
			`CREATE INDEX attest_challenges_device ON attest_challenges(device_id)`,
			`CREATE INDEX attest_challenges_expires ON attest_challenges(expires)`},
	},
	placeholder: dollarPlaceholders,
	forUpdate:   " FOR UPDATE",
	version: func(ctx context.Context, tx *sql.Tx) (int, error) {
		var exists bool
		if err := tx.QueryRowContext(ctx, `SELECT to_regclass('schema_version') IS NOT NULL`).Scan(&exists); err != nil {
			return 0, fmt.Errorf("registry: %w", err)
		}
		if !exists {
			return 0, fmt.Errorf("%w: no table schema_version", ErrNotInitialised)
		}
		var v int
		if err := tx.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v); err != nil {
			return 0, fmt.Errorf("%w: schema_version: %v", ErrCorrupt, err)
		}
		return v, nil
	},
	setVersion: func(ctx context.Context, tx *sql.Tx, v int) error {
		_, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = $1`, v)
		return err
	},
	lockMigrations: func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLock))
		return err
	},
	notify: func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `SELECT pg_notify($1, '')`, NotifyChannel)
		return err
	},
}

// NewPostgres opens the registry in the PostgreSQL database behind db (a
// database/sql handle on a PostgreSQL driver; name stands for it in errors,
// without a password), migrating an older schema. With rootSHA256 empty a
// database without the registry's schema is refused with ErrNotInitialised;
// otherwise the schema is created and bound to the root CA with that
// fingerprint, and a database bound to another CA is refused with
// ErrForeign. listen delivers the notifications on NotifyChannel until its
// connection fails or ctx ends. The registry owns db from here, also when
// NewPostgres fails.
func NewPostgres(ctx context.Context, db *sql.DB, name, rootSHA256 string, listen func(ctx context.Context, signal func())) (*Postgres, error) {
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	db.SetConnMaxIdleTime(5 * time.Minute)
	r := &Postgres{sqlDB: sqlDB{db: db, d: postgresDialect, name: name, now: time.Now}, listen: listen}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("registry: %s: %w", name, err)
	}
	if err := r.migrate(ctx, rootSHA256 != ""); err != nil {
		db.Close()
		return nil, err
	}
	if rootSHA256 != "" {
		if err := r.bind(ctx, rootSHA256); err != nil {
			r.Close()
			return nil, err
		}
	}
	return r, nil
}

// Changes returns a channel that receives a value soon after any process
// revokes or reinstates a device (PostgreSQL LISTEN/NOTIFY on a dedicated
// connection, reconnected after failures), and is closed when ctx ends.
// Signals may be coalesced and a reconnect sends one, so the receiver
// reloads what it needs; it should keep polling slowly as well.
func (r *Postgres) Changes(ctx context.Context) <-chan struct{} {
	return changes(func(signal func()) {
		backoff := 100 * time.Millisecond
		for {
			// listen returns when its connection fails (or ctx ends): the
			// receiver's slow poll covers the gap until it listens again.
			r.listen(ctx, signal)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, 5*time.Second)
		}
	})
}
