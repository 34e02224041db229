//go:build cgo

package pkcs11_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// open opens a store on u and closes it when the test ends.
func open(t testing.TB, u keystore.PKCS11, opts ...pkcs11.Option) *pkcs11.Store {
	t.Helper()
	s, err := pkcs11.Open(t.Context(), u, opts...)
	if err != nil {
		t.Fatalf("Open(%s): %v", u, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// empty opens a store on tok and deletes every key on it: the conformance
// suite wants an empty store per subtest.
func empty(t *testing.T, tok *softhsmtest.Token) keystore.Store {
	t.Helper()
	s := open(t, tok.URI())
	names, err := s.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if err := s.Delete(t.Context(), n); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// The conformance suite, mutual-TLS handshakes included, against a SoftHSM2
// token made for this test.
func TestConformance(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "conformance")
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return empty(t, tok) }, keystoretest.Config{
		Reopen: func(t *testing.T, s keystore.Store) keystore.Store {
			if err := s.(*pkcs11.Store).Close(); err != nil {
				t.Fatal(err)
			}
			return open(t, tok.URI())
		},
	})
}

// Negative cases first: what a wrong or incomplete configuration gets.

func TestWrongPIN(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "pin")
	wrong := filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(wrong, []byte("not-the-pin-4711\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	u := tok.URI()
	u.PINSource = "file:" + wrong
	_, err := pkcs11.Open(t.Context(), u)
	if !errors.Is(err, pkcs11.ErrPIN) {
		t.Fatalf("Open with a wrong PIN = %v, want ErrPIN", err)
	}
	for _, secret := range []string{"not-the-pin-4711", tok.PIN} {
		if strings.Contains(err.Error(), secret) {
			t.Errorf("error contains a PIN: %v", err)
		}
	}
	if !strings.Contains(err.Error(), wrong) || !strings.Contains(err.Error(), `"pin"`) {
		t.Errorf("error does not name the PIN source and the token: %v", err)
	}
	// The right PIN still works afterwards.
	open(t, tok.URI())

	// The token now answers any C_Login of this process with "already
	// logged in"; the store refuses a wrong PIN all the same.
	_, err = pkcs11.Open(t.Context(), u)
	if !errors.Is(err, pkcs11.ErrPIN) || !strings.Contains(err.Error(), "another PIN") {
		t.Fatalf("Open with a wrong PIN while logged in = %v, want ErrPIN", err)
	}
	if strings.Contains(err.Error(), tok.PIN) || strings.Contains(err.Error(), "not-the-pin-4711") {
		t.Errorf("error contains a PIN: %v", err)
	}
	open(t, tok.URI()) // a second store with the right PIN is fine
}

func TestPINSources(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "pins")
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return p
	}
	t.Setenv("MQTLS_EMPTY_PIN", "")
	for _, tc := range []struct {
		name, source string
		want         error
	}{
		{"missing file", "file:" + filepath.Join(dir, "nope"), os.ErrNotExist},
		{"world-readable file", "file:" + write("0644.pin", tok.PIN, 0o644), keystore.ErrInsecurePermissions},
		{"group-readable file", "file:" + write("0640.pin", tok.PIN, 0o640), keystore.ErrInsecurePermissions},
		{"empty file", "file:" + write("empty.pin", "\n", 0o600), pkcs11.ErrPINSource},
		{"directory", "file:" + dir, pkcs11.ErrPINSource},
		{"unset variable", "env:MQTLS_UNSET_PIN_VAR", pkcs11.ErrPINSource},
		{"empty variable", "env:MQTLS_EMPTY_PIN", pkcs11.ErrPINSource},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := tok.URI()
			u.PINSource = tc.source
			_, err := pkcs11.Open(t.Context(), u)
			if !errors.Is(err, tc.want) || !errors.Is(err, pkcs11.ErrPINSource) {
				t.Fatalf("Open = %v, want %v and ErrPINSource", err, tc.want)
			}
			if strings.Contains(err.Error(), tok.PIN) {
				t.Errorf("error contains the PIN: %v", err)
			}
		})
	}
	t.Run("variable", func(t *testing.T) {
		t.Setenv("MQTLS_PIN", tok.PIN)
		u := tok.URI()
		u.PINSource = "env:MQTLS_PIN"
		s := open(t, u)
		if _, err := s.Generate(t.Context(), "k", ""); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("file without newline", func(t *testing.T) {
		u := tok.URI()
		u.PINSource = "file:" + write("bare.pin", tok.PIN, 0o400)
		open(t, u)
	})
}

func TestNoToken(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "present")
	for name, edit := range map[string]func(*keystore.PKCS11){
		"label":         func(u *keystore.PKCS11) { u.Token = "absent" },
		"serial":        func(u *keystore.PKCS11) { u.Serial = "0000000000000000" },
		"model":         func(u *keystore.PKCS11) { u.Model = "not SoftHSM" },
		"slot-id":       func(u *keystore.PKCS11) { u.SlotID = strconv.FormatUint(uint64(tok.Slot)+1, 10) },
		"label+slot-id": func(u *keystore.PKCS11) { u.Token = "absent"; u.SlotID = strconv.FormatUint(uint64(tok.Slot), 10) },
	} {
		t.Run(name, func(t *testing.T) {
			u := tok.URI()
			edit(&u)
			_, err := pkcs11.Open(t.Context(), u)
			if !errors.Is(err, pkcs11.ErrNoToken) {
				t.Fatalf("Open = %v, want ErrNoToken", err)
			}
			if !strings.Contains(err.Error(), `token "present"`) {
				t.Errorf("error does not list the tokens seen: %v", err)
			}
		})
	}
	t.Run("slot-id alone", func(t *testing.T) {
		u := tok.URI()
		u.Token, u.SlotID = "", strconv.FormatUint(uint64(tok.Slot), 10)
		open(t, u)
	})
	t.Run("slot-id built by hand with leading zeros", func(t *testing.T) {
		u := tok.URI()
		u.Token, u.SlotID = "", "00"+strconv.FormatUint(uint64(tok.Slot), 10)
		open(t, u)
	})
	t.Run("every attribute", func(t *testing.T) {
		u := tok.URI()
		u.Manufacturer, u.Model, u.SlotID = "SoftHSM project", "SoftHSM v2", strconv.FormatUint(uint64(tok.Slot), 10)
		open(t, u)
	})
}

