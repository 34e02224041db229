// Package ca is the fleet's PKI: it creates (or adopts) a root CA and an
// issuing CA, issues the broker's server certificate, and signs device
// certificates under a fixed issuance policy.
//
// # Layout
//
//	DIR/ca/root.crt     root CA certificate (the trust anchor devices pin)
//	DIR/ca/root.key     root CA key (keep offline in production)
//	DIR/ca/issuing.crt  issuing CA certificate (pathlen 0)
//	DIR/ca/issuing.key  issuing CA key, or
//	DIR/ca/issuing.keyuri  the keystore URI of an issuing key kept in a
//	                    hardware store (PKCS#11 token, TPM) instead
//	DIR/tls/server.crt  broker server certificate + issuing CA
//	DIR/tls/server.key  broker server key
//
// # Security
//
// Keys are PKCS#8 PEM files of mode 0600 in directories of mode 0700,
// written atomically and never overwritten. Only the server certificate
// is ever replaced ([CA.ReissueServer]), atomically, keeping its key. The issuing key may instead
// live in a keystore the caller opens ([InitConfig.IssuingSigner],
// [WithIssuingSigner]): this package then never sees the key, only a
// [crypto.Signer], and records no secret (the URI holds where the PIN is
// read, never the PIN). Device certificates take only
// the public key and the device ID from a request: everything else (no SANs,
// no CA flag, no extra key usages) is the policy's.
package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/mqtls/mqtls/internal/atomicfile"
	"github.com/mqtls/mqtls/internal/spki"
	"github.com/mqtls/mqtls/keystore"
)

// Files inside the data directory.
const (
	RootCertFile    = "ca/root.crt"
	RootKeyFile     = "ca/root.key"
	IssuingCertFile = "ca/issuing.crt"
	IssuingKeyFile  = "ca/issuing.key"
	// IssuingKeyURIFile records the keystore URI of an issuing key held
	// outside the data directory (see [InitConfig.IssuingSigner]).
	IssuingKeyURIFile = "ca/issuing.keyuri"
	ServerCertFile    = "tls/server.crt"
	ServerKeyFile     = "tls/server.key"
)

// Lifetimes.
const (
	RootValidity    = 20 * 365 * 24 * time.Hour
	IssuingValidity = 5 * 365 * 24 * time.Hour
	ServerValidity  = 397 * 24 * time.Hour
	// DefaultDeviceValidity is a device certificate's default lifetime.
	DefaultDeviceValidity = 30 * 24 * time.Hour
	// backdate absorbs clock skew between CA and devices.
	backdate = 5 * time.Minute
)

var (
	// ErrExists reports an init over an existing CA.
	ErrExists = errors.New("ca: a CA already exists")
	// ErrPolicy reports a request the issuance policy refuses.
	ErrPolicy = errors.New("ca: refused by issuance policy")
	// ErrExternalKey reports a Load of a CA whose issuing key is held in
	// another keystore (recorded in IssuingKeyURIFile) without
	// [WithIssuingSigner]: open that keystore and pass its signer.
	ErrExternalKey = errors.New("ca: the issuing key is held in a keystore the caller must open")
	// ErrKeyMismatch reports a key that is not the certificate's.
	ErrKeyMismatch = errors.New("ca: key does not match the certificate")
)

// DefaultHosts are the server certificate's names when none are given.
var DefaultHosts = []string{"localhost", "127.0.0.1", "::1"}

