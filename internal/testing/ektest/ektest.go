// Package ektest manufactures TPMs for attestation tests: a test TPM
// manufacturer CA (made at test time) and an EK certificate for a TPM's
// endorsement key, written to an NV index of the TCG EK Credential Profile
// as a TPM vendor does at the factory. It also plays cheating devices
// (CheatingEvidence) and makes keys with chosen attributes (Key).
package ektest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// Manufacturer is a test TPM manufacturer: a root and an issuing CA.
type Manufacturer struct{ *testpki.CA }

// NewManufacturer creates a fresh manufacturer CA.
func NewManufacturer(t testing.TB) *Manufacturer {
	t.Helper()
	return &Manufacturer{testpki.New(t)}
}

// Pools returns the roots and intermediates an EST server trusts for EK
// certificates of this manufacturer.
func (m *Manufacturer) Pools() (roots, inter *x509.CertPool) {
	inter = x509.NewCertPool()
	inter.AddCert(m.Issuing)
	return m.Pool(), inter
}

// EKCert issues an EK certificate for pub shaped like a vendor's: EKU
// tcg-kp-EKCertificate, key usage keyEncipherment (RSA) or keyAgreement
// (ECC), and a critical subject alternative name holding only the TPM
// manufacturer, model and version (a directoryName). Each tweak may change
// the template before it is signed.
func (m *Manufacturer) EKCert(t testing.TB, pub crypto.PublicKey, tweaks ...func(*x509.Certificate)) []byte {
	t.Helper()
	san := sanDirName(t)
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	tmpl := &x509.Certificate{
		SerialNumber:          serial.Add(serial, big.NewInt(1)),
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageKeyEncipherment,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{{2, 23, 133, 8, 1}},
		BasicConstraintsValid: true,
		ExtraExtensions:       []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	if _, ok := pub.(*ecdsa.PublicKey); ok {
		tmpl.KeyUsage = x509.KeyUsageKeyAgreement
	}
	for _, tw := range tweaks {
		tw(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, m.Issuing, pub, m.IssuingKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func sanDirName(t testing.TB) []byte {
	t.Helper()
	type atv struct {
		Type  asn1.ObjectIdentifier
		Value string `asn1:"utf8"`
	}
	name, err := asn1.Marshal([]([]atv){
		{{asn1.ObjectIdentifier{2, 23, 133, 2, 1}, "id:4D514C53"}},
		{{asn1.ObjectIdentifier{2, 23, 133, 2, 2}, "mqtls-test"}},
		{{asn1.ObjectIdentifier{2, 23, 133, 2, 3}, "id:00010001"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	// GeneralNames ::= SEQUENCE OF GeneralName; directoryName [4] EXPLICIT Name
	dir, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name})
	if err != nil {
		t.Fatal(err)
	}
	seq, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: dir})
	if err != nil {
		t.Fatal(err)
	}
	return seq
}

// EKPublic returns the public key of the TPM's EK made from template
// (tpm2.RSAEKTemplate or tpm2.ECCEKTemplate).
func EKPublic(t testing.TB, tr transport.TPM, template tpm2.TPMTPublic) crypto.PublicKey {
	t.Helper()
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(template),
	}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tr)
	p, err := rsp.OutPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.Pub(*p)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

// WriteEKCert (re)defines an EK certificate NV index (tpm.EKCertIndexRSA,
// tpm.EKCertIndexECC) with platform authorization and writes der to it.
func WriteEKCert(t testing.TB, tr transport.TPM, index tpm2.TPMHandle, der []byte) {
	t.Helper()
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	RemoveEKCert(t, tr, index)
	if _, err := (tpm2.NVDefineSpace{
		AuthHandle: platform,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: index,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{PPWrite: true, PPRead: true, OwnerRead: true, AuthRead: true, NoDA: true,
				PlatformCreate: true, NT: tpm2.TPMNTOrdinary},
			DataSize: uint16(len(der)),
		}),
	}).Execute(tr); err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(der); off += 512 {
		end := min(off+512, len(der))
		if _, err := (tpm2.NVWrite{
			AuthHandle: platform,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}).Execute(tr); err != nil {
			t.Fatal(err)
		}
	}
}

// RemoveEKCert undefines an EK certificate NV index, if defined.
func RemoveEKCert(t testing.TB, tr transport.TPM, index tpm2.TPMHandle) {
	t.Helper()
	platform := tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	old, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tr)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVUndefineSpace{AuthHandle: platform, NVIndex: tpm2.NamedHandle{Handle: index, Name: old.NVName}}).Execute(tr); err != nil {
		t.Fatal(err)
	}
}

