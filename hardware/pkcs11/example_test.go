//go:build cgo

package pkcs11_test

import (
	"context"
	"log"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/keystore"
)

// A device whose key lives in a secure element reached through PKCS#11: the
// PIN is read from a root-only file, never written in the URI.
func ExampleOpen() {
	ctx := context.Background()
	u, err := keystore.ParseURI("pkcs11:token=mqtls;object=device" +
		"?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mqtls/pin")
	if err != nil {
		log.Fatal(err)
	}
	store, err := pkcs11.Open(ctx, u.PKCS11)
	if err != nil {
		log.Fatal(err) // ErrNoModule, ErrNoToken, ErrPIN, ErrPINSource … name the fix
	}
	defer store.Close()
	signer, err := store.Signer(ctx, "device")
	if err != nil {
		signer, err = store.Generate(ctx, "device", keystore.ECDSAP256)
	}
	if err != nil {
		log.Fatal(err)
	}
	// Hand signer to provisioning (the CSR) and keystore.TLSCertificate.
	log.Printf("device key on the token: %T", signer.Public())
}
