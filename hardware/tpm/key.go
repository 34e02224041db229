package tpm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/mqtls/mqtls/keystore"
)

// srkTemplate is the storage root key that openssl's tpm2 provider,
// tpm2-tss-engine and tpm2-tools rebuild for a key file whose parent is the
// owner hierarchy: the TCG H-2 ECC P-256 storage template (AES-128-CFB, noDA,
// restricted decrypt) with an empty unique field. go-tpm's ECCSRKTemplate
// fills unique with 32 zero bytes per coordinate, which yields another SRK,
// and those tools then fail to load our keys (TPM_RC_INTEGRITY).
var srkTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM:            true,
		FixedParent:         true,
		SensitiveDataOrigin: true,
		UserWithAuth:        true,
		NoDA:                true,
		Restricted:          true,
		Decrypt:             true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
		Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		CurveID: tpm2.TPMECCNistP256,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

// keyTemplate returns the template of an unrestricted signing key. The
// scheme is left NULL so one key serves ECDSA or, for RSA, PKCS #1 v1.5 and
// PSS, chosen per signature.
func keyTemplate(alg keystore.KeyAlg) tpm2.TPMTPublic {
	t := tpm2.TPMTPublic{
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			NoDA:                true,
			SignEncrypt:         true,
		},
	}
	if bits := alg.RSABits(); bits != 0 {
		t.Type = tpm2.TPMAlgRSA
		t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Scheme:  tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull},
			KeyBits: tpm2.TPMKeyBits(bits),
		})
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
		return t
	}
	curve := tpm2.TPMECCNistP256
	if alg == keystore.ECDSAP384 {
		curve = tpm2.TPMECCNistP384
	}
	t.Type = tpm2.TPMAlgECC
	t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
		CurveID: curve,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	})
	t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{})
	return t
}

// key is a TPM-wrapped key blob and its public key.
type key struct {
	public  tpm2.TPM2BPublic
	private tpm2.TPM2BPrivate
	pub     crypto.PublicKey
	alg     keystore.KeyAlg
}

func newKey(public tpm2.TPM2BPublic, private tpm2.TPM2BPrivate) (*key, error) {
	contents, err := public.Contents()
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %v", keystore.ErrCorrupt, err)
	}
	if !contents.ObjectAttributes.SignEncrypt || contents.ObjectAttributes.Restricted {
		return nil, fmt.Errorf("%w: not an unrestricted signing key", keystore.ErrUnsupported)
	}
	pub, err := tpm2.Pub(*contents)
	if err != nil {
		return nil, fmt.Errorf("%w: public key: %v", keystore.ErrCorrupt, err)
	}
	alg, err := keystore.AlgOf(pub)
	if err != nil {
		return nil, err
	}
	return &key{public: public, private: private, pub: pub, alg: alg}, nil
}

// oidLoadableKey identifies a TSS2 key loadable under its parent
// (TCG TSS 2.0 ASN.1 key file specification).
var oidLoadableKey = asn1.ObjectIdentifier{2, 23, 133, 10, 1, 3}

// ownerHierarchy as the parent means: the SRK made from the H-2 template.
const ownerHierarchy = 0x40000001

const pemType = "TSS2 PRIVATE KEY"

// tssKey is the ASN.1 TPMKey structure as this package writes it (policy
// and secret omitted: this package neither writes nor accepts them).
type tssKey struct {
	Type      asn1.ObjectIdentifier
	EmptyAuth bool `asn1:"explicit,tag:0,optional"`
	Parent    int64
	Pubkey    []byte // TPM2B_PUBLIC, size prefix included
	Privkey   []byte // TPM2B_PRIVATE, size prefix included
}

func (k *key) encode() []byte {
	der, err := asn1.Marshal(tssKey{
		Type:      oidLoadableKey,
		EmptyAuth: true,
		Parent:    ownerHierarchy,
		Pubkey:    tpm2.Marshal(k.public),
		Privkey:   tpm2.Marshal(k.private),
	})
	if err != nil {
		panic("tpm: marshal key file: " + err.Error()) // fixed structure: cannot fail
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der})
}

