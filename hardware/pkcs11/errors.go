package pkcs11

import "errors"

// Errors. Those about the token wrap the PKCS#11 return value where there
// is one.
var (
	// ErrUnavailable is reported where this backend is compiled out
	// (CGO_ENABLED=0).
	ErrUnavailable = errors.New("pkcs11: unavailable in this build")
	// ErrNoModule reports a module-path that cannot be loaded.
	ErrNoModule = errors.New("pkcs11: cannot load the PKCS#11 module")
	// ErrNoToken reports that no token (or more than one) matches the URI.
	ErrNoToken = errors.New("pkcs11: token not found")
	// ErrPIN reports a PIN the token refused.
	ErrPIN = errors.New("pkcs11: wrong PIN")
	// ErrPINLocked reports a token whose user PIN is blocked.
	ErrPINLocked = errors.New("pkcs11: user PIN locked")
	// ErrPINSource reports a pin-source that cannot be read.
	ErrPINSource = errors.New("pkcs11: cannot read the PIN")
	// ErrAmbiguous reports several key pairs carrying one label.
	ErrAmbiguous = errors.New("pkcs11: several keys have this label")
	// ErrClosed is returned by a closed store and its signers.
	ErrClosed = errors.New("pkcs11: store closed")
)
