//go:build cgo

package pkcs11_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// BenchmarkSign measures one signature on a SoftHSM2 token, as a TLS
// handshake asks for it (a session from the pool, C_SignInit, C_Sign).
func BenchmarkSign(b *testing.B) {
	hsm := softhsmtest.Start(b)
	tok := hsm.InitToken(b, "bench")
	s := open(b, tok.URI())
	for _, alg := range []keystore.KeyAlg{keystore.ECDSAP256, keystore.ECDSAP384, keystore.RSA2048, keystore.RSA3072} {
		signer, err := s.Generate(b.Context(), "k-"+string(alg), alg)
		if err != nil {
			b.Fatal(err)
		}
		b.Run("softhsm/"+string(alg), func(b *testing.B) { keystoretest.BenchmarkSign(b, signer) })
		if alg != keystore.ECDSAP256 {
			continue
		}
		// The session pool lets signatures of one key run in parallel.
		b.Run("softhsm/"+string(alg)+"/parallel", func(b *testing.B) {
			d := sha256.Sum256([]byte("bench"))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := signer.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
