//go:build cgo

package pkcs11

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ThalesGroup/crypto11"
	p11 "github.com/miekg/pkcs11"

	"github.com/mqtls/mqtls/keystore"
)

// DefaultMaxSessions is the default size of a store's session pool (one
// more session stays open for the login).
const DefaultMaxSessions = 16

// moduleMu serialises loading, initialising and finalising modules: PKCS#11
// initialisation is per process, and crypto11 counts its users per module.
// It also guards logins.
var moduleMu sync.Mutex

// PKCS#11 logs in an application, not a session: while one store is logged
// in to a token, the token answers another store's C_Login with
// CKR_USER_ALREADY_LOGGED_IN whatever PIN it gives. logins remembers, per
// token, a digest of the PIN the token accepted, so that a later store of
// this process with another PIN is refused all the same.
var logins = map[loginKey]*login{}

type loginKey struct {
	module string
	slot   uint
}

type login struct {
	pin    [sha256.Size]byte
	stores int
}

// Store is a [keystore.Store] on one PKCS#11 token. Create it with [Open];
// Close logs out (with the last store of the process on that module) and
// unloads the module.
type Store struct {
	c      *crypto11.Context
	object string // "" or the one label this store may use
	token  string // describes the token in errors
	login  loginKey
	// raw reaches the module directly for what crypto11 lacks
	// (C_SetAttributeValue); the module is initialised by crypto11.
	raw  *p11.Ctx
	slot uint

	mu     sync.Mutex // serialises Generate and Delete
	closed atomic.Bool
}

var (
	_ keystore.Store   = (*Store)(nil)
	_ keystore.Renamer = (*Store)(nil)
)

type options struct {
	maxSessions int
}

// Option configures a Store.
type Option func(*options)

// WithMaxSessions sets how many sessions the store's pool keeps for
// concurrent operations, at least 1 (default [DefaultMaxSessions]); a token
// that allows fewer lowers it.
func WithMaxSessions(n int) Option {
	return func(o *options) { o.maxSessions = n }
}

func (o options) validate() error {
	if o.maxSessions < 1 {
		return fmt.Errorf("pkcs11: WithMaxSessions(%d): want at least 1", o.maxSessions)
	}
	return nil
}

// Open loads the module u names, finds its one token matching u, reads the
// user PIN from u's pin-source and logs in. It returns [ErrNoModule],
// [ErrNoToken] (listing the tokens seen), [ErrPINSource], [ErrPIN] or
// [ErrPINLocked], wrapped with what to do about it.
func Open(ctx context.Context, u keystore.PKCS11, opts ...Option) (*Store, error) {
	o := options{maxSessions: DefaultMaxSessions}
	for _, opt := range opts {
		opt(&o)
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// Checked and normalised again, so that attributes built by hand, not
	// by ParseURI, get the same answers.
	parsed, err := keystore.ParseURI(u.String())
	if err != nil {
		return nil, fmt.Errorf("pkcs11: %w", err)
	}
	u = parsed.PKCS11
	pin, err := readPIN(u.PINSource)
	if err != nil {
		return nil, err
	}

	moduleMu.Lock()
	defer moduleMu.Unlock()
	slot, info, err := findToken(u)
	if err != nil {
		return nil, err
	}
	desc := describe(slot, info)
	key := loginKey{u.ModulePath, slot}
	sum := sha256.Sum256([]byte(pin))
	if l := logins[key]; l != nil && subtle.ConstantTimeCompare(l.pin[:], sum[:]) != 1 {
		return nil, fmt.Errorf("%w for %s (from pin-source %s): another store of this process is logged in to this token with another PIN", ErrPIN, desc, u.PINSource)
	}
	if info.Flags&p11.CKF_USER_PIN_LOCKED != 0 {
		return nil, fmt.Errorf("%w on %s: unblock it with the SO PIN (pkcs11-tool --login --login-type so --init-pin) or re-initialise the token", ErrPINLocked, desc)
	}
	if info.Flags&p11.CKF_USER_PIN_INITIALIZED == 0 {
		return nil, fmt.Errorf("pkcs11: %s has no user PIN set: initialise it (softhsm2-util --init-token, pkcs11-tool --init-pin)", desc)
	}
	n := int(slot)
	c, err := crypto11.Configure(&crypto11.Config{
		Path:        u.ModulePath,
		SlotNumber:  &n,
		Pin:         pin,
		MaxSessions: o.maxSessions + 1, // crypto11 keeps one for the login
	})
	if err != nil {
		return nil, loginErr(u, slot, desc, err)
	}
	raw := p11.New(u.ModulePath)
	if raw == nil {
		c.Close()
		return nil, fmt.Errorf("%w %s: second dlopen failed", ErrNoModule, u.ModulePath)
	}
	if err := raw.Initialize(); err == nil || !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		// crypto11 initialised it: anything else is a module we do not
		// understand.
		if err == nil {
			raw.Finalize()
		}
		raw.Destroy()
		c.Close()
		return nil, fmt.Errorf("pkcs11: %s: module not initialised after login (%v)", u.ModulePath, err)
	}
	l := logins[key]
	if l == nil {
		l = &login{pin: sum}
		logins[key] = l
	}
	l.stores++
	return &Store{c: c, object: u.Object, token: desc, login: key, raw: raw, slot: slot}, nil
}

