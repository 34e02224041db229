package provisioning

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/smallstep/pkcs7"
)

// EST paths (RFC 7030 section 3.2.2) and media types.
const (
	PathCACerts       = "/.well-known/est/cacerts"
	PathSimpleEnroll  = "/.well-known/est/simpleenroll"
	PathSimpleReenrol = "/.well-known/est/simplereenroll"
	PathCSRAttrs      = "/.well-known/est/csrattrs"

	TypePKCS10    = "application/pkcs10"
	TypeCertsOnly = "application/pkcs7-mime; smime-type=certs-only"
	TypeCSRAttrs  = "application/csrattrs"
)

// Sentinels for EST refusals; a [*ServerError] matches the one for its
// status code with [errors.Is].
var (
	ErrBadRequest   = errors.New("provisioning: request refused as malformed (400)")
	ErrUnauthorized = errors.New("provisioning: not authorized (401)")
	ErrForbidden    = errors.New("provisioning: refused by issuance policy (403)")
	ErrTooLarge     = errors.New("provisioning: request too large (413)")
	ErrRateLimited  = errors.New("provisioning: rate limited (429)")
	// ErrBadResponse reports an answer that does not certify the request:
	// wrong chain, wrong key, wrong CN.
	ErrBadResponse = errors.New("provisioning: bad EST response")
)

// ServerError is an EST refusal: the HTTP status and the server's reason.
type ServerError struct {
	StatusCode int
	Reason     string
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("provisioning: EST server refused (%d %s): %s", e.StatusCode, http.StatusText(e.StatusCode), e.Reason)
}

// Is matches the sentinel of the status code.
func (e *ServerError) Is(target error) bool {
	switch e.StatusCode {
	case http.StatusBadRequest:
		return target == ErrBadRequest
	case http.StatusUnauthorized:
		return target == ErrUnauthorized
	case http.StatusForbidden:
		return target == ErrForbidden
	case http.StatusRequestEntityTooLarge:
		return target == ErrTooLarge
	case http.StatusTooManyRequests:
		return target == ErrRateLimited
	}
	return false
}

// Client talks EST to one server, trusting only a pinned root. It is safe
// for concurrent use.
type Client struct {
	base  string
	root  *x509.Certificate
	roots *x509.CertPool
	http  *http.Client
}

// NewClient returns a client for the EST server at estURL (https://HOST:PORT,
// optionally with a path prefix) that trusts root only.
func NewClient(estURL string, root *x509.Certificate) (*Client, error) {
	u, err := url.Parse(estURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("provisioning: EST URL %q: want https://HOST:PORT", estURL)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	c := &Client{base: strings.TrimSuffix(u.String(), "/"), root: root, roots: roots}
	c.http = c.httpClient(nil)
	return c, nil
}

func (c *Client) httpClient(cert *tls.Certificate) *http.Client {
	cfg := &tls.Config{RootCAs: c.roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{
		Transport: &http.Transport{
			TLSClientConfig:     cfg,
			TLSHandshakeTimeout: 30 * time.Second,
			ForceAttemptHTTP2:   true,
			MaxIdleConnsPerHost: 4,
		},
		Timeout: 2 * time.Minute,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return errors.New("provisioning: EST server redirected; refusing to follow")
		},
	}
}

// Root returns the pinned root.
func (c *Client) Root() *x509.Certificate { return c.root }

// CACerts fetches the CA certificates (issuing CA and root) the server
// publishes, each verified to chain to the pinned root.
func (c *Client) CACerts(ctx context.Context) ([]*x509.Certificate, error) {
	body, err := c.do(ctx, c.http, http.MethodGet, PathCACerts, nil, nil)
	if err != nil {
		return nil, err
	}
	certs, err := ParseCertsOnly(body)
	if err != nil {
		return nil, err
	}
	inter := x509.NewCertPool()
	for _, cert := range certs {
		inter.AddCert(cert)
	}
	for _, cert := range certs {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: c.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return nil, fmt.Errorf("%w: CA certificate %q does not chain to the pinned root: %v", ErrBadResponse, cert.Subject.CommonName, err)
		}
	}
	return certs, nil
}

