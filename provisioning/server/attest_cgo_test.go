//go:build cgo

package server_test

import (
	"crypto/rand"
	"math/big"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
	"github.com/mqtls/mqtls/internal/testing/ektest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/attest"
	"github.com/mqtls/mqtls/provisioning/ca"
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
func attestedTPM(t *testing.T) *tpm.Store {
	t.Helper()
	simOnce.Do(func() {
		n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
		simSeed = n.Int64()
		tr, err := tpmsim.OpenSeed(simSeed) // kept open: the simulator (and its NV) lives until the process ends
		if err != nil {
			t.Fatal(err)
		}
		mfr = ektest.NewManufacturer(t)
		ektest.WriteEKCert(t, tr, mfr.EKCert(t, ektest.EKPublic(t, tr)))
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
func attestEnv(t *testing.T, tweak func(*server.Config, *attest.Config)) *esttest.Env {
	t.Helper()
	return esttest.Start(t, func(c *server.Config) {
		roots, inter := mfr.Pools()
		ac := attest.Config{Roots: roots, Intermediates: inter}
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
