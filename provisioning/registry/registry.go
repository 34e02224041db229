// Package registry records the fleet: devices, enrollment tokens (hashes
// only), issued certificates with their revocation state, and an audit
// trail of enrollments and refusals. It is backed by an embedded SQLite
// file (pure Go driver, WAL mode, synchronous=FULL: a committed enrollment
// survives power loss) with versioned schema migrations; the SQL is kept
// portable so a PostgreSQL backend can implement the same methods.
//
// # Concurrency
//
// A Registry is safe for concurrent use, and several processes may open
// the same file (the broker serving, `broker revoke` from a shell): SQLite
// serialises writers and readers see committed state.
package registry

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	_ "modernc.org/sqlite" // database/sql driver "sqlite"

	"github.com/mqtls/mqtls/provisioning"
)

// Errors.
var (
	ErrNotFound     = errors.New("registry: not found")
	ErrTokenInvalid = errors.New("registry: unknown device or wrong token")
	ErrTokenUsed    = errors.New("registry: token already used")
	ErrTokenExpired = errors.New("registry: token expired")
)

// Certificate status values.
const (
	StatusValid   = "valid"
	StatusRevoked = "revoked"
)

// Registry is an open registry database.
type Registry struct {
	db   *sql.DB
	path string
	now  func() time.Time
}

// Open opens (creating and migrating it if needed) the registry at path.
func Open(path string) (*Registry, error) {
	// Create the file ourselves so it (and the -wal/-shm files SQLite
	// derives from it) is 0600: it holds token hashes and the audit trail.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	f.Close()
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("registry: open %s: %w", path, err)
	}
	r := &Registry{db: db, path: path, now: time.Now}
	if err := r.migrate(context.Background()); err != nil {
		db.Close()
		return nil, err
	}
	return r, nil
}

// Close closes the database.
func (r *Registry) Close() error { return r.db.Close() }

// migrations[i] moves the schema from version i to i+1. Append only.
var migrations = []string{
	`CREATE TABLE devices (
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
	);`,
}

func (r *Registry) migrate(ctx context.Context) error {
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("registry: migrate %s: %w", r.path, err)
	}
	defer tx.Rollback()
	var v int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return fmt.Errorf("registry: migrate %s: %w", r.path, err)
	}
	if v > len(migrations) {
		return fmt.Errorf("registry: %s has schema version %d, newer than this program's %d: upgrade the program", r.path, v, len(migrations))
	}
	for ; v < len(migrations); v++ {
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			return fmt.Errorf("registry: migration %d: %w", v+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", v+1)); err != nil {
			return fmt.Errorf("registry: migration %d: %w", v+1, err)
		}
	}
	return tx.Commit()
}

// Event is one audit record.
type Event struct {
	At       time.Time
	Event    string // enroll, enroll_refused, reenroll, reenroll_refused, token, revoke
	DeviceID string
	Serial   string
	Remote   string
	Reason   string
}

// Audit appends an event.
func (r *Registry) Audit(ctx context.Context, e Event) error {
	return audit(ctx, r.db, r.now(), e)
}

type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

func audit(ctx context.Context, db execer, now time.Time, e Event) error {
	if e.At.IsZero() {
		e.At = now
	}
	_, err := db.ExecContext(ctx, `INSERT INTO audit (at, event, device_id, serial, remote, reason) VALUES (?, ?, ?, ?, ?, ?)`,
		e.At.UnixMilli(), e.Event, e.DeviceID, e.Serial, e.Remote, e.Reason)
	if err != nil {
		return fmt.Errorf("registry: audit: %w", err)
	}
	return nil
}

