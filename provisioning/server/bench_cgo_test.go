//go:build cgo

package server_test

import (
	"path/filepath"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/server"
)

// benchHardwareCA runs the sqlite enrollment benchmark with the issuing CA
// key on a SoftHSM2 token made for the run (ECDSA P-256, generated on the
// token, signing through the store's session pool): every issuance is a
// PKCS#11 C_Sign.
func benchHardwareCA(b *testing.B) {
	b.Run("sqlite-softhsm2", func(b *testing.B) {
		tok := softhsmtest.Start(b).InitToken(b, "bench-ca")
		u := tok.URI()
		u.Object = "issuing-ca"
		store, err := pkcs11.Open(b.Context(), u)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { store.Close() })
		signer, err := store.Generate(b.Context(), "issuing-ca", keystore.ECDSAP256)
		if err != nil {
			b.Fatal(err)
		}
		benchEnroll(b, func(b *testing.B, c *server.Config) {
			dir := filepath.Join(b.TempDir(), "data")
			uri := keystore.URI{Kind: keystore.KindPKCS11, PKCS11: u}.String()
			if err := ca.Init(dir, ca.InitConfig{IssuingSigner: signer, IssuingKeyURI: uri}); err != nil {
				b.Fatal(err)
			}
			if c.CA, err = ca.Load(dir, ca.WithIssuingSigner(signer)); err != nil {
				b.Fatal(err)
			}
			reg, err := registry.CreateSQLite(b.Context(), filepath.Join(dir, "registry.db"), ca.Fingerprint(c.CA.Root))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { reg.Close() })
			c.Registry = reg
		})
	})
}
