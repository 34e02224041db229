// Package attest is the enrollment server's side of TPM key attestation
// (TCG "TPM 2.0 Keys for Device Identity and Attestation", LDevID
// enrollment): before the CA signs, the device proves that the key of its
// request lives in a TPM whose endorsement key (EK) a trusted TPM
// manufacturer certified.
//
//  1. [Verifier.Challenge]: the device sends its EK certificate and the
//     public area of a fresh attestation key (AK, restricted signing). The
//     EK certificate must chain to a configured manufacturer CA; the AK must
//     be a restricted signing key fixed to its TPM. The answer is a
//     credential made with TPM2_MakeCredential's algorithm (go-tpm's
//     tpm2.CreateCredential, with the name and symmetric algorithms of the
//     EK's TCG template) for the EK, bound to the AK's name, wrapping a
//     random secret, and a nonce.
//  2. [Verifier.Verify]: the device returns the secret (only the TPM that
//     owns the EK decrypts it, and only with that AK loaded) and a
//     TPM2_Certify of its device key by the AK over the nonce. The key must
//     be the request's, fixedTPM, fixedParent, sensitiveDataOrigin, a
//     signing key and neither a decryption key nor duplicable.
//
// # Security
//
// A challenge is single use (taken out of the registry by the first Verify,
// whatever its outcome: the database lets one taker have it), expires after
// Config.TTL, and is bound to the device ID and to the hash of the
// enrollment token it was asked with. The registry keeps the secret's hash
// only; the secret and the nonce are compared in constant time. A device
// has at most Config.PerDevice challenges pending. Challenges live in the
// registry: both steps may reach different servers sharing it.
package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/mqtls/mqtls/provisioning/registry"
)

// Error is an attestation refusal: Label names the cause (for metrics and
// tests), Reason says it and how to fix it. Malformed marks input that does
// not parse (HTTP 400); other refusals are policy (HTTP 403).
type Error struct {
	Label     string
	Reason    string
	Malformed bool
}

func (e *Error) Error() string { return "attest: " + e.Reason }

func refuse(label, format string, args ...any) *Error {
	return &Error{Label: label, Reason: fmt.Sprintf(format, args...)}
}

func malformed(label, format string, args ...any) *Error {
	return &Error{Label: label, Reason: fmt.Sprintf(format, args...), Malformed: true}
}

// Config configures a Verifier.
type Config struct {
	// Roots are the TPM manufacturer CAs an EK certificate must chain to
	// (required; see LoadRoots). Intermediates, if any, help build chains.
	Roots         *x509.CertPool
	Intermediates *x509.CertPool
	// Store keeps the pending challenges (required): the registry, shared
	// by every server that may receive the second step.
	Store Store
	// TTL is how long a challenge may be answered (default 2 minutes).
	TTL time.Duration
	// PerDevice bounds the challenges a device has pending (default 4);
	// past it new ones are refused until some are answered or expire.
	PerDevice int
	// Now is the clock (default time.Now), for tests.
	Now func() time.Time
}

// Store keeps pending challenges (registry.Registry is one).
type Store interface {
	PutChallenge(ctx context.Context, c registry.Challenge, perDevice int) error
	TakeChallenge(ctx context.Context, id string) (registry.Challenge, error)
}

// Verifier issues credential challenges and verifies their answers. It is
// safe for concurrent use.
type Verifier struct {
	cfg Config
}

// state is what a pending challenge keeps (registry.Challenge.Data).
type state struct {
	Binding      []byte `json:"binding"`       // SHA-256 of the token
	SecretSHA256 []byte `json:"secret_sha256"` // of the credential's secret
	Nonce        []byte `json:"nonce"`
	AK           []byte `json:"ak"` // TPM2B_PUBLIC
	EK           EK     `json:"ek"`
}

// EK identifies an attested endorsement key.
type EK struct {
	SHA256 string `json:"sha256"` // hex SHA-256 of the EK's SubjectPublicKeyInfo
	Issuer string `json:"issuer"` // the EK certificate's issuer (RFC 2253)
	Serial string `json:"serial"` // the EK certificate's serial, hex
}

