// Package pkcs11 is the PKCS#11 backend of [keystore.Store]: keys are
// generated inside a token (a secure element, a smart card, an HSM or
// SoftHSM) and used through it; they never leave it. Signing goes through
// github.com/ThalesGroup/crypto11 over github.com/miekg/pkcs11.
//
// A store is opened from the attributes of a pkcs11: keystore URI
// ([keystore.PKCS11], RFC 7512), for example
//
//	pkcs11:token=mqtls;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mqtls/pin
//
// The path attributes (token, serial, slot-id, manufacturer, model) select
// exactly one token: every attribute given must match. A key NAME is the
// key pair whose objects carry CKA_LABEL NAME (and a CKA_ID, random for keys
// made here, shared by both halves); object=NAME restricts the store to that
// one key. [Store.Rename] relabels a pair (PKCS#11 has no atomic change of
// several objects: see its documentation). Keys made by other programs (pkcs11-tool --keypairgen --label
// NAME --id ID) are used the same way.
//
// # Security
//
// Private keys are generated on the token with CKA_TOKEN, CKA_PRIVATE and
// CKA_SENSITIVE true and CKA_EXTRACTABLE false, usable only for signing
// (no decrypt, unwrap or derive); the attributes are read back after
// generation and a key the token did not make sensitive is deleted again.
//
// The user PIN comes only from a file (pin-source=file:PATH, mode 0600 or
// stricter) or an environment variable (pin-source=env:NAME); a URI holding
// pin-value is refused by [keystore.ParseURI], and no error of this package
// contains the PIN. PKCS#11 logs in an application, not a session: while
// one store of a process is logged in to a token, the token answers any
// further login of the process with "already logged in", whatever the PIN.
// [Open] therefore remembers a SHA-256 digest of the PIN each token of the
// process accepted (while a store on it is open) and refuses another PIN
// with [ErrPIN] itself.
//
// # Concurrency
//
// A [Store] and its signers are safe for concurrent use: each operation
// takes a session from a pool (see [WithMaxSessions]) and returns it, so
// several signatures run in parallel on tokens that allow it. Generate and
// Delete are serialised within a store (the name check and the creation
// happen under one lock); two processes creating the same name at once may
// both succeed, which [Store.Signer] then reports as an ambiguous name.
// Sign blocks for as long as the token takes and cannot be cancelled.
//
// Loading, initialising and finalising a PKCS#11 module is process-wide
// state: [Open] and [Store.Close] are serialised across the package, and the
// module is finalised when its last store closes.
//
// This package needs cgo (the module is a C shared library loaded with
// dlopen). A binary built with CGO_ENABLED=0 has no backend: its commands
// answer a pkcs11: URI with [ErrUnavailable].
package pkcs11
