package keystore_test

import (
	"path/filepath"
	"testing"

	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

func BenchmarkSign(b *testing.B) {
	file, err := keystore.NewFile(filepath.Join(b.TempDir(), "keys"))
	if err != nil {
		b.Fatal(err)
	}
	defer file.Close()
	for name, s := range map[string]keystore.Store{"file": file, "mem": keystore.NewMemory()} {
		for _, alg := range []keystore.KeyAlg{keystore.ECDSAP256, keystore.RSA2048} {
			signer, err := s.Generate(b.Context(), "k-"+string(alg), alg)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(name+"/"+string(alg), func(b *testing.B) { keystoretest.BenchmarkSign(b, signer) })
		}
	}
}