// New returns a Verifier.
func New(cfg Config) (*Verifier, error) {
	if cfg.Roots == nil {
		return nil, errors.New("attest: no TPM manufacturer CA configured")
	}
	if cfg.Store == nil {
		return nil, errors.New("attest: no challenge store (registry) configured")
	}
	if cfg.TTL <= 0 {
		cfg.TTL = 2 * time.Minute
	}
	if cfg.PerDevice <= 0 {
		cfg.PerDevice = 4
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Verifier{cfg: cfg}, nil
}

// Challenge is the server's answer to a challenge request; the fields are
// what the device feeds to TPM2_ActivateCredential (TPM2B_ID_OBJECT,
// TPM2B_ENCRYPTED_SECRET) and TPM2_Certify (qualifying data).
type Challenge struct {
	ID         string    `json:"id"`
	Credential []byte    `json:"credential"`
	Secret     []byte    `json:"secret"`
	Nonce      []byte    `json:"nonce"`
	Expires    time.Time `json:"expires"`
}

// Binding is what a challenge is bound to besides the device ID: the
// SHA-256 of the enrollment token.
func Binding(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// Challenge checks the EK certificate and the AK and makes a credential
// challenge for deviceID.
func (v *Verifier) Challenge(ctx context.Context, deviceID string, binding [32]byte, ekCertDER, akPublic []byte) (Challenge, error) {
	now := v.cfg.Now()
	ek, ekPub, err := v.checkEK(ekCertDER, now)
	if err != nil {
		return Challenge{}, err
	}
	akPub, err := publicArea(akPublic)
	if err != nil {
		return Challenge{}, malformed("bad_ak", "attestation key public area: %v", err)
	}
	a := akPub.ObjectAttributes
	if !a.Restricted || !a.SignEncrypt || a.Decrypt || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return Challenge{}, refuse("ak_attributes", "the attestation key must be a restricted signing key with fixedTPM, fixedParent and sensitiveDataOrigin (got %s)", attrs(a))
	}
	if !strongName(akPub.NameAlg) {
		return Challenge{}, refuse("ak_attributes", "the attestation key's name algorithm 0x%04x is not SHA-256, SHA-384 or SHA-512", uint16(akPub.NameAlg))
	}
	name, err := tpm2.ObjectName(akPub)
	if err != nil {
		return Challenge{}, malformed("bad_ak", "attestation key name: %v", err)
	}
	ekKey, err := tpm2.ImportEncapsulationKey(ekPublicArea(ekPub))
	if err != nil {
		return Challenge{}, refuse("ek_unsupported", "EK key: %v", err)
	}
	secret, nonce := random(32), random(32)
	cred, enc, err := tpm2.CreateCredential(rand.Reader, ekKey, name.Buffer, secret)
	if err != nil {
		return Challenge{}, refuse("ek_unsupported", "make credential for the EK: %v", err)
	}
	cred, enc = tpm2.Marshal(tpm2.TPM2BIDObject{Buffer: cred}), tpm2.Marshal(tpm2.TPM2BEncryptedSecret{Buffer: enc})
	sum := sha256.Sum256(secret)
	data, err := json.Marshal(state{Binding: binding[:], SecretSHA256: sum[:], Nonce: nonce, AK: akPublic, EK: ek})
	if err != nil {
		return Challenge{}, fmt.Errorf("attest: %w", err)
	}
	c := registry.Challenge{ID: base64.RawURLEncoding.EncodeToString(random(18)), DeviceID: deviceID, Expires: now.Add(v.cfg.TTL), Data: data}
	if err := v.cfg.Store.PutChallenge(ctx, c, v.cfg.PerDevice); errors.Is(err, registry.ErrChallengeLimit) {
		return Challenge{}, refuse("attest_busy", "%d attestation challenges of this device are pending: answer one or retry in %v", v.cfg.PerDevice, v.cfg.TTL)
	} else if err != nil {
		return Challenge{}, fmt.Errorf("attest: store challenge: %w", err)
	}
	return Challenge{ID: c.ID, Credential: cred, Secret: enc, Nonce: nonce, Expires: c.Expires}, nil
}

// Evidence is the device's answer to a challenge.
type Evidence struct {
	ChallengeID string
	Secret      []byte // the activated credential
	KeyPublic   []byte // TPM2B_PUBLIC of the device key
	CertifyInfo []byte // TPMS_ATTEST of TPM2_Certify
	Signature   []byte // TPMT_SIGNATURE of the AK over CertifyInfo
}

// Verify checks the evidence for deviceID's request for key and returns the
// EK that vouches for it. The challenge is used up whatever the outcome.
func (v *Verifier) Verify(ctx context.Context, deviceID string, binding [32]byte, ev Evidence, key crypto.PublicKey) (EK, error) {
	now := v.cfg.Now()
	p, err := v.cfg.Store.TakeChallenge(ctx, ev.ChallengeID)
	if errors.Is(err, registry.ErrNotFound) {
		return EK{}, refuse("challenge_unknown", "unknown or already used attestation challenge: ask for a new one")
	}
	if err != nil {
		return EK{}, fmt.Errorf("attest: take challenge: %w", err)
	}
	var c state
	if err := json.Unmarshal(p.Data, &c); err != nil {
		return EK{}, fmt.Errorf("attest: challenge %s: %w", p.ID, err)
	}
	sum := sha256.Sum256(ev.Secret)
	switch {
	case !now.Before(p.Expires):
		return EK{}, refuse("challenge_expired", "attestation challenge expired at %s: ask for a new one", p.Expires.UTC().Format(time.RFC3339))
	case p.DeviceID != deviceID || subtle.ConstantTimeCompare(c.Binding, binding[:]) != 1:
		return EK{}, refuse("challenge_mismatch", "attestation challenge was issued for another device or token")
	case subtle.ConstantTimeCompare(c.SecretSHA256, sum[:]) != 1:
		return EK{}, refuse("activation_failed", "wrong activation secret: the attestation key is not in the TPM of the EK certificate")
	}
	ak, err := publicArea(c.AK)
	if err != nil {
		return EK{}, fmt.Errorf("attest: challenge %s: %w", p.ID, err)
	}
	kpub, err := publicArea(ev.KeyPublic)
	if err != nil {
		return EK{}, malformed("bad_evidence", "key public area: %v", err)
	}
	if err := verifySignature(ak, ev.CertifyInfo, ev.Signature); err != nil {
		return EK{}, err
	}
	info, err := tpm2.Unmarshal[tpm2.TPMSAttest](ev.CertifyInfo)
	if err != nil {
		return EK{}, malformed("bad_evidence", "certify info: %v", err)
	}
	// go-tpm does not check the magic. Without it a restricted AK signs
	// any structure the device wrote (TPM2_Hash's ticket only says the
	// data does not start with TPM_GENERATED_VALUE).
	if info.Magic.Check() != nil {
		return EK{}, refuse("certify_forged", "the certify info was not made by a TPM (magic 0x%08x, want TPM_GENERATED_VALUE)", uint32(info.Magic))
	}
	if info.Type != tpm2.TPMSTAttestCertify {
		return EK{}, refuse("certify_mismatch", "attestation structure is not a TPM2_Certify (type 0x%x)", uint16(info.Type))
	}
	if subtle.ConstantTimeCompare(info.ExtraData.Buffer, c.Nonce) != 1 {
		return EK{}, refuse("certify_mismatch", "certify info does not carry the challenge's nonce")
	}
	certified, err := info.Attested.Certify()
	if err != nil {
		return EK{}, malformed("bad_evidence", "certify info: %v", err)
	}
	name, err := tpm2.ObjectName(kpub)
	if err != nil {
		return EK{}, malformed("bad_evidence", "key name: %v", err)
	}
	if subtle.ConstantTimeCompare(certified.Name.Buffer, name.Buffer) != 1 {
		return EK{}, refuse("certify_mismatch", "the certified key is not the key whose public area was sent")
	}
	tpub, err := tpm2.Pub(*kpub)
	if err != nil {
		return EK{}, malformed("bad_evidence", "key public key: %v", err)
	}
	if k, ok := key.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(tpub) {
		return EK{}, refuse("certify_mismatch", "the certified key is not the key of the certificate request")
	}
	// The name binds the certified public area: a weak hash would let
	// another public area (other attributes) share it.
	if !strongName(kpub.NameAlg) {
		return EK{}, refuse("key_attributes", "the device key's name algorithm 0x%04x is not SHA-256, SHA-384 or SHA-512", uint16(kpub.NameAlg))
	}
	a := kpub.ObjectAttributes
	if !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin || !a.SignEncrypt || a.Decrypt || a.Restricted || a.EncryptedDuplication {
		return EK{}, refuse("key_attributes", "the device key must be a TPM-generated signing key that cannot leave its TPM (fixedTPM, fixedParent, sensitiveDataOrigin, sign; not decrypt, restricted or duplicable); got %s", attrs(a))
	}
	return c.EK, nil
}

// publicArea parses a TPM2B_PUBLIC.
func publicArea(b []byte) (*tpm2.TPMTPublic, error) {
	p, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		return nil, err
	}
	return p.Contents()
}

