package tpm_test

import (
	"testing"

	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// BenchmarkSign covers load + sign + flush, what each TLS handshake costs.
func BenchmarkSign(b *testing.B) {
	sw := swtpmtest.Start(b)
	for name, s := range map[string]keystore.Store{"simulator": newSim(b, keyDir(b)), "swtpm": newSWTPM(b, sw, keyDir(b))} {
		for _, alg := range []keystore.KeyAlg{keystore.ECDSAP256, keystore.RSA2048} {
			signer, err := s.Generate(b.Context(), "k-"+string(alg), alg)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(name+"/"+string(alg), func(b *testing.B) { keystoretest.BenchmarkSign(b, signer) })
		}
	}
}