// Events returns the audit trail after id afterID (0: from the start),
// oldest first, at most limit entries, with the last id returned.
func (r *Registry) Events(ctx context.Context, afterID int64, limit int) ([]Event, int64, error) {
	rows, err := r.db.QueryContext(ctx, `SELECT id, at, event, device_id, serial, remote, reason FROM audit WHERE id > ? ORDER BY id LIMIT ?`, afterID, limit)
	if err != nil {
		return nil, afterID, fmt.Errorf("registry: events: %w", err)
	}
	defer rows.Close()
	var out []Event
	last := afterID
	for rows.Next() {
		var e Event
		var at int64
		if err := rows.Scan(&last, &at, &e.Event, &e.DeviceID, &e.Serial, &e.Remote, &e.Reason); err != nil {
			return nil, afterID, fmt.Errorf("registry: events: %w", err)
		}
		e.At = time.UnixMilli(at)
		out = append(out, e)
	}
	return out, last, rows.Err()
}

// CreateToken mints a single-use enrollment token for deviceID that
// expires after ttl; group (may be empty) becomes the OU of the device's
// certificates. Only the token's SHA-256 is stored.
func (r *Registry) CreateToken(ctx context.Context, deviceID, group string, ttl time.Duration) (string, error) {
	toks, err := r.CreateTokens(ctx, []string{deviceID}, group, ttl)
	if err != nil {
		return "", err
	}
	return toks[0], nil
}

// CreateTokens is CreateToken for many devices in one transaction: all
// tokens are minted, or none.
func (r *Registry) CreateTokens(ctx context.Context, deviceIDs []string, group string, ttl time.Duration) ([]string, error) {
	for _, id := range deviceIDs {
		if err := provisioning.CheckDeviceID(id); err != nil {
			return nil, err
		}
	}
	if group != "" {
		if err := provisioning.CheckDeviceID(group); err != nil {
			return nil, fmt.Errorf("registry: group: %w", err)
		}
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("registry: token lifetime %v must be positive", ttl)
	}
	now := r.now()
	expires := now.Add(ttl)
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer tx.Rollback()
	tokens := make([]string, len(deviceIDs))
	for i, id := range deviceIDs {
		var raw [32]byte
		_, _ = rand.Read(raw[:]) // crypto/rand.Read never fails
		tokens[i] = base64.RawURLEncoding.EncodeToString(raw[:])
		hash := sha256.Sum256([]byte(tokens[i]))
		if _, err := tx.ExecContext(ctx, `INSERT INTO devices (id, grp, created_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING`,
			id, group, now.UnixMilli()); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO tokens (hash, device_id, grp, created_at, expires_at) VALUES (?, ?, ?, ?, ?)`,
			hash[:], id, group, now.UnixMilli(), expires.UnixMilli()); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		if err := audit(ctx, tx, now, Event{Event: "token", DeviceID: id, Reason: "expires " + expires.UTC().Format(time.RFC3339)}); err != nil {
			return nil, err
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return tokens, nil
}

// Grant is a checked, still unused token.
type Grant struct {
	DeviceID string
	Group    string
	hash     []byte
}

// CheckToken finds the token presented for deviceID, comparing hashes in
// constant time. It returns ErrTokenInvalid, ErrTokenUsed or
// ErrTokenExpired. It does not use the token up: Enrolled does.
func (r *Registry) CheckToken(ctx context.Context, deviceID, token string) (Grant, error) {
	presented := sha256.Sum256([]byte(token))
	rows, err := r.db.QueryContext(ctx, `SELECT hash, grp, expires_at, used_at FROM tokens WHERE device_id = ?`, deviceID)
	if err != nil {
		return Grant{}, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var hash []byte
		var g Grant
		var expires int64
		var used sql.NullInt64
		if err := rows.Scan(&hash, &g.Group, &expires, &used); err != nil {
			return Grant{}, fmt.Errorf("registry: %w", err)
		}
		if subtle.ConstantTimeCompare(hash, presented[:]) != 1 {
			continue
		}
		switch {
		case used.Valid:
			return Grant{}, fmt.Errorf("%w (at %s)", ErrTokenUsed, time.UnixMilli(used.Int64).UTC().Format(time.RFC3339))
		case r.now().UnixMilli() >= expires:
			return Grant{}, fmt.Errorf("%w (at %s)", ErrTokenExpired, time.UnixMilli(expires).UTC().Format(time.RFC3339))
		}
		g.DeviceID, g.hash = deviceID, hash
		return g, nil
	}
	if err := rows.Err(); err != nil {
		return Grant{}, fmt.Errorf("registry: %w", err)
	}
	return Grant{}, ErrTokenInvalid
}

// Cert is an issued certificate as the registry keeps it.
type Cert struct {
	Serial           string // lower-case hex
	DeviceID         string
	SPKISHA256       string // hex
	NotBefore        time.Time
	NotAfter         time.Time
	IssuedAt         time.Time
	Status           string
	RevokedAt        time.Time // zero unless revoked
	RevocationReason string
}

// Enrolled uses up the token of g and records cert, in one transaction
// with its audit event. A token used concurrently yields ErrTokenUsed and
// records nothing.
func (r *Registry) Enrolled(ctx context.Context, g Grant, cert Cert, remote string) error {
	now := r.now()
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	defer tx.Rollback()
	res, err := tx.ExecContext(ctx, `UPDATE tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL`, now.UnixMilli(), g.hash)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return ErrTokenUsed
	}
	if _, err := tx.ExecContext(ctx, `UPDATE devices SET status = 'enrolled', grp = ?, enrolled_at = ? WHERE id = ?`, g.Group, now.UnixMilli(), g.DeviceID); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := insertCert(ctx, tx, now, cert); err != nil {
		return err
	}
	if err := audit(ctx, tx, now, Event{Event: "enroll", DeviceID: cert.DeviceID, Serial: cert.Serial, Remote: remote}); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// Reenrolled records a renewed certificate with its audit event.
func (r *Registry) Reenrolled(ctx context.Context, cert Cert, remote string) error {
	now := r.now()
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	defer tx.Rollback()
	if err := insertCert(ctx, tx, now, cert); err != nil {
		return err
	}
	if err := audit(ctx, tx, now, Event{Event: "reenroll", DeviceID: cert.DeviceID, Serial: cert.Serial, Remote: remote}); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

func insertCert(ctx context.Context, tx *sql.Tx, now time.Time, c Cert) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO certificates (serial, device_id, spki_sha256, not_before, not_after, issued_at) VALUES (?, ?, ?, ?, ?, ?)`,
		c.Serial, c.DeviceID, c.SPKISHA256, c.NotBefore.UnixMilli(), c.NotAfter.UnixMilli(), now.UnixMilli())
	if err != nil {
		return fmt.Errorf("registry: record certificate %s: %w", c.Serial, err)
	}
	return nil
}

