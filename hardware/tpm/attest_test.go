package tpm_test

import (
	"crypto/ecdsa"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
	"github.com/mqtls/mqtls/internal/testing/ektest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/attest"
)

// A TPM whose only EK certificate is for its ECC P-256 EK (NV 0x01c0000a)
// attests with it: the verifier's credential is made for an ECC EK.
func TestAttestECCEK(t *testing.T) {
	s := newSim(t, keyDir(t))
	tr, err := tpmsim.OpenSeed(simSeed)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	m := ektest.NewManufacturer(t)
	ektest.WriteEKCert(t, tr, tpm.EKCertIndexECC, m.EKCert(t, ektest.EKPublic(t, tr, tpm2.ECCEKTemplate)))
	defer ektest.RemoveEKCert(t, tr, tpm.EKCertIndexECC)
	key, err := s.Generate(t.Context(), "device", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	att, err := s.Attest(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ekCert, err := attest.ParseEKCertificate(att.EKCertificate())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := ekCert.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Fatalf("EK certificate key %T, want the ECC EK's", ekCert.PublicKey)
	}
	roots, inter := m.Pools()
	v, err := attest.New(attest.Config{Roots: roots, Intermediates: inter, Store: ektest.Registry(t, "dev")})
	if err != nil {
		t.Fatal(err)
	}
	binding := attest.Binding("token")
	ch, err := v.Challenge(t.Context(), "dev", binding, att.EKCertificate(), att.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	secret, err := att.Activate(t.Context(), ch.Credential, ch.Secret)
	if err != nil {
		t.Fatal(err)
	}
	pub, info, sig, err := att.Certify(t.Context(), key, ch.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := v.Verify(t.Context(), "dev", binding, attest.Evidence{ChallengeID: ch.ID, Secret: secret, KeyPublic: pub, CertifyInfo: info, Signature: sig}, key.Public())
	if err != nil || ek.SHA256 != attest.Fingerprint(ekCert) {
		t.Fatalf("Verify = %+v, %v", ek, err)
	}
}
