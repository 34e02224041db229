package tpm_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// runTool runs an external program against swtpm and returns its stdout.
func runTool(t *testing.T, sw *swtpmtest.SWTPM, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(testtool.Require(t, name), args...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI="+sw.TCTI(), "TPM2OPENSSL_TCTI="+sw.TCTI())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.Bytes()
}

// A key our backend created on swtpm is loaded by openssl's tpm2 provider
// and by tpm2-tools, and what they sign verifies in Go with the public key
// we reported.
func TestInteropOpenSSLAndTPM2Tools(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := keyDir(t)
	s := newSWTPM(t, sw, dir)
	signer, err := s.Generate(t.Context(), "device", "")
	if err != nil {
		t.Fatal(err)
	}
	pub := signer.Public().(*ecdsa.PublicKey)
	keyFile := s.Path("device")
	s.Close() // swtpm serves one client at a time

	work := t.TempDir()
	msg := []byte("signed by another program")
	digest := sha256.Sum256(msg)
	digestFile := filepath.Join(work, "digest")
	if err := os.WriteFile(digestFile, digest[:], 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("openssl", func(t *testing.T) {
		testtool.Require(t, "openssl")
		sig := filepath.Join(work, "openssl.sig")
		runTool(t, sw, "openssl", "pkeyutl", "-provider", "tpm2", "-provider", "default",
			"-sign", "-inkey", keyFile, "-in", digestFile, "-out", sig)
		der, err := os.ReadFile(sig)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub, digest[:], der) {
			t.Fatal("signature made by openssl -provider tpm2 does not verify")
		}
	})

	t.Run("tpm2-tools", func(t *testing.T) {
		// With only -r, tpm2_load reads parent and public part from the
		// TSS2 PEM file and rebuilds the SRK itself.
		keyCtx, sig := filepath.Join(work, "key.ctx"), filepath.Join(work, "tools.sig")
		runTool(t, sw, "tpm2_load", "-r", keyFile, "-c", keyCtx)
		runTool(t, sw, "tpm2_flushcontext", "-t")
		runTool(t, sw, "tpm2_sign", "-c", keyCtx, "-g", "sha256", "-s", "ecdsa", "-d", "-f", "plain", "-o", sig, digestFile)
		runTool(t, sw, "tpm2_flushcontext", "-t")
		der, err := os.ReadFile(sig)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub, digest[:], der) {
			t.Fatal("signature made by tpm2_sign does not verify")
		}
	})
}

// The other way round: a key openssl's tpm2 provider generated on swtpm
// signs through our Store.
func TestInteropOpenSSLKeyInStore(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := keyDir(t)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	runTool(t, sw, "openssl", "genpkey", "-provider", "tpm2", "-provider", "default",
		"-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", filepath.Join(dir, "ossl.tpmkey"))
	s := newSWTPM(t, sw, dir)
	signer, err := s.Signer(t.Context(), "ossl")
	if err != nil {
		t.Fatal(err)
	}
	keystoretest.CheckSigns(t, signer)
}