// loginErr explains a failed crypto11.Configure, with the token's PIN
// retry state when it reports one.
func loginErr(u keystore.PKCS11, slot uint, desc string, err error) error {
	var rv p11.Error
	if !errors.As(err, &rv) {
		return fmt.Errorf("pkcs11: open %s: %w", desc, err)
	}
	switch rv {
	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_LEN_RANGE:
		state := ""
		if _, info, ferr := findToken(u); ferr == nil {
			switch {
			case info.Flags&p11.CKF_USER_PIN_LOCKED != 0:
				state = "; the token reports the PIN is now locked"
			case info.Flags&p11.CKF_USER_PIN_FINAL_TRY != 0:
				state = "; the token reports one try left before the PIN locks"
			case info.Flags&p11.CKF_USER_PIN_COUNT_LOW != 0:
				state = "; the token reports a failed PIN try (CKF_USER_PIN_COUNT_LOW): check pin-source before trying again"
			}
		}
		return fmt.Errorf("%w for %s (from pin-source %s)%s: %w", ErrPIN, desc, u.PINSource, state, rv)
	case p11.CKR_PIN_LOCKED:
		return fmt.Errorf("%w on %s: unblock it with the SO PIN or re-initialise the token: %w", ErrPINLocked, desc, rv)
	}
	return fmt.Errorf("pkcs11: log in to %s: %w", desc, err)
}

// findToken loads the module and returns the slot of the one token that
// matches every selecting attribute of u. moduleMu must be held.
func findToken(u keystore.PKCS11) (uint, p11.TokenInfo, error) {
	if _, err := os.Stat(u.ModulePath); err != nil {
		return 0, p11.TokenInfo{}, fmt.Errorf("%w %s: %w (install the token's module, e.g. apt-get install softhsm2 or opensc-pkcs11, or fix module-path)", ErrNoModule, u.ModulePath, err)
	}
	m := p11.New(u.ModulePath)
	if m == nil {
		return 0, p11.TokenInfo{}, fmt.Errorf("%w %s: dlopen failed or it exports no C_GetFunctionList (is it a PKCS#11 module for this architecture?)", ErrNoModule, u.ModulePath)
	}
	defer m.Destroy()
	switch err := m.Initialize(); {
	case err == nil:
		// A failed C_Finalize of this probe leaves nothing to undo.
		defer m.Finalize()
	case errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
		// Another store of this process has it loaded: leave it so.
	default:
		return 0, p11.TokenInfo{}, fmt.Errorf("%w %s: C_Initialize: %w", ErrNoModule, u.ModulePath, err)
	}
	slots, err := m.GetSlotList(true)
	if err != nil {
		return 0, p11.TokenInfo{}, fmt.Errorf("pkcs11: list slots of %s: %w", u.ModulePath, err)
	}
	var (
		seen    []string
		matches []uint
		found   p11.TokenInfo
	)
	for _, slot := range slots {
		info, err := m.GetTokenInfo(slot)
		if err != nil {
			continue
		}
		info.Label = strings.TrimRight(info.Label, " \x00")
		info.SerialNumber = strings.TrimRight(info.SerialNumber, " \x00")
		info.ManufacturerID = strings.TrimRight(info.ManufacturerID, " \x00")
		info.Model = strings.TrimRight(info.Model, " \x00")
		if info.Flags&p11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		seen = append(seen, describe(slot, info))
		if (u.Token == "" || u.Token == info.Label) &&
			(u.Serial == "" || u.Serial == info.SerialNumber) &&
			(u.Manufacturer == "" || u.Manufacturer == info.ManufacturerID) &&
			(u.Model == "" || u.Model == info.Model) &&
			(u.SlotID == "" || u.SlotID == strconv.FormatUint(uint64(slot), 10)) {
			matches = append(matches, slot)
			found = info
		}
	}
	tokens := "none"
	if len(seen) > 0 {
		tokens = strings.Join(seen, "; ")
	}
	switch len(matches) {
	case 0:
		return 0, p11.TokenInfo{}, fmt.Errorf("%w: no initialised token of %s matches %s (tokens seen: %s)", ErrNoToken, u.ModulePath, selector(u), tokens)
	case 1:
		return matches[0], found, nil
	}
	return 0, p11.TokenInfo{}, fmt.Errorf("%w: %d tokens of %s match %s; add serial= or slot-id= (tokens seen: %s)", ErrNoToken, len(matches), u.ModulePath, selector(u), tokens)
}