// Enroll requests a first certificate for deviceID with the bootstrap
// token, signing the request with signer. It returns the verified chain,
// leaf first, without the root.
func (c *Client) Enroll(ctx context.Context, signer crypto.Signer, deviceID, token string) ([]*x509.Certificate, error) {
	return c.EnrollWithEvidence(ctx, signer, deviceID, token, nil)
}

// Reenroll renews the certificate current (authenticating with it over
// mutual TLS) for the key of signer: the same key as current's, or a new
// one. It returns the verified chain, leaf first, without the root.
func (c *Client) Reenroll(ctx context.Context, current tls.Certificate, signer crypto.Signer) ([]*x509.Certificate, error) {
	leaf := current.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(current.Certificate[0]); err != nil {
			return nil, fmt.Errorf("provisioning: current certificate: %w", err)
		}
	}
	deviceID := leaf.Subject.CommonName
	csr, err := NewCSR(signer, deviceID)
	if err != nil {
		return nil, err
	}
	hc := c.httpClient(&current)
	defer hc.CloseIdleConnections()
	body, err := c.do(ctx, hc, http.MethodPost, PathSimpleReenrol, csr, nil)
	if err != nil {
		return nil, err
	}
	return c.verifyIssued(body, signer.Public(), deviceID)
}

func (c *Client) do(ctx context.Context, hc *http.Client, method, path string, der []byte, prep func(*http.Request)) ([]byte, error) {
	if der == nil {
		return c.send(ctx, hc, method, path, "", nil, prep)
	}
	return c.send(ctx, hc, method, path, TypePKCS10, strings.NewReader(base64.StdEncoding.EncodeToString(der)), func(r *http.Request) {
		r.Header.Set("Content-Transfer-Encoding", "base64")
		if prep != nil {
			prep(r)
		}
	})
}

func (c *Client) send(ctx context.Context, hc *http.Client, method, path, contentType string, body io.Reader, prep func(*http.Request)) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, fmt.Errorf("provisioning: %w", err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if prep != nil {
		prep(req)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("provisioning: %s %s: %w", method, c.base+path, explainTLS(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("provisioning: read EST response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		reason := strings.TrimSpace(string(data))
		if len(reason) > 300 {
			reason = reason[:300]
		}
		return nil, &ServerError{StatusCode: resp.StatusCode, Reason: reason}
	}
	return data, nil
}

// explainTLS names the cause of a TLS failure against the pinned root.
func explainTLS(err error) error {
	var unknown x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	switch {
	case errors.As(err, &unknown):
		return fmt.Errorf("EST server certificate is not signed by the pinned root CA (wrong --ca or a man in the middle): %w", err)
	case errors.As(err, &host):
		return fmt.Errorf("EST server certificate does not name %q (on the broker, add the name: broker server-cert --data DIR --host %s, keeping its other --host names; or use a URL with a name it has): %w",
			host.Host, host.Host, err)
	case errors.As(err, &invalid):
		return fmt.Errorf("EST server certificate is invalid: %w", err)
	}
	return err
}

// verifyIssued checks an enrollment answer: it must chain to the pinned
// root for client authentication, certify pub and name deviceID.
func (c *Client) verifyIssued(body []byte, pub crypto.PublicKey, deviceID string) ([]*x509.Certificate, error) {
	certs, err := ParseCertsOnly(body)
	if err != nil {
		return nil, err
	}
	var leaf *x509.Certificate
	inter := x509.NewCertPool()
	for _, cert := range certs {
		if k, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); ok && !cert.IsCA && k.Equal(pub) {
			leaf = cert
		} else {
			inter.AddCert(cert)
		}
	}
	if leaf == nil {
		return nil, fmt.Errorf("%w: no certificate for the requesting key", ErrBadResponse)
	}
	if leaf.Subject.CommonName != deviceID {
		return nil, fmt.Errorf("%w: certificate names %q, want %q", ErrBadResponse, leaf.Subject.CommonName, deviceID)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: c.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return nil, fmt.Errorf("%w: issued certificate does not chain to the pinned root for client auth: %v", ErrBadResponse, err)
	}
	chain := chains[0]
	return chain[:len(chain)-1], nil // without the root
}

// ParseCertsOnly decodes a base64 PKCS#7 certs-only body (RFC 8951: line
// breaks and surrounding white space are ignored).
func ParseCertsOnly(body []byte) ([]*x509.Certificate, error) {
	der, err := DecodeBase64(body)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadResponse, err)
	}
	p7, err := pkcs7.Parse(der)
	if err != nil {
		return nil, fmt.Errorf("%w: PKCS#7: %v", ErrBadResponse, err)
	}
	if len(p7.Certificates) == 0 {
		return nil, fmt.Errorf("%w: PKCS#7 holds no certificates", ErrBadResponse)
	}
	return p7.Certificates, nil
}