// InitConfig says what Init creates or adopts. The zero value creates a
// new root and issuing CA and a server certificate for DefaultHosts.
type InitConfig struct {
	// Hosts are the broker's DNS names and IP addresses (server cert SANs).
	Hosts []string
	// RootCert and RootKey (PEM files) adopt an existing root: Init then
	// creates the issuing CA under it. RootKey may be empty when an issuing
	// CA is adopted too.
	RootCert, RootKey string
	// IssuingCert and IssuingKey (PEM files) adopt an existing issuing CA;
	// RootCert is then required.
	IssuingCert, IssuingKey string
	// IssuingSigner, if set, is the issuing CA's key, held in a keystore
	// the caller opened (a PKCS#11 token, a TPM): Init creates the issuing
	// CA for it (or, with IssuingCert, checks that it is that
	// certificate's key) and writes no issuing key file. IssuingKeyURI is
	// then required, IssuingKey refused.
	IssuingSigner crypto.Signer
	// IssuingKeyURI is the keystore URI ([keystore.ParseURI]) of
	// IssuingSigner's store, recorded in IssuingKeyURIFile (mode 0600) so
	// that the data directory's users know what to open before [Load].
	// A URI holding a PIN is refused.
	IssuingKeyURI string
}

// validate checks cfg and returns it with IssuingKeyURI in the form
// keystore.ParseURI prints.
func (cfg InitConfig) validate() (InitConfig, error) {
	switch {
	case cfg.IssuingSigner != nil && cfg.IssuingKeyURI == "":
		return cfg, errors.New("ca: an IssuingSigner needs its IssuingKeyURI (recorded so that the store can be reopened)")
	case cfg.IssuingSigner == nil && cfg.IssuingKeyURI != "":
		return cfg, errors.New("ca: an IssuingKeyURI needs the IssuingSigner of its store")
	case cfg.IssuingSigner != nil && cfg.IssuingKey != "":
		return cfg, errors.New("ca: the issuing key is either in a keystore (issuing key URI) or a file (--issuing-key), not both")
	}
	if cfg.IssuingKeyURI != "" {
		u, err := keystore.ParseURI(cfg.IssuingKeyURI)
		if err != nil {
			return cfg, fmt.Errorf("ca: issuing key URI: %w", err)
		}
		cfg.IssuingKeyURI = u.String()
	}
	return cfg, nil
}

// CA is a loaded PKI, ready to issue. It is safe for concurrent use when
// its issuing key's signer is (file keys are; see the keystore's
// documentation otherwise). A CA does not own an external signer: the
// caller closes its keystore after the CA's last use.
type CA struct {
	Root    *x509.Certificate
	Issuing *x509.Certificate
	key     crypto.Signer
	dir     string
}

// Init creates the PKI in dir. It refuses (ErrExists) when dir already
// holds a CA with a server certificate; when only the server certificate
// is missing (an interrupted init), it issues that, with cfg.IssuingSigner
// when the issuing key is external.
func Init(dir string, cfg InitConfig) error {
	cfg, err := cfg.validate() // a copy: the caller's config is not changed
	if err != nil {
		return err
	}
	hosts := cfg.Hosts
	if len(hosts) == 0 {
		hosts = DefaultHosts
	}
	if _, err := os.Stat(filepath.Join(dir, IssuingCertFile)); err == nil {
		if _, err := os.Stat(filepath.Join(dir, ServerCertFile)); err == nil {
			return fmt.Errorf("%w in %s (refusing to overwrite it)", ErrExists, dir)
		}
		var opts []Option
		if cfg.IssuingSigner != nil {
			opts = append(opts, WithIssuingSigner(cfg.IssuingSigner))
		}
		c, err := Load(dir, opts...)
		if err != nil {
			return err
		}
		return c.writeServer(hosts)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	// Build ca/ in a temporary directory and rename it into place, so an
	// interrupted init leaves no half CA.
	tmp, err := os.MkdirTemp(dir, ".init-")
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o700); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	c, err := buildCA(tmp, cfg)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "ca")); err != nil {
		return fmt.Errorf("ca: %w (does %s exist?)", err, filepath.Join(dir, "ca"))
	}
	c.dir = dir
	return c.writeServer(hosts)
}