func TestNoModule(t *testing.T) {
	notModule := filepath.Join(t.TempDir(), "not-a-module.so")
	if err := os.WriteFile(notModule, []byte("ELF? no"), 0o644); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pin, []byte("1234"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/nonexistent/libpkcs11.so", notModule} {
		u := keystore.PKCS11{Token: "t", ModulePath: path, PINSource: "file:" + pin}
		_, err := pkcs11.Open(t.Context(), u)
		if !errors.Is(err, pkcs11.ErrNoModule) || !strings.Contains(err.Error(), path) {
			t.Errorf("Open(module-path=%s) = %v, want ErrNoModule naming the path", path, err)
		}
	}
}

func TestOpenRefusesBadAttributes(t *testing.T) {
	// Built by hand, not by ParseURI: Open checks them too.
	_, err := pkcs11.Open(t.Context(), keystore.PKCS11{Token: "t", ModulePath: "relative.so", PINSource: "file:x"})
	if !errors.Is(err, keystore.ErrBadURI) {
		t.Errorf("Open(relative module) = %v, want ErrBadURI", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := pkcs11.Open(ctx, keystore.PKCS11{}); !errors.Is(err, context.Canceled) {
		t.Errorf("Open(canceled) = %v, want context.Canceled", err)
	}
	if _, err := pkcs11.Open(t.Context(), keystore.PKCS11{}, pkcs11.WithMaxSessions(0)); err == nil {
		t.Error("WithMaxSessions(0) accepted")
	}
}

// object= restricts the store to one key.
func TestObjectRestricts(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "object")
	all := open(t, tok.URI())
	if _, err := all.Generate(t.Context(), "other", ""); err != nil {
		t.Fatal(err)
	}
	u := tok.URI()
	u.Object = "device"
	s := open(t, u)
	if _, err := s.Signer(t.Context(), "device"); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("Signer(device) before Generate = %v, want ErrNotFound", err)
	}
	for _, name := range []string{"other", "device-next"} {
		if _, err := s.Generate(t.Context(), name, ""); !errors.Is(err, keystore.ErrInvalidName) {
			t.Errorf("Generate(%s) = %v, want ErrInvalidName", name, err)
		}
		if _, err := s.Signer(t.Context(), name); !errors.Is(err, keystore.ErrInvalidName) {
			t.Errorf("Signer(%s) = %v, want ErrInvalidName", name, err)
		}
	}
	if _, err := s.Generate(t.Context(), "device", ""); err != nil {
		t.Fatal(err)
	}
	if names, err := s.List(t.Context()); err != nil || !slices.Equal(names, []string{"device"}) {
		t.Errorf("List with object=device = %v, %v", names, err)
	}
	if names, err := all.List(t.Context()); err != nil || !slices.Equal(names, []string{"device", "other"}) {
		t.Errorf("List of the whole token = %v, %v", names, err)
	}
}

