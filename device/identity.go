package device

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/internal/atomicfile"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
)

// Files of an identity directory.
const (
	CertFile   = "device.crt"    // leaf + issuing CA, PEM
	RootFile   = "ca.crt"        // the pinned root, PEM
	ConfigFile = "identity.json" // device ID, keystore URI, EST URL
	// KeyName is the device key's name in its keystore (device.key in a
	// file keystore, device.tpmkey in a TPM one).
	KeyName = "device"
	// nextKeyName holds a new key during a renewal with --rekey.
	nextKeyName = "device-next"
)

// Errors.
var (
	ErrNoIdentity     = errors.New("device: no identity")
	ErrIdentityExists = errors.New("device: identity already exists")
	ErrExpired        = errors.New("device: certificate expired")
	ErrKeyMismatch    = errors.New("device: existing key does not match")
)

// IdentityConfig is identity.json: what renewal and the commands need to
// find the key and the CA again. It holds no secret.
type IdentityConfig struct {
	DeviceID string `json:"device_id"`
	Keystore string `json:"keystore"` // keystore URI
	EST      string `json:"est,omitempty"`
}

// Identity is a device's certificate chain, pinned root and key.
type Identity struct {
	Dir    string
	Config IdentityConfig
	Chain  []*x509.Certificate // leaf first, without the root
	Root   *x509.Certificate
	Signer crypto.Signer
}

// Leaf returns the device certificate.
func (id *Identity) Leaf() *x509.Certificate { return id.Chain[0] }

// TLSCertificate returns the chain and key for a TLS client.
func (id *Identity) TLSCertificate() (tls.Certificate, error) {
	der := make([][]byte, len(id.Chain))
	for i, c := range id.Chain {
		der[i] = c.Raw
	}
	return keystore.TLSCertificate(der, id.Signer)
}

// RootPool returns a pool holding the pinned root only.
func (id *Identity) RootPool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(id.Root)
	return p
}

// ReadConfig reads dir/identity.json. A directory without it yields
// ErrNoIdentity.
func ReadConfig(dir string) (IdentityConfig, error) {
	data, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if errors.Is(err, fs.ErrNotExist) {
		return IdentityConfig{}, fmt.Errorf("%w in %s (no %s: run devsim enroll first)", ErrNoIdentity, dir, ConfigFile)
	}
	if err != nil {
		return IdentityConfig{}, fmt.Errorf("device: %w", err)
	}
	var c IdentityConfig
	if err := json.Unmarshal(data, &c); err != nil {
		return IdentityConfig{}, fmt.Errorf("device: %s: %w", filepath.Join(dir, ConfigFile), err)
	}
	return c, nil
}

// Load reads the identity in dir and finds its key in store. It checks
// that the chain leads to the pinned root (ignoring expiry: an expired
// identity loads, so the caller can report it) and that the key matches
// the certificate. A renewal interrupted after its commit point is
// completed here.
func Load(ctx context.Context, dir string, store keystore.Store) (*Identity, error) {
	cfg, err := ReadConfig(dir)
	if err != nil {
		return nil, err
	}
	chain, err := readCerts(filepath.Join(dir, CertFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s (no %s: enrollment did not finish; run devsim enroll again)", ErrNoIdentity, dir, CertFile)
	}
	if err != nil {
		return nil, err
	}
	roots, err := readCerts(filepath.Join(dir, RootFile))
	if err != nil {
		return nil, err
	}
	id := &Identity{Dir: dir, Config: cfg, Chain: chain, Root: roots[0]}
	if err := verifyChain(id.Chain, id.Root, id.Leaf().NotBefore.Add(time.Second)); err != nil {
		return nil, fmt.Errorf("device: %s: %w", filepath.Join(dir, CertFile), err)
	}
	if id.Signer, err = findKey(ctx, store, id.Leaf()); err != nil {
		return nil, fmt.Errorf("device: %s: %w", dir, err)
	}
	return id, nil
}

// findKey returns the key of leaf: KeyName, or the key of an interrupted
// renewal, which it then renames into place.
func findKey(ctx context.Context, store keystore.Store, leaf *x509.Certificate) (crypto.Signer, error) {
	s, err := store.Signer(ctx, KeyName)
	if err != nil && !errors.Is(err, keystore.ErrNotFound) {
		return nil, err
	}
	if err == nil && samePublic(s.Public(), leaf.PublicKey) {
		return s, nil
	}
	next, nerr := store.Signer(ctx, nextKeyName)
	if nerr != nil || !samePublic(next.Public(), leaf.PublicKey) {
		return nil, fmt.Errorf("no key in the keystore matches %s (SPKI differs)", CertFile)
	}
	if r, ok := store.(keystore.Renamer); ok {
		if err := r.Rename(ctx, nextKeyName, KeyName); err != nil {
			return nil, fmt.Errorf("finish renewal: %w", err)
		}
		return store.Signer(ctx, KeyName)
	}
	return next, nil
}

func verifyChain(chain []*x509.Certificate, root *x509.Certificate, at time.Time) error {
	roots := x509.NewCertPool()
	roots.AddCert(root)
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return fmt.Errorf("certificate does not chain to %s: %w", RootFile, err)
	}
	return nil
}

