package tpm

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/tcp"

	"github.com/mqtls/mqtls/internal/atomicfile"
	"github.com/mqtls/mqtls/internal/keyfiles"
	"github.com/mqtls/mqtls/keystore"
)

// KeyFileExt is the file name extension of a TPM key blob.
const KeyFileExt = ".tpmkey"

// Errors, each wrapping the TPM response code where there is one.
var (
	ErrNoDevice = errors.New("tpm: no TPM device")
	ErrAuth     = errors.New("tpm: authorization failed")
	ErrLockout  = errors.New("tpm: TPM is in dictionary-attack lockout")
	ErrClosed   = errors.New("tpm: store closed")
)

// Store is a [keystore.Store] on a TPM 2.0. Create it with [New], [Open] or
// [OpenSWTPM]; Close flushes the SRK and closes the transport.
type Store struct {
	dir  string
	root *os.Root

	mu      sync.Mutex // guards every use of tpm and closed
	tpm     transport.TPM
	closed  bool
	srk     tpm2.TPMHandle
	srkName tpm2.TPM2BName
	srkKept bool // persistent: not flushed at Close
}

var _ keystore.Store = (*Store)(nil)

type options struct {
	ownerAuth  []byte
	persistSRK tpm2.TPMHandle
}

// Option configures a Store.
type Option func(*options)

// WithOwnerAuth sets the owner hierarchy's authorization value, needed to
// create the SRK when the TPM's owner password is set.
func WithOwnerAuth(auth []byte) Option {
	return func(o *options) { o.ownerAuth = slices.Clone(auth) }
}

// DefaultSRKHandle is the TCG-recommended persistent handle of the SRK.
const DefaultSRKHandle = 0x81000001

// WithPersistentSRK keeps the SRK at a persistent handle (usually
// DefaultSRKHandle): it is created and persisted once, then reused, which
// saves a primary key generation (up to hundreds of ms on hardware) at each
// Open. Key files are unchanged: their parent stays the owner hierarchy,
// which the persistent SRK is derived from. A handle holding another kind
// of object is refused.
func WithPersistentSRK(handle uint32) Option {
	return func(o *options) { o.persistSRK = tpm2.TPMHandle(handle) }
}

// Open opens the TPM device at path (e.g. /dev/tpmrm0) and keeps key blobs
// in dir. A missing device yields [ErrNoDevice].
func Open(ctx context.Context, path, dir string, opts ...Option) (*Store, error) {
	t, err := linuxtpm.Open(path)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, linuxtpm.ErrFileIsNotDevice) {
		return nil, fmt.Errorf("%w at %s (is the tpm_tis/tpm_crb driver loaded? use swtpm:HOST:PORT or tpmsim:DIR for a software TPM): %w", ErrNoDevice, path, err)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: open %s: %w", path, err)
	}
	return New(ctx, t, dir, opts...)
}