func decodeKey(data []byte) (*key, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != pemType {
		return nil, fmt.Errorf("%w: no PEM block of type %s", keystore.ErrCorrupt, pemType)
	}
	tk, err := parseTSSKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	if !tk.Type.Equal(oidLoadableKey) {
		return nil, fmt.Errorf("%w: key type %v is not a loadable key", keystore.ErrUnsupported, tk.Type)
	}
	if tk.Parent != ownerHierarchy {
		return nil, fmt.Errorf("%w: parent 0x%x; only keys under the owner hierarchy SRK (0x40000001) are supported", keystore.ErrUnsupported, tk.Parent)
	}
	if !tk.EmptyAuth {
		return nil, fmt.Errorf("%w: key has an authorization value; only emptyAuth keys are supported", keystore.ErrUnsupported)
	}
	public, err := tpm2.Unmarshal[tpm2.TPM2BPublic](tk.Pubkey)
	if err != nil {
		return nil, fmt.Errorf("%w: public area: %v", keystore.ErrCorrupt, err)
	}
	private, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](tk.Privkey)
	if err != nil {
		return nil, fmt.Errorf("%w: private area: %v", keystore.ErrCorrupt, err)
	}
	return newKey(*public, *private)
}

// signer signs with a TPM key. It loads the key for each signature and
// flushes it afterwards.
type signer struct {
	store *Store
	key   *key
}

func (s *signer) Public() crypto.PublicKey { return s.key.pub }

// Sign implements [crypto.Signer]. It blocks while the TPM works and while
// other signers of the same Store use the TPM. rand is ignored: the TPM has
// its own.
func (s *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	h := opts.HashFunc()
	scheme, err := s.scheme(digest, opts)
	if err != nil {
		return nil, err
	}
	var sig *tpm2.TPMTSignature
	err = s.store.do(func(t transport.TPM) (err error) {
		st := s.store
		loaded, err := run(func() (*tpm2.LoadResponse, error) {
			return tpm2.Load{
				ParentHandle: tpm2.AuthHandle{Handle: st.srk, Name: st.srkName, Auth: tpm2.PasswordAuth(nil)},
				InPrivate:    s.key.private,
				InPublic:     s.key.public,
			}.Execute(t)
		})
		if err != nil {
			return tpmErr("load key", err)
		}
		defer func() {
			if _, ferr := run(func() (*tpm2.FlushContextResponse, error) {
				return tpm2.FlushContext{FlushHandle: loaded.ObjectHandle}.Execute(t)
			}); ferr != nil && err == nil {
				err = tpmErr("flush key", ferr)
			}
		}()
		rsp, err := run(func() (*tpm2.SignResponse, error) {
			return tpm2.Sign{
				KeyHandle:  tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name, Auth: tpm2.PasswordAuth(nil)},
				Digest:     tpm2.TPM2BDigest{Buffer: digest},
				InScheme:   scheme,
				Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
			}.Execute(t)
		})
		if err != nil {
			return tpmErr("sign", err)
		}
		sig = &rsp.Signature
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch scheme.Scheme {
	case tpm2.TPMAlgECDSA:
		e, err := sig.Signature.ECDSA()
		if err != nil {
			return nil, fmt.Errorf("tpm: ECDSA signature: %w", err)
		}
		return asn1.Marshal(struct{ R, S *big.Int }{
			new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer),
		})
	case tpm2.TPMAlgRSAPSS:
		r, err := sig.Signature.RSAPSS()
		if err != nil {
			return nil, fmt.Errorf("tpm: RSA-PSS signature: %w", err)
		}
		// The TPM picks the salt length itself (the reference implementation
		// uses the hash length, some TPMs the maximum). Return only what the
		// caller's verifier will accept.
		if err := rsa.VerifyPSS(s.key.pub.(*rsa.PublicKey), h, digest, r.Sig.Buffer, opts.(*rsa.PSSOptions)); err != nil {
			return nil, fmt.Errorf("tpm: the TPM's RSA-PSS signature does not verify with salt length %d: %w", opts.(*rsa.PSSOptions).SaltLength, err)
		}
		return r.Sig.Buffer, nil
	default:
		r, err := sig.Signature.RSASSA()
		if err != nil {
			return nil, fmt.Errorf("tpm: RSA signature: %w", err)
		}
		return r.Sig.Buffer, nil
	}
}

