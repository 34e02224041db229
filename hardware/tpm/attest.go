package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/mqtls/mqtls/keystore"
)

var _ keystore.Attester = (*Store)(nil)

// NV indices of the EK certificates (TCG EK Credential Profile 2.x), with
// the EK templates that go with them: RSA 2048 (template L-1), ECC P-256
// (template L-2) and, in the high range, ECC P-384 (template H-3, where
// swtpm_setup --create-ek-cert writes the ECC EK certificate).
const (
	EKCertIndexRSA  = 0x01c00002
	EKCertIndexECC  = 0x01c0000a
	EKCertIndexP384 = 0x01c00016
)

// EKTemplateP384 is the TCG EK Credential Profile's template H-3: ECC
// P-384, SHA-384, AES-256, userWithAuth and adminWithPolicy with the
// profile's PolicyB (SHA-384), and an empty unique field. go-tpm has no
// high-range template; TestEKTemplateP384 checks that it derives the EK
// of swtpm's certificate.
var EKTemplateP384 = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA384,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, AdminWithPolicy: true,
		Restricted: true, Decrypt: true,
	},
	AuthPolicy: tpm2.TPM2BDigest{Buffer: []byte{
		0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc, 0xf5, 0xfd, 0x3a, 0x1a,
		0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4, 0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca,
		0xcb, 0x47, 0xba, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
	}},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
		Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		CurveID: tpm2.TPMECCNistP384,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// ErrNoEKCert: the TPM holds no EK certificate this package can use.
var ErrNoEKCert = errors.New("tpm: no EK certificate")

// ekSlots are the EK certificates tried, in order, with the EK template
// and the persistent handle the TCG recommends for the EK (where
// swtpm_setup, tpm2_createek and Windows keep it: using it saves deriving
// the EK, an RSA key generation, twice per attestation).
var ekSlots = []struct {
	index      tpm2.TPMHandle
	template   tpm2.TPMTPublic
	persistent tpm2.TPMHandle
}{
	{EKCertIndexRSA, tpm2.RSAEKTemplate, 0x81010001},
	{EKCertIndexECC, tpm2.ECCEKTemplate, 0x81010002},
	{EKCertIndexP384, EKTemplateP384, 0x81010016}, // swtpm's handle
}

// akTemplate is the attestation key: a restricted ECDSA P-256 signing key
// (it signs only structures the TPM made, e.g. TPM2_Certify's).
var akTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		SignEncrypt:         true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme: tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		},
		CurveID: tpm2.TPMECCNistP256,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// Attestation proves to an enrollment server that keys of this Store live
// in this TPM (TCG "TPM 2.0 Keys for Device Identity and Attestation"): it
// holds the TPM's EK certificate and a fresh attestation key (AK) made for
// one enrollment. The server encrypts a credential to the EK bound to the
// AK's name ([Attestation.Activate] decrypts it, which only the TPM owning
// the EK can, with the AK loaded), then the AK certifies the device key
// ([Attestation.Certify]).
//
// An Attestation is used by one goroutine; its TPM commands go through the
// Store's lock. The AK blob lives in memory only and is discarded with it.
type Attestation struct {
	s          *Store
	ekCert     []byte
	ekTemplate tpm2.TPMTPublic
	ekHandle   *tpm2.NamedHandle // the persistent EK, or nil: derive it
	ekUser     bool              // the EK admits its (empty) password: userWithAuth
	akPublic   tpm2.TPM2BPublic
	akPrivate  tpm2.TPM2BPrivate
}

