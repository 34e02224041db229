package registry

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// Postgres is the registry in a PostgreSQL database (through pgx), the one
// several broker nodes share. Revocations are announced with NOTIFY on
// the channel [NotifyChannel]; [Postgres.Changes] listens to it.
type Postgres struct {
	sqlDB
	conn *pgx.ConnConfig
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

// PostgresOption configures OpenPostgres and CreatePostgres.
type PostgresOption func(*pgx.ConnConfig)

// WithPassword sets the password (from a file the operator named), which
// then never appears in a URL or a log.
func WithPassword(password string) PostgresOption {
	return func(c *pgx.ConnConfig) { c.Password = password }
}

// CreatePostgres migrates the database at url (a libpq URL or DSN; the
// password may also come from PGPASSFILE) to the newest schema and binds
// it to the root CA with fingerprint rootSHA256; a database bound to
// another CA is refused with ErrForeign.
func CreatePostgres(ctx context.Context, url, rootSHA256 string, opts ...PostgresOption) (*Postgres, error) {
	if rootSHA256 == "" {
		return nil, errors.New("registry: create: the root CA fingerprint is required")
	}
	r, err := openPostgres(ctx, url, true, opts)
	if err != nil {
		return nil, err
	}
	if err := r.bind(ctx, rootSHA256); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// OpenPostgres opens the registry in the database at url, migrating an
// older schema; a database without the registry's schema is refused
// with ErrNotInitialised (it is never created here).
func OpenPostgres(ctx context.Context, url string, opts ...PostgresOption) (*Postgres, error) {
	return openPostgres(ctx, url, false, opts)
}

func openPostgres(ctx context.Context, url string, create bool, opts []PostgresOption) (*Postgres, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		// pgx's parse errors redact the password.
		return nil, fmt.Errorf("registry: PostgreSQL URL: %w", err)
	}
	for _, o := range opts {
		o(cfg)
	}
	name := fmt.Sprintf("postgres://%s@%s:%d/%s", cfg.User, cfg.Host, cfg.Port, cfg.Database)
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(32)
	db.SetConnMaxIdleTime(5 * time.Minute)
	r := &Postgres{sqlDB: sqlDB{db: db, d: postgresDialect, name: name, now: time.Now}, conn: cfg}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("registry: %s: %w", name, err)
	}
	if err := r.migrate(ctx, create); err != nil {
		db.Close()
		return nil, err
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

// listen signals every notification on NotifyChannel until its connection
// fails or ctx ends.
func (r *Postgres) listen(ctx context.Context, signal func()) {
	conn, err := pgx.ConnectConfig(ctx, r.conn.Copy())
	if err != nil {
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{NotifyChannel}.Sanitize()); err != nil {
		return
	}
	signal() // anything missed while not listening
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return
		}
		signal()
	}
}
