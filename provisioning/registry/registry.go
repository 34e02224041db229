// Package registry records the fleet: devices, enrollment tokens (hashes
// only), issued certificates with their revocation state, and an audit
// trail of enrollments and refusals.
//
// One interface, [Registry], has two backends sharing the same SQL: an
// embedded SQLite file ([CreateSQLite], [OpenSQLite]; pure Go driver, WAL
// mode, synchronous=FULL so a committed enrollment survives power loss)
// and PostgreSQL ([NewPostgres]; package registry/postgres opens it with pgx), the
// database several broker nodes share. Both have versioned migrations and
// refuse a schema newer than the program's. The conformance suite in
// registrytest runs against both.
//
// Creating a registry is the job of `broker init` alone: Create binds the
// new registry to the root CA's certificate fingerprint; Open only opens
// an existing registry (it never creates a file or a schema), and
// [Registry.Check] tells a server whether the registry is intact and its
// own.
//
// # Invariants
//
//   - A token is used at most once; the certificate it buys is recorded in
//     the same transaction that burns it.
//   - Revoking a device burns its unused tokens, and no token can be
//     minted for a revoked device until it is reinstated (audited).
//   - A re-enrollment checks that the presented certificate and its device
//     are not revoked in the same transaction that records the new one.
//   - An enrollment retried with the same token and the same key gets the
//     certificate already issued (audited as a replay); another key is
//     refused.
//
// # Concurrency
//
// A Registry is safe for concurrent use, and several processes may open
// the same registry (the broker serving, `broker revoke` from a shell).
// Check-then-act sequences run in one transaction that first locks the
// device's row (SQLite: the database write lock).
package registry

import (
	"context"
	"errors"
	"time"
)

// Errors.
var (
	ErrNotFound     = errors.New("registry: not found")
	ErrTokenInvalid = errors.New("registry: unknown device or wrong token")
	ErrTokenUsed    = errors.New("registry: token already used")
	ErrTokenExpired = errors.New("registry: token expired")
	// ErrTokenRevoked: the token was burned when its device was revoked.
	ErrTokenRevoked = errors.New("registry: token burned by the device's revocation")
	// ErrKeyMismatch: a used token was presented again with another key.
	ErrKeyMismatch = errors.New("registry: token already used for another key")
	// ErrRevoked: the device (or the presented certificate) is revoked.
	ErrRevoked = errors.New("registry: device revoked")
	// ErrMissing, ErrEmpty, ErrCorrupt, ErrForeign, ErrNotInitialised:
	// the registry cannot be trusted; the error text names the fix.
	ErrMissing        = errors.New("registry: missing")
	ErrEmpty          = errors.New("registry: empty (0 bytes)")
	ErrCorrupt        = errors.New("registry: integrity check failed")
	ErrForeign        = errors.New("registry: belongs to another CA")
	ErrUnbound        = errors.New("registry: bound to no CA (made before registries were bound to their root CA)")
	ErrNotInitialised = errors.New("registry: not initialised")
	ErrExists         = errors.New("registry: already exists")
	ErrNewerSchema    = errors.New("registry: schema newer than this program")
	// ErrEKBound: the TPM's endorsement key is bound to another device,
	// or the device to another endorsement key (a moved or cloned
	// identity); ReleaseEK lifts the binding.
	ErrEKBound = errors.New("registry: endorsement key bound to another device")
	// ErrChallengeLimit: the device has too many pending attestation
	// challenges.
	ErrChallengeLimit = errors.New("registry: too many pending attestation challenges for the device")
)

// Attestation policies of a token.
const (
	AttestDefault  = ""         // the server's default
	AttestRequired = "required" // enrollment only with TPM attestation
	AttestOptional = "optional" // attestation when the device offers it
)

// Certificate status values.
const (
	StatusValid   = "valid"
	StatusRevoked = "revoked"
)

