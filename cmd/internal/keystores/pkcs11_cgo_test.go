//go:build cgo

package keystores

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// A pkcs11: URI, as given to --keystore, opens the token it names; the
// device key lives there and nowhere in the identity directory.
func TestOpenPKCS11(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "mqtls")
	uri := "pkcs11:token=mqtls;object=device?module-path=" + softhsmtest.Module + "&pin-source=file:" + tok.PINFile
	u, err := keystore.ParseURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	id := filepath.Join(t.TempDir(), "identity")
	s, err := Open(t.Context(), u, id)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	signer, err := s.Generate(t.Context(), "device", "")
	if err != nil {
		t.Fatal(err)
	}
	keystoretest.CheckSigns(t, signer)
	if m, _ := filepath.Glob(filepath.Join(id, "*")); len(m) != 0 {
		t.Errorf("pkcs11 store wrote into the identity directory: %v", m)
	}

	wrong := u
	wrong.PKCS11.Token = "other"
	if _, err := Open(t.Context(), wrong, id); !errors.Is(err, pkcs11.ErrNoToken) {
		t.Errorf("Open(token=other) = %v, want ErrNoToken", err)
	}
}
