package provisioning

import (
	"errors"
	"fmt"
)

// ErrBadDeviceID reports a device ID outside [A-Za-z0-9._-]{1,64}.
var ErrBadDeviceID = errors.New("provisioning: invalid device ID")

// MaxDeviceIDLen is the longest device ID.
const MaxDeviceIDLen = 64

// CheckDeviceID reports whether id may name a device: 1–64 characters of
// [A-Za-z0-9._-]. The device ID is the certificate CN and the MQTT client
// ID and is substituted into topic templates, so MQTT wildcards (+ #), the
// level separator (/), $ and NUL must never pass. The error wraps
// [ErrBadDeviceID].
func CheckDeviceID(id string) error {
	if id == "" || len(id) > MaxDeviceIDLen {
		return fmt.Errorf("%w %q: want 1-%d characters of [A-Za-z0-9._-], got %d", ErrBadDeviceID, id, MaxDeviceIDLen, len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w %q: character %q is not in [A-Za-z0-9._-]", ErrBadDeviceID, id, c)
		}
	}
	return nil
}