// checkEK verifies the EK certificate and returns its identity and key.
func (v *Verifier) checkEK(der []byte, now time.Time) (EK, crypto.PublicKey, error) {
	cert, err := ParseEKCertificate(der)
	if err != nil {
		return EK{}, nil, malformed("bad_ek_certificate", "EK certificate: %v", err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: v.cfg.Roots, Intermediates: v.cfg.Intermediates, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return EK{}, nil, refuse("ek_untrusted", "EK certificate (issuer %q) does not chain to a configured TPM manufacturer CA (--tpm-ca): %v", cert.Issuer.String(), err)
	}
	// Only an EK certificate vouches for a TPM: a manufacturer CA may
	// sign other certificates (a CA, a TLS server) whose key is anywhere.
	usage := x509.KeyUsageKeyEncipherment
	switch k := cert.PublicKey.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 {
			return EK{}, nil, refuse("ek_unsupported", "EK RSA key of %d bits (want 2048: templates L-1, H-1)", k.N.BitLen())
		}
	case *ecdsa.PublicKey:
		usage = x509.KeyUsageKeyAgreement
		if c := k.Curve; c != elliptic.P256() && c != elliptic.P384() {
			return EK{}, nil, refuse("ek_unsupported", "EK curve %s (want P-256 or P-384)", c.Params().Name)
		}
	default:
		return EK{}, nil, refuse("ek_unsupported", "EK key type %T (want RSA or ECC)", cert.PublicKey)
	}
	switch {
	case cert.IsCA:
		return EK{}, nil, refuse("ek_usage", "the EK certificate %q is a CA certificate, not an EK certificate", cert.Subject.String())
	case (len(cert.ExtKeyUsage) > 0 || len(cert.UnknownExtKeyUsage) > 0) && !slices.ContainsFunc(cert.UnknownExtKeyUsage, oidEKCertificate.Equal):
		return EK{}, nil, refuse("ek_usage", "the EK certificate's extended key usage lacks tcg-kp-EKCertificate (2.23.133.8.1): not an EK certificate")
	case cert.KeyUsage != 0 && cert.KeyUsage&usage == 0:
		return EK{}, nil, refuse("ek_usage", "the EK certificate's key usage (0x%x) lacks %s for its key type: not an EK certificate", int(cert.KeyUsage), map[x509.KeyUsage]string{x509.KeyUsageKeyEncipherment: "keyEncipherment", x509.KeyUsageKeyAgreement: "keyAgreement"}[usage])
	}
	return EK{SHA256: Fingerprint(cert), Issuer: cert.Issuer.String(), Serial: cert.SerialNumber.Text(16)}, cert.PublicKey, nil
}