// Keys made by the store are sensitive and never extractable, as the token
// itself reports them to another program; their value cannot be read out.
func TestKeysStayInToken(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "attrs")
	s, err := pkcs11.Open(t.Context(), tok.URI())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() }) // idempotent; closed below before the direct session
	for _, alg := range keystore.Algs() {
		if _, err := s.Generate(t.Context(), "k-"+string(alg), alg); err != nil {
			t.Fatal(err)
		}
	}
	out := pkcs11Tool(t, tok, "--list-objects", "--type", "privkey")
	objects := strings.Split(string(out), "Private Key Object")[1:]
	if len(objects) != len(keystore.Algs()) {
		t.Fatalf("pkcs11-tool lists %d private keys, want %d:\n%s", len(objects), len(keystore.Algs()), out)
	}
	for _, o := range objects {
		access := regexpLine(o, "Access:")
		usage := regexpLine(o, "Usage:")
		for _, want := range []string{"sensitive", "always sensitive", "never extractable", "local"} {
			if !strings.Contains(access, want) {
				t.Errorf("key lacks %q: Access: %s\n%s", want, access, o)
			}
		}
		if strings.Contains(access, " extractable") && !strings.Contains(access, "never extractable") {
			t.Errorf("key is extractable: %s", access)
		}
		for _, bad := range []string{"decrypt", "unwrap", "derive"} {
			if strings.Contains(usage, bad) {
				t.Errorf("key usage includes %s: %s", bad, usage)
			}
		}
	}
	// Asked for the private value, the token refuses (pkcs11-tool does
	// not even try): ask it directly, in a PKCS#11 session of our own.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	direct(t, tok, func(m *p11.Ctx, sess p11.SessionHandle) { checkPrivateKeys(t, m, sess) })
}

func checkPrivateKeys(t *testing.T, m *p11.Ctx, sess p11.SessionHandle) {
	if err := m.FindObjectsInit(sess, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY)}); err != nil {
		t.Fatal(err)
	}
	handles, _, err := m.FindObjects(sess, 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.FindObjectsFinal(sess); err != nil {
		t.Fatal(err)
	}
	if len(handles) != len(keystore.Algs()) {
		t.Fatalf("found %d private keys, want %d", len(handles), len(keystore.Algs()))
	}
	for _, h := range handles {
		attrs, err := m.GetAttributeValue(sess, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_LABEL, nil),
			p11.NewAttribute(p11.CKA_SENSITIVE, nil),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
			p11.NewAttribute(p11.CKA_NEVER_EXTRACTABLE, nil),
			p11.NewAttribute(p11.CKA_PRIVATE, nil),
		})
		if err != nil {
			t.Fatal(err)
		}
		label := string(attrs[0].Value)
		for i, want := range []bool{true, false, true, true} {
			if got := attrs[i+1].Value[0] != 0; got != want {
				t.Errorf("%s: attribute 0x%x = %v, want %v", label, attrs[i+1].Type, got, want)
			}
		}
		if strings.HasPrefix(label, "k-rsa") {
			_, err := m.GetAttributeValue(sess, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_PRIVATE_EXPONENT, nil)})
			if !errors.Is(err, p11.Error(p11.CKR_ATTRIBUTE_SENSITIVE)) {
				t.Errorf("%s: reading the private exponent = %v, want CKR_ATTRIBUTE_SENSITIVE", label, err)
			}
		} else {
			_, err := m.GetAttributeValue(sess, h, []*p11.Attribute{p11.NewAttribute(p11.CKA_VALUE, nil)})
			if !errors.Is(err, p11.Error(p11.CKR_ATTRIBUTE_SENSITIVE)) {
				t.Errorf("%s: reading the private value = %v, want CKR_ATTRIBUTE_SENSITIVE", label, err)
			}
		}
	}
}

func regexpLine(s, prefix string) string {
	for line := range strings.SplitSeq(s, "\n") {
		if l := strings.TrimSpace(line); strings.HasPrefix(l, prefix) {
			return strings.TrimSpace(strings.TrimPrefix(l, prefix))
		}
	}
	return ""
}