func describe(slot uint, info p11.TokenInfo) string {
	return fmt.Sprintf("token %q (slot %d, serial %s, %s %s)", info.Label, slot, info.SerialNumber, info.ManufacturerID, info.Model)
}

// selector is the token-selecting part of u, for errors.
func selector(u keystore.PKCS11) string {
	s := u.String()
	s, _, _ = strings.Cut(s, "?")
	return s
}

// check refuses work on a closed store, a done context and a name the
// store does not hold.
func (s *Store) check(ctx context.Context, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if s.closed.Load() {
		return ErrClosed
	}
	if err := keystore.CheckName(name); err != nil {
		return err
	}
	if s.object != "" && name != s.object {
		return fmt.Errorf("%w %q: the keystore URI restricts this store to object=%s", keystore.ErrInvalidName, name, s.object)
	}
	return nil
}

// Generate creates a key pair labelled name on the token.
func (s *Store) Generate(ctx context.Context, name string, alg keystore.KeyAlg) (crypto.Signer, error) {
	if err := s.check(ctx, name); err != nil {
		return nil, err
	}
	alg, err := alg.Resolve()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	existing, err := s.c.FindPrivateKeys(nil, []byte(name))
	if err != nil {
		return nil, s.wrap("look up "+strconv.Quote(name), err)
	}
	if len(existing) > 0 {
		return nil, fmt.Errorf("%w: %q on %s", keystore.ErrExists, name, s.token)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	pub, priv := crypto11.NewAttributeSet(), crypto11.NewAttributeSet()
	pub.AddIfNotPresent([]*p11.Attribute{
		p11.NewAttribute(p11.CKA_ID, id),
		p11.NewAttribute(p11.CKA_LABEL, name),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_VERIFY, true),
		p11.NewAttribute(p11.CKA_ENCRYPT, false),
		p11.NewAttribute(p11.CKA_WRAP, false),
	})
	priv.AddIfNotPresent([]*p11.Attribute{
		p11.NewAttribute(p11.CKA_ID, id),
		p11.NewAttribute(p11.CKA_LABEL, name),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_SIGN, true),
		p11.NewAttribute(p11.CKA_DECRYPT, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
	})
	var k crypto11.Signer
	if bits := alg.RSABits(); bits != 0 {
		k, err = s.c.GenerateRSAKeyPairWithAttributes(pub, priv, bits)
	} else {
		k, err = s.c.GenerateECDSAKeyPairWithAttributes(pub, priv, alg.Curve())
	}
	if err != nil {
		var rv p11.Error
		if errors.As(err, &rv) && (rv == p11.CKR_MECHANISM_INVALID || rv == p11.CKR_KEY_SIZE_RANGE ||
			rv == p11.CKR_DOMAIN_PARAMS_INVALID || rv == p11.CKR_CURVE_NOT_SUPPORTED) {
			return nil, fmt.Errorf("%w: %s on %s: %w", keystore.ErrUnsupported, alg, s.token, rv)
		}
		return nil, s.wrap(fmt.Sprintf("generate %s key %q", alg, name), err)
	}
	if err := s.checkProtected(k); err != nil {
		if derr := k.Delete(); derr != nil {
			return nil, errors.Join(err, s.wrap("delete the unprotected key", derr))
		}
		return nil, err
	}
	return &signer{s: s, k: k, name: name}, nil
}

