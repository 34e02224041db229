package pkcs11

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/mqtls/mqtls/keystore"
)

// maxPIN bounds what is read from a PIN file.
const maxPIN = 256

// readPIN returns the PIN a pin-source names: "file:PATH" or "env:NAME".
// Its errors name the source, never the PIN.
func readPIN(source string) (string, error) {
	scheme, arg, _ := strings.Cut(source, ":")
	var pin string
	switch scheme {
	case "file":
		f, err := os.Open(arg)
		if err != nil {
			return "", fmt.Errorf("%w: %w", ErrPINSource, err)
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return "", fmt.Errorf("%w: %w", ErrPINSource, err)
		}
		if !fi.Mode().IsRegular() {
			return "", fmt.Errorf("%w: %s is not a regular file", ErrPINSource, arg)
		}
		if perm := fi.Mode().Perm(); perm&0o077 != 0 {
			return "", fmt.Errorf("%w: %w: PIN file %s has mode %04o, readable or writable by others than its owner (chmod 600 %s)",
				ErrPINSource, keystore.ErrInsecurePermissions, arg, perm, arg)
		}
		b, err := io.ReadAll(io.LimitReader(f, maxPIN+1))
		if err != nil {
			return "", fmt.Errorf("%w: %w", ErrPINSource, err)
		}
		if len(b) > maxPIN {
			return "", fmt.Errorf("%w: PIN file %s is longer than %d bytes", ErrPINSource, arg, maxPIN)
		}
		pin = string(b)
		clear(b)
		pin = strings.TrimSuffix(pin, "\n")
		pin = strings.TrimSuffix(pin, "\r")
		if pin == "" {
			return "", fmt.Errorf("%w: PIN file %s is empty", ErrPINSource, arg)
		}
	case "env":
		v, ok := os.LookupEnv(arg)
		if !ok || v == "" {
			return "", fmt.Errorf("%w: environment variable %s is not set or empty", ErrPINSource, arg)
		}
		pin = v
	default:
		return "", fmt.Errorf("%w: pin-source %q: want file:PATH or env:NAME", ErrPINSource, source)
	}
	return pin, nil
}