// EncodeCertsOnly returns the base64 PKCS#7 certs-only body for certs.
func EncodeCertsOnly(certs []*x509.Certificate) ([]byte, error) {
	var raw []byte
	for _, c := range certs {
		raw = append(raw, c.Raw...)
	}
	der, err := pkcs7.DegenerateCertificate(raw)
	if err != nil {
		return nil, fmt.Errorf("provisioning: PKCS#7: %w", err)
	}
	return EncodeBase64(der), nil
}

// DecodeBase64 decodes standard base64 ignoring white space.
func DecodeBase64(b []byte) ([]byte, error) {
	clean := bytes.Map(func(r rune) rune {
		if r == ' ' || r == '\t' || r == '\r' || r == '\n' {
			return -1
		}
		return r
	}, b)
	out := make([]byte, base64.StdEncoding.DecodedLen(len(clean)))
	n, err := base64.StdEncoding.Decode(out, clean)
	if err != nil {
		return nil, fmt.Errorf("malformed base64: %v", err)
	}
	return out[:n], nil
}

// EncodeBase64 encodes der as base64 wrapped at 64 characters, as EST
// bodies customarily are.
func EncodeBase64(der []byte) []byte {
	s := base64.StdEncoding.EncodeToString(der)
	var b bytes.Buffer
	for len(s) > 64 {
		b.WriteString(s[:64])
		b.WriteString("\r\n")
		s = s[64:]
	}
	b.WriteString(s)
	b.WriteString("\r\n")
	return b.Bytes()
}

// TPM key attestation over EST (see README "TPM key attestation"): a
// challenge request, then simpleenroll with the evidence in headers.
const (
	PathAttestChallenge = "/.well-known/est/attest/challenge"

	HeaderAttestChallenge = "Mqtls-Attest-Challenge" // challenge ID
	HeaderAttestSecret    = "Mqtls-Attest-Secret"    // activated credential, base64
	HeaderAttestKey       = "Mqtls-Attest-Key"       // TPM2B_PUBLIC of the device key, base64
	HeaderAttestCertify   = "Mqtls-Attest-Certify"   // TPMS_ATTEST of TPM2_Certify, base64
	HeaderAttestSignature = "Mqtls-Attest-Signature" // TPMT_SIGNATURE of the AK, base64
)

// AttestRequest is the body of a challenge request (JSON; byte fields in
// standard base64).
type AttestRequest struct {
	EKCertificate []byte `json:"ek_certificate"` // DER
	AKPublic      []byte `json:"ak_public"`      // TPM2B_PUBLIC
}

// AttestChallenge is the server's answer: a credential for
// TPM2_ActivateCredential (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) and the
// nonce TPM2_Certify must qualify.
type AttestChallenge struct {
	ID         string    `json:"id"`
	Credential []byte    `json:"credential"`
	Secret     []byte    `json:"secret"`
	Nonce      []byte    `json:"nonce"`
	Expires    time.Time `json:"expires"`
}