// DuplicableKey creates, in the TPM behind tr, an ECC P-256 signing key
// that may leave its TPM (fixedTPM and fixedParent clear) and writes it as
// dir/name.tpmkey, where a tpm.Store finds it.
func DuplicableKey(t testing.TB, tr transport.TPM, dir, name string) {
	t.Helper()
	Key(t, tr, dir, name, func(*tpm2.TPMTPublic) {})
}

// Key creates, in the TPM behind tr, an ECC P-256 signing key from a
// template that tweak may change (default: duplicable, fixedTPM and
// fixedParent clear) and writes it as dir/name.tpmkey, where a tpm.Store
// finds it.
func Key(t testing.TB, tr transport.TPM, dir, name string, tweak func(*tpm2.TPMTPublic)) {
	t.Helper()
	srk, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tpm.SRKTemplate()),
	}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: srk.ObjectHandle}.Execute(tr)
	tmpl := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			SensitiveDataOrigin: true, UserWithAuth: true, NoDA: true, SignEncrypt: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
	tweak(&tmpl)
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPublic:     tpm2.New2B(tmpl),
	}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name+tpm.KeyFileExt), tpm.KeyFile(rsp.OutPublic, rsp.OutPrivate), 0o600); err != nil {
		t.Fatal(err)
	}
}

// ForeignAK returns the public area (TPM2B_PUBLIC) of an attestation key
// shaped like a TPM's (restricted ECDSA signing key, fixedTPM) whose key
// lives in no TPM this test knows: an AK "from another TPM".
func ForeignAK(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, NoDA: true,
			Restricted: true, SignEncrypt: true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{
				Scheme:  tpm2.TPMAlgECDSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
		}),
	}
	return tpm2.Marshal(tpm2.New2B(pub))
}

// EKPublicOf returns the public key of an EK certificate (DER).
func EKPublicOf(t testing.TB, der []byte) crypto.PublicKey {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c.PublicKey
}

// Cheat is how a device with a genuine TPM tries to have a software key
// pass as one of its TPM's.
type Cheat int

const (
	// LoadExternal loads only the public part of the software key into the
	// TPM (TPM2_LoadExternal) and has the AK certify it.
	LoadExternal Cheat = iota
	// SignForgery writes the TPMS_ATTEST itself, with a magic other than
	// TPM_GENERATED_VALUE (a restricted key signs any digest of data not
	// starting with it: TPM2_Hash then TPM2_Sign), and has the AK sign it.
	SignForgery
	// Quote sends a TPM2_Quote by the AK over the nonce (a genuine
	// TPMS_ATTEST, of another type) instead of a TPM2_Certify.
	Quote
)

