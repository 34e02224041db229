//go:build cgo

package pkcs11_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/keystore/keystoretest"
)

// Key pairs made by OpenSC's pkcs11-tool on the token are used through the
// store: they are listed, sign, and authenticate a mutual-TLS handshake.
// The store is open while pkcs11-tool makes them.
func TestInteropPKCS11ToolKeys(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "interop-in")
	s := open(t, tok.URI())
	keys := []struct {
		label, id, keyType string
		alg                keystore.KeyAlg
	}{
		{"ext-p256", "0a", "EC:prime256v1", keystore.ECDSAP256},
		{"ext-p384", "0b", "EC:secp384r1", keystore.ECDSAP384},
		{"ext-rsa2048", "0c", "RSA:2048", keystore.RSA2048},
	}
	for _, k := range keys {
		pkcs11Tool(t, tok, "--keypairgen", "--key-type", k.keyType, "--label", k.label, "--id", k.id, "--usage-sign")
	}
	names, err := s.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"ext-p256", "ext-p384", "ext-rsa2048"}; !slices.Equal(names, want) {
		t.Fatalf("List = %v, want %v", names, want)
	}
	for _, k := range keys {
		t.Run(k.label, func(t *testing.T) {
			signer, err := s.Signer(t.Context(), k.label)
			if err != nil {
				t.Fatal(err)
			}
			if alg, err := keystore.AlgOf(signer.Public()); err != nil || alg != k.alg {
				t.Fatalf("AlgOf = %v, %v; want %s", alg, err, k.alg)
			}
			keystoretest.CheckSigns(t, signer)
			keystoretest.Handshake(t, signer, tls.VersionTLS13)
			if k.alg == keystore.ECDSAP384 {
				return // TLS 1.2 pairs P-384 keys with any hash; 1.3 covers it
			}
			keystoretest.Handshake(t, signer, tls.VersionTLS12)
		})
	}
	if err := s.Delete(t.Context(), "ext-p256"); err != nil {
		t.Fatal(err)
	}
	out := pkcs11Tool(t, tok, "--list-objects")
	if strings.Contains(string(out), "ext-p256") {
		t.Fatalf("pkcs11-tool still lists the deleted key:\n%s", out)
	}
}

// A key made by the store signs through pkcs11-tool, and openssl verifies
// the signature against the device certificate issued for that key (whose
// chain openssl verifies to the root as well).
func TestInteropPKCS11ToolSigns(t *testing.T) {
	testtool.Require(t, "openssl")
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "interop-out")
	s := open(t, tok.URI())
	ca := testpki.New(t)
	work := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(work, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root := write("root.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Root.Raw}))
	issuing := write("issuing.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Issuing.Raw}))
	msg := []byte("signed on the token by pkcs11-tool")
	msgFile := write("msg", msg)
	d256, d384 := sha256.Sum256(msg), sha512.Sum384(msg)
	// SoftHSM signs ECDSA only over a digest made outside (CKM_ECDSA):
	// pkcs11-tool is given the digest, openssl dgst hashes the message.
	digest256 := write("msg.sha256", d256[:])
	digest384 := write("msg.sha384", d384[:])

	for _, tc := range []struct {
		alg         keystore.KeyAlg
		mechanism   string
		input, dgst string
		digest      []byte
		sigopts     []string
	}{
		{keystore.ECDSAP256, "ECDSA", digest256, "-sha256", d256[:], nil},
		{keystore.ECDSAP384, "ECDSA", digest384, "-sha384", d384[:], nil},
		{keystore.RSA2048, "SHA256-RSA-PKCS", msgFile, "-sha256", d256[:], nil},
		{keystore.RSA3072, "SHA256-RSA-PKCS-PSS", msgFile, "-sha256", d256[:], []string{"-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:auto"}},
	} {
		name := "dev-" + string(tc.alg) + "-" + strings.ToLower(tc.mechanism)
		t.Run(name, func(t *testing.T) {
			signer, err := s.Generate(t.Context(), name, tc.alg)
			if err != nil {
				t.Fatal(err)
			}
			chain := ca.Client(t, "dev-1", signer.Public())
			cert := write(name+".pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: chain[0]}))
			if out := run(t, "openssl", "verify", "-CAfile", root, "-untrusted", issuing, cert); !strings.Contains(string(out), "OK") {
				t.Fatalf("openssl verify: %s", out)
			}
			pub := write(name+".pub", run(t, "openssl", "x509", "-in", cert, "-pubkey", "-noout"))

			sig := filepath.Join(work, name+".sig")
			// With --label, pkcs11-tool 0.23 --sign was seen signing with
			// another private key of the token (an EC key for an RSA
			// mechanism: CKR_GENERAL_ERROR): name the key by its CKA_ID.
			pkcs11Tool(t, tok, "--sign", "--mechanism", tc.mechanism, "--id", idOf(t, tok, name),
				"--input-file", tc.input, "--output-file", sig, "--signature-format", "openssl")
			args := append([]string{"dgst", tc.dgst, "-verify", pub, "-signature", sig}, tc.sigopts...)
			if out := run(t, "openssl", append(args, msgFile)...); !strings.Contains(string(out), "Verified OK") {
				t.Fatalf("openssl dgst -verify: %s", out)
			}
			der, err := os.ReadFile(sig)
			if err != nil {
				t.Fatal(err)
			}
			switch pk := signer.Public().(type) {
			case *ecdsa.PublicKey:
				if !ecdsa.VerifyASN1(pk, tc.digest, der) {
					t.Fatal("pkcs11-tool's ECDSA signature does not verify in Go")
				}
			case *rsa.PublicKey:
				var err error
				if tc.sigopts != nil {
					err = rsa.VerifyPSS(pk, crypto.SHA256, tc.digest, der, nil)
				} else {
					err = rsa.VerifyPKCS1v15(pk, crypto.SHA256, tc.digest, der)
				}
				if err != nil {
					t.Fatalf("pkcs11-tool's RSA signature does not verify in Go: %v", err)
				}
			}
		})
	}
}

// idOf returns the CKA_ID (hex) of the private key labelled label, as
// pkcs11-tool lists it.
func idOf(t *testing.T, tok *softhsmtest.Token, label string) string {
	t.Helper()
	out := pkcs11Tool(t, tok, "--list-objects", "--type", "privkey")
	for _, o := range strings.Split(string(out), "Private Key Object")[1:] {
		if regexpLine(o, "label:") == label {
			if id := regexpLine(o, "ID:"); id != "" {
				return id
			}
		}
	}
	t.Fatalf("pkcs11-tool lists no private key labelled %s:\n%s", label, out)
	return ""
}

// run runs an external program and returns its stdout.
func run(t *testing.T, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(testtool.Require(t, name), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.Bytes()
}