// Fingerprint is the EK's identity: the hex SHA-256 of the EK
// certificate's SubjectPublicKeyInfo (the same EK keeps it across
// re-issued certificates).
func Fingerprint(ekCert *x509.Certificate) string {
	sum := sha256.Sum256(ekCert.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}

var (
	oidSAN           = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1} // tcg-kp-EKCertificate
)

// ParseEKCertificate parses an EK certificate. TCG EK certificates carry a
// critical subject alternative name holding only a directoryName (TPM
// manufacturer, model, version), which crypto/x509 leaves in
// UnhandledCriticalExtensions, failing every Verify; it is accepted here
// (the one place this is worked around; TestGoLeavesTCGSANUnhandled fails
// when crypto/x509 changes).
func ParseEKCertificate(der []byte) (*x509.Certificate, error) {
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	var keep []asn1.ObjectIdentifier
	for _, o := range cert.UnhandledCriticalExtensions {
		if !o.Equal(oidSAN) {
			keep = append(keep, o)
		}
	}
	cert.UnhandledCriticalExtensions = keep
	return cert, nil
}

// verifySignature checks the AK's signature over info.
func verifySignature(ak *tpm2.TPMTPublic, info, sigBytes []byte) error {
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](sigBytes)
	if err != nil {
		return malformed("bad_evidence", "signature: %v", err)
	}
	pub, err := tpm2.Pub(*ak)
	if err != nil {
		return malformed("bad_ak", "attestation key: %v", err)
	}
	bad := refuse("signature_invalid", "the attestation key's signature over the certify info does not verify")
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		e, err := sig.Signature.ECDSA()
		if err != nil || sig.SigAlg != tpm2.TPMAlgECDSA {
			return bad
		}
		h, err := e.Hash.Hash()
		if err != nil || h.Size() < crypto.SHA256.Size() {
			return bad
		}
		d := h.New()
		d.Write(info)
		r, s := new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)
		if !ecdsa.Verify(k, d.Sum(nil), r, s) {
			return bad
		}
	case *rsa.PublicKey:
		e, err := sig.Signature.RSASSA()
		if err != nil || sig.SigAlg != tpm2.TPMAlgRSASSA {
			return bad
		}
		h, err := e.Hash.Hash()
		if err != nil || h.Size() < crypto.SHA256.Size() {
			return bad
		}
		d := h.New()
		d.Write(info)
		if rsa.VerifyPKCS1v15(k, h, d.Sum(nil), e.Sig.Buffer) != nil {
			return bad
		}
	default:
		return refuse("ak_attributes", "attestation key type %T", pub)
	}
	return nil
}

