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
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/mqtls/mqtls/deviceid"
)

// dialect is what differs between the SQL databases.
type dialect struct {
	name       string
	migrations [][]string // migrations[i] moves the schema from version i to i+1; append only
	// placeholder rewrites the portable "?" placeholders.
	placeholder func(q string) string
	// forUpdate locks the selected rows until the transaction ends
	// (SQLite's immediate transactions hold the database write lock).
	forUpdate string
	// version reads the schema version; ErrNotInitialised when absent.
	version    func(ctx context.Context, tx *sql.Tx) (int, error)
	setVersion func(ctx context.Context, tx *sql.Tx, v int) error
	// lockMigrations serialises migrations across processes.
	lockMigrations func(ctx context.Context, tx *sql.Tx) error
	// integrity checks the storage itself (SQLite quick_check).
	integrity func(ctx context.Context, db *sql.DB) error
	// notify signals a change to listeners inside tx (PostgreSQL NOTIFY).
	notify func(ctx context.Context, tx *sql.Tx) error
	// oneWriter: the database runs one write transaction at a time.
	oneWriter bool
}

// sqlDB implements Registry over database/sql for a dialect.
type sqlDB struct {
	writeMu sync.Mutex // see begin
	db      *sql.DB
	d       *dialect
	name    string // path or redacted URL, for errors
	now     func() time.Time
}

func (r *sqlDB) q(query string) string { return r.d.placeholder(query) }

func (r *sqlDB) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	return tx.ExecContext(ctx, r.q(query), args...)
}

// Close closes the database.
func (r *sqlDB) Close() error { return r.db.Close() }

// Ping reports whether the database answers with the registry's data.
func (r *sqlDB) Ping(ctx context.Context) error {
	var n int
	if err := r.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM meta").Scan(&n); err != nil {
		return fmt.Errorf("registry: %s: %w", r.name, err)
	}
	return nil
}

// begin starts a write transaction; done rolls it back unless it was
// committed. With a dialect that serialises writers (SQLite), writers of
// this process queue on a mutex instead of sleeping in SQLite's busy
// handler, which wastes the time the lock is free.
func (r *sqlDB) begin(ctx context.Context) (tx *sql.Tx, done func(), err error) {
	if r.d.oneWriter {
		r.writeMu.Lock()
	}
	unlock := func() {
		if r.d.oneWriter {
			r.writeMu.Unlock()
		}
	}
	tx, err = r.db.BeginTx(ctx, nil)
	if err != nil {
		unlock()
		return nil, nil, fmt.Errorf("registry: %w", err)
	}
	return tx, func() { tx.Rollback(); unlock() }, nil
}