// checkProtected reads back the attributes that keep a private key inside
// the token.
func (s *Store) checkProtected(k crypto11.Signer) error {
	attrs, err := s.c.GetAttributes(k, []crypto11.AttributeType{crypto11.CkaSensitive, crypto11.CkaExtractable, crypto11.CkaPrivate})
	if err != nil {
		return s.wrap("read key attributes", err)
	}
	is := func(t crypto11.AttributeType) bool {
		a := attrs[t]
		return a != nil && len(a.Value) == 1 && a.Value[0] != 0
	}
	if !is(crypto11.CkaSensitive) || is(crypto11.CkaExtractable) || !is(crypto11.CkaPrivate) {
		return fmt.Errorf("pkcs11: %s made a key that is not sensitive, private and non-extractable; refusing it", s.token)
	}
	return nil
}

// find returns the one key pair labelled name.
func (s *Store) find(name string) (crypto11.Signer, error) {
	keys, err := s.c.FindKeyPairs(nil, []byte(name))
	if err != nil {
		return nil, s.wrap("look up "+strconv.Quote(name), err)
	}
	switch len(keys) {
	case 0:
		return nil, fmt.Errorf("%w: %q on %s", keystore.ErrNotFound, name, s.token)
	case 1:
		return keys[0], nil
	}
	return nil, fmt.Errorf("%w: %d key pairs labelled %q on %s; delete the extra ones (pkcs11-tool --delete-object --type privkey --id ID)", ErrAmbiguous, len(keys), name, s.token)
}

// Signer returns the signer of the key pair labelled name.
func (s *Store) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := s.check(ctx, name); err != nil {
		return nil, err
	}
	k, err := s.find(name)
	if err != nil {
		return nil, err
	}
	if _, err := keystore.AlgOf(k.Public()); err != nil {
		return nil, fmt.Errorf("pkcs11: key %q on %s: %w", name, s.token, err)
	}
	return &signer{s: s, k: k, name: name}, nil
}

// List returns the labels of the token's key pairs that are valid key names
// (and, with object=, only that one), sorted.
func (s *Store) List(ctx context.Context) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if s.closed.Load() {
		return nil, ErrClosed
	}
	keys, err := s.c.FindAllKeyPairs()
	if err != nil {
		return nil, s.wrap("list keys", err)
	}
	names := []string{}
	for _, k := range keys {
		a, err := s.c.GetAttribute(k, crypto11.CkaLabel)
		if err != nil {
			return nil, s.wrap("read key label", err)
		}
		if a == nil {
			continue
		}
		name := string(a.Value)
		if keystore.CheckName(name) != nil || s.object != "" && name != s.object {
			continue
		}
		names = append(names, name)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// Delete destroys both halves of the key pair labelled name.
func (s *Store) Delete(ctx context.Context, name string) error {
	if err := s.check(ctx, name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	k, err := s.find(name)
	if err != nil {
		return err
	}
	if err := k.Delete(); err != nil {
		return s.wrap("delete "+strconv.Quote(name), err)
	}
	return nil
}

// Rename gives the key pair labelled oldName the label newName, deleting
// any key pair labelled newName first. PKCS#11 has no atomic multi-object
// change: a crash in between leaves the key under its old name (which
// identity renewal recovers from) or its private half already relabelled,
// never two keys of one name. The private half is relabelled first: its
// public half is found by CKA_ID alone until it follows.
func (s *Store) Rename(ctx context.Context, oldName, newName string) error {
	if err := s.check(ctx, oldName); err != nil {
		return err
	}
	if err := s.check(ctx, newName); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	src, err := s.find(oldName)
	if err != nil {
		return err
	}
	if oldName == newName {
		return nil
	}
	a, err := s.c.GetAttribute(src, crypto11.CkaId)
	if err != nil {
		return s.wrap("read key ID", err)
	}
	var id []byte
	if a != nil {
		id = a.Value
	}
	old, err := s.c.FindKeyPairs(nil, []byte(newName))
	if err != nil {
		return s.wrap("look up "+strconv.Quote(newName), err)
	}
	for _, k := range old {
		if err := k.Delete(); err != nil {
			return s.wrap("delete "+strconv.Quote(newName), err)
		}
	}
	sess, err := s.raw.OpenSession(s.slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		return s.wrap("open session", err)
	}
	defer s.raw.CloseSession(sess) // nothing to undo if it fails
	for _, class := range []uint{p11.CKO_PRIVATE_KEY, p11.CKO_PUBLIC_KEY} {
		tmpl := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, class), p11.NewAttribute(p11.CKA_LABEL, oldName)}
		if len(id) > 0 {
			tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, id))
		}
		handles, err := s.findObjects(sess, tmpl)
		if err != nil {
			return s.wrap("find "+strconv.Quote(oldName), err)
		}
		for _, h := range handles {
			if err := s.raw.SetAttributeValue(sess, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, newName)}); err != nil {
				return s.wrap(fmt.Sprintf("relabel %q as %q", oldName, newName), err)
			}
		}
	}
	return nil
}