// OpenSWTPM connects to a swtpm process whose TPM command port is addr
// (HOST:PORT); its control port must be PORT+1. swtpm must be started with
// --flags startup-clear: Store never sends platform commands to it.
func OpenSWTPM(ctx context.Context, addr, dir string, opts ...Option) (*Store, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("tpm: swtpm address %q: %w", addr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 1 || p > 65534 {
		return nil, fmt.Errorf("tpm: swtpm address %q: bad port", addr)
	}
	// swtpm's command port speaks the TCG simulator protocol that go-tpm's
	// tcp transport implements; the control port is connected, never sent
	// a command (PowerOn would be misread by swtpm).
	t, err := tcp.Open(tcp.Config{CommandAddress: addr, PlatformAddress: net.JoinHostPort(host, strconv.Itoa(p+1))})
	if err != nil {
		return nil, fmt.Errorf("%w: swtpm at %s: %w", ErrNoDevice, addr, err)
	}
	return New(ctx, t, dir, opts...)
}

// New returns a Store that sends TPM commands over t and keeps key blobs in
// dir (created with mode 0700). The Store owns t: Close closes it if it is
// an [io.Closer]. New creates the SRK, which may take a while on hardware.
func New(ctx context.Context, t transport.TPM, dir string, opts ...Option) (*Store, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	closeT := func() {
		if c, ok := t.(io.Closer); ok {
			_ = c.Close() // the setup error is the one to report
		}
	}
	root, err := openDir(dir)
	if err != nil {
		closeT()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		closeT()
		root.Close()
		return nil, err
	}
	s := &Store{dir: dir, root: root, tpm: t}
	if err := s.loadSRK(o); err != nil {
		closeT()
		root.Close()
		return nil, err
	}
	return s, nil
}

// loadSRK creates the SRK, or finds (creating it once) its persistent copy.
func (s *Store) loadSRK(o options) error {
	t := s.tpm
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(o.ownerAuth)}
	if o.persistSRK != 0 {
		rp, err := run(func() (*tpm2.ReadPublicResponse, error) {
			return tpm2.ReadPublic{ObjectHandle: o.persistSRK}.Execute(t)
		})
		if err == nil {
			pub, err := rp.OutPublic.Contents()
			if err != nil || !sameSRK(pub) {
				return fmt.Errorf("tpm: persistent handle 0x%x holds another object than the SRK; evict it (tpm2_evictcontrol -c 0x%x) or choose another handle", uint32(o.persistSRK), uint32(o.persistSRK))
			}
			s.srk, s.srkName, s.srkKept = o.persistSRK, rp.Name, true
			return nil
		}
		if !errors.Is(err, tpm2.TPMRCHandle) {
			return tpmErr(fmt.Sprintf("read persistent SRK 0x%x", uint32(o.persistSRK)), err)
		}
	}
	rsp, err := run(func() (*tpm2.CreatePrimaryResponse, error) {
		return tpm2.CreatePrimary{PrimaryHandle: owner, InPublic: tpm2.New2B(srkTemplate)}.Execute(t)
	})
	if err != nil {
		return tpmErr("create storage root key", err)
	}
	s.srk, s.srkName = rsp.ObjectHandle, rsp.Name
	if o.persistSRK == 0 {
		return nil
	}
	_, err = run(func() (*tpm2.EvictControlResponse, error) {
		return tpm2.EvictControl{
			Auth:             owner,
			ObjectHandle:     tpm2.NamedHandle{Handle: rsp.ObjectHandle, Name: rsp.Name},
			PersistentHandle: o.persistSRK,
		}.Execute(t)
	})
	_, ferr := tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(t)
	if err != nil {
		return tpmErr(fmt.Sprintf("persist SRK at 0x%x", uint32(o.persistSRK)), err)
	}
	if ferr != nil {
		return tpmErr("flush storage root key", ferr)
	}
	s.srk, s.srkKept = o.persistSRK, true
	return nil
}

// sameSRK reports whether a public area is the SRK template's (the unique
// field, the key itself, aside).
func sameSRK(pub *tpm2.TPMTPublic) bool {
	p := *pub
	p.Unique = srkTemplate.Unique
	return bytes.Equal(tpm2.Marshal(p), tpm2.Marshal(srkTemplate))
}

func openDir(dir string) (*os.Root, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("tpm: create key directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: key directory %s has mode %04o, group and others must have no access: run chmod 700 %s",
			keystore.ErrInsecurePermissions, dir, perm, dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return root, nil
}

// Close flushes the SRK and closes the transport. Signers of a closed Store
// return [ErrClosed].
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var err error
	if !s.srkKept {
		if _, ferr := (tpm2.FlushContext{FlushHandle: s.srk}).Execute(s.tpm); ferr != nil {
			err = tpmErr("flush storage root key", ferr)
		}
	}
	if c, ok := s.tpm.(io.Closer); ok {
		err = errors.Join(err, c.Close())
	}
	return errors.Join(err, s.root.Close())
}

// Dir returns the key directory.
func (s *Store) Dir() string { return s.dir }

// Path returns the file that holds (or would hold) key name.
func (s *Store) Path(name string) string { return filepath.Join(s.dir, name+KeyFileExt) }