// scheme picks the TPM signature scheme for a digest and the signer options.
func (s *signer) scheme(digest []byte, opts crypto.SignerOpts) (tpm2.TPMTSigScheme, error) {
	h := opts.HashFunc()
	hashAlg, ok := map[crypto.Hash]tpm2.TPMIAlgHash{
		crypto.SHA256: tpm2.TPMAlgSHA256, crypto.SHA384: tpm2.TPMAlgSHA384, crypto.SHA512: tpm2.TPMAlgSHA512,
	}[h]
	if !ok {
		return tpm2.TPMTSigScheme{}, fmt.Errorf("%w: tpm: hash %v (want SHA-256, SHA-384 or SHA-512)", keystore.ErrUnsupported, h)
	}
	if len(digest) != h.Size() {
		return tpm2.TPMTSigScheme{}, fmt.Errorf("tpm: digest is %d bytes, %v needs %d", len(digest), h, h.Size())
	}
	alg := tpm2.TPMAlgRSASSA
	switch s.key.pub.(type) {
	case *ecdsa.PublicKey:
		if want := s.key.alg.Hash(); h != want {
			return tpm2.TPMTSigScheme{}, fmt.Errorf("%w: tpm: %s key signs %v digests only, not %v", keystore.ErrUnsupported, s.key.alg, want, h)
		}
		alg = tpm2.TPMAlgECDSA
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			if sl := pss.SaltLength; sl != rsa.PSSSaltLengthAuto && sl != rsa.PSSSaltLengthEqualsHash && sl != h.Size() {
				return tpm2.TPMTSigScheme{}, fmt.Errorf("%w: tpm: RSA-PSS salt length %d (the TPM uses the hash length)", keystore.ErrUnsupported, sl)
			}
			alg = tpm2.TPMAlgRSAPSS
		}
	}
	return tpm2.TPMTSigScheme{
		Scheme:  alg,
		Details: tpm2.NewTPMUSigScheme(alg, &tpm2.TPMSSchemeHash{HashAlg: hashAlg}),
	}, nil
}

// parseTSSKey reads a TPMKey structure field by field: openssl's tpm2
// provider encodes emptyAuth TRUE as 0x01 (BER, not DER), which
// encoding/asn1 refuses for a bool, and the optional tagged fields must be
// told apart from the parent INTEGER.
func parseTSSKey(der []byte) (tssKey, error) {
	var tk tssKey
	bad := func(what string, err error) (tssKey, error) {
		return tssKey{}, fmt.Errorf("%w: TSS2 key structure: %s: %v", keystore.ErrCorrupt, what, err)
	}
	var seq asn1.RawValue
	if rest, err := asn1.Unmarshal(der, &seq); err != nil || len(rest) != 0 || seq.Tag != asn1.TagSequence {
		return bad("not a SEQUENCE", err)
	}
	rest, err := asn1.Unmarshal(seq.Bytes, &tk.Type)
	if err != nil {
		return bad("type", err)
	}
	for {
		var f asn1.RawValue
		if _, err := asn1.Unmarshal(rest, &f); err != nil {
			return bad("field", err)
		}
		if f.Class != asn1.ClassContextSpecific {
			break
		}
		rest, _ = asn1.Unmarshal(rest, &f)
		switch f.Tag {
		case 0:
			var b asn1.RawValue
			if _, err := asn1.Unmarshal(f.Bytes, &b); err != nil || b.Tag != asn1.TagBoolean || len(b.Bytes) != 1 {
				return bad("emptyAuth", err)
			}
			tk.EmptyAuth = b.Bytes[0] != 0
		default:
			return tssKey{}, fmt.Errorf("%w: key has a policy or an imported secret ([%d]); only plain emptyAuth keys are supported", keystore.ErrUnsupported, f.Tag)
		}
	}
	if rest, err = asn1.Unmarshal(rest, &tk.Parent); err != nil {
		return bad("parent", err)
	}
	if rest, err = asn1.Unmarshal(rest, &tk.Pubkey); err != nil {
		return bad("pubkey", err)
	}
	if rest, err = asn1.Unmarshal(rest, &tk.Privkey); err != nil {
		return bad("privkey", err)
	}
	if len(rest) != 0 {
		return bad("trailing data", nil)
	}
	return tk, nil
}

// SRKTemplate returns the SRK's template (TCG H-2, unique empty), for
// tools and tests that create keys under the SRK themselves.
func SRKTemplate() tpm2.TPMTPublic { return srkTemplate }

// KeyFile encodes a key created under the SRK (TPM2B_PUBLIC and
// TPM2B_PRIVATE, as TPM2_Create returns them) as this package's key file.
// The Store loads any unrestricted signing key from such a file, whatever
// its other attributes: what the TPM vouches for is left to attestation.
func KeyFile(public tpm2.TPM2BPublic, private tpm2.TPM2BPrivate) []byte {
	return (&key{public: public, private: private}).encode()
}