// Registry is the fleet's source of truth. Implementations: *SQLite,
// *Postgres. Methods return the errors named on them, wrapped with
// context; anything else is a storage failure.
type Registry interface {
	// Check verifies that the registry is intact (SQLite: quick_check;
	// both: schema version) and bound to the root CA whose certificate
	// has SHA-256 fingerprint rootSHA256 (hex). ErrCorrupt, ErrForeign,
	// ErrUnbound, ErrNotInitialised.
	Check(ctx context.Context, rootSHA256 string) error
	// Ping reports whether the registry answers (for readiness).
	Ping(ctx context.Context) error
	Close() error

	// CreateToken mints a single-use enrollment token for deviceID that
	// expires after ttl; group (may be empty) becomes the OU of the
	// device's certificates. Only the token's SHA-256 is stored.
	// ErrRevoked if the device is revoked (see Reinstate).
	CreateToken(ctx context.Context, deviceID, group string, ttl time.Duration) (string, error)
	// CreateTokens is CreateToken for many devices in one transaction:
	// all tokens are minted, or none.
	CreateTokens(ctx context.Context, deviceIDs []string, group string, ttl time.Duration) ([]string, error)
	// CreateTokensWith is CreateTokens with every token option.
	CreateTokensWith(ctx context.Context, deviceIDs []string, o TokenOptions) ([]string, error)
	// Reinstate lets a revoked device enroll again (its status becomes
	// pending; its certificates stay revoked), audited with reason.
	// ErrNotFound for an unknown device; a device that is not revoked is
	// left alone.
	Reinstate(ctx context.Context, deviceID, reason string) error
	// CheckToken finds the token presented for deviceID, comparing hashes
	// in constant time. ErrTokenInvalid, ErrTokenUsed, ErrTokenExpired,
	// ErrTokenRevoked. It does not use the token up: Enrolled does.
	CheckToken(ctx context.Context, deviceID, token string) (Grant, error)
	// Enrolled uses up the token of g and records cert (with its DER), in
	// one transaction with its audit event. ErrTokenUsed if the token was
	// used meanwhile, ErrRevoked if the device was revoked meanwhile. With
	// cert.EK set, the EK is bound to the device (ErrEKBound if it is bound
	// to another device or the device to another EK); without, a device
	// bound to an EK is refused with ErrEKBound (it enrolls attested only).
	Enrolled(ctx context.Context, g Grant, cert Cert, remote string) error
	// Replay returns the certificate an already used token bought, if the
	// token has not expired and spkiSHA256 is that certificate's key, and
	// audits the replay. ErrTokenInvalid, ErrTokenExpired, ErrTokenRevoked,
	// ErrKeyMismatch, ErrRevoked; ErrTokenUsed if the token bought no
	// recorded certificate.
	Replay(ctx context.Context, deviceID, token, spkiSHA256 string, remote string) (Cert, error)
	// Reenrolled records cert, renewed with the certificate prevSerial, in
	// one transaction that checks prevSerial is recorded for the same
	// device, neither is revoked. ErrNotFound, ErrRevoked.
	Reenrolled(ctx context.Context, prevSerial string, cert Cert, remote string) error

	// Certificate returns the record of serial, or ErrNotFound.
	Certificate(ctx context.Context, serial string) (Cert, error)
	// Certificates returns every certificate of deviceID, newest first.
	Certificates(ctx context.Context, deviceID string) ([]Cert, error)
	// Revoke revokes every valid certificate of deviceID, burns its unused
	// tokens and marks the device revoked; it returns how many
	// certificates it revoked. ErrNotFound for an unknown device.
	Revoke(ctx context.Context, deviceID, reason string) (int, error)
	// RevokedSince returns the certificates revoked at or after t, oldest
	// revocation first (for polling).
	RevokedSince(ctx context.Context, t time.Time) ([]Cert, error)
	// RevokedDevices returns the IDs of the devices revoked now (a
	// reinstated device is not), sorted.
	RevokedDevices(ctx context.Context) ([]string, error)
	// SetChildren replaces the device IDs gateway speaks for (audited;
	// empty: none). Each must be a valid device ID. ErrNotFound for an
	// unknown gateway.
	SetChildren(ctx context.Context, gateway string, children []string) error
	// Children returns the device IDs gateway speaks for, sorted.
	Children(ctx context.Context, gateway string) ([]string, error)
	// GatewaysChangedSince returns the gateways whose children were set at
	// or after t, with their children now (for polling).
	GatewaysChangedSince(ctx context.Context, t time.Time) (map[string][]string, error)
	// ReleaseEK removes the binding between deviceID and its endorsement
	// key (an operator's decision for a moved TPM or a replaced board),
	// audited with reason. ErrNotFound when the device has none.
	ReleaseEK(ctx context.Context, deviceID, reason string) error
	// PutChallenge stores a pending attestation challenge so that its
	// answer may reach any server sharing this registry. It deletes the
	// expired challenges and refuses with ErrChallengeLimit when the
	// device already has perDevice unexpired ones. ErrNotFound for an
	// unknown device.
	PutChallenge(ctx context.Context, c Challenge, perDevice int) error
	// TakeChallenge deletes challenge id and returns it, expired or not:
	// of concurrent takers (on any handle) exactly one gets it, the
	// others ErrNotFound.
	TakeChallenge(ctx context.Context, id string) (Challenge, error)

	// Device returns one device, or ErrNotFound.
	Device(ctx context.Context, id string) (Device, error)
	// Devices returns every device, sorted by ID.
	Devices(ctx context.Context) ([]Device, error)

	// Audit appends an event. An event with Aggregate set that repeats
	// the newest one with the same event, device, remote and reason
	// within AggregateWindow increments that record's Count instead.
	Audit(ctx context.Context, e Event) error
	// Events returns the audit trail after id afterID (0: from the
	// start), oldest first, at most limit entries, with the last id.
	Events(ctx context.Context, afterID int64, limit int) ([]Event, int64, error)
	// PruneAudit deletes records older than maxAge and the oldest beyond
	// maxRows (0: no bound) and returns how many it deleted.
	PruneAudit(ctx context.Context, maxRows int, maxAge time.Duration) (int, error)
}

