package keystore

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/mqtls/mqtls/internal/keyfiles"
)

// Sentinel errors. Backends wrap them with context; compare with [errors.Is].
var (
	ErrNotFound            = keyfiles.ErrNotFound
	ErrExists              = keyfiles.ErrExists
	ErrUnsupported         = errors.New("keystore: unsupported algorithm")
	ErrInvalidName         = keyfiles.ErrInvalidName
	ErrInsecurePermissions = errors.New("keystore: insecure permissions")
)

// Store keeps private keys and signs with them. Implementations return the
// sentinel errors above (wrapped) so callers can act on them.
type Store interface {
	// Generate creates a key named name inside the store and returns its
	// signer. alg "" means [ECDSAP256]. It returns [ErrExists] if the name
	// is taken (the existing key is left untouched), [ErrUnsupported] for
	// an algorithm the backend cannot create and [ErrInvalidName] for a bad
	// name.
	Generate(ctx context.Context, name string, alg KeyAlg) (crypto.Signer, error)
	// Signer returns the signer of an existing key, or [ErrNotFound].
	Signer(ctx context.Context, name string) (crypto.Signer, error)
	// List returns the names of all keys, sorted.
	List(ctx context.Context) ([]string, error)
	// Delete removes a key, or returns [ErrNotFound].
	Delete(ctx context.Context, name string) error
}

// KeyAlg names a key algorithm and size.
type KeyAlg string

// Supported key algorithms.
const (
	ECDSAP256 KeyAlg = "ecdsa-p256"
	ECDSAP384 KeyAlg = "ecdsa-p384"
	RSA2048   KeyAlg = "rsa-2048"
	RSA3072   KeyAlg = "rsa-3072"
)

// Algs lists every supported algorithm, default first.
var algs = []KeyAlg{ECDSAP256, ECDSAP384, RSA2048, RSA3072}

// Algs returns every algorithm a Store may support, the default first.
func Algs() []KeyAlg { return slices.Clone(algs) }

// Resolve returns the algorithm alg stands for ("" is [ECDSAP256]) or an
// error wrapping [ErrUnsupported] that lists the accepted names.
func (a KeyAlg) Resolve() (KeyAlg, error) {
	if a == "" {
		return ECDSAP256, nil
	}
	if slices.Contains(algs, a) {
		return a, nil
	}
	names := make([]string, len(algs))
	for i, x := range algs {
		names[i] = string(x)
	}
	return "", fmt.Errorf("%w %q (accepted: %s)", ErrUnsupported, string(a), strings.Join(names, ", "))
}

// Curve returns the elliptic curve of an ECDSA algorithm, or nil.
func (a KeyAlg) Curve() elliptic.Curve {
	switch a {
	case ECDSAP256:
		return elliptic.P256()
	case ECDSAP384:
		return elliptic.P384()
	}
	return nil
}

// RSABits returns the modulus size of an RSA algorithm, or 0.
func (a KeyAlg) RSABits() int {
	switch a {
	case RSA2048:
		return 2048
	case RSA3072:
		return 3072
	}
	return 0
}

// Hash returns the digest an ECDSA key of this algorithm signs: SHA-256
// for P-256, SHA-384 for P-384 (the pairing TLS 1.3 mandates), 0 for RSA.
func (a KeyAlg) Hash() crypto.Hash {
	switch a {
	case ECDSAP256:
		return crypto.SHA256
	case ECDSAP384:
		return crypto.SHA384
	}
	return 0
}

// AlgOf returns the algorithm of a public key, or an error wrapping
// [ErrUnsupported].
func AlgOf(pub crypto.PublicKey) (KeyAlg, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return ECDSAP256, nil
		case elliptic.P384():
			return ECDSAP384, nil
		}
		return "", fmt.Errorf("%w: ECDSA curve %s", ErrUnsupported, k.Curve.Params().Name)
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048:
			return RSA2048, nil
		case 3072:
			return RSA3072, nil
		}
		return "", fmt.Errorf("%w: RSA-%d", ErrUnsupported, k.N.BitLen())
	}
	return "", fmt.Errorf("%w: public key type %T", ErrUnsupported, pub)
}

// CheckName reports whether name is a valid key name: 1–64 characters of
// [A-Za-z0-9._-], not starting with a dot. The error wraps [ErrInvalidName].
func CheckName(name string) error { return keyfiles.CheckName(name) }

// ErrCorrupt reports a key file that exists but cannot be parsed.
var ErrCorrupt = errors.New("keystore: corrupt key file")

// Renamer is implemented by stores that can rename a key, replacing any
// key of the new name atomically. Identity renewal with a new key uses it
// to swap the new key into place.
type Renamer interface {
	Rename(ctx context.Context, oldName, newName string) error
}

// Attester is implemented by stores that can prove to an enrollment
// server that their keys live in a TPM (TPM key attestation): the TPM
// keystore.
type Attester interface {
	Attest(ctx context.Context) (Attestation, error)
}

// Attestation is one enrollment's attestation: the TPM's EK certificate,
// a fresh attestation key (AK), the activation of the server's credential
// and the certification of a key of the store by the AK.
type Attestation interface {
	// EKCertificate returns the endorsement key's certificate (DER).
	EKCertificate() []byte
	// AKPublic returns the attestation key's public area (TPM2B_PUBLIC).
	AKPublic() []byte
	// Activate returns the secret of a credential (TPM2B_ID_OBJECT,
	// TPM2B_ENCRYPTED_SECRET) bound to the AK and encrypted to the EK.
	Activate(ctx context.Context, credential, secret []byte) ([]byte, error)
	// Certify has the AK certify key over nonce: the key's public area
	// (TPM2B_PUBLIC), the TPMS_ATTEST and its TPMT_SIGNATURE.
	Certify(ctx context.Context, key crypto.Signer, nonce []byte) (public, info, sig []byte, err error)
}