// pkcs11Tool runs OpenSC's pkcs11-tool logged in to tok (the PIN passes
// through the environment) and returns its output.
func pkcs11Tool(t *testing.T, tok *softhsmtest.Token, args ...string) []byte {
	t.Helper()
	args = append([]string{"--module", softhsmtest.Module, "--token-label", tok.Label, "--login", "--pin", "env:MQTLS_TEST_PIN"}, args...)
	cmd := exec.Command(testtool.Require(t, "pkcs11-tool"), args...)
	cmd.Env = tok.Env()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("pkcs11-tool %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.Bytes()
}

func TestClosed(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "closed")
	s, err := pkcs11.Open(t.Context(), tok.URI())
	if err != nil {
		t.Fatal(err)
	}
	signer, err := s.Generate(t.Context(), "k", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	d := sha256.Sum256([]byte("late"))
	if _, err := signer.Sign(rand.Reader, d[:], crypto.SHA256); !errors.Is(err, pkcs11.ErrClosed) {
		t.Errorf("Sign after Close = %v, want ErrClosed", err)
	}
	if _, err := s.Signer(t.Context(), "k"); !errors.Is(err, pkcs11.ErrClosed) {
		t.Errorf("Signer after Close = %v, want ErrClosed", err)
	}
}

// Two stores of one process on one token share the module; closing one
// leaves the other working.
func TestTwoStores(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "shared")
	a := open(t, tok.URI())
	b, err := pkcs11.Open(t.Context(), tok.URI(), pkcs11.WithMaxSessions(2))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := a.Generate(t.Context(), "k", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Signer(t.Context(), "k"); err != nil {
		t.Fatalf("second store does not see the key: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	keystoretest.CheckSigns(t, signer)
}

// A digest of the wrong length for the hash is refused before the token
// sees it.
func TestDigestLength(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "digest")
	s := open(t, tok.URI())
	signer, err := s.Generate(t.Context(), "k", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := signer.Sign(rand.Reader, make([]byte, 20), crypto.SHA256); err == nil {
		t.Fatal("20-byte digest accepted as SHA-256")
	}
	d := sha256.Sum256([]byte("ok"))
	sig, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(signer.Public().(*ecdsa.PublicKey), d[:], sig) {
		t.Fatalf("Sign: %v", err)
	}
}

// More signers than sessions: callers wait for a session from the pool
// instead of failing.
func TestSmallPool(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "pool")
	s := open(t, tok.URI(), pkcs11.WithMaxSessions(1))
	signer, err := s.Generate(t.Context(), "k", "")
	if err != nil {
		t.Fatal(err)
	}
	pub := signer.Public().(*ecdsa.PublicKey)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 20 {
				d := sha256.Sum256([]byte{byte(g), byte(i)})
				sig, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
				if err != nil {
					errs <- err
					return
				}
				if !ecdsa.VerifyASN1(pub, d[:], sig) {
					errs <- errors.New("signature does not verify")
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A rename cut short after the private half (the state a crash in Rename
// can leave): the key is found under its new name through the shared
// CKA_ID, and not under its old one.
func TestRenameCutShort(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "cut")
	s, err := pkcs11.Open(t.Context(), tok.URI())
	if err != nil {
		t.Fatal(err)
	}
	signer, err := s.Generate(t.Context(), "device-next", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	direct(t, tok, func(m *p11.Ctx, sess p11.SessionHandle) {
		tmpl := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY), p11.NewAttribute(p11.CKA_LABEL, "device-next")}
		if err := m.FindObjectsInit(sess, tmpl); err != nil {
			t.Fatal(err)
		}
		hs, _, err := m.FindObjects(sess, 2)
		if err != nil || len(hs) != 1 {
			t.Fatalf("private key: %v, %v", hs, err)
		}
		if err := m.FindObjectsFinal(sess); err != nil {
			t.Fatal(err)
		}
		if err := m.SetAttributeValue(sess, hs[0], []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, "device")}); err != nil {
			t.Fatal(err)
		}
	})
	s = open(t, tok.URI())
	got, err := s.Signer(t.Context(), "device")
	if err != nil {
		t.Fatal(err)
	}
	if !got.Public().(*ecdsa.PublicKey).Equal(signer.Public()) {
		t.Fatal("half-renamed key has another public key")
	}
	keystoretest.CheckSigns(t, got)
	if _, err := s.Signer(t.Context(), "device-next"); !errors.Is(err, keystore.ErrNotFound) {
		t.Fatalf("Signer(old name) = %v, want ErrNotFound", err)
	}
}

// direct runs f in a logged-in read-write session of tok's module, opened
// without the store (no store of the test may be open).
func direct(t *testing.T, tok *softhsmtest.Token, f func(*p11.Ctx, p11.SessionHandle)) {
	t.Helper()
	m := p11.New(softhsmtest.Module)
	if m == nil {
		t.Fatal("cannot load the SoftHSM module")
	}
	defer m.Destroy()
	if err := m.Initialize(); err != nil {
		t.Fatal(err)
	}
	defer m.Finalize()
	sess, err := m.OpenSession(tok.Slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		t.Fatal(err)
	}
	defer m.CloseSession(sess)
	if err := m.Login(sess, p11.CKU_USER, tok.PIN); err != nil {
		t.Fatal(err)
	}
	f(m, sess)
}

// The device SDK does not link the PKCS#11 backend or its dependencies:
// only programs that import this package (the commands) do.
func TestSDKDoesNotLinkPKCS11(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps",
		"github.com/mqtls/mqtls/device", "github.com/mqtls/mqtls/examples/device",
		"github.com/mqtls/mqtls/keystore", "github.com/mqtls/mqtls/provisioning").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for dep := range strings.SplitSeq(string(out), "\n") {
		if strings.Contains(dep, "pkcs11") || strings.Contains(dep, "crypto11") {
			t.Errorf("the SDK links %s", dep)
		}
	}
}