// EnrollConfig says how to enroll a new identity.
type EnrollConfig struct {
	Dir      string            // identity directory (created 0700)
	DeviceID string            // becomes the certificate CN
	Token    string            // one-time enrollment token (never stored)
	EST      string            // https://HOST:PORT of the EST server
	Root     *x509.Certificate // the pinned root
	Store    keystore.Store    // where the key is created
	Keystore string            // the store's URI, recorded for renewal
	Alg      keystore.KeyAlg   // default ECDSA P-256
	// Attest enrolls with TPM key attestation: the server verifies that
	// the key lives in the TPM of a manufacturer-certified EK before it
	// signs, and marks the certificate attested. The Store must be a
	// [keystore.Attester] (the TPM keystore); others get ErrNoAttestation.
	Attest bool
}

// ErrNoAttestation: attestation was asked of a keystore that cannot attest.
var ErrNoAttestation = errors.New("device: the keystore cannot attest its keys (TPM keystores only: tpm, swtpm:HOST:PORT, tpmsim:DIR)")

// Enroll creates an identity: key in the keystore, CSR, EST enrollment,
// verified chain, files. It refuses a directory that already holds an
// identity (ErrIdentityExists). A crash or refusal leaves no device.crt;
// running Enroll again reuses the key already generated.
func Enroll(ctx context.Context, cfg EnrollConfig) (*Identity, error) {
	if err := deviceid.Check(cfg.DeviceID); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(cfg.Dir, CertFile)); err == nil {
		return nil, fmt.Errorf("%w in %s: use devsim renew, or another directory", ErrIdentityExists, cfg.Dir)
	}
	attester, ok := cfg.Store.(keystore.Attester)
	if cfg.Attest && !ok {
		return nil, fmt.Errorf("%w; keystore %q", ErrNoAttestation, cfg.Keystore)
	}
	client, err := provisioning.NewClient(cfg.EST, cfg.Root)
	if err != nil {
		return nil, err
	}
	root, err := openDir(cfg.Dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	conf := IdentityConfig{DeviceID: cfg.DeviceID, Keystore: cfg.Keystore, EST: cfg.EST}
	if old, err := ReadConfig(cfg.Dir); err == nil && old.DeviceID != cfg.DeviceID {
		return nil, fmt.Errorf("device: %s holds an unfinished enrollment of %q, not %q", cfg.Dir, old.DeviceID, cfg.DeviceID)
	}
	if err := writeJSON(root, ConfigFile, conf); err != nil {
		return nil, err
	}
	signer, err := cfg.Store.Signer(ctx, KeyName)
	if errors.Is(err, keystore.ErrNotFound) {
		signer, err = cfg.Store.Generate(ctx, KeyName, cfg.Alg)
	} else if err == nil && cfg.Alg != "" {
		// a key left by an earlier attempt is reused only if it is what
		// was asked for
		if have, aerr := keystore.AlgOf(signer.Public()); aerr == nil && have != cfg.Alg {
			return nil, fmt.Errorf("%w: key %q in keystore %q (left by an earlier enrollment attempt) is %s, not the requested %s: enroll with %s, or delete the key",
				ErrKeyMismatch, KeyName, cfg.Keystore, have, cfg.Alg, have)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("device: key: %w", err)
	}
	var chain []*x509.Certificate
	if cfg.Attest {
		att, aerr := attester.Attest(ctx)
		if aerr != nil {
			return nil, fmt.Errorf("device: attestation: %w", aerr)
		}
		chain, err = client.EnrollAttested(ctx, signer, cfg.DeviceID, cfg.Token, att)
	} else {
		chain, err = client.Enroll(ctx, signer, cfg.DeviceID, cfg.Token)
	}
	if err != nil {
		return nil, err
	}
	if err := atomicfile.Write(root, RootFile, pemCerts(cfg.Root), 0o644); err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	// device.crt last: its presence is the commit point.
	if err := atomicfile.Write(root, CertFile, pemCerts(chain...), 0o644); err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	return &Identity{Dir: cfg.Dir, Config: conf, Chain: chain, Root: cfg.Root, Signer: signer}, nil
}

// RenewConfig says how to renew.
type RenewConfig struct {
	EST   string          // override the recorded EST URL
	Rekey bool            // generate a new key
	Alg   keystore.KeyAlg // algorithm of the new key (default: as before)
}

// Renew re-enrolls id over EST with its current certificate and writes the
// new chain. With Rekey, a new key is generated first as "device-next";
// device.crt is the commit point and the key is renamed into place after
// it, so a crash at any step leaves an identity that Load accepts: the old
// one, or the new one. The identity must not have expired (ErrExpired):
// an expired device enrolls again with a new token.
func Renew(ctx context.Context, id *Identity, store keystore.Store, cfg RenewConfig) (*Identity, error) {
	if now := time.Now(); now.After(id.Leaf().NotAfter) {
		return nil, fmt.Errorf("%w at %s: renewal needs a valid certificate; enroll again with a new token", ErrExpired, id.Leaf().NotAfter.UTC().Format(time.RFC3339))
	}
	est := cfg.EST
	if est == "" {
		est = id.Config.EST
	}
	client, err := provisioning.NewClient(est, id.Root)
	if err != nil {
		return nil, err
	}
	current, err := id.TLSCertificate()
	if err != nil {
		return nil, err
	}
	signer := id.Signer
	if cfg.Rekey {
		if _, rn := store.(keystore.Renamer); !rn {
			return nil, fmt.Errorf("device: keystore %T cannot rename keys; rekey needs keystore.Renamer", store)
		}
		alg := cfg.Alg
		if alg == "" {
			if alg, err = keystore.AlgOf(id.Signer.Public()); err != nil {
				return nil, err
			}
		}
		// A leftover from an interrupted renewal is not trusted: start over.
		if err := store.Delete(ctx, nextKeyName); err != nil && !errors.Is(err, keystore.ErrNotFound) {
			return nil, fmt.Errorf("device: %w", err)
		}
		if signer, err = store.Generate(ctx, nextKeyName, alg); err != nil {
			return nil, fmt.Errorf("device: new key: %w", err)
		}
	}
	chain, err := client.Reenroll(ctx, current, signer)
	if err != nil {
		return nil, err
	}
	root, err := openDir(id.Dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	if err := atomicfile.Write(root, CertFile, pemCerts(chain...), 0o644); err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	conf := id.Config
	conf.EST = est
	if err := writeJSON(root, ConfigFile, conf); err != nil {
		return nil, err
	}
	if cfg.Rekey {
		if err := store.(keystore.Renamer).Rename(ctx, nextKeyName, KeyName); err != nil {
			return nil, fmt.Errorf("device: swap in the new key: %w", err)
		}
		if signer, err = store.Signer(ctx, KeyName); err != nil {
			return nil, fmt.Errorf("device: %w", err)
		}
	}
	return &Identity{Dir: id.Dir, Config: conf, Chain: chain, Root: id.Root, Signer: signer}, nil
}

func openDir(dir string) (*os.Root, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	r, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	return r, nil
}

func writeJSON(root *os.Root, name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("device: %w", err)
	}
	if err := atomicfile.Write(root, name, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("device: %w", err)
	}
	return nil
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// ReadCertFile reads one or more PEM certificates.
func ReadCertFile(path string) ([]*x509.Certificate, error) { return readCerts(path) }

func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("device: %w", err)
	}
	var out []*x509.Certificate
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("device: %s: %w", path, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("device: %s: no PEM certificate", path)
	}
	return out, nil
}

func samePublic(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