// buildCA creates or adopts root and issuing CA into caDir (the future
// DIR/ca).
func buildCA(caDir string, cfg InitConfig) (*CA, error) {
	now := time.Now()
	var root *x509.Certificate
	var rootKey crypto.Signer
	var err error
	switch {
	case cfg.RootCert != "":
		if root, err = readCert(cfg.RootCert); err != nil {
			return nil, err
		}
		if !root.IsCA || root.CheckSignatureFrom(root) != nil {
			return nil, fmt.Errorf("ca: %s is not a self-signed CA certificate", cfg.RootCert)
		}
		if cfg.RootKey != "" {
			if rootKey, err = readKey(cfg.RootKey, root.PublicKey); err != nil {
				return nil, err
			}
		}
	case cfg.IssuingCert != "" || cfg.RootKey != "":
		return nil, errors.New("ca: adopting a CA needs --root-cert")
	default:
		if rootKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		if root, err = create(&x509.Certificate{
			Subject:               pkix.Name{CommonName: "mqtls root CA", Organization: []string{"mqtls"}},
			NotBefore:             now.Add(-backdate),
			NotAfter:              now.Add(RootValidity),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}, nil, rootKey.Public(), rootKey); err != nil {
			return nil, err
		}
	}
	var iss *x509.Certificate
	var issKey crypto.Signer
	if cfg.IssuingCert != "" {
		if iss, err = readCert(cfg.IssuingCert); err != nil {
			return nil, err
		}
		if !iss.IsCA || iss.CheckSignatureFrom(root) != nil {
			return nil, fmt.Errorf("ca: %s is not a CA certificate signed by %s", cfg.IssuingCert, cfg.RootCert)
		}
		if cfg.IssuingSigner != nil {
			if !publicKeyEqual(cfg.IssuingSigner.Public(), iss.PublicKey) {
				return nil, fmt.Errorf("%w: the issuing key in the keystore is not the key of %s", ErrKeyMismatch, cfg.IssuingCert)
			}
			issKey = cfg.IssuingSigner
		} else if issKey, err = readKey(cfg.IssuingKey, iss.PublicKey); err != nil {
			return nil, err
		}
	} else {
		if rootKey == nil {
			return nil, errors.New("ca: creating the issuing CA needs the root key (--root-key)")
		}
		if cfg.IssuingSigner != nil {
			if err := CheckKey(cfg.IssuingSigner.Public()); err != nil {
				return nil, fmt.Errorf("ca: issuing key: %w", err)
			}
			issKey = cfg.IssuingSigner
		} else if issKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
		if iss, err = create(&x509.Certificate{
			Subject:               pkix.Name{CommonName: "mqtls issuing CA", Organization: []string{"mqtls"}},
			NotBefore:             now.Add(-backdate),
			NotAfter:              minTime(now.Add(IssuingValidity), root.NotAfter),
			IsCA:                  true,
			BasicConstraintsValid: true,
			MaxPathLenZero:        true,
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		}, root, issKey.Public(), rootKey); err != nil {
			return nil, err
		}
	}
	r, err := os.OpenRoot(caDir)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer r.Close()
	files := map[string][]byte{"root.crt": pemCert(root), "issuing.crt": pemCert(iss)}
	if rootKey != nil {
		files["root.key"], err = pemKey(rootKey)
		if err != nil {
			return nil, err
		}
	}
	if cfg.IssuingSigner != nil {
		files["issuing.keyuri"] = []byte(cfg.IssuingKeyURI + "\n")
	} else if files["issuing.key"], err = pemKey(issKey); err != nil {
		return nil, err
	}
	for name, data := range files {
		perm := os.FileMode(0o644)
		if ext := filepath.Ext(name); ext == ".key" || ext == ".keyuri" {
			perm = 0o600
		}
		if err := atomicfile.WriteExclusive(r, name, data, perm); err != nil {
			return nil, fmt.Errorf("ca: %w", err)
		}
	}
	return &CA{Root: root, Issuing: iss, key: issKey}, nil
}