// ekPublicArea is the public area the TCG EK templates give the EK of
// pub, as far as TPM2_MakeCredential uses it (name and symmetric
// algorithms): RSA 2048 (L-1, H-1) and ECC P-256 (L-2, H-2) use SHA-256
// and AES-128, ECC P-384 (H-3, at 0x01c00016) SHA-384 and AES-256.
func ekPublicArea(pub crypto.PublicKey) *tpm2.TPMTPublic {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		t := tpm2.RSAEKTemplate
		d, _ := t.Parameters.RSADetail() // a constant template: copied, not changed
		p := *d
		if k.E != 65537 {
			p.Exponent = uint32(k.E)
		}
		t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &p)
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.Bytes()})
		return &t
	case *ecdsa.PublicKey:
		t := tpm2.ECCEKTemplate
		d, _ := t.Parameters.ECCDetail()
		p := *d
		if k.Curve == elliptic.P384() {
			t.NameAlg = tpm2.TPMAlgSHA384
			p.CurveID = tpm2.TPMECCNistP384
			p.Symmetric.KeyBits = tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256))
		}
		t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &p)
		size := (k.Curve.Params().BitSize + 7) / 8
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, size))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, size))},
		})
		return &t
	}
	return &tpm2.TPMTPublic{} // checkEK admits RSA and ECC only
}

func strongName(alg tpm2.TPMIAlgHash) bool {
	return alg == tpm2.TPMAlgSHA256 || alg == tpm2.TPMAlgSHA384 || alg == tpm2.TPMAlgSHA512
}

func attrs(a tpm2.TPMAObject) string {
	return fmt.Sprintf("fixedTPM=%t fixedParent=%t sensitiveDataOrigin=%t sign=%t decrypt=%t restricted=%t encryptedDuplication=%t",
		a.FixedTPM, a.FixedParent, a.SensitiveDataOrigin, a.SignEncrypt, a.Decrypt, a.Restricted, a.EncryptedDuplication)
}

func random(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return b
}

// LoadRoots reads TPM manufacturer CA certificates from a file or a
// directory (PEM, several per file allowed, or DER). In a directory only
// *.pem, *.crt, *.cer and *.der files are read, and PEM files holding no
// certificate (a CA's private key, as in swtpm's local CA directory) are
// passed over. Fails closed: a missing path, an unreadable or unparsable
// file, a certificate that is not a CA, or no certificate at all is an
// error.
func LoadRoots(path string) (*x509.CertPool, int, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, 0, fmt.Errorf("attest: TPM CA %w", err)
	}
	files := []string{path}
	if fi.IsDir() {
		files = nil
		err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			switch strings.ToLower(filepath.Ext(p)) {
			case ".pem", ".crt", ".cer", ".der":
				if d.Type().IsRegular() {
					files = append(files, p)
				}
			}
			return nil
		})
		if err != nil {
			return nil, 0, fmt.Errorf("attest: TPM CA directory: %w", err)
		}
	}
	pool := x509.NewCertPool()
	n := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, 0, fmt.Errorf("attest: TPM CA: %w", err)
		}
		certs, err := parseCerts(data, fi.IsDir())
		if err != nil {
			return nil, 0, fmt.Errorf("attest: TPM CA file %s: %w", f, err)
		}
		for _, c := range certs {
			if !c.IsCA {
				return nil, 0, fmt.Errorf("attest: TPM CA file %s: %q is not a CA certificate", f, c.Subject.String())
			}
			pool.AddCert(c)
			n++
		}
	}
	if n == 0 {
		return nil, 0, fmt.Errorf("attest: no TPM CA certificate in %s", path)
	}
	return pool, n, nil
}

func parseCerts(data []byte, inDir bool) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := data
	isPEM := false
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		isPEM = true
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) > 0 || (isPEM && inDir) {
		return out, nil
	}
	c, err := x509.ParseCertificate(data)
	if err != nil {
		return nil, fmt.Errorf("neither PEM certificates nor one DER certificate: %v", err)
	}
	return []*x509.Certificate{c}, nil
}
