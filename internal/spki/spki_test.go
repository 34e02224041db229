package spki_test

import (
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"testing"

	"github.com/mqtls/mqtls/internal/spki"
)

func TestFingerprint(t *testing.T) {
	c := &x509.Certificate{RawSubjectPublicKeyInfo: []byte("spki"), Raw: []byte("other")}
	want := fmt.Sprintf("%x", sha256.Sum256([]byte("spki")))
	if got := spki.Fingerprint(c); got != want {
		t.Errorf("Fingerprint = %s, want %s", got, want)
	}
}