// writeServer issues the broker's server certificate into DIR/tls.
func (c *CA) writeServer(hosts []string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	cert, err := c.issueServer(key.Public(), hosts)
	if err != nil {
		return err
	}
	tlsDir := filepath.Join(c.dir, "tls")
	if err := os.MkdirAll(tlsDir, 0o700); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	r, err := os.OpenRoot(tlsDir)
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	defer r.Close()
	keyPEM, err := pemKey(key)
	if err != nil {
		return err
	}
	// Key first: a crash leaves a key without a certificate, which the
	// next init replaces, never a certificate without its key.
	if err := atomicfile.Write(r, "server.key", keyPEM, 0o600); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	chain := append(pemCert(cert), pemCert(c.Issuing)...)
	if err := atomicfile.WriteExclusive(r, "server.crt", chain, 0o644); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	return nil
}

// ReissueServer issues a new server certificate for hosts (DNS names and
// IP addresses) from the issuing CA and replaces ServerCertFile with it
// atomically (temporary file, fsync, rename; mode 0600). The server key is
// kept: only the certificate file changes, so a reader (a broker
// reloading it) never sees a key and a certificate that do not match. A
// missing server key is made first. It returns the new certificate.
func (c *CA) ReissueServer(hosts []string) (*x509.Certificate, error) {
	if len(hosts) == 0 {
		return nil, errors.New("ca: a server certificate needs at least one host name")
	}
	for _, h := range hosts {
		if h == "" || strings.ContainsAny(h, " \t\r\n/") {
			return nil, fmt.Errorf("ca: host %q is not a DNS name or an IP address", h)
		}
	}
	tlsDir := filepath.Join(c.dir, "tls")
	if err := os.MkdirAll(tlsDir, 0o700); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	ks, err := keystore.NewFile(tlsDir)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer ks.Close()
	key, err := ks.Signer(context.Background(), "server")
	if errors.Is(err, keystore.ErrNotFound) {
		key, err = ks.Generate(context.Background(), "server", keystore.ECDSAP256)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: server key: %w", err)
	}
	cert, err := c.issueServer(key.Public(), hosts)
	if err != nil {
		return nil, err
	}
	r, err := os.OpenRoot(tlsDir)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer r.Close()
	chain := append(pemCert(cert), pemCert(c.Issuing)...)
	if err := atomicfile.Write(r, "server.crt", chain, 0o600); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	return cert, nil
}

// issueServer signs a server certificate for pub naming hosts.
func (c *CA) issueServer(pub crypto.PublicKey, hosts []string) (*x509.Certificate, error) {
	now := time.Now()
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: hosts[0]},
		NotBefore:             now.Add(-backdate),
		NotAfter:              minTime(now.Add(ServerValidity), c.Issuing.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return create(tmpl, c.Issuing, pub, c.key)
}

// Option configures [Load].
type Option func(*loadOptions)

type loadOptions struct {
	signer crypto.Signer
}

// WithIssuingSigner gives Load the issuing CA's key, held in a keystore
// the caller opened from the URI [IssuingKeyURI] returns. Load checks that
// it is the issuing certificate's key. Its Sign may block (a token); it is
// called by every issuance.
func WithIssuingSigner(s crypto.Signer) Option {
	return func(o *loadOptions) { o.signer = s }
}

// IssuingKeyURI returns the keystore URI recorded in dir by an Init with
// an external issuing key, or "" when the issuing key is a file in dir. The
// URI is checked with [keystore.ParseURI] (which refuses PINs).
func IssuingKeyURI(dir string) (string, error) {
	data, err := os.ReadFile(filepath.Join(dir, IssuingKeyURIFile))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("ca: %w", err)
	}
	u, err := keystore.ParseURI(strings.TrimSpace(string(data)))
	if err != nil {
		return "", fmt.Errorf("ca: %s: %w", filepath.Join(dir, IssuingKeyURIFile), err)
	}
	return u.String(), nil
}

// LoadRoot reads the root CA certificate of dir (what binds a registry),
// without the issuing CA or any key.
func LoadRoot(dir string) (*x509.Certificate, error) {
	return readCert(filepath.Join(dir, RootCertFile))
}