// Generate implements [keystore.Store]: the TPM creates the key and the
// wrapped blob is written to DIR/NAME.tpmkey.
func (s *Store) Generate(ctx context.Context, name string, alg keystore.KeyAlg) (crypto.Signer, error) {
	alg, err := keyfiles.Prepare(ctx, name, alg, func() error { return keyfiles.Absent(s.root, s.dir, name, KeyFileExt) })
	if err != nil {
		return nil, err
	}
	file := name + KeyFileExt
	tmpl := keyTemplate(alg)
	var k *key
	err = s.do(func(t transport.TPM) error {
		if _, err := run(func() (*tpm2.TestParmsResponse, error) {
			return tpm2.TestParms{Parameters: tpm2.TPMTPublicParms{Type: tmpl.Type, Parameters: tmpl.Parameters}}.Execute(t)
		}); err != nil {
			return fmt.Errorf("%w: %s: the TPM does not support it (%w)", keystore.ErrUnsupported, alg, err)
		}
		rsp, err := run(func() (*tpm2.CreateResponse, error) {
			return tpm2.Create{
				ParentHandle: tpm2.AuthHandle{Handle: s.srk, Name: s.srkName, Auth: tpm2.PasswordAuth(nil)},
				InPublic:     tpm2.New2B(tmpl),
			}.Execute(t)
		})
		if err != nil {
			return tpmErr("create "+string(alg)+" key", err)
		}
		k, err = newKey(rsp.OutPublic, rsp.OutPrivate)
		return err
	})
	if err != nil {
		return nil, err
	}
	err = atomicfile.WriteExclusive(s.root, file, k.encode(), 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %s", keystore.ErrExists, s.Path(name))
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	return &signer{store: s, key: k}, nil
}

// Signer implements [keystore.Store]. The key blob is checked (it must
// parse and name the owner hierarchy as parent) but not loaded until the
// first signature.
func (s *Store) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := keystore.CheckName(name); err != nil {
		return nil, err
	}
	path := s.Path(name)
	data, err := s.root.ReadFile(name + KeyFileExt)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", keystore.ErrNotFound, path)
	}
	if err != nil {
		return nil, fmt.Errorf("tpm: %w", err)
	}
	k, err := decodeKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &signer{store: s, key: k}, nil
}

// List implements [keystore.Store].
func (s *Store) List(ctx context.Context) ([]string, error) {
	return keyfiles.List(s.root, s.dir, KeyFileExt)
}

// Delete implements [keystore.Store]. The TPM holds nothing for the key, so
// removing the blob destroys it.
func (s *Store) Delete(ctx context.Context, name string) error {
	return keyfiles.Delete(s.root, s.dir, name, KeyFileExt)
}

// do runs f with exclusive use of the TPM.
func (s *Store) do(f func(t transport.TPM) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return f(s.tpm)
}

// retry runs a TPM command again while the TPM answers with a warning
// that asks for it (TPM_RC_RETRY, TPM_RC_YIELDED, TPM_RC_TESTING: busy with
// NV writes or self tests), at most 10 times over about a second.
func retry(f func() error) error {
	delay := 5 * time.Millisecond
	for i := 0; ; i++ {
		err := f()
		if i == 9 || !(errors.Is(err, tpm2.TPMRCRetry) || errors.Is(err, tpm2.TPMRCYielded) || errors.Is(err, tpm2.TPMRCTesting)) {
			return err
		}
		time.Sleep(delay)
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// run is retry for a command with a response.
func run[R any](f func() (*R, error)) (*R, error) {
	var r *R
	err := retry(func() (err error) { r, err = f(); return err })
	return r, err
}

// tpmErr wraps a TPM error with op and, for the response codes a user can
// act on, a sentinel and the fix.
func tpmErr(op string, err error) error {
	switch {
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("%w during %s: wait for the lockout recovery time or reset it with the lockout authorization (tpm2_dictionarylockout --clear-lockout): %w", ErrLockout, op, err)
	case errors.Is(err, tpm2.TPMRCBadAuth), errors.Is(err, tpm2.TPMRCAuthFail):
		return fmt.Errorf("%w during %s: wrong authorization value (owner password set? pass it with WithOwnerAuth): %w", ErrAuth, op, err)
	}
	return fmt.Errorf("tpm: %s: %w", op, err)
}

// Rename implements [keystore.Renamer]: the blob file is renamed
// atomically, replacing any key of the new name.
func (s *Store) Rename(ctx context.Context, oldName, newName string) error {
	return keyfiles.Rename(s.root, s.dir, oldName, newName, KeyFileExt)
}