func (s *Store) findObjects(sess p11.SessionHandle, tmpl []*p11.Attribute) ([]p11.ObjectHandle, error) {
	if err := s.raw.FindObjectsInit(sess, tmpl); err != nil {
		return nil, err
	}
	var all []p11.ObjectHandle
	for {
		hs, _, err := s.raw.FindObjects(sess, 16)
		if err != nil {
			s.raw.FindObjectsFinal(sess) // the find error is the one to report
			return nil, err
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	return all, s.raw.FindObjectsFinal(sess)
}

// Close logs out and unloads the module when this is the process's last
// store on it. Signers of a closed store return [ErrClosed].
func (s *Store) Close() error {
	moduleMu.Lock()
	defer moduleMu.Unlock()
	if s.closed.Swap(true) {
		return nil
	}
	if l := logins[s.login]; l != nil {
		if l.stores--; l.stores == 0 {
			delete(logins, s.login)
		}
	}
	s.raw.Destroy() // unloads nothing while crypto11 holds the module
	return s.c.Close()
}

func (s *Store) wrap(what string, err error) error {
	if s.closed.Load() {
		return fmt.Errorf("pkcs11: %s: %w", what, ErrClosed)
	}
	return fmt.Errorf("pkcs11: %s on %s: %w", what, s.token, err)
}

// signer is a key pair on the token as a crypto.Signer.
type signer struct {
	s    *Store
	k    crypto11.Signer
	name string
}

func (k *signer) Public() crypto.PublicKey { return k.k.Public() }

// Sign signs digest on the token (rand is not used: the token draws its
// own randomness). ECDSA signatures are ASN.1 DER; RSA keys sign PKCS #1
// v1.5, or PSS for *rsa.PSSOptions (rsa.PSSSaltLengthAuto signs with a
// salt as long as the hash, which every PSS verifier accepts). It blocks
// for as long as the token takes.
func (k *signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if k.s.closed.Load() {
		return nil, ErrClosed
	}
	if h := opts.HashFunc(); h != 0 && len(digest) != h.Size() {
		return nil, fmt.Errorf("pkcs11: sign with %q: digest is %d bytes, %s needs %d", k.name, len(digest), h, h.Size())
	}
	if pss, ok := opts.(*rsa.PSSOptions); ok && pss.SaltLength == rsa.PSSSaltLengthAuto {
		o := *pss
		o.SaltLength = rsa.PSSSaltLengthEqualsHash
		opts = &o
	}
	sig, err := k.k.Sign(nil, digest, opts)
	if err != nil {
		return nil, k.s.wrap("sign with "+strconv.Quote(k.name), err)
	}
	return sig, nil
}
