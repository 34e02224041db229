package tpm_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// simSeed is this test process's simulator seed: fresh per run.
var simSeed = func() int64 {
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	return n.Int64()
}()

// newSim opens a Store on the in-process simulator with blobs in dir.
func newSim(t testing.TB, dir string) *tpm.Store {
	t.Helper()
	tr, err := tpmsim.OpenSeed(simSeed)
	if err != nil {
		t.Fatal(err)
	}
	s, err := tpm.New(t.Context(), tr, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func newSWTPM(t testing.TB, sw *swtpmtest.SWTPM, dir string) *tpm.Store {
	t.Helper()
	s, err := tpm.OpenSWTPM(t.Context(), sw.Addr, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func keyDir(t testing.TB) string { return filepath.Join(t.TempDir(), "keys") }

func TestSimulatorConformance(t *testing.T) {
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return newSim(t, keyDir(t)) }, keystoretest.Config{
		Unsupported: []keystore.KeyAlg{keystore.RSA3072},
		Reopen: func(t *testing.T, s keystore.Store) keystore.Store {
			ts := s.(*tpm.Store)
			ts.Close()
			return newSim(t, ts.Dir())
		},
	})
}

func TestSWTPMConformance(t *testing.T) {
	sw := swtpmtest.Start(t)
	keystoretest.Run(t, func(t *testing.T) keystore.Store { return newSWTPM(t, sw, keyDir(t)) }, keystoretest.Config{
		Reopen: func(t *testing.T, s keystore.Store) keystore.Store {
			ts := s.(*tpm.Store)
			ts.Close()
			return newSWTPM(t, sw, ts.Dir())
		},
	})
}

// Keys are wrapped by the SRK, which the TPM rederives from its persistent
// owner seed: a blob made before a swtpm restart loads after it.
func TestSWTPMRestart(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := keyDir(t)
	s := newSWTPM(t, sw, dir)
	signer, err := s.Generate(t.Context(), "device", "")
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	sw.Restart(t)
	again, err := newSWTPM(t, sw, dir).Signer(t.Context(), "device")
	if err != nil {
		t.Fatal(err)
	}
	if !again.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(signer.Public()) {
		t.Fatal("public key changed across restart")
	}
	keystoretest.CheckSigns(t, again)
}

// Without a resource manager only a few transient objects fit in the TPM:
// every Sign must flush what it loads.
func TestSimulatorNoObjectLeak(t *testing.T) {
	s := newSim(t, keyDir(t))
	var signers []crypto.Signer
	for i := range 4 {
		k, err := s.Generate(t.Context(), "k"+string(rune('a'+i)), "")
		if err != nil {
			t.Fatal(err)
		}
		signers = append(signers, k)
	}
	d := sha256.Sum256([]byte("x"))
	for i := range 3000 {
		if _, err := signers[i%len(signers)].Sign(nil, d[:], crypto.SHA256); err != nil {
			t.Fatalf("signature %d: %v", i, err)
		}
	}
}

func TestHashPinning(t *testing.T) {
	s := newSim(t, keyDir(t))
	p256, err := s.Generate(t.Context(), "p256", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	d384 := sha512.Sum384([]byte("x"))
	if _, err := p256.Sign(nil, d384[:], crypto.SHA384); !errors.Is(err, keystore.ErrUnsupported) {
		t.Errorf("P-256 key signing SHA-384 = %v, want ErrUnsupported", err)
	}
	d := sha256.Sum256([]byte("x"))
	if _, err := p256.Sign(nil, d[:20], crypto.SHA256); err == nil || !strings.Contains(err.Error(), "digest is 20 bytes") {
		t.Errorf("short digest = %v, want a digest length error", err)
	}
	if _, err := p256.Sign(nil, d[:20], crypto.SHA1); !errors.Is(err, keystore.ErrUnsupported) {
		t.Errorf("SHA-1 = %v, want ErrUnsupported", err)
	}
}

func TestNoDevice(t *testing.T) {
	for _, path := range []string{"/dev/tpmrm-does-not-exist", "/etc/hostname"} {
		_, err := tpm.Open(t.Context(), path, keyDir(t))
		if !errors.Is(err, tpm.ErrNoDevice) || !strings.Contains(err.Error(), path) {
			t.Errorf("Open(%s) = %v, want ErrNoDevice naming the path", path, err)
		}
	}
	_, err := tpm.OpenSWTPM(t.Context(), "127.0.0.1:1", keyDir(t))
	if !errors.Is(err, tpm.ErrNoDevice) {
		t.Errorf("OpenSWTPM(closed port) = %v, want ErrNoDevice", err)
	}
}

func TestCorruptKeyFile(t *testing.T) {
	s := newSim(t, keyDir(t))
	good, err := s.Generate(t.Context(), "good", "")
	if err != nil {
		t.Fatal(err)
	}
	_ = good
	blob, err := os.ReadFile(s.Path("good"))
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"empty":     nil,
		"garbage":   []byte("hello\n"),
		"softkey":   []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
		"badasn1":   []byte("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n"),
		"truncated": blob[:len(blob)/2],
	}
	for name, data := range cases {
		if err := os.WriteFile(s.Path(name), data, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := s.Signer(t.Context(), name)
		if !errors.Is(err, keystore.ErrCorrupt) || !strings.Contains(err.Error(), s.Path(name)) {
			t.Errorf("%s: Signer = %v, want ErrCorrupt naming the file", name, err)
		}
	}
}

// A blob from another TPM (here: another simulator seed, i.e. another SRK)
// parses but does not load: the TPM's integrity check error is surfaced.
func TestForeignBlob(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := keyDir(t)
	foreign := newSWTPM(t, sw, dir)
	if _, err := foreign.Generate(t.Context(), "k", ""); err != nil {
		t.Fatal(err)
	}
	foreign.Close()
	s := newSim(t, dir)
	signer, err := s.Signer(t.Context(), "k")
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(nil)
	_, err = signer.Sign(nil, d[:], crypto.SHA256)
	if err == nil || !strings.Contains(err.Error(), "tpm: load key") {
		t.Fatalf("Sign with a foreign blob = %v, want a load error", err)
	}
	t.Logf("foreign blob: %v", err)
}

// A persistent SRK is created once and reused; keys work with it and with a
// transient SRK alike; a handle holding another object is refused.
func TestPersistentSRK(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := keyDir(t)
	open := func(opts ...tpm.Option) (*tpm.Store, error) {
		return tpm.OpenSWTPM(t.Context(), sw.Addr, dir, opts...)
	}
	s, err := open(tpm.WithPersistentSRK(tpm.DefaultSRKHandle))
	if err != nil {
		t.Fatal(err)
	}
	k, err := s.Generate(t.Context(), "device", "")
	if err != nil {
		t.Fatal(err)
	}
	keystoretest.CheckSigns(t, k)
	s.Close()
	sw.Restart(t) // persistent objects survive a TPM restart
	for _, opts := range [][]tpm.Option{{tpm.WithPersistentSRK(tpm.DefaultSRKHandle)}, nil} {
		s, err := open(opts...)
		if err != nil {
			t.Fatal(err)
		}
		signer, err := s.Signer(t.Context(), "device")
		if err != nil {
			t.Fatal(err)
		}
		keystoretest.CheckSigns(t, signer)
		s.Close()
	}
	for range 2 { // persisted at a second handle, then reused
		s, err := open(tpm.WithPersistentSRK(0x81000002))
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
}

// A TPM without an EK certificate cannot attest: the error names the NV
// indices looked at and how swtpm gets one.
func TestAttestWithoutEKCert(t *testing.T) {
	s := newSim(t, keyDir(t))
	_, err := s.Attest(t.Context())
	if !errors.Is(err, tpm.ErrNoEKCert) || !strings.Contains(err.Error(), "0x01c00002") || !strings.Contains(err.Error(), "swtpm_setup") {
		t.Fatalf("Attest = %v, want ErrNoEKCert naming the NV indices and the fix", err)
	}
}
