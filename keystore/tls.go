package keystore

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
)

// TLSCertificate pairs a certificate chain (leaf first, DER) with the
// keystore signer of the leaf's key. For ECDSA keys it pins the one
// signature scheme the key's curve pairs with (P-256 with SHA-256, P-384
// with SHA-384) so that a TLS 1.2 peer cannot ask a TPM key for a digest it
// is not allowed to sign.
func TLSCertificate(chain [][]byte, signer crypto.Signer) (tls.Certificate, error) {
	if len(chain) == 0 {
		return tls.Certificate{}, fmt.Errorf("keystore: empty certificate chain")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("keystore: parse leaf certificate: %w", err)
	}
	if !publicKeyEqual(leaf.PublicKey, signer.Public()) {
		return tls.Certificate{}, fmt.Errorf("keystore: certificate %q does not match the key", leaf.Subject.CommonName)
	}
	alg, err := AlgOf(signer.Public())
	if err != nil {
		return tls.Certificate{}, err
	}
	cert := tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: leaf}
	switch alg {
	case ECDSAP256:
		cert.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}
	case ECDSAP384:
		cert.SupportedSignatureAlgorithms = []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}
	}
	return cert, nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