// Load reads the PKI from dir. The root key is not needed (nor read). The
// issuing key is dir's issuing key file unless dir records an external
// one (IssuingKeyURIFile): then the caller passes that key with
// [WithIssuingSigner], and Load without it returns [ErrExternalKey]. A key
// that is not the issuing certificate's gets [ErrKeyMismatch].
func Load(dir string, opts ...Option) (*CA, error) {
	var o loadOptions
	for _, opt := range opts {
		opt(&o)
	}
	root, err := readCert(filepath.Join(dir, RootCertFile))
	if err != nil {
		return nil, err
	}
	iss, err := readCert(filepath.Join(dir, IssuingCertFile))
	if err != nil {
		return nil, err
	}
	if err := iss.CheckSignatureFrom(root); err != nil {
		return nil, fmt.Errorf("ca: %s is not signed by %s: %w", IssuingCertFile, RootCertFile, err)
	}
	if o.signer != nil {
		if !publicKeyEqual(o.signer.Public(), iss.PublicKey) {
			return nil, fmt.Errorf("%w: the issuing key given is not the key of %s", ErrKeyMismatch, filepath.Join(dir, IssuingCertFile))
		}
		return &CA{Root: root, Issuing: iss, key: o.signer, dir: dir}, nil
	}
	uri, err := IssuingKeyURI(dir)
	if err != nil {
		return nil, err
	}
	if uri != "" {
		return nil, fmt.Errorf("%w: %s (recorded in %s)", ErrExternalKey, uri, filepath.Join(dir, IssuingKeyURIFile))
	}
	ks, err := keystore.NewFile(filepath.Join(dir, "ca"))
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer ks.Close()
	key, err := ks.Signer(context.Background(), "issuing")
	if err != nil {
		return nil, fmt.Errorf("ca: issuing key: %w", err)
	}
	if !publicKeyEqual(key.Public(), iss.PublicKey) {
		return nil, fmt.Errorf("%w: %s does not match %s", ErrKeyMismatch, IssuingKeyFile, IssuingCertFile)
	}
	return &CA{Root: root, Issuing: iss, key: key, dir: dir}, nil
}

// ServerCertificate loads the broker's TLS certificate (chain + key).
func (c *CA) ServerCertificate() (tls.Certificate, error) {
	ks, err := keystore.NewFile(filepath.Join(c.dir, "tls"))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("ca: %w", err)
	}
	defer ks.Close()
	key, err := ks.Signer(context.Background(), "server")
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("ca: server key: %w", err)
	}
	data, err := os.ReadFile(filepath.Join(c.dir, ServerCertFile))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("ca: %w", err)
	}
	var chain [][]byte
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		if block.Type == "CERTIFICATE" {
			chain = append(chain, block.Bytes)
		}
	}
	return keystore.TLSCertificate(chain, key)
}

// Pool returns a pool holding the root only.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Root)
	return p
}

// CheckKey applies the policy on device keys: ECDSA P-256 or P-384, RSA
// 2048 to 8192 bits. The error wraps ErrPolicy and names the key.
func CheckKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("%w: ECDSA curve %s not allowed (P-256 or P-384)", ErrPolicy, k.Curve.Params().Name)
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < 2048 {
			return fmt.Errorf("%w: key too weak: RSA-%d (minimum RSA-2048)", ErrPolicy, n)
		} else if n > 8192 {
			return fmt.Errorf("%w: RSA-%d too large (maximum RSA-8192)", ErrPolicy, n)
		}
		return nil
	}
	return fmt.Errorf("%w: key type %T not allowed (ECDSA P-256/P-384 or RSA >= 2048)", ErrPolicy, pub)
}

// IssueDevice signs a device certificate for pub: CN deviceID, OU groups,
// EKU clientAuth, KU digitalSignature, CA:FALSE, 128-bit random serial,
// validity from now (capped at the issuing CA's). Nothing else from the
// request is used. The caller checks the device ID and the request's
// signature.
func (c *CA) IssueDevice(pub crypto.PublicKey, deviceID string, groups []string, validity time.Duration) (*x509.Certificate, error) {
	return c.issueDevice(pub, deviceID, groups, validity, nil)
}

