// Package deviceid holds the one rule for device IDs: 1–64 characters of
// [A-Za-z0-9._-].
//
// The device ID is the certificate CN and the MQTT client ID and is
// substituted into topic templates, so MQTT wildcards (+ #), the level
// separator (/), $ and NUL must never pass. Issuance (provisioning, its
// server and registry), the device SDK, the broker and its policy all check
// IDs here, so the rule cannot drift between the side that issues an ID and
// the side that trusts it.
//
// It is a leaf: it imports only the standard library, and any package of the
// module may import it.
package deviceid

import (
	"errors"
	"fmt"
)

// ErrInvalid reports a device ID outside [A-Za-z0-9._-]{1,64}.
var ErrInvalid = errors.New("deviceid: invalid device ID")

// MaxLen is the longest device ID.
const MaxLen = 64

// Check reports whether id may name a device: 1–64 characters of
// [A-Za-z0-9._-]. The error wraps [ErrInvalid] and names the cause.
func Check(id string) error {
	if id == "" || len(id) > MaxLen {
		return fmt.Errorf("%w %q: want 1-%d characters of [A-Za-z0-9._-], got %d", ErrInvalid, id, MaxLen, len(id))
	}
	if i := bad(id); i >= 0 {
		return fmt.Errorf("%w %q: character %q is not in [A-Za-z0-9._-]", ErrInvalid, id, id[i])
	}
	return nil
}

// Valid reports whether [Check] accepts id, without building an error (the
// broker's policy calls it on every CONNECT).
func Valid(id string) bool {
	return id != "" && len(id) <= MaxLen && bad(id) < 0
}

// bad returns the index of the first byte outside [A-Za-z0-9._-], or -1.
func bad(id string) int {
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return i
		}
	}
	return -1
}