// CheatingEvidence plays a device that cheats with a genuine TPM: it makes
// an AK in the TPM behind tr (owner hierarchy), asks challenge for a
// credential bound to it, activates it with the EK made from ekTemplate,
// then has the AK vouch, as how says, for a public area of the software
// key pub claiming fixedTPM, fixedParent and sensitiveDataOrigin. It
// returns the evidence: the activated secret, the key's public area, the
// certify info and the AK's signature, or the TPM's refusal to make them
// (the reference TPM authorizes no use of a public-only object).
func CheatingEvidence(t testing.TB, tr transport.TPM, ekTemplate tpm2.TPMTPublic, pub *ecdsa.PublicKey, how Cheat,
	challenge func(akPublic []byte) (credential, secret, nonce []byte)) (activated, keyPublic, info, sig []byte, err error) {
	t.Helper()
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	akPub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](ForeignAK(t))
	if err != nil {
		t.Fatal(err)
	}
	tmpl, err := akPub.Contents()
	if err != nil {
		t.Fatal(err)
	}
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{})
	ak, err := tpm2.CreatePrimary{PrimaryHandle: owner, InPublic: tpm2.New2B(*tmpl)}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: ak.ObjectHandle}.Execute(tr)
	cred, enc, nonce := challenge(tpm2.Marshal(ak.OutPublic))

	ek, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(ekTemplate),
	}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	sess, closeSess, err := tpm2.PolicySession(tr, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer closeSess()
	if _, err := (tpm2.PolicySecret{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(), NonceTPM: sess.NonceTPM()}).Execute(tr); err != nil {
		t.Fatal(err)
	}
	blob, err := tpm2.Unmarshal[tpm2.TPM2BIDObject](cred)
	if err != nil {
		t.Fatal(err)
	}
	encSecret, err := tpm2.Unmarshal[tpm2.TPM2BEncryptedSecret](enc)
	if err != nil {
		t.Fatal(err)
	}
	act, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
		KeyHandle:      tpm2.AuthHandle{Handle: ek.ObjectHandle, Name: ek.Name, Auth: sess},
		CredentialBlob: *blob,
		Secret:         *encSecret,
	}.Execute(tr)
	tpm2.FlushContext{FlushHandle: ek.ObjectHandle}.Execute(tr) // room for the external key
	if err != nil {
		t.Fatal(err)
	}

	// A public-only object has no authValue: TPM2_Certify's admin role is
	// met by a policy allowing TPM2_Certify.
	pc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := (tpm2.PolicyCommandCode{Code: tpm2.TPMCCCertify}).Update(pc); err != nil {
		t.Fatal(err)
	}
	soft := tpm2.New2B(tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, AdminWithPolicy: true, NoDA: true, SignEncrypt: true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: pc.Hash().Digest},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: pub.X.FillBytes(make([]byte, 32))},
			Y: tpm2.TPM2BECCParameter{Buffer: pub.Y.FillBytes(make([]byte, 32))},
		}),
	})
	akAuth := tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)}
	switch how {
	case SignForgery:
		info, sig, err := forge(tr, akAuth, soft, nonce)
		return act.CertInfo.Buffer, tpm2.Marshal(soft), info, sig, err
	case Quote:
		q, err := tpm2.Quote{SignHandle: akAuth, QualifyingData: tpm2.TPM2BData{Buffer: nonce}, InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}}.Execute(tr)
		if err != nil {
			return nil, nil, nil, nil, err
		}
		return act.CertInfo.Buffer, tpm2.Marshal(soft), q.Quoted.Bytes(), tpm2.Marshal(q.Signature), nil
	}
	ext, err := tpm2.LoadExternal{InPublic: soft, Hierarchy: tpm2.TPMRHOwner}.Execute(tr)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm2.FlushContext{FlushHandle: ext.ObjectHandle}.Execute(tr)
	adm, closeAdm, err := tpm2.PolicySession(tr, tpm2.TPMAlgSHA256, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAdm()
	if _, err := (tpm2.PolicyCommandCode{PolicySession: adm.Handle(), Code: tpm2.TPMCCCertify}).Execute(tr); err != nil {
		t.Fatal(err)
	}
	rsp, err := tpm2.Certify{
		ObjectHandle:   tpm2.AuthHandle{Handle: ext.ObjectHandle, Name: ext.Name, Auth: adm},
		SignHandle:     akAuth,
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(tr)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	return act.CertInfo.Buffer, tpm2.Marshal(soft), rsp.CertifyInfo.Bytes(), tpm2.Marshal(rsp.Signature), nil
}

// forge has the restricted AK sign a TPMS_ATTEST of type certify naming
// the key public, written outside the TPM (magic 0).
func forge(tr transport.TPM, ak tpm2.AuthHandle, public tpm2.TPM2BPublic, nonce []byte) (info, sig []byte, err error) {
	p, err := public.Contents()
	if err != nil {
		return nil, nil, err
	}
	name, err := tpm2.ObjectName(p)
	if err != nil {
		return nil, nil, err
	}
	info = tpm2.Marshal(tpm2.TPMSAttest{
		Magic:     0,
		Type:      tpm2.TPMSTAttestCertify,
		ExtraData: tpm2.TPM2BData{Buffer: nonce},
		Attested:  tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{Name: *name, QualifiedName: *name}),
	})
	h, err := tpm2.Hash{Data: tpm2.TPM2BMaxBuffer{Buffer: info}, HashAlg: tpm2.TPMAlgSHA256, Hierarchy: tpm2.TPMRHOwner}.Execute(tr)
	if err != nil {
		return nil, nil, err
	}
	rsp, err := tpm2.Sign{KeyHandle: ak, Digest: h.OutHash, InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}, Validation: h.Validation}.Execute(tr)
	if err != nil {
		return nil, nil, err
	}
	return info, tpm2.Marshal(rsp.Signature), nil
}

// Registry returns a SQLite registry (in t's temporary directory) that
// knows the devices ids, to keep an attest.Verifier's challenges.
func Registry(t testing.TB, ids ...string) registry.Registry {
	t.Helper()
	reg, err := registry.CreateSQLite(t.Context(), filepath.Join(t.TempDir(), "registry.db"), strings.Repeat("ab", 32))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	for _, id := range ids {
		if _, err := reg.CreateToken(t.Context(), id, "", time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}
