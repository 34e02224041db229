package provisioning

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"

	"github.com/mqtls/mqtls/deviceid"
)

// NewCSR returns a DER PKCS#10 request for deviceID (as the subject CN)
// signed by signer. It asks for nothing else: the CA decides the rest.
func NewCSR(signer crypto.Signer, deviceID string) ([]byte, error) {
	if err := deviceid.Check(deviceID); err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: deviceID},
	}, signer)
	if err != nil {
		return nil, fmt.Errorf("provisioning: sign certificate request: %w", err)
	}
	return der, nil
}