// AggregateWindow is how long repeated refusals fold into one audit record.
const AggregateWindow = time.Minute

// Event is one audit record.
type Event struct {
	At       time.Time
	Event    string // enroll, enroll_replay, ek_release, enroll_refused, reenroll, reenroll_refused, token, revoke, reinstate, server_cert (no device)
	DeviceID string
	Serial   string
	Remote   string
	Reason   string
	// Count is how many times the event happened (aggregated refusals),
	// the last one at LastAt.
	Count  int
	LastAt time.Time
	// Aggregate asks Audit to fold this event into a recent identical one.
	Aggregate bool
}

// TokenOptions are the properties of new tokens.
type TokenOptions struct {
	Group  string        // becomes the OU of the device's certificates (may be empty)
	TTL    time.Duration // lifetime
	Attest string        // AttestDefault, AttestRequired or AttestOptional
}

// Grant is a checked, still unused token.
type Grant struct {
	DeviceID string
	Group    string
	Attest   string // the token's attestation policy
	hash     []byte
}

// EK is an attested endorsement key.
type EK struct {
	SHA256 string `json:"sha256"` // hex SHA-256 of its SubjectPublicKeyInfo
	Issuer string `json:"issuer,omitempty"`
	Serial string `json:"serial,omitempty"` // of its EK certificate, hex
}

// Challenge is a pending attestation challenge. Data is the verifier's
// state, opaque to the registry (it holds no secret in the clear).
type Challenge struct {
	ID       string
	DeviceID string
	Expires  time.Time
	Data     []byte
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
	DER              []byte // the certificate (recorded since schema 2)
	// EK is the endorsement key that attested the certificate's key
	// (SHA256 only when read back); zero when not attested.
	EK EK
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
	EK           string    `json:"ek_sha256,omitempty"`  // the endorsement key bound to the device
}