// migrate brings the schema to the newest version. With create false a
// registry without a schema is refused (ErrNotInitialised).
func (r *sqlDB) migrate(ctx context.Context, create bool) error {
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	if r.d.lockMigrations != nil {
		if err := r.d.lockMigrations(ctx, tx); err != nil {
			return fmt.Errorf("registry: migrate %s: %w", r.name, err)
		}
	}
	v, err := r.d.version(ctx, tx)
	if errors.Is(err, ErrNotInitialised) && create {
		v, err = 0, nil
	}
	if err != nil {
		return err
	}
	if v == 0 && !create {
		return fmt.Errorf("%w: %s has no schema", ErrNotInitialised, r.name)
	}
	if v > len(r.d.migrations) {
		return fmt.Errorf("%w: %s has schema version %d, this program knows up to %d: upgrade the program", ErrNewerSchema, r.name, v, len(r.d.migrations))
	}
	for ; v < len(r.d.migrations); v++ {
		for _, stmt := range r.d.migrations[v] {
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("registry: %s: migration %d: %w", r.name, v+1, err)
			}
		}
		if err := r.d.setVersion(ctx, tx, v+1); err != nil {
			return fmt.Errorf("registry: %s: migration %d: %w", r.name, v+1, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: migrate %s: %w", r.name, err)
	}
	return nil
}

const metaRoot = "root_sha256"

// Bind binds a registry made before registries were bound (ErrUnbound) to
// the root CA with fingerprint rootSHA256; a registry bound to another CA
// is refused with ErrForeign. Create binds new registries itself.
func (r *sqlDB) Bind(ctx context.Context, rootSHA256 string) error { return r.bind(ctx, rootSHA256) }

// bind records the root CA fingerprint, or checks it when one is there.
func (r *sqlDB) bind(ctx context.Context, rootSHA256 string) error {
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	if _, err := r.exec(ctx, tx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING`, metaRoot, rootSHA256); err != nil {
		return fmt.Errorf("registry: bind %s: %w", r.name, err)
	}
	var got string
	if err := tx.QueryRowContext(ctx, r.q(`SELECT value FROM meta WHERE key = ?`), metaRoot).Scan(&got); err != nil {
		return fmt.Errorf("registry: bind %s: %w", r.name, err)
	}
	if got != rootSHA256 {
		return fmt.Errorf("%w: %s is bound to the root CA with SHA-256 fingerprint %s, not %s", ErrForeign, r.name, got, rootSHA256)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: bind %s: %w", r.name, err)
	}
	return nil
}

// Check verifies integrity, schema version and the CA binding.
func (r *sqlDB) Check(ctx context.Context, rootSHA256 string) error {
	if r.d.integrity != nil {
		if err := r.d.integrity(ctx, r.db); err != nil {
			return err
		}
	}
	tx, err := r.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: r.d.name == "postgres"})
	if err != nil {
		return fmt.Errorf("registry: %s: %w", r.name, err)
	}
	defer tx.Rollback()
	v, err := r.d.version(ctx, tx)
	if err != nil {
		return err
	}
	if v != len(r.d.migrations) {
		return fmt.Errorf("%w: %s has schema version %d, want %d", ErrCorrupt, r.name, v, len(r.d.migrations))
	}
	var got string
	err = tx.QueryRowContext(ctx, r.q(`SELECT value FROM meta WHERE key = ?`), metaRoot).Scan(&got)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: %s", ErrUnbound, r.name)
	}
	if err != nil {
		return fmt.Errorf("%w: %s: %v", ErrCorrupt, r.name, err)
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(rootSHA256)) != 1 {
		return fmt.Errorf("%w: %s is bound to the root CA with SHA-256 fingerprint %s, the data directory's root is %s", ErrForeign, r.name, got, rootSHA256)
	}
	return nil
}

// Audit appends an event, or folds an aggregated one into its twin, in
// one transaction.
func (r *sqlDB) Audit(ctx context.Context, e Event) error {
	now := r.now()
	if e.At.IsZero() {
		e.At = now
	}
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	folded := false
	if e.Aggregate {
		res, err := r.exec(ctx, tx, `UPDATE audit SET count = count + 1, last_at = ? WHERE id = (
			SELECT MAX(id) FROM audit WHERE event = ? AND device_id = ? AND remote = ? AND reason = ? AND serial = ? AND at >= ?)`,
			e.At.UnixMilli(), e.Event, e.DeviceID, e.Remote, e.Reason, e.Serial, e.At.Add(-AggregateWindow).UnixMilli())
		if err != nil {
			return fmt.Errorf("registry: audit: %w", err)
		}
		n, _ := res.RowsAffected()
		folded = n > 0
	}
	if !folded {
		if err := r.auditTx(ctx, tx, now, e); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: audit: %w", err)
	}
	return nil
}

func (r *sqlDB) auditTx(ctx context.Context, tx *sql.Tx, now time.Time, e Event) error {
	if e.At.IsZero() {
		e.At = now
	}
	_, err := r.exec(ctx, tx, `INSERT INTO audit (at, event, device_id, serial, remote, reason) VALUES (?, ?, ?, ?, ?, ?)`,
		e.At.UnixMilli(), e.Event, e.DeviceID, e.Serial, e.Remote, e.Reason)
	if err != nil {
		return fmt.Errorf("registry: audit: %w", err)
	}
	return nil
}

// Events returns the audit trail after afterID.
func (r *sqlDB) Events(ctx context.Context, afterID int64, limit int) ([]Event, int64, error) {
	rows, err := r.db.QueryContext(ctx, r.q(`SELECT id, at, event, device_id, serial, remote, reason, count, last_at FROM audit WHERE id > ? ORDER BY id LIMIT ?`), afterID, limit)
	if err != nil {
		return nil, afterID, fmt.Errorf("registry: events: %w", err)
	}
	defer rows.Close()
	var out []Event
	last := afterID
	for rows.Next() {
		var e Event
		var at int64
		var lastAt sql.NullInt64
		if err := rows.Scan(&last, &at, &e.Event, &e.DeviceID, &e.Serial, &e.Remote, &e.Reason, &e.Count, &lastAt); err != nil {
			return nil, afterID, fmt.Errorf("registry: events: %w", err)
		}
		e.At, e.LastAt = time.UnixMilli(at), time.UnixMilli(at)
		if lastAt.Valid {
			e.LastAt = time.UnixMilli(lastAt.Int64)
		}
		out = append(out, e)
	}
	return out, last, rows.Err()
}

// PruneAudit enforces the audit retention.
func (r *sqlDB) PruneAudit(ctx context.Context, maxRows int, maxAge time.Duration) (int, error) {
	tx, done, err := r.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer done()
	var n int64
	if maxAge > 0 {
		res, err := r.exec(ctx, tx, `DELETE FROM audit WHERE at < ?`, r.now().Add(-maxAge).UnixMilli())
		if err != nil {
			return 0, fmt.Errorf("registry: prune audit: %w", err)
		}
		k, _ := res.RowsAffected()
		n += k
	}
	if maxRows > 0 {
		res, err := r.exec(ctx, tx, `DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET ?)`, maxRows)
		if err != nil {
			return 0, fmt.Errorf("registry: prune audit: %w", err)
		}
		k, _ := res.RowsAffected()
		n += k
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("registry: prune audit: %w", err)
	}
	return int(n), nil
}

// CreateToken mints one token.
func (r *sqlDB) CreateToken(ctx context.Context, deviceID, group string, ttl time.Duration) (string, error) {
	toks, err := r.CreateTokens(ctx, []string{deviceID}, group, ttl)
	if err != nil {
		return "", err
	}
	return toks[0], nil
}

// CreateTokens mints tokens for many devices in one transaction.
func (r *sqlDB) CreateTokens(ctx context.Context, deviceIDs []string, group string, ttl time.Duration) ([]string, error) {
	return r.CreateTokensWith(ctx, deviceIDs, TokenOptions{Group: group, TTL: ttl})
}

// CreateTokensWith mints tokens with options in one transaction.
func (r *sqlDB) CreateTokensWith(ctx context.Context, deviceIDs []string, o TokenOptions) ([]string, error) {
	group, ttl := o.Group, o.TTL
	switch o.Attest {
	case AttestDefault, AttestRequired, AttestOptional:
	default:
		return nil, fmt.Errorf("registry: attestation policy %q: want %q or %q", o.Attest, AttestRequired, AttestOptional)
	}
	for _, id := range deviceIDs {
		if err := deviceid.Check(id); err != nil {
			return nil, err
		}
	}
	if group != "" {
		if err := deviceid.Check(group); err != nil {
			return nil, fmt.Errorf("registry: group: %w", err)
		}
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("registry: token lifetime %v must be positive", ttl)
	}
	now := r.now()
	expires := now.Add(ttl)
	tx, done, err := r.begin(ctx)
	if err != nil {
		return nil, err
	}
	defer done()
	tokens := make([]string, len(deviceIDs))
	for i, id := range deviceIDs {
		var raw [32]byte
		_, _ = rand.Read(raw[:]) // crypto/rand.Read never fails
		tokens[i] = base64.RawURLEncoding.EncodeToString(raw[:])
		hash := sha256.Sum256([]byte(tokens[i]))
		if _, err := r.exec(ctx, tx, `INSERT INTO devices (id, grp, created_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING`,
			id, group, now.UnixMilli()); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		status, err := r.lockDevice(ctx, tx, id)
		if err != nil {
			return nil, err
		}
		if status == "revoked" {
			return nil, fmt.Errorf("%w: %q: no token is minted for a revoked device unless it is reinstated", ErrRevoked, id)
		}
		if _, err := r.exec(ctx, tx, `INSERT INTO tokens (hash, device_id, grp, created_at, expires_at, attest) VALUES (?, ?, ?, ?, ?, ?)`,
			hash[:], id, group, now.UnixMilli(), expires.UnixMilli(), o.Attest); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		if err := r.auditTx(ctx, tx, now, Event{Event: "token", DeviceID: id, Reason: "expires " + expires.UTC().Format(time.RFC3339)}); err != nil {
			return nil, err
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return tokens, nil
}

// lockDevice returns the device's status with its row locked until tx
// ends, or ErrNotFound.
func (r *sqlDB) lockDevice(ctx context.Context, tx *sql.Tx, id string) (string, error) {
	var status string
	err := tx.QueryRowContext(ctx, r.q(`SELECT status FROM devices WHERE id = ?`+r.d.forUpdate), id).Scan(&status)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("%w: device %q", ErrNotFound, id)
	}
	if err != nil {
		return "", fmt.Errorf("registry: %w", err)
	}
	return status, nil
}

// Reinstate lets a revoked device enroll again.
func (r *sqlDB) Reinstate(ctx context.Context, deviceID, reason string) error {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	status, err := r.lockDevice(ctx, tx, deviceID)
	if err != nil {
		return err
	}
	if status != "revoked" {
		return nil
	}
	if _, err := r.exec(ctx, tx, `UPDATE devices SET status = 'pending' WHERE id = ?`, deviceID); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := r.auditTx(ctx, tx, now, Event{Event: "reinstate", DeviceID: deviceID, Reason: reason}); err != nil {
		return err
	}
	if err := r.notify(ctx, tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

func (r *sqlDB) notify(ctx context.Context, tx *sql.Tx) error {
	if r.d.notify == nil {
		return nil
	}
	if err := r.d.notify(ctx, tx); err != nil {
		return fmt.Errorf("registry: notify: %w", err)
	}
	return nil
}

// tokenRow is a token found by its hash.
type tokenRow struct {
	hash      []byte
	group     string
	attest    string
	expires   int64
	used      sql.NullInt64
	serial    sql.NullString
	revokedAt sql.NullInt64
}

// findToken compares every token of deviceID with the presented one in
// constant time.
func (r *sqlDB) findToken(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, deviceID, token string) (tokenRow, error) {
	presented := sha256.Sum256([]byte(token))
	rows, err := q.QueryContext(ctx, r.q(`SELECT hash, grp, attest, expires_at, used_at, serial, revoked_at FROM tokens WHERE device_id = ?`), deviceID)
	if err != nil {
		return tokenRow{}, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var found tokenRow
	ok := false
	for rows.Next() {
		var t tokenRow
		if err := rows.Scan(&t.hash, &t.group, &t.attest, &t.expires, &t.used, &t.serial, &t.revokedAt); err != nil {
			return tokenRow{}, fmt.Errorf("registry: %w", err)
		}
		if subtle.ConstantTimeCompare(t.hash, presented[:]) == 1 {
			found, ok = t, true
		}
	}
	if err := rows.Err(); err != nil {
		return tokenRow{}, fmt.Errorf("registry: %w", err)
	}
	if !ok {
		return tokenRow{}, ErrTokenInvalid
	}
	return found, nil
}

func stamp(ms int64) string { return time.UnixMilli(ms).UTC().Format(time.RFC3339) }

// CheckToken checks a presented token.
func (r *sqlDB) CheckToken(ctx context.Context, deviceID, token string) (Grant, error) {
	t, err := r.findToken(ctx, r.db, deviceID, token)
	if err != nil {
		return Grant{}, err
	}
	switch {
	case t.revokedAt.Valid:
		return Grant{}, fmt.Errorf("%w (at %s)", ErrTokenRevoked, stamp(t.revokedAt.Int64))
	case t.used.Valid:
		return Grant{}, fmt.Errorf("%w (at %s)", ErrTokenUsed, stamp(t.used.Int64))
	case r.now().UnixMilli() >= t.expires:
		return Grant{}, fmt.Errorf("%w (at %s)", ErrTokenExpired, stamp(t.expires))
	}
	return Grant{DeviceID: deviceID, Group: t.group, Attest: t.attest, hash: t.hash}, nil
}

// Enrolled burns the token and records the certificate.
func (r *sqlDB) Enrolled(ctx context.Context, g Grant, cert Cert, remote string) error {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	status, err := r.lockDevice(ctx, tx, g.DeviceID)
	if err != nil {
		return err
	}
	if status == "revoked" {
		return fmt.Errorf("%w: %q", ErrRevoked, g.DeviceID)
	}
	if err := r.bindEK(ctx, tx, now, g.DeviceID, cert.EK); err != nil {
		return err
	}
	res, err := r.exec(ctx, tx, `UPDATE tokens SET used_at = ?, serial = ? WHERE hash = ? AND used_at IS NULL AND revoked_at IS NULL`, now.UnixMilli(), cert.Serial, g.hash)
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		return ErrTokenUsed
	}
	if _, err := r.exec(ctx, tx, `UPDATE devices SET status = 'enrolled', grp = ?, enrolled_at = ? WHERE id = ?`, g.Group, now.UnixMilli(), g.DeviceID); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := r.insertCert(ctx, tx, now, cert); err != nil {
		return err
	}
	e := Event{Event: "enroll", DeviceID: cert.DeviceID, Serial: cert.Serial, Remote: remote}
	if cert.EK.SHA256 != "" {
		e.Reason = fmt.Sprintf("TPM-attested: EK %s (certificate %s of %s)", cert.EK.SHA256, cert.EK.Serial, cert.EK.Issuer)
	}
	if err := r.auditTx(ctx, tx, now, e); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// Replay returns the certificate a used token bought for the same key.
func (r *sqlDB) Replay(ctx context.Context, deviceID, token, spkiSHA256, remote string) (Cert, error) {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return Cert{}, err
	}
	defer done()
	t, err := r.findToken(ctx, tx, deviceID, token)
	if err != nil {
		return Cert{}, err
	}
	switch {
	case t.revokedAt.Valid:
		return Cert{}, fmt.Errorf("%w (at %s)", ErrTokenRevoked, stamp(t.revokedAt.Int64))
	case !t.used.Valid:
		return Cert{}, fmt.Errorf("%w: token not used yet", ErrTokenInvalid)
	case now.UnixMilli() >= t.expires:
		return Cert{}, fmt.Errorf("%w (at %s)", ErrTokenExpired, stamp(t.expires))
	case !t.serial.Valid || t.serial.String == "":
		return Cert{}, fmt.Errorf("%w (at %s)", ErrTokenUsed, stamp(t.used.Int64))
	}
	c, err := scanCert(tx.QueryRowContext(ctx, r.q(certColumns+`WHERE serial = ?`), t.serial.String))
	if err != nil {
		return Cert{}, fmt.Errorf("registry: replay: %w", err)
	}
	switch {
	case subtle.ConstantTimeCompare([]byte(c.SPKISHA256), []byte(spkiSHA256)) != 1:
		return Cert{}, fmt.Errorf("%w (at %s)", ErrKeyMismatch, stamp(t.used.Int64))
	case c.Status == StatusRevoked:
		return Cert{}, fmt.Errorf("%w: certificate %s revoked at %s (%s)", ErrRevoked, c.Serial, c.RevokedAt.UTC().Format(time.RFC3339), c.RevocationReason)
	case len(c.DER) == 0:
		return Cert{}, fmt.Errorf("%w (at %s; the certificate predates replay support)", ErrTokenUsed, stamp(t.used.Int64))
	}
	if err := r.auditTx(ctx, tx, now, Event{Event: "enroll_replay", DeviceID: deviceID, Serial: c.Serial, Remote: remote, Reason: "same token and key: certificate sent again"}); err != nil {
		return Cert{}, err
	}
	if err := tx.Commit(); err != nil {
		return Cert{}, fmt.Errorf("registry: %w", err)
	}
	return c, nil
}

// Reenrolled records a renewed certificate after checking, in the same
// transaction, that neither the device nor the presented certificate is
// revoked.
func (r *sqlDB) Reenrolled(ctx context.Context, prevSerial string, cert Cert, remote string) error {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	status, err := r.lockDevice(ctx, tx, cert.DeviceID)
	if err != nil {
		return err
	}
	prev, err := scanCert(tx.QueryRowContext(ctx, r.q(certColumns+`WHERE serial = ?`), prevSerial))
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: certificate %s", ErrNotFound, prevSerial)
	}
	if err != nil {
		return err
	}
	switch {
	case prev.DeviceID != cert.DeviceID:
		return fmt.Errorf("%w: certificate %s of device %q", ErrNotFound, prevSerial, cert.DeviceID)
	case prev.Status == StatusRevoked:
		return fmt.Errorf("%w: certificate %s revoked at %s (%s)", ErrRevoked, prevSerial, prev.RevokedAt.UTC().Format(time.RFC3339), prev.RevocationReason)
	case status == "revoked":
		return fmt.Errorf("%w: %q", ErrRevoked, cert.DeviceID)
	}
	if err := r.insertCert(ctx, tx, now, cert); err != nil {
		return err
	}
	if err := r.auditTx(ctx, tx, now, Event{Event: "reenroll", DeviceID: cert.DeviceID, Serial: cert.Serial, Remote: remote, Reason: "renews " + prevSerial}); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// bindEK checks, in the enrollment's transaction, that ek and deviceID
// are bound to each other or to nothing, and binds them. Without ek, a
// device bound to an EK is refused.
func (r *sqlDB) bindEK(ctx context.Context, tx *sql.Tx, now time.Time, deviceID string, ek EK) error {
	var bound string
	err := tx.QueryRowContext(ctx, r.q(`SELECT ek_sha256 FROM endorsement_keys WHERE device_id = ?`), deviceID).Scan(&bound)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		bound = ""
	case err != nil:
		return fmt.Errorf("registry: %w", err)
	}
	if ek.SHA256 == "" {
		if bound != "" {
			return fmt.Errorf("%w: device %q is bound to the TPM with EK %s and enrolls only with attestation from it (broker ek release --device %s, if the TPM was replaced)", ErrEKBound, deviceID, bound, deviceID)
		}
		return nil
	}
	if bound != "" {
		if subtle.ConstantTimeCompare([]byte(bound), []byte(ek.SHA256)) == 1 {
			return nil
		}
		return fmt.Errorf("%w: device %q is bound to the TPM with EK %s, not this one (%s): a moved or cloned identity (broker ek release --device %s, if the TPM was replaced)", ErrEKBound, deviceID, bound, ek.SHA256, deviceID)
	}
	var other string
	err = tx.QueryRowContext(ctx, r.q(`SELECT device_id FROM endorsement_keys WHERE ek_sha256 = ?`), ek.SHA256).Scan(&other)
	switch {
	case err == nil:
		return fmt.Errorf("%w: the TPM with EK %s is bound to device %q, not %q (broker ek release --device %s, if the TPM moved)", ErrEKBound, ek.SHA256, other, deviceID, other)
	case !errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("registry: %w", err)
	}
	if _, err := r.exec(ctx, tx, `INSERT INTO endorsement_keys (ek_sha256, device_id, issuer, serial, bound_at) VALUES (?, ?, ?, ?, ?)`,
		ek.SHA256, deviceID, ek.Issuer, ek.Serial, now.UnixMilli()); err != nil {
		return fmt.Errorf("registry: bind EK: %w", err)
	}
	return nil
}

// ReleaseEK removes a device's EK binding.
func (r *sqlDB) ReleaseEK(ctx context.Context, deviceID, reason string) error {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	if _, err := r.lockDevice(ctx, tx, deviceID); err != nil {
		return err
	}
	var ek string
	err = tx.QueryRowContext(ctx, r.q(`SELECT ek_sha256 FROM endorsement_keys WHERE device_id = ?`), deviceID).Scan(&ek)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%w: device %q has no endorsement key bound", ErrNotFound, deviceID)
	}
	if err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if _, err := r.exec(ctx, tx, `DELETE FROM endorsement_keys WHERE device_id = ?`, deviceID); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := r.auditTx(ctx, tx, now, Event{Event: "ek_release", DeviceID: deviceID, Reason: fmt.Sprintf("EK %s released: %s", ek, reason)}); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// PutChallenge stores c, under the device's row lock so that the bound
// holds against concurrent requests.
func (r *sqlDB) PutChallenge(ctx context.Context, c Challenge, perDevice int) error {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	if _, err := r.lockDevice(ctx, tx, c.DeviceID); err != nil {
		return err
	}
	if _, err := r.exec(ctx, tx, `DELETE FROM attest_challenges WHERE expires <= ?`, now.UnixMilli()); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	var n int
	if err := tx.QueryRowContext(ctx, r.q(`SELECT COUNT(*) FROM attest_challenges WHERE device_id = ?`), c.DeviceID).Scan(&n); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if n >= perDevice {
		return fmt.Errorf("%w: %q has %d", ErrChallengeLimit, c.DeviceID, n)
	}
	if _, err := r.exec(ctx, tx, `INSERT INTO attest_challenges (id, device_id, expires, data) VALUES (?, ?, ?, ?)`,
		c.ID, c.DeviceID, c.Expires.UnixMilli(), c.Data); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// TakeChallenge deletes and returns a challenge in one statement: the
// database lets one DELETE only remove the row.
func (r *sqlDB) TakeChallenge(ctx context.Context, id string) (Challenge, error) {
	tx, done, err := r.begin(ctx)
	if err != nil {
		return Challenge{}, err
	}
	defer done()
	c := Challenge{ID: id}
	var expires int64
	err = tx.QueryRowContext(ctx, r.q(`DELETE FROM attest_challenges WHERE id = ? RETURNING device_id, expires, data`), id).Scan(&c.DeviceID, &expires, &c.Data)
	if errors.Is(err, sql.ErrNoRows) {
		return Challenge{}, fmt.Errorf("%w: challenge", ErrNotFound)
	}
	if err != nil {
		return Challenge{}, fmt.Errorf("registry: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return Challenge{}, fmt.Errorf("registry: %w", err)
	}
	c.Expires = time.UnixMilli(expires)
	return c, nil
}

func (r *sqlDB) insertCert(ctx context.Context, tx *sql.Tx, now time.Time, c Cert) error {
	var ek sql.NullString
	if c.EK.SHA256 != "" {
		ek = sql.NullString{String: c.EK.SHA256, Valid: true}
	}
	_, err := r.exec(ctx, tx, `INSERT INTO certificates (serial, device_id, spki_sha256, not_before, not_after, issued_at, der, ek_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
		c.Serial, c.DeviceID, c.SPKISHA256, c.NotBefore.UnixMilli(), c.NotAfter.UnixMilli(), now.UnixMilli(), c.DER, ek)
	if err != nil {
		return fmt.Errorf("registry: record certificate %s: %w", c.Serial, err)
	}
	return nil
}

// Certificate returns the record of serial.
func (r *sqlDB) Certificate(ctx context.Context, serial string) (Cert, error) {
	c, err := scanCert(r.db.QueryRowContext(ctx, r.q(certColumns+`WHERE serial = ?`), serial))
	if errors.Is(err, sql.ErrNoRows) {
		return Cert{}, fmt.Errorf("%w: certificate %s", ErrNotFound, serial)
	}
	return c, err
}

// Certificates returns every certificate of deviceID, newest first.
func (r *sqlDB) Certificates(ctx context.Context, deviceID string) ([]Cert, error) {
	return r.certs(ctx, `WHERE device_id = ? ORDER BY issued_at DESC, serial`, deviceID)
}

const certColumns = `SELECT serial, device_id, spki_sha256, not_before, not_after, issued_at, status, revoked_at, revocation_reason, der, ek_sha256 FROM certificates `

func (r *sqlDB) certs(ctx context.Context, where string, args ...any) ([]Cert, error) {
	rows, err := r.db.QueryContext(ctx, r.q(certColumns+where), args...)
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
	var reason, ek sql.NullString
	if err := s.Scan(&c.Serial, &c.DeviceID, &c.SPKISHA256, &nb, &na, &ia, &c.Status, &ra, &reason, &c.DER, &ek); err != nil {
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
	c.EK.SHA256 = ek.String
	return c, nil
}

// Revoke revokes a device: certificates, unused tokens, status.
func (r *sqlDB) Revoke(ctx context.Context, deviceID, reason string) (int, error) {
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return 0, err
	}
	defer done()
	if _, err := r.lockDevice(ctx, tx, deviceID); err != nil {
		return 0, err
	}
	if _, err := r.exec(ctx, tx, `UPDATE devices SET status = 'revoked' WHERE id = ?`, deviceID); err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	res, err := r.exec(ctx, tx, `UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE device_id = ? AND status = 'valid'`,
		now.UnixMilli(), reason, deviceID)
	if err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	n, _ := res.RowsAffected()
	res, err = r.exec(ctx, tx, `UPDATE tokens SET revoked_at = ? WHERE device_id = ? AND used_at IS NULL AND revoked_at IS NULL`, now.UnixMilli(), deviceID)
	if err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	burned, _ := res.RowsAffected()
	if err := r.auditTx(ctx, tx, now, Event{Event: "revoke", DeviceID: deviceID, Reason: fmt.Sprintf("%s (%d certificates, %d unused tokens burned)", reason, n, burned)}); err != nil {
		return 0, err
	}
	if err := r.notify(ctx, tx); err != nil {
		return 0, err
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("registry: %w", err)
	}
	return int(n), nil
}

// RevokedSince returns the certificates revoked at or after t.
func (r *sqlDB) RevokedSince(ctx context.Context, t time.Time) ([]Cert, error) {
	return r.certs(ctx, `WHERE revoked_at >= ? ORDER BY revoked_at`, t.UnixMilli())
}

// RevokedDevices returns the IDs of the devices revoked now.
func (r *sqlDB) RevokedDevices(ctx context.Context) ([]string, error) {
	rows, err := r.db.QueryContext(ctx, `SELECT id FROM devices WHERE status = 'revoked' ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		out = append(out, id)
	}
	return out, rows.Err()
}

// SetChildren replaces a gateway's children.
func (r *sqlDB) SetChildren(ctx context.Context, gateway string, children []string) error {
	set := map[string]bool{}
	for _, c := range children {
		if err := deviceid.Check(c); err != nil {
			return fmt.Errorf("registry: child %w", err)
		}
		if c == gateway {
			return fmt.Errorf("registry: gateway %q cannot be its own child", gateway)
		}
		set[c] = true
	}
	list := slices.Sorted(maps.Keys(set))
	now := r.now()
	tx, done, err := r.begin(ctx)
	if err != nil {
		return err
	}
	defer done()
	if _, err := r.lockDevice(ctx, tx, gateway); err != nil {
		return err
	}
	if _, err := r.exec(ctx, tx, `DELETE FROM gateways WHERE id = ?`, gateway); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if _, err := r.exec(ctx, tx, `INSERT INTO gateways (id, children, updated_at) VALUES (?, ?, ?)`, gateway, strings.Join(list, ","), now.UnixMilli()); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if err := r.auditTx(ctx, tx, now, Event{Event: "children", DeviceID: gateway, Reason: fmt.Sprintf("%d children", len(list))}); err != nil {
		return err
	}
	if err := r.notify(ctx, tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	return nil
}

// Children returns a gateway's children.
func (r *sqlDB) Children(ctx context.Context, gateway string) ([]string, error) {
	var list string
	err := r.db.QueryRowContext(ctx, r.q(`SELECT children FROM gateways WHERE id = ?`), gateway).Scan(&list)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	return splitChildren(list), nil
}

// GatewaysChangedSince returns the gateways set at or after t.
func (r *sqlDB) GatewaysChangedSince(ctx context.Context, t time.Time) (map[string][]string, error) {
	rows, err := r.db.QueryContext(ctx, r.q(`SELECT id, children FROM gateways WHERE updated_at >= ?`), t.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	out := map[string][]string{}
	for rows.Next() {
		var id, list string
		if err := rows.Scan(&id, &list); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		out[id] = splitChildren(list)
	}
	return out, rows.Err()
}

func splitChildren(list string) []string {
	if list == "" {
		return nil
	}
	return strings.Split(list, ",")
}

// Device returns one device.
func (r *sqlDB) Device(ctx context.Context, id string) (Device, error) {
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
func (r *sqlDB) Devices(ctx context.Context) ([]Device, error) { return r.devices(ctx, "") }

func (r *sqlDB) devices(ctx context.Context, where string, args ...any) ([]Device, error) {
	rows, err := r.db.QueryContext(ctx, r.q(`SELECT d.id, d.grp, d.status, d.created_at, d.enrolled_at,
		(SELECT COUNT(*) FROM certificates c WHERE c.device_id = d.id),
		(SELECT MAX(not_after) FROM certificates c WHERE c.device_id = d.id AND c.status = 'valid'),
		(SELECT ek_sha256 FROM endorsement_keys e WHERE e.device_id = d.id)
		FROM devices d `+where+` ORDER BY d.id`), args...)
	if err != nil {
		return nil, fmt.Errorf("registry: %w", err)
	}
	defer rows.Close()
	var out []Device
	for rows.Next() {
		var d Device
		var created int64
		var enrolled, until sql.NullInt64
		var ek sql.NullString
		if err := rows.Scan(&d.ID, &d.Group, &d.Status, &created, &enrolled, &d.Certificates, &until, &ek); err != nil {
			return nil, fmt.Errorf("registry: %w", err)
		}
		d.CreatedAt = time.UnixMilli(created)
		d.EK = ek.String
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

// changes runs watch in a goroutine, giving it a signal that never blocks
// (signals coalesce in a channel of one), and returns that channel, closed
// when watch returns.
func changes(watch func(signal func())) <-chan struct{} {
	ch := make(chan struct{}, 1)
	signal := func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	go func() {
		defer close(ch)
		watch(signal)
	}()
	return ch
}

// dollarPlaceholders rewrites ? to $1, $2, ... (the queries hold no ? in
// literals).
func dollarPlaceholders(q string) string {
	var b strings.Builder
	n := 0
	for _, c := range q {
		if c == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(c)
	}
	return b.String()
}
