package keystore_test

import (
	"errors"
	"testing"

	"github.com/mqtls/mqtls/keystore"
)

// Any string parses to a URI that prints back to itself, or fails with
// ErrBadURI.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"file", "file:/a", "mem", "tpm", "tpm:/dev/tpm0", "swtpm:127.0.0.1:2321", "tpmsim:x", "x:y:z", "pkcs11:token=t;object=o?module-path=/m.so&pin-source=file:p", "pkcs11:slot-id=01;serial=%41?module-path=/a%2Fb&pin-source=env:P"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := keystore.ParseURI(s)
		if err != nil {
			if !errors.Is(err, keystore.ErrBadURI) {
				t.Fatalf("ParseURI(%q) error %v does not wrap ErrBadURI", s, err)
			}
			return
		}
		again, err := keystore.ParseURI(u.String())
		if err != nil || again != u {
			t.Fatalf("ParseURI(%q) = %+v prints as %q which parses to %+v, %v", s, u, u.String(), again, err)
		}
	})
}

// A valid name never contains a path separator, NUL or a leading dot.
func FuzzCheckName(f *testing.F) {
	f.Add("device")
	f.Add("../x")
	f.Fuzz(func(t *testing.T, s string) {
		if keystore.CheckName(s) != nil {
			return
		}
		for _, c := range []byte(s) {
			if c == '/' || c == '\\' || c == 0 || c > 0x7e {
				t.Fatalf("CheckName accepted %q", s)
			}
		}
		if s == "" || s[0] == '.' || len(s) > 64 {
			t.Fatalf("CheckName accepted %q", s)
		}
	})
}
