package keystore

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"io"
)

// softSigner hides the concrete private key type so that a software key,
// like a TPM key, can only be used to sign.
type softSigner struct{ key crypto.Signer }

func (s softSigner) Public() crypto.PublicKey { return s.key.Public() }

func (s softSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return s.key.Sign(r, digest, opts)
}

func generateSoft(alg KeyAlg) (crypto.Signer, error) {
	if c := alg.Curve(); c != nil {
		return ecdsa.GenerateKey(c, rand.Reader)
	}
	return rsa.GenerateKey(rand.Reader, alg.RSABits())
}