// The attested marker: the TCG certificate policies ("TPM 2.0 Keys for
// Device Identity and Attestation", tcg-cap-verifiedTPMResidency and
// tcg-cap-verifiedTPMFixed) that say the CA verified, by TPM attestation,
// that the key lives in a TPM and cannot leave it.
var (
	OIDVerifiedTPMResidency = mustOID(2, 23, 133, 11, 1, 1)
	OIDVerifiedTPMFixed     = mustOID(2, 23, 133, 11, 1, 2)
)

func mustOID(ints ...uint64) x509.OID {
	o, err := x509.OIDFromInts(ints)
	if err != nil {
		panic(err) // constant input
	}
	return o
}

// IssueAttestedDevice is IssueDevice for a key whose TPM residency the
// caller verified: the certificate carries the attested marker.
func (c *CA) IssueAttestedDevice(pub crypto.PublicKey, deviceID string, groups []string, validity time.Duration) (*x509.Certificate, error) {
	return c.issueDevice(pub, deviceID, groups, validity, []x509.OID{OIDVerifiedTPMResidency, OIDVerifiedTPMFixed})
}

// Attested reports whether cert carries the attested marker.
func Attested(cert *x509.Certificate) bool {
	var residency, fixed bool
	for _, p := range cert.Policies {
		residency = residency || p.Equal(OIDVerifiedTPMResidency)
		fixed = fixed || p.Equal(OIDVerifiedTPMFixed)
	}
	return residency && fixed
}

func (c *CA) issueDevice(pub crypto.PublicKey, deviceID string, groups []string, validity time.Duration, policies []x509.OID) (*x509.Certificate, error) {
	if err := CheckKey(pub); err != nil {
		return nil, err
	}
	if validity <= 0 {
		validity = DefaultDeviceValidity
	}
	now := time.Now()
	// Backdate for clock skew, but by no more than a tenth of the lifetime:
	// renewal is scheduled on NotBefore..NotAfter.
	return create(&x509.Certificate{
		Subject:               pkix.Name{CommonName: deviceID, OrganizationalUnit: groups},
		NotBefore:             now.Add(-min(backdate, validity/10)),
		NotAfter:              minTime(now.Add(validity), c.Issuing.NotAfter),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		Policies:              policies,
	}, c.Issuing, pub, c.key)
}

// create signs tmpl, filling the serial and the subject key ID.
func create(tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("ca: serial: %w", err)
	}
	tmpl.SerialNumber = serial.Add(serial, big.NewInt(1)) // never 0
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	ski := sha256.Sum256(spki) // RFC 7093 method 1
	tmpl.SubjectKeyId = ski[:20]
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign certificate: %w", err)
	}
	return x509.ParseCertificate(der)
}

// Fingerprint is the hex SHA-256 of a certificate (its DER): what binds a
// registry to its root CA.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return fmt.Sprintf("%x", sum)
}

// SPKIFingerprint is the hex SHA-256 of a certificate's public key info:
// what logs and the registry show instead of the certificate. The
// definition lives in internal/spki, which the device side shares without
// linking the CA.
func SPKIFingerprint(c *x509.Certificate) string { return spki.Fingerprint(c) }

func readCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("ca: %s: no PEM CERTIFICATE", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", path, err)
	}
	return c, nil
}

// readKey reads a PEM private key (PKCS#8, SEC1 or PKCS#1) that must match
// pub.
func readKey(path string, pub crypto.PublicKey) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer clear(data)
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("ca: %s: no PEM block", path)
	}
	var key any
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		err = fmt.Errorf("unsupported PEM type %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", path, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok || !publicKeyEqual(signer.Public(), pub) {
		return nil, fmt.Errorf("ca: %s does not hold the certificate's key", path)
	}
	return signer, nil
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func pemKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	defer clear(der)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