// Certificate returns the record of serial, or ErrNotFound.
func (r *Registry) Certificate(ctx context.Context, serial string) (Cert, error) {
	row := r.db.QueryRowContext(ctx, certColumns+`WHERE serial = ?`, serial)
	c, err := scanCert(row)
	if errors.Is(err, sql.ErrNoRows) {
		return Cert{}, fmt.Errorf("%w: certificate %s", ErrNotFound, serial)
	}
	return c, err
}

// Certificates returns every certificate of deviceID, newest first.
func (r *Registry) Certificates(ctx context.Context, deviceID string) ([]Cert, error) {
	return r.certs(ctx, `WHERE device_id = ? ORDER BY issued_at DESC`, deviceID)
}

const certColumns = `SELECT serial, device_id, spki_sha256, not_before, not_after, issued_at, status, revoked_at, revocation_reason FROM certificates `

func (r *Registry) certs(ctx context.Context, where string, args ...any) ([]Cert, error) {
	rows, err := r.db.QueryContext(ctx, certColumns+where, args...)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var out []Cert
	for rows.Next() {
		c, err := scanCert(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

type scanner interface{ Scan(dest ...any) error }

func scanCert(s scanner) (Cert, error) {
	var c Cert
	var nb, na, ia int64
	var ra sql.NullInt64
	var reason sql.NullString
	if err := s.Scan(&c.Serial, &c.DeviceID, &c.SPKISHA256, &nb, &na, &ia, &c.Status, &ra, &reason); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return Cert{}, err
		}
		return Cert{}, fmt.Errorf("registry: %w", err)
	}
	c.NotBefore, c.NotAfter, c.IssuedAt = time.UnixMilli(nb), time.UnixMilli(na), time.UnixMilli(ia)
	if ra.Valid {
		c.RevokedAt = time.UnixMilli(ra.Int64)
	}
	c.RevocationReason = reason.String
	return c, nil
}

// Revoke revokes every valid certificate of deviceID and returns how many.
// A device without certificates yields ErrNotFound.
func (r *Registry) Revoke(ctx context.Context, deviceID, reason string) (int, error) {
	now := r.now()
	tx, err := r.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	defer tx.Rollback()
	var exists int
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM devices WHERE id = ?`, deviceID).Scan(&exists); err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	if exists == 0 {
		return 0, fmt.Errorf("%w: device %q", ErrNotFound, deviceID)
	}
	res, err := tx.ExecContext(ctx, `UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE device_id = ? AND status = 'valid'`,
		now.UnixMilli(), reason, deviceID)
	if err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	n, _ := res.RowsAffected()
	if _, err := tx.ExecContext(ctx, `UPDATE devices SET status = 'revoked' WHERE id = ?`, deviceID); err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	if err := audit(ctx, tx, now, Event{Event: "revoke", DeviceID: deviceID, Reason: fmt.Sprintf("%s (%d certificates)", reason, n)}); err != nil {
		return 0, err
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	return int(n), nil
}

// RevokedSince returns the certificates revoked at or after t, oldest
// revocation first (for polling).
func (r *Registry) RevokedSince(ctx context.Context, t time.Time) ([]Cert, error) {
	return r.certs(ctx, `WHERE revoked_at >= ? ORDER BY revoked_at`, t.UnixMilli())
}

// Device is a registry entry.
type Device struct {
	ID           string    `json:"id"`
	Group        string    `json:"group,omitempty"`
	Status       string    `json:"status"` // pending, enrolled, revoked
	CreatedAt    time.Time `json:"created_at"`
	EnrolledAt   time.Time `json:"enrolled_at,omitzero"`
	Certificates int       `json:"certificates"`
	ValidUntil   time.Time `json:"valid_until,omitzero"` // newest valid certificate's expiry
}

// Device returns one device, or ErrNotFound.
func (r *Registry) Device(ctx context.Context, id string) (Device, error) {
	ds, err := r.devices(ctx, `WHERE d.id = ?`, id)
	if err != nil {
		return Device{}, err
	}
	if len(ds) == 0 {
		return Device{}, fmt.Errorf("%w: device %q", ErrNotFound, id)
	}
	return ds[0], nil
}

// Devices returns every device, sorted by ID.
func (r *Registry) Devices(ctx context.Context) ([]Device, error) { return r.devices(ctx, "") }

func (r *Registry) devices(ctx context.Context, where string, args ...any) ([]Device, error) {
	rows, err := r.db.QueryContext(ctx, `SELECT d.id, d.grp, d.status, d.created_at, d.enrolled_at,
		(SELECT COUNT(*) FROM certificates c WHERE c.device_id = d.id),
		(SELECT MAX(not_after) FROM certificates c WHERE c.device_id = d.id AND c.status = 'valid')
		FROM devices d `+where+` ORDER BY d.id`, args...)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var out []Device
	for rows.Next() {
		var d Device
		var created int64
		var enrolled, until sql.NullInt64
		if err := rows.Scan(&d.ID, &d.Group, &d.Status, &created, &enrolled, &d.Certificates, &until); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		d.CreatedAt = time.UnixMilli(created)
		if enrolled.Valid {
			d.EnrolledAt = time.UnixMilli(enrolled.Int64)
		}
		if until.Valid {
			d.ValidUntil = time.UnixMilli(until.Int64)
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

// RevokedDevices returns the IDs of the devices revoked now, sorted.
func (r *Registry) RevokedDevices(ctx context.Context) ([]string, error) {
	rows, err := r.db.QueryContext(ctx, `SELECT id FROM devices WHERE status = 'revoked' ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var ids []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}