// Attest reads the TPM's EK certificate (RSA, ECC P-256, then ECC P-384 in
// the high range), checks that
// it certifies the EK this TPM derives from the standard template, and
// creates an attestation key. [ErrNoEKCert] when no EK certificate is
// provisioned.
func (s *Store) Attest(ctx context.Context) (keystore.Attestation, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	a := &Attestation{s: s}
	err := s.do(func(t transport.TPM) error {
		var tried []string
		for _, slot := range ekSlots {
			der, err := readNV(t, slot.index)
			if errors.Is(err, tpm2.TPMRCHandle) {
				tried = append(tried, fmt.Sprintf("0x%08x", uint32(slot.index)))
				continue
			}
			if err != nil {
				return tpmErr(fmt.Sprintf("read EK certificate at NV 0x%08x", uint32(slot.index)), err)
			}
			// Some manufacturers pad the NV area: parse the first DER object.
			cert, err := x509.ParseCertificate(trimDER(der))
			if err != nil {
				return fmt.Errorf("tpm: EK certificate at NV 0x%08x: %w", uint32(slot.index), err)
			}
			a.ekCert, a.ekTemplate, a.ekUser = cert.Raw, slot.template, slot.template.ObjectAttributes.UserWithAuth
			if rp, err := (tpm2.ReadPublic{ObjectHandle: slot.persistent}).Execute(t); err == nil {
				if pub, err := ekPublicKey(rp.OutPublic); err == nil && pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) {
					a.ekHandle = &tpm2.NamedHandle{Handle: slot.persistent, Name: rp.Name}
					if p, err := rp.OutPublic.Contents(); err == nil {
						a.ekUser = p.ObjectAttributes.UserWithAuth
					}
					break
				}
			}
			ek, err := createEK(t, slot.template)
			if err != nil {
				return err
			}
			flush(t, ek.ObjectHandle)
			pub, err := ekPublicKey(ek.OutPublic)
			if err != nil {
				return err
			}
			if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(cert.PublicKey) {
				return fmt.Errorf("tpm: the EK certificate at NV 0x%08x does not certify the EK made from the standard template", uint32(slot.index))
			}
			break
		}
		if a.ekCert == nil {
			return fmt.Errorf("%w in NV %v (a TPM from its manufacturer has one; for swtpm run swtpm_setup --tpm2 --create-ek-cert)", ErrNoEKCert, tried)
		}
		rsp, err := run(func() (*tpm2.CreateResponse, error) {
			return tpm2.Create{ParentHandle: s.srkAuth(), InPublic: tpm2.New2B(akTemplate)}.Execute(t)
		})
		if err != nil {
			return tpmErr("create attestation key", err)
		}
		a.akPublic, a.akPrivate = rsp.OutPublic, rsp.OutPrivate
		return nil
	})
	if err != nil {
		return nil, err
	}
	return a, nil
}

// EKCertificate returns the EK certificate (DER).
func (a *Attestation) EKCertificate() []byte { return bytes.Clone(a.ekCert) }

// AKPublic returns the attestation key's public area (TPM2B_PUBLIC).
func (a *Attestation) AKPublic() []byte { return tpm2.Marshal(a.akPublic) }

// Activate decrypts a credential (TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
// from TPM2_MakeCredential) with the EK, which the TPM does only when the
// credential names the loaded AK.
func (a *Attestation) Activate(ctx context.Context, credential, secret []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	blob, err := tpm2.Unmarshal[tpm2.TPM2BIDObject](credential)
	if err != nil {
		return nil, fmt.Errorf("tpm: credential: %w", err)
	}
	enc, err := tpm2.Unmarshal[tpm2.TPM2BEncryptedSecret](secret)
	if err != nil {
		return nil, fmt.Errorf("tpm: credential secret: %w", err)
	}
	var out []byte
	err = a.s.do(func(t transport.TPM) error {
		ak, err := a.loadAK(t)
		if err != nil {
			return err
		}
		defer flush(t, ak.ObjectHandle)
		ek := a.ekHandle
		if ek == nil {
			rsp, err := createEK(t, a.ekTemplate)
			if err != nil {
				return err
			}
			defer flush(t, rsp.ObjectHandle)
			ek = &tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}
		}
		// The high-range EKs admit their empty password; the low-range
		// ones only their policy (PolicySecret with the endorsement
		// hierarchy).
		var sess tpm2.Session = tpm2.PasswordAuth(nil)
		if !a.ekUser {
			ps, closeSess, err := tpm2.PolicySession(t, tpm2.TPMAlgSHA256, 16)
			if err != nil {
				return tpmErr("start EK policy session", err)
			}
			defer func() { _ = closeSess() }() // flushed by the TPM after use anyway
			if _, err := (tpm2.PolicySecret{
				AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
				PolicySession: ps.Handle(),
				NonceTPM:      ps.NonceTPM(),
			}).Execute(t); err != nil {
				return tpmErr("EK policy (PolicySecret endorsement)", err)
			}
			sess = ps
		}
		// RETRY (swtpm answers it while busy) means not executed: the
		// policy session is still unused.
		rsp, err := run(func() (*tpm2.ActivateCredentialResponse, error) {
			return tpm2.ActivateCredential{
				ActivateHandle: tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
				KeyHandle:      tpm2.AuthHandle{Handle: ek.Handle, Name: ek.Name, Auth: sess},
				CredentialBlob: *blob,
				Secret:         *enc,
			}.Execute(t)
		})
		if err != nil {
			return tpmErr("activate credential", err)
		}
		out = rsp.CertInfo.Buffer
		return nil
	})
	return out, err
}

