package tpm

import (
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/mqtls/mqtls/keystore"
)

// Key files come from disk and from other tools: any input either decodes
// or fails with ErrCorrupt/ErrUnsupported, never panics.
func FuzzDecodeKey(f *testing.F) {
	pub := tpm2.New2B(keyTemplate(keystore.ECDSAP256))
	k := &key{public: pub, private: tpm2.TPM2BPrivate{Buffer: []byte{1, 2, 3}}}
	f.Add(k.encode())
	f.Add([]byte("-----BEGIN TSS2 PRIVATE KEY-----\nMAA=\n-----END TSS2 PRIVATE KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := decodeKey(data)
		if err != nil && !errors.Is(err, keystore.ErrCorrupt) && !errors.Is(err, keystore.ErrUnsupported) {
			t.Fatalf("decodeKey error %v wraps neither ErrCorrupt nor ErrUnsupported", err)
		}
	})
}