// AttestEvidence is the device's answer to a challenge, sent with
// simpleenroll.
type AttestEvidence struct {
	ChallengeID string
	Secret      []byte // the activated credential
	KeyPublic   []byte // TPM2B_PUBLIC of the device key
	CertifyInfo []byte // TPMS_ATTEST
	Signature   []byte // TPMT_SIGNATURE
}

// Attester proves where a key lives: a TPM with an EK certificate and an
// attestation key made for one enrollment. The TPM keystore's
// Attestation (hardware/tpm) implements it.
type Attester interface {
	EKCertificate() []byte
	AKPublic() []byte
	Activate(ctx context.Context, credential, secret []byte) ([]byte, error)
	Certify(ctx context.Context, key crypto.Signer, nonce []byte) (public, info, sig []byte, err error)
}

// RequestAttestChallenge asks for a credential challenge for deviceID,
// authenticated with its enrollment token (which it does not use up).
func (c *Client) RequestAttestChallenge(ctx context.Context, deviceID, token string, req AttestRequest) (AttestChallenge, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return AttestChallenge{}, fmt.Errorf("provisioning: %w", err)
	}
	data, err := c.send(ctx, c.http, http.MethodPost, PathAttestChallenge, "application/json", bytes.NewReader(body), func(r *http.Request) { r.SetBasicAuth(deviceID, token) })
	if err != nil {
		return AttestChallenge{}, err
	}
	var ch AttestChallenge
	if err := json.Unmarshal(data, &ch); err != nil {
		return AttestChallenge{}, fmt.Errorf("%w: attestation challenge: %v", ErrBadResponse, err)
	}
	return ch, nil
}

// EnrollWithEvidence is Enroll with attestation evidence (nil: none).
func (c *Client) EnrollWithEvidence(ctx context.Context, signer crypto.Signer, deviceID, token string, ev *AttestEvidence) ([]*x509.Certificate, error) {
	csr, err := NewCSR(signer, deviceID)
	if err != nil {
		return nil, err
	}
	body, err := c.do(ctx, c.http, http.MethodPost, PathSimpleEnroll, csr, func(r *http.Request) {
		r.SetBasicAuth(deviceID, token)
		if ev != nil {
			b := base64.StdEncoding.EncodeToString
			r.Header.Set(HeaderAttestChallenge, ev.ChallengeID)
			r.Header.Set(HeaderAttestSecret, b(ev.Secret))
			r.Header.Set(HeaderAttestKey, b(ev.KeyPublic))
			r.Header.Set(HeaderAttestCertify, b(ev.CertifyInfo))
			r.Header.Set(HeaderAttestSignature, b(ev.Signature))
		}
	})
	if err != nil {
		return nil, err
	}
	return c.verifyIssued(body, signer.Public(), deviceID)
}

// EnrollAttested enrolls signer's key with TPM key attestation by a: the
// challenge, the credential activation, the certification of the key by
// the attestation key, then simpleenroll with the evidence.
func (c *Client) EnrollAttested(ctx context.Context, signer crypto.Signer, deviceID, token string, a Attester) ([]*x509.Certificate, error) {
	ch, err := c.RequestAttestChallenge(ctx, deviceID, token, AttestRequest{EKCertificate: a.EKCertificate(), AKPublic: a.AKPublic()})
	if err != nil {
		return nil, err
	}
	secret, err := a.Activate(ctx, ch.Credential, ch.Secret)
	if err != nil {
		return nil, fmt.Errorf("provisioning: attestation: %w", err)
	}
	pub, info, sig, err := a.Certify(ctx, signer, ch.Nonce)
	if err != nil {
		return nil, fmt.Errorf("provisioning: attestation: %w", err)
	}
	return c.EnrollWithEvidence(ctx, signer, deviceID, token, &AttestEvidence{ChallengeID: ch.ID, Secret: secret, KeyPublic: pub, CertifyInfo: info, Signature: sig})
}