// Certify has the AK certify key, a signer of this Store, with nonce as
// qualifying data. It returns the key's public area (TPM2B_PUBLIC), the
// attestation structure (TPMS_ATTEST) and the AK's signature over it
// (TPMT_SIGNATURE).
func (a *Attestation) Certify(ctx context.Context, key crypto.Signer, nonce []byte) (public, info, sig []byte, err error) {
	if err := ctx.Err(); err != nil {
		return nil, nil, nil, err
	}
	k, ok := key.(*signer)
	if !ok || k.store != a.s {
		return nil, nil, nil, fmt.Errorf("tpm: certify: the key (%T) is not a key of this TPM store", key)
	}
	err = a.s.do(func(t transport.TPM) error {
		ak, err := a.loadAK(t)
		if err != nil {
			return err
		}
		defer flush(t, ak.ObjectHandle)
		obj, err := run(func() (*tpm2.LoadResponse, error) {
			return tpm2.Load{ParentHandle: a.s.srkAuth(), InPrivate: k.key.private, InPublic: k.key.public}.Execute(t)
		})
		if err != nil {
			return tpmErr("load key", err)
		}
		defer flush(t, obj.ObjectHandle)
		rsp, err := run(func() (*tpm2.CertifyResponse, error) {
			return tpm2.Certify{
				ObjectHandle:   tpm2.AuthHandle{Handle: obj.ObjectHandle, Name: obj.Name, Auth: tpm2.PasswordAuth(nil)},
				SignHandle:     tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)},
				QualifyingData: tpm2.TPM2BData{Buffer: nonce},
				InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			}.Execute(t)
		})
		if err != nil {
			return tpmErr("certify key", err)
		}
		public, info, sig = tpm2.Marshal(k.key.public), rsp.CertifyInfo.Bytes(), tpm2.Marshal(rsp.Signature)
		return nil
	})
	return public, info, sig, err
}

func (a *Attestation) loadAK(t transport.TPM) (*tpm2.LoadResponse, error) {
	rsp, err := run(func() (*tpm2.LoadResponse, error) {
		return tpm2.Load{ParentHandle: a.s.srkAuth(), InPrivate: a.akPrivate, InPublic: a.akPublic}.Execute(t)
	})
	if err != nil {
		return nil, tpmErr("load attestation key", err)
	}
	return rsp, nil
}

func (s *Store) srkAuth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: s.srk, Name: s.srkName, Auth: tpm2.PasswordAuth(nil)}
}

func createEK(t transport.TPM, template tpm2.TPMTPublic) (*tpm2.CreatePrimaryResponse, error) {
	rsp, err := run(func() (*tpm2.CreatePrimaryResponse, error) {
		return tpm2.CreatePrimary{
			PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			InPublic:      tpm2.New2B(template),
		}.Execute(t)
	})
	if err != nil {
		return nil, tpmErr("create endorsement key", err)
	}
	return rsp, nil
}

func ekPublicKey(public tpm2.TPM2BPublic) (crypto.PublicKey, error) {
	p, err := public.Contents()
	if err != nil {
		return nil, fmt.Errorf("tpm: EK public area: %w", err)
	}
	pub, err := tpm2.Pub(*p)
	if err != nil {
		return nil, fmt.Errorf("tpm: EK public key: %w", err)
	}
	return pub, nil
}

// flush unloads a transient object; a failure leaves a slot used until the
// TPM restarts, which the next command reports if it matters.
func flush(t transport.TPM, h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(t)
}

// readNV reads a whole NV index, in chunks the TPM accepts.
func readNV(t transport.TPM, index tpm2.TPMHandle) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(t)
	if err != nil {
		return nil, err
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	// The index's own (empty) authorization where allowed: it works when
	// the owner has a password.
	auth := tpm2.AuthHandle{Handle: index, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)}
	if !contents.Attributes.AuthRead && contents.Attributes.OwnerRead {
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	}
	const chunk = 512 // below every TPM's MAX_NV_BUFFER_SIZE
	out := make([]byte, 0, contents.DataSize)
	for off := 0; off < int(contents.DataSize); off += chunk {
		n := min(chunk, int(contents.DataSize)-off)
		rsp, err := run(func() (*tpm2.NVReadResponse, error) {
			return tpm2.NVRead{
				AuthHandle: auth,
				NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
				Size:       uint16(n),
				Offset:     uint16(off),
			}.Execute(t)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

// trimDER cuts b after its first DER object (NV areas may be padded).
func trimDER(b []byte) []byte {
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(b, &raw); err != nil {
		return b // the certificate parser reports it
	}
	return raw.FullBytes
}
