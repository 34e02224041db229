// Package spki names a public key in logs and the registry: the hex SHA-256
// of a certificate's SubjectPublicKeyInfo, shown instead of the certificate.
//
// It imports only the standard library, so the device side (cmd/devsim)
// and the CA side (provisioning/ca, which re-exports it as
// ca.SPKIFingerprint) share one definition without the device linking the CA.
package spki

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
)

// Fingerprint is the hex SHA-256 of c's SubjectPublicKeyInfo.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}
