package tpm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/tcp"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
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
	roundTrip(t, att, key, roots, inter)
}

// roundTrip runs an attestation of key against a verifier trusting roots.
func roundTrip(t *testing.T, att keystore.Attestation, key crypto.Signer, roots, inter *x509.CertPool) {
	t.Helper()
	ekCert, err := attest.ParseEKCertificate(att.EKCertificate())
	if err != nil {
		t.Fatal(err)
	}
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

// A TPM whose only EK certificate is in the high range (ECC P-384 at
// 0x01c00016, as swtpm_setup --create-ek-cert writes it, signed by swtpm's
// local CA) attests with it: first with the EK swtpm_setup persisted,
// then with the EK derived from template H-3, which must be the one the
// certificate names.
func TestEKTemplateP384(t *testing.T) {
	sw := swtpmtest.StartManufactured(t)
	roots, _, err := attest.LoadRoots(sw.CADir)
	if err != nil {
		t.Fatal(err)
	}
	raw := func(f func(tr transport.TPM)) {
		host, port, _ := net.SplitHostPort(sw.Addr)
		p, _ := strconv.Atoi(port)
		tr, err := tcp.Open(tcp.Config{CommandAddress: sw.Addr, PlatformAddress: net.JoinHostPort(host, strconv.Itoa(p+1))})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		f(tr)
	}
	raw(func(tr transport.TPM) { ektest.RemoveEKCert(t, tr, tpm.EKCertIndexRSA) }) // only the high-range certificate is left
	dir := keyDir(t)
	attestP384 := func() []byte {
		s, err := tpm.OpenSWTPM(t.Context(), sw.Addr, dir)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		key, err := s.Generate(t.Context(), fmt.Sprintf("device-%d", time.Now().UnixNano()), keystore.ECDSAP256)
		if err != nil {
			t.Fatal(err)
		}
		att, err := s.Attest(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if k, ok := ektest.EKPublicOf(t, att.EKCertificate()).(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P384() {
			t.Fatalf("EK certificate key %T, want the P-384 EK's", ektest.EKPublicOf(t, att.EKCertificate()))
		}
		roundTrip(t, att, key, roots, nil)
		return att.EKCertificate()
	}
	t.Run("persistent EK", func(t *testing.T) { attestP384() })
	t.Run("EK from template H-3", func(t *testing.T) {
		var certKey crypto.PublicKey
		raw(func(tr transport.TPM) {
			rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(0x81010016)}.Execute(tr)
			if err != nil {
				t.Fatal(err)
			}
			owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
			if _, err := (tpm2.EvictControl{Auth: owner, ObjectHandle: tpm2.NamedHandle{Handle: 0x81010016, Name: rp.Name}, PersistentHandle: 0x81010016}).Execute(tr); err != nil {
				t.Fatal(err)
			}
			certKey = ektest.EKPublic(t, tr, tpm.EKTemplateP384)
		})
		der := attestP384()
		if !certKey.(*ecdsa.PublicKey).Equal(ektest.EKPublicOf(t, der)) {
			t.Fatal("the EK derived from template H-3 is not the one swtpm's certificate names")
		}
	})
}
