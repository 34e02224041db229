//go:build cgo

package server_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
	"github.com/mqtls/mqtls/internal/testing/ektest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/attest"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/registry/postgres"
	"github.com/mqtls/mqtls/provisioning/server"
)

// The in-process simulator is one per process: it is manufactured once
// (EK certificate by mfr in its NV) and stays up for the whole run.
var (
	simOnce sync.Once
	simSeed int64
	mfr     *ektest.Manufacturer
)

// attestedTPM returns a TPM store on the simulator, whose EK certificate
// was made by the test manufacturer mfr.
func attestedTPM(t testing.TB) *tpm.Store {
	t.Helper()
	simOnce.Do(func() {
		n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
		simSeed = n.Int64()
		tr, err := tpmsim.OpenSeed(simSeed) // kept open: the simulator (and its NV) lives until the process ends
		if err != nil {
			t.Fatal(err)
		}
		mfr = ektest.NewManufacturer(t)
		ektest.WriteEKCert(t, tr, tpm.EKCertIndexRSA, mfr.EKCert(t, ektest.EKPublic(t, tr, tpm2.RSAEKTemplate)))
	})
	tr, err := tpmsim.OpenSeed(simSeed)
	if err != nil {
		t.Fatal(err)
	}
	s, err := tpm.New(t.Context(), tr, filepath.Join(t.TempDir(), "keys"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// attestEnv is an EST server trusting mfr for EK certificates.
func attestEnv(t testing.TB, tweak func(*server.Config, *attest.Config)) *esttest.Env {
	t.Helper()
	return esttest.Start(t, func(c *server.Config) {
		roots, inter := mfr.Pools()
		ac := attest.Config{Roots: roots, Intermediates: inter, Store: c.Registry}
		if tweak != nil {
			tweak(c, &ac)
		}
		v, err := attest.New(ac)
		if err != nil {
			t.Fatal(err)
		}
		c.Attestation = v
	})
}

func TestAttestedEnrollment(t *testing.T) {
	store := attestedTPM(t)
	env := attestEnv(t, nil)
	key, err := store.Generate(t.Context(), "device", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	att, err := store.Attest(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	tok := env.Token(t, "dev-attested", "", time.Hour)
	chain, err := client(t, env).EnrollAttested(t.Context(), key, "dev-attested", tok, att)
	if err != nil {
		t.Fatal(err)
	}
	if !ca.Attested(chain[0]) {
		t.Fatalf("certificate policies %v: no attested marker", chain[0].Policies)
	}
	ekCert, err := attest.ParseEKCertificate(att.EKCertificate())
	if err != nil {
		t.Fatal(err)
	}
	want := attest.Fingerprint(ekCert)
	dev, err := env.Registry.Device(t.Context(), "dev-attested")
	if err != nil || dev.EK != want {
		t.Fatalf("device EK = %q, %v; want %s", dev.EK, err, want)
	}
	rec, err := env.Registry.Certificate(t.Context(), chain[0].SerialNumber.Text(16))
	if err != nil || rec.EK.SHA256 != want {
		t.Fatalf("certificate EK = %q, %v; want %s", rec.EK.SHA256, err, want)
	}

	// Renewal keeps the marker for the same key, not for a new one.
	cur, err := keystore.TLSCertificate([][]byte{chain[0].Raw, chain[1].Raw}, key)
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := client(t, env).Reenroll(t.Context(), cur, key)
	if err != nil || !ca.Attested(renewed[0]) {
		t.Fatalf("renewal with the same key: attested %v, %v", err == nil && ca.Attested(renewed[0]), err)
	}
	rekey, err := store.Generate(t.Context(), "rekey", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	renewed, err = client(t, env).Reenroll(t.Context(), cur, rekey)
	if err != nil || ca.Attested(renewed[0]) {
		t.Fatalf("renewal with a new key: %v; the new key was not attested, the certificate must not say so", err)
	}
	// Once the operator released the EK (the TPM moved, the board was
	// replaced), the device is no longer known to hold its TPM: the same
	// key renews without the marker.
	if err := env.Registry.ReleaseEK(t.Context(), "dev-attested", "board replaced"); err != nil {
		t.Fatal(err)
	}
	renewed, err = client(t, env).Reenroll(t.Context(), cur, key)
	if err != nil || ca.Attested(renewed[0]) {
		t.Fatalf("renewal with the same key after ek release: %v; attested %v, want false", err, err == nil && ca.Attested(renewed[0]))
	}

	// A plain enrollment gets no marker.
	plain, err := store.Generate(t.Context(), "plain", keystore.ECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	chain, err = client(t, env).Enroll(t.Context(), plain, "dev-plain", env.Token(t, "dev-plain", "", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if ca.Attested(chain[0]) {
		t.Fatal("plain enrollment carries the attested marker")
	}
}

// flow is one attested enrollment, stopped before simpleenroll so a test
// can tamper with any part of it.
type flow struct {
	env *esttest.Env
	id  string
	tok string
	key crypto.Signer
	att keystore.Attestation
	ch  provisioning.AttestChallenge
	ev  provisioning.AttestEvidence
}

// prepare runs the challenge, the activation and the certification.
func prepare(t *testing.T, env *esttest.Env, store *tpm.Store, id string) *flow {
	t.Helper()
	f := &flow{env: env, id: id, tok: env.Token(t, id, "", time.Hour)}
	var err error
	if f.key, err = store.Generate(t.Context(), id, keystore.ECDSAP256); err != nil {
		t.Fatal(err)
	}
	if f.att, err = store.Attest(t.Context()); err != nil {
		t.Fatal(err)
	}
	f.challenge(t)
	return f
}

// challenge gets a fresh challenge and answers it.
func (f *flow) challenge(t *testing.T) {
	t.Helper()
	var err error
	f.ch, err = client(t, f.env).RequestAttestChallenge(t.Context(), f.id, f.tok, provisioning.AttestRequest{EKCertificate: f.att.EKCertificate(), AKPublic: f.att.AKPublic()})
	if err != nil {
		t.Fatal(err)
	}
	f.certify(t, f.key)
}

func (f *flow) certify(t *testing.T, key crypto.Signer) {
	t.Helper()
	secret, err := f.att.Activate(t.Context(), f.ch.Credential, f.ch.Secret)
	if err != nil {
		t.Fatal(err)
	}
	pub, info, sig, err := f.att.Certify(t.Context(), key, f.ch.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	f.ev = provisioning.AttestEvidence{ChallengeID: f.ch.ID, Secret: secret, KeyPublic: pub, CertifyInfo: info, Signature: sig}
}

func (f *flow) enroll(t *testing.T, key crypto.Signer) error {
	t.Helper()
	_, err := client(t, f.env).EnrollWithEvidence(t.Context(), key, f.id, f.tok, &f.ev)
	return err
}

// wantRefused checks a refusal: its status, its reason, and an audit
// record with that reason.
func wantRefused(t *testing.T, env *esttest.Env, err error, status int, reason string) {
	t.Helper()
	var se *provisioning.ServerError
	if !errors.As(err, &se) || se.StatusCode != status || !strings.Contains(se.Reason, reason) {
		t.Fatalf("got %v; want %d with %q", err, status, reason)
	}
	if !slices.ContainsFunc(env.Events(t), func(e registry.Event) bool {
		return e.Event == "enroll_refused" && strings.Contains(e.Reason, reason)
	}) {
		t.Fatalf("no audit record with %q", reason)
	}
}

func TestAttestationRefusals(t *testing.T) {
	store := attestedTPM(t)
	now := time.Now()
	var clock atomic.Int64
	env := attestEnv(t, func(_ *server.Config, c *attest.Config) {
		c.Now = func() time.Time { return now.Add(time.Duration(clock.Load())) }
	})
	ctx := t.Context()

	t.Run("software key, attestation required", func(t *testing.T) {
		toks, err := env.Registry.CreateTokensWith(ctx, []string{"soft"}, registry.TokenOptions{TTL: time.Hour, Attest: registry.AttestRequired})
		if err != nil {
			t.Fatal(err)
		}
		_, err = client(t, env).Enroll(ctx, testpki.NewKey(t), "soft", toks[0])
		wantRefused(t, env, err, http.StatusForbidden, "requires TPM key attestation")
	})
	t.Run("software key with a TPM key's evidence", func(t *testing.T) {
		f := prepare(t, env, store, "soft-evidence")
		wantRefused(t, env, f.enroll(t, testpki.NewKey(t)), http.StatusForbidden, "not the key of the certificate request")
	})
	t.Run("duplicable key", func(t *testing.T) {
		tr, err := tpmsim.OpenSeed(simSeed)
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		ektest.DuplicableKey(t, tr, store.Dir(), "dup")
		dup, err := store.Signer(ctx, "dup")
		if err != nil {
			t.Fatal(err)
		}
		f := prepare(t, env, store, "dup-dev")
		f.certify(t, dup)
		wantRefused(t, env, f.enroll(t, dup), http.StatusForbidden, "cannot leave its TPM")
	})
	t.Run("key named with SHA-1", func(t *testing.T) {
		tr, err := tpmsim.OpenSeed(simSeed)
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		ektest.Key(t, tr, store.Dir(), "sha1", func(p *tpm2.TPMTPublic) {
			p.NameAlg = tpm2.TPMAlgSHA1
			p.ObjectAttributes.FixedTPM, p.ObjectAttributes.FixedParent = true, true
		})
		k, err := store.Signer(ctx, "sha1")
		if err != nil {
			t.Fatal(err)
		}
		f := prepare(t, env, store, "sha1-dev")
		f.certify(t, k)
		wantRefused(t, env, f.enroll(t, k), http.StatusForbidden, "name algorithm")
	})
	t.Run("AK from another TPM", func(t *testing.T) {
		f := prepare(t, env, store, "foreign-ak")
		ch, err := client(t, env).RequestAttestChallenge(ctx, f.id, f.tok, provisioning.AttestRequest{EKCertificate: f.att.EKCertificate(), AKPublic: ektest.ForeignAK(t)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.att.Activate(ctx, ch.Credential, ch.Secret); err == nil {
			t.Fatal("the TPM activated a credential bound to another TPM's AK")
		}
		f.ev.ChallengeID, f.ev.Secret = ch.ID, make([]byte, 32)
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "wrong activation secret")
	})
	t.Run("EK certificate of another TPM", func(t *testing.T) {
		f := prepare(t, env, store, "foreign-ek")
		other, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		ch, err := client(t, env).RequestAttestChallenge(ctx, f.id, f.tok, provisioning.AttestRequest{EKCertificate: mfr.EKCert(t, &other.PublicKey), AKPublic: f.att.AKPublic()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.att.Activate(ctx, ch.Credential, ch.Secret); err == nil {
			t.Fatal("the TPM activated a credential made for another EK")
		}
		f.ev.ChallengeID, f.ev.Secret = ch.ID, make([]byte, 32)
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "wrong activation secret")
	})
	t.Run("EK certificate from an untrusted CA", func(t *testing.T) {
		f := prepare(t, env, store, "untrusted-ek")
		rogue := ektest.NewManufacturer(t)
		_, err := client(t, env).RequestAttestChallenge(ctx, f.id, f.tok, provisioning.AttestRequest{EKCertificate: rogue.EKCert(t, ektest.EKPublicOf(t, f.att.EKCertificate())), AKPublic: f.att.AKPublic()})
		wantRefused(t, env, err, http.StatusForbidden, "does not chain to a configured TPM manufacturer CA")
	})
	t.Run("manufacturer certificate that is not an EK certificate", func(t *testing.T) {
		f := prepare(t, env, store, "not-ek")
		tls := mfr.EKCert(t, ektest.EKPublicOf(t, f.att.EKCertificate()), func(c *x509.Certificate) {
			c.UnknownExtKeyUsage, c.ExtKeyUsage = nil, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		})
		_, err := client(t, env).RequestAttestChallenge(ctx, f.id, f.tok, provisioning.AttestRequest{EKCertificate: tls, AKPublic: f.att.AKPublic()})
		wantRefused(t, env, err, http.StatusForbidden, "not an EK certificate")
	})
	t.Run("wrong activation secret", func(t *testing.T) {
		f := prepare(t, env, store, "wrong-secret")
		f.ev.Secret[0] ^= 1
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "wrong activation secret")
	})
	t.Run("replayed evidence", func(t *testing.T) {
		f := prepare(t, env, store, "replayed")
		if err := f.enroll(t, f.key); err != nil {
			t.Fatal(err)
		}
		g := prepare(t, env, store, "replayer")
		g.ev = f.ev
		wantRefused(t, env, g.enroll(t, f.key), http.StatusForbidden, "unknown or already used attestation challenge")
	})
	t.Run("challenge reuse after a refusal", func(t *testing.T) {
		f := prepare(t, env, store, "reuse")
		good := f.ev
		f.ev.Secret = make([]byte, 32)
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "wrong activation secret")
		f.ev = good
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "unknown or already used attestation challenge")
	})
	t.Run("challenge of another device", func(t *testing.T) {
		f := prepare(t, env, store, "owner")
		g := prepare(t, env, store, "thief")
		g.ev = f.ev
		wantRefused(t, env, g.enroll(t, f.key), http.StatusForbidden, "issued for another device or token")
	})
	t.Run("expired challenge", func(t *testing.T) {
		f := prepare(t, env, store, "late")
		clock.Add(int64(3 * time.Minute))
		defer clock.Store(0)
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "attestation challenge expired")
	})
	t.Run("certify info for another key", func(t *testing.T) {
		f := prepare(t, env, store, "swap")
		other, err := store.Generate(ctx, "swap-other", keystore.ECDSAP256)
		if err != nil {
			t.Fatal(err)
		}
		pub, info, sig, err := f.att.Certify(ctx, other, f.ch.Nonce)
		if err != nil {
			t.Fatal(err)
		}
		_ = pub
		// the key's public area is the request's; the certify info names another key
		f.ev.CertifyInfo, f.ev.Signature = info, sig
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "the certified key is not the key whose public area was sent")
	})
	t.Run("certify info without the nonce", func(t *testing.T) {
		f := prepare(t, env, store, "stale")
		_, info, sig, err := f.att.Certify(ctx, f.key, []byte("another nonce"))
		if err != nil {
			t.Fatal(err)
		}
		f.ev.CertifyInfo, f.ev.Signature = info, sig
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "does not carry the challenge's nonce")
	})
	t.Run("tampered signature", func(t *testing.T) {
		f := prepare(t, env, store, "tampered")
		f.ev.Signature[len(f.ev.Signature)-1] ^= 1
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "signature over the certify info does not verify")
	})
	t.Run("tampered certify info", func(t *testing.T) {
		f := prepare(t, env, store, "tampered-info")
		f.ev.CertifyInfo[len(f.ev.CertifyInfo)-1] ^= 1
		wantRefused(t, env, f.enroll(t, f.key), http.StatusForbidden, "signature over the certify info does not verify")
	})
	// A device with a genuine TPM (AK activated) vouching for a software key.
	cheat := func(t *testing.T, id string, how ektest.Cheat) (*flow, crypto.Signer, error) {
		f := prepare(t, env, store, id)
		tr, err := tpmsim.OpenSeed(simSeed)
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		soft := testpki.NewKey(t)
		f.ev.Secret, f.ev.KeyPublic, f.ev.CertifyInfo, f.ev.Signature, err = ektest.CheatingEvidence(t, tr, tpm2.RSAEKTemplate, soft.Public().(*ecdsa.PublicKey), how,
			func(ak []byte) ([]byte, []byte, []byte) {
				ch, err := client(t, env).RequestAttestChallenge(ctx, f.id, f.tok, provisioning.AttestRequest{EKCertificate: f.att.EKCertificate(), AKPublic: ak})
				if err != nil {
					t.Fatal(err)
				}
				f.ev.ChallengeID = ch.ID
				return ch.Credential, ch.Secret, ch.Nonce
			})
		return f, soft, err
	}
	t.Run("software key loaded into the TPM with TPM2_LoadExternal", func(t *testing.T) {
		f, soft, err := cheat(t, "external-key", ektest.LoadExternal)
		// The server trusts fixedTPM in a certified public area because a
		// TPM authorizes no use (TPM2_Certify included) of an object loaded
		// without its private part: if that changes, the enrollment below
		// shows what a software key would get.
		if errors.Is(err, tpm2.TPMRCAuthUnavailable) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		wantRefused(t, env, f.enroll(t, soft), http.StatusForbidden, "TPM")
	})
	t.Run("certify info written by the device and signed by the AK", func(t *testing.T) {
		f, soft, err := cheat(t, "forged-info", ektest.SignForgery)
		if err != nil {
			t.Fatal(err)
		}
		wantRefused(t, env, f.enroll(t, soft), http.StatusForbidden, "not made by a TPM")
	})
	t.Run("a quote by the AK instead of a certify", func(t *testing.T) {
		f, soft, err := cheat(t, "quoted", ektest.Quote)
		if err != nil {
			t.Fatal(err)
		}
		wantRefused(t, env, f.enroll(t, soft), http.StatusForbidden, "not a TPM2_Certify")
	})
	t.Run("EK bound to another device", func(t *testing.T) {
		f := prepare(t, env, store, "first-of-tpm")
		if err := f.enroll(t, f.key); err != nil && !strings.Contains(err.Error(), "bound") {
			t.Fatal(err)
		}
		g := prepare(t, env, store, "second-of-tpm")
		wantRefused(t, env, g.enroll(t, g.key), http.StatusForbidden, "is bound to device")
	})
}

// The server default applies to tokens minted without a policy; a token's
// own policy wins. One EK ↔ one device until an operator releases it.
func TestAttestationPolicy(t *testing.T) {
	store := attestedTPM(t)
	ctx := t.Context()
	if _, err := server.New(server.Config{CA: attestEnv(t, nil).CA, Registry: attestEnv(t, nil).Registry, Attest: registry.AttestRequired}); err == nil {
		t.Fatal("attestation required by default without a TPM CA was accepted")
	}
	env := attestEnv(t, func(c *server.Config, _ *attest.Config) { c.Attest = registry.AttestRequired })
	_, err := client(t, env).Enroll(ctx, testpki.NewKey(t), "by-default", env.Token(t, "by-default", "", time.Hour))
	wantRefused(t, env, err, http.StatusForbidden, "requires TPM key attestation")
	toks, err := env.Registry.CreateTokensWith(ctx, []string{"opted-out"}, registry.TokenOptions{TTL: time.Hour, Attest: registry.AttestOptional})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client(t, env).Enroll(ctx, testpki.NewKey(t), "opted-out", toks[0]); err != nil {
		t.Fatalf("token with attestation optional: %v", err)
	}

	// The TPM enrolls "board-1"; "board-2" from the same TPM is refused
	// until the operator releases board-1's EK.
	f := prepare(t, env, store, "board-1")
	if err := f.enroll(t, f.key); err != nil {
		t.Fatal(err)
	}
	g := prepare(t, env, store, "board-2")
	wantRefused(t, env, g.enroll(t, g.key), http.StatusForbidden, `is bound to device "board-1"`)
	if err := env.Registry.ReleaseEK(ctx, "board-1", "TPM moved to board-2 (ticket 42)"); err != nil {
		t.Fatal(err)
	}
	g.challenge(t)
	chain, err := client(t, env).EnrollWithEvidence(ctx, g.key, g.id, g.tok, &g.ev)
	if err != nil || !ca.Attested(chain[0]) {
		t.Fatalf("after release: %v", err)
	}
}

// BenchmarkAttestedEnrollment measures one device's first enrollment end to
// end, plain and attested, on the in-process simulator and on swtpm: key
// generation in the TPM, the CSR signature, EST over HTTPS (keep-alive),
// issuance and the registry transaction; attested adds reading the EK
// certificate, deriving the EK, creating the AK, the challenge,
// ActivateCredential and TPM2_Certify. Token minting and the EK release
// that lets the next iteration enroll another device ID from the same TPM
// are outside the timer.
func BenchmarkAttestedEnrollment(b *testing.B) {
	b.Run("tpmsim", func(b *testing.B) {
		store := attestedTPM(b)
		roots, inter := mfr.Pools()
		benchAttested(b, store, attest.Config{Roots: roots, Intermediates: inter})
	})
	b.Run("swtpm", func(b *testing.B) {
		sw := swtpmtest.StartManufactured(b)
		store, err := tpm.OpenSWTPM(b.Context(), sw.Addr, filepath.Join(b.TempDir(), "keys"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { store.Close() })
		roots, _, err := attest.LoadRoots(sw.CADir)
		if err != nil {
			b.Fatal(err)
		}
		benchAttested(b, store, attest.Config{Roots: roots})
	})
}

func benchAttested(b *testing.B, store *tpm.Store, ac attest.Config) {
	env := esttest.Start(b, func(c *server.Config) {
		ac.Store = c.Registry
		v, err := attest.New(ac)
		if err != nil {
			b.Fatal(err)
		}
		c.Attestation = v
	})
	cl, err := provisioning.NewClient(env.URL, env.CA.Root)
	if err != nil {
		b.Fatal(err)
	}
	ctx := b.Context()
	var n atomic.Int64 // device IDs unique across the runs of -count
	for _, attested := range []bool{false, true} {
		name := map[bool]string{false: "plain", true: "attested"}[attested]
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				id := fmt.Sprintf("%s-%d", name, n.Add(1))
				tok := env.Token(b, id, "", time.Hour)
				b.StartTimer()
				key, err := store.Generate(ctx, id, keystore.ECDSAP256)
				if err != nil {
					b.Fatal(err)
				}
				if !attested {
					if _, err := cl.Enroll(ctx, key, id, tok); err != nil {
						b.Fatal(err)
					}
					continue
				}
				att, err := store.Attest(ctx)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := cl.EnrollAttested(ctx, key, id, tok, att); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := env.Registry.ReleaseEK(ctx, id, "benchmark"); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// Challenges live in the registry: with two EST servers on one PostgreSQL
// registry (a cluster behind a load balancer) the challenge asked from one
// is answered on the other, and only once across both.
func TestAttestationOnAnyNode(t *testing.T) {
	store := attestedTPM(t)
	pg := pgtest.Start(t)
	db := pg.NewDatabase(t)
	node := func(c *ca.CA, create bool) *esttest.Env {
		return attestEnv(t, func(sc *server.Config, ac *attest.Config) {
			var reg registry.Registry
			var err error
			if create {
				reg, err = postgres.Create(t.Context(), pg.URL(db), ca.Fingerprint(sc.CA.Root))
			} else {
				sc.CA = c
				reg, err = postgres.Open(t.Context(), pg.URL(db))
			}
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { reg.Close() })
			sc.Registry, ac.Store = reg, reg
		})
	}
	a := node(nil, true)
	b := node(a.CA, false)

	f := prepare(t, a, store, "any-node") // challenge from node a
	chain, err := client(t, b).EnrollWithEvidence(t.Context(), f.key, f.id, f.tok, &f.ev)
	if err != nil {
		t.Fatalf("evidence for node a's challenge answered on node b: %v", err)
	}
	if !ca.Attested(chain[0]) {
		t.Fatal("no attested marker")
	}
	g := prepare(t, a, store, "any-node-2")
	g.env = b
	ev := g.ev
	if err := g.enroll(t, g.key); err != nil && !strings.Contains(err.Error(), "bound") {
		t.Fatal(err)
	}
	g.env, g.ev = a, ev
	wantRefused(t, a, g.enroll(t, g.key), http.StatusForbidden, "unknown or already used attestation challenge")
}
