//go:build cgo

package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/pkcs11/softhsmtest"
	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// caURI is the keystore URI of the issuing key on tok.
func caURI(tok *softhsmtest.Token, object string) string {
	u := tok.URI()
	u.Object = object
	return keystore.URI{Kind: keystore.KindPKCS11, PKCS11: u}.String()
}

// startServe runs broker serve until the test ends; it returns the EST and
// MQTT addresses once EST listens, and the channel of its exit code.
func startServe(t *testing.T, data string) (estAddr, mqttAddr string, logs *syncBuffer, done <-chan int, stop func()) {
	t.Helper()
	estAddr, mqttAddr = testtool.FreeAddr(t), testtool.FreeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	logs = &syncBuffer{}
	served := make(chan int, 1)
	go func() {
		served <- run(ctx, []string{"serve", "--data", data, "--est-addr", estAddr, "--mqtt-addr", mqttAddr, "--metrics-addr", ""}, io.Discard, logs)
	}()
	stop = func() {
		cancel()
		select {
		case code := <-served:
			if code != 0 {
				t.Errorf("serve exit %d\n%s", code, logs.String())
			}
		case <-time.After(15 * time.Second):
			t.Error("serve did not stop")
		}
	}
	testtool.Eventually(t, 10*time.Second, "serve listening", func() bool {
		select {
		case code := <-served:
			t.Fatalf("serve exited %d:\n%s", code, logs.String())
		default:
		}
		return strings.Contains(logs.String(), "EST listening")
	})
	return estAddr, mqttAddr, logs, served, stop
}

// assertNoSecret fails if any file under dir, or any of texts, holds one of
// the PINs.
func assertNoSecret(t *testing.T, dir string, pins []string, texts ...string) {
	t.Helper()
	for _, pin := range pins {
		for _, s := range texts {
			if strings.Contains(s, pin) {
				t.Errorf("output holds a PIN:\n%s", s)
			}
		}
		filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			b, err := os.ReadFile(path)
			if err == nil && strings.Contains(string(b), pin) {
				t.Errorf("%s holds a PIN", path)
			}
			return nil
		})
	}
}

// broker init --issuing-key-uri pkcs11:... refuses what it cannot use,
// without writing a CA or keeping a key it made.
func TestInitIssuingKeyRefused(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "ca")
	good := caURI(tok, "issuing-ca")
	wrongPIN := filepath.Join(t.TempDir(), "wrong.pin")
	if err := os.WriteFile(wrongPIN, []byte("00000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := tok.URI()
	wrong.PINSource = "file:" + wrongPIN
	missing := tok.URI()
	missing.Token = "no-such-token"
	uri := func(p keystore.PKCS11) string { return keystore.URI{Kind: keystore.KindPKCS11, PKCS11: p}.String() }

	for _, tc := range []struct {
		name string
		args []string
		code int
		says []string
	}{
		{"file", []string{"--issuing-key-uri", "file"}, 2, []string{"hardware store", "leave the flag out"}},
		{"mem", []string{"--issuing-key-uri", "mem"}, 2, []string{"hardware store"}},
		{"PIN in the URI", []string{"--issuing-key-uri", "pkcs11:token=ca?module-path=" + softhsmtest.Module + "&pin-value=" + tok.PIN}, 2, []string{"pin-value is refused"}},
		{"with a key file", []string{"--issuing-key-uri", good, "--issuing-key", "x.key"}, 2, []string{"not both"}},
		{"token missing", []string{"--issuing-key-uri", uri(missing)}, 1, []string{"token not found", "no-such-token", "connect the token", "correct --issuing-key-uri"}},
		{"wrong PIN", []string{"--issuing-key-uri", uri(wrong)}, 1, []string{"wrong PIN", "file:" + wrongPIN, "put the token's user PIN in the pin-source"}},
		{"module missing", []string{"--issuing-key-uri", strings.Replace(good, "libsofthsm2.so", "nope.so", 1)}, 1, []string{"cannot load the PKCS#11 module", "install the token's PKCS#11 module"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := filepath.Join(t.TempDir(), "data")
			out, errs, code := brokerCLI(t, append([]string{"init", "--data", data}, tc.args...)...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\n%s%s", code, tc.code, out, errs)
			}
			t.Logf("init: %s", errs)
			for _, s := range tc.says {
				if !strings.Contains(errs, s) {
					t.Errorf("stderr lacks %q:\n%s", s, errs)
				}
			}
			assertNoSecret(t, filepath.Dir(data), []string{tok.PIN}, out, errs)
			if _, err := os.Stat(filepath.Join(data, "ca")); !errors.Is(err, os.ErrNotExist) {
				t.Error("a refused init left ca/ behind")
			}
		})
	}

	// An init that fails after making the key deletes it again: an
	// adopted root without its key cannot sign the issuing CA.
	data := filepath.Join(t.TempDir(), "data")
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatal(errs)
	}
	_, errs, code := brokerCLI(t, "init", "--data", filepath.Join(t.TempDir(), "d2"), "--root-cert", filepath.Join(data, ca.RootCertFile), "--issuing-key-uri", good)
	if code != 1 || !strings.Contains(errs, "root key") {
		t.Fatalf("init under a root without its key: %d %s", code, errs)
	}
	store, err := keystores.Open(t.Context(), keystore.URI{Kind: keystore.KindPKCS11, PKCS11: tok.URI()}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if names, err := store.List(t.Context()); err != nil || len(names) != 0 {
		t.Fatalf("keys left on the token after a failed init: %v %v", names, err)
	}
}

// The issuing CA key in SoftHSM2: init makes it on the token, nothing of
// it reaches the disk, devices enroll over EST (chain verified by openssl
// against the root), revocation closes a live session, and serve without
// the token or with a wrong PIN exits 1 naming the URI and the cause.
func TestIssuingKeyPKCS11(t *testing.T) {
	openssl := testtool.Require(t, "openssl")
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "mqtls-ca")
	uri := caURI(tok, "issuing-ca")
	data := filepath.Join(t.TempDir(), "data")

	out, errs, code := brokerCLI(t, "init", "--data", data, "--issuing-key-uri", uri)
	if code != 0 {
		t.Fatalf("init: %d %s", code, errs)
	}
	if !strings.Contains(out, "issuing key: "+uri+" (made in the store; no key file)") {
		t.Errorf("init output does not name the store:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(data, ca.IssuingKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s exists (%v): the issuing key touched the disk", ca.IssuingKeyFile, err)
	}
	if keys := privateKeyFiles(t, data); strings.Join(keys, " ") != ca.RootKeyFile+" "+ca.ServerKeyFile {
		t.Fatalf("private keys on disk: %v, want the root's and the server's only", keys)
	}
	fi, err := os.Stat(filepath.Join(data, ca.IssuingKeyURIFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v, want mode 0600", ca.IssuingKeyURIFile, err, fi)
	}
	if recorded, err := ca.IssuingKeyURI(data); err != nil || recorded != uri {
		t.Fatalf("recorded URI %q, %v; want %q", recorded, err, uri)
	}
	// the token holds the key: it signed the issuing CA's server certificate
	store, err := keystores.Open(t.Context(), keystore.URI{Kind: keystore.KindPKCS11, PKCS11: tok.URI()}, "")
	if err != nil {
		t.Fatal(err)
	}
	onToken, err := store.Signer(t.Context(), "issuing-ca")
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.Load(data, ca.WithIssuingSigner(onToken))
	if err != nil {
		t.Fatalf("the key on the token is not the issuing CA's: %v", err)
	}
	store.Close()
	if _, err := ca.Load(data); !errors.Is(err, ca.ErrExternalKey) {
		t.Fatalf("ca.Load without the token: %v, want ErrExternalKey", err)
	}

	estAddr, mqttAddr, logs, _, stop := startServe(t, data)
	tokDev, _, _ := brokerCLI(t, "token", "--data", data, "--device", "dev-1")
	cl, lost := enrollAndConnect(t, data, "dev-1", tokDev, estAddr, mqttAddr)
	if tk := cl.Publish("devices/dev-1/t", 1, false, "x"); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("publish: %v", tk.Error())
	}

	// openssl verifies a device chain issued by the token's key
	idDir := filepath.Join(t.TempDir(), "id-2")
	tok2, _, _ := brokerCLI(t, "token", "--data", data, "--device", "dev-2")
	fstore, err := keystore.NewFile(idDir)
	if err != nil {
		t.Fatal(err)
	}
	defer fstore.Close()
	ident, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: idDir, DeviceID: "dev-2", Token: strings.TrimSpace(tok2), EST: "https://" + estAddr, Root: c.Root, Store: fstore, Keystore: "file"})
	if err != nil {
		t.Fatal(err)
	}
	if err := ident.Leaf().CheckSignatureFrom(c.Issuing); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(openssl, "verify", "-CAfile", filepath.Join(data, ca.RootCertFile), "-untrusted", filepath.Join(data, ca.IssuingCertFile),
		"-purpose", "sslclient", filepath.Join(idDir, device.CertFile))
	if b, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(b), ": OK") {
		t.Fatalf("openssl verify: %v\n%s", err, b)
	}

	// revocation still reaches the live session
	if out, errs, code := brokerCLI(t, "revoke", "--data", data, "--device", "dev-1", "--reason", "test"); code != 0 {
		t.Fatalf("revoke: %d %s %s", code, out, errs)
	}
	select {
	case <-lost:
	case <-time.After(5 * time.Second):
		t.Fatal("session still open 5s after broker revoke")
	}

	// many enrollments in parallel sign through the token's session pool
	n := 1000
	if testing.Short() {
		n = 100
	}
	lines, errs, code := brokerCLI(t, "token", "--data", data, "--count", fmt.Sprint(n), "--prefix", "bulk")
	if code != 0 {
		t.Fatal(errs)
	}
	enrollAll(t, estAddr, c.Root, c.Issuing, strings.Split(strings.TrimSpace(lines), "\n"))
	// server-cert signs through the token while serve uses it; serve
	// picks the new certificate up
	scOut, errs, code := brokerCLI(t, "server-cert", "--data", data, "--host", "127.0.0.1", "--host", "ca-in-token.example")
	if code != 0 {
		t.Fatalf("server-cert with the issuing key in the token: %s", errs)
	}
	if leaf := readCert(t, filepath.Join(data, ca.ServerCertFile)); leaf.CheckSignatureFrom(c.Issuing) != nil || leaf.VerifyHostname("ca-in-token.example") != nil {
		t.Errorf("re-issued server certificate names %v", leaf.DNSNames)
	}
	testtool.Eventually(t, 10*time.Second, "serve reloads the server certificate", func() bool {
		return strings.Contains(logs.String(), "server certificate reloaded")
	})
	stop()
	assertNoSecret(t, filepath.Dir(data), []string{tok.PIN}, out, scOut, errs, logs.String())

	// serve with a wrong PIN, then without the token: exit 1, named cause
	pin, err := os.ReadFile(tok.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tok.PINFile, []byte("00000000\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serveFails(t, data, uri, "wrong PIN", "put the token's user PIN in the pin-source")
	if err := os.WriteFile(tok.PINFile, pin, 0o600); err != nil {
		t.Fatal(err)
	}
	// the key object deleted from the token
	store, err = keystores.Open(t.Context(), keystore.URI{Kind: keystore.KindPKCS11, PKCS11: tok.URI()}, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Delete(t.Context(), "issuing-ca"); err != nil {
		t.Fatal(err)
	}
	store.Close()
	serveFails(t, data, uri, "key not found", `the store holds no key "issuing-ca"`)
	del := exec.Command(testtool.Require(t, "softhsm2-util"), "--delete-token", "--token", tok.Label)
	del.Env = tok.Env()
	if b, err := del.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --delete-token: %v\n%s", err, b)
	}
	serveFails(t, data, uri, "token not found", "connect the token", "correct the URI recorded in "+filepath.Join(data, ca.IssuingKeyURIFile))
}

// privateKeyFiles lists the files under dir holding a software private
// key (PEM PKCS#8, SEC1 or PKCS#1; not the TPM-wrapped TSS2 blobs that
// only their TPM can load).
func privateKeyFiles(t *testing.T, dir string) []string {
	t.Helper()
	var keys []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if regexp.MustCompile(`-----BEGIN (|EC |RSA |ENCRYPTED )PRIVATE KEY-----`).Match(b) {
			rel, _ := filepath.Rel(dir, path)
			keys = append(keys, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// serveFails runs broker serve and wants exit 1 with the URI, the
// recording file and says in stderr, and no PIN.
func serveFails(t *testing.T, data, uri string, says ...string) {
	t.Helper()
	var errs syncBuffer
	code := run(t.Context(), []string{"serve", "--data", data, "--est-addr", testtool.FreeAddr(t), "--mqtt-addr", testtool.FreeAddr(t), "--metrics-addr", ""}, io.Discard, &errs)
	if code != 1 {
		t.Fatalf("serve exit %d, want 1\n%s", code, errs.String())
	}
	t.Logf("serve: %s", errs.String())
	for _, s := range append([]string{"issuing CA key " + uri}, says...) {
		if !strings.Contains(errs.String(), s) {
			t.Errorf("serve stderr lacks %q:\n%s", s, errs.String())
		}
	}
}

// enrollAll enrolls every "ID TOKEN" line over EST from 8 goroutines and
// checks each chain.
func enrollAll(t *testing.T, estAddr string, root, issuing *x509.Certificate, lines []string) {
	t.Helper()
	client, err := provisioning.NewClient("https://"+estAddr, root)
	if err != nil {
		t.Fatal(err)
	}
	work := make(chan string)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []error
	for range 8 {
		wg.Go(func() {
			for line := range work {
				id, token, _ := strings.Cut(line, " ")
				key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				chain, err := client.Enroll(t.Context(), key, id, token)
				if err == nil {
					err = chain[0].CheckSignatureFrom(issuing)
				}
				if err != nil {
					mu.Lock()
					failed = append(failed, fmt.Errorf("%s: %w", id, err))
					mu.Unlock()
				}
			}
		})
	}
	start := time.Now()
	for _, l := range lines {
		work <- l
	}
	close(work)
	wg.Wait()
	if len(failed) > 0 {
		t.Fatalf("%d of %d enrollments failed, first: %v", len(failed), len(lines), failed[0])
	}
	t.Logf("%d enrollments in %v", len(lines), time.Since(start))
}

// Adoption: a key already on the token becomes the issuing CA's key.
func TestInitIssuingKeyAdopted(t *testing.T) {
	hsm := softhsmtest.Start(t)
	tok := hsm.InitToken(t, "ca")
	store, err := keystores.Open(t.Context(), keystore.URI{Kind: keystore.KindPKCS11, PKCS11: tok.URI()}, "")
	if err != nil {
		t.Fatal(err)
	}
	made, err := store.Generate(t.Context(), "my-ca-key", keystore.ECDSAP384)
	if err != nil {
		t.Fatal(err)
	}
	pub := made.Public()
	store.Close()

	data := filepath.Join(t.TempDir(), "data")
	uri := caURI(tok, "my-ca-key")
	out, errs, code := brokerCLI(t, "init", "--data", data, "--issuing-key-uri", uri)
	if code != 0 {
		t.Fatalf("init: %s", errs)
	}
	if !strings.Contains(out, "(adopted from the store; no key file)") {
		t.Errorf("init output:\n%s", out)
	}
	c, release, err := loadCA(t.Context(), data)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Issuing.PublicKey.(*ecdsa.PublicKey).Equal(pub) {
		t.Fatal("the issuing CA is not for the adopted key")
	}
	// the key was kept when a second init is refused
	if _, errs, code := brokerCLI(t, "init", "--data", data, "--issuing-key-uri", uri); code != 1 || !strings.Contains(errs, "already exists") {
		t.Fatalf("second init: %d %s", code, errs)
	}
	if _, err := c.IssueDevice(pub, "dev-1", nil, time.Hour); err != nil {
		t.Fatalf("issuing after a refused second init: %v", err)
	}
	release()

	// an init interrupted before the server certificate resumes with the
	// recorded store, without the flag
	for _, f := range []string{"tls", RegistryFile} { // init makes the registry last
		if err := os.RemoveAll(filepath.Join(data, f)); err != nil {
			t.Fatal(err)
		}
	}
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatalf("resumed init: %s", errs)
	}
	leaf := readCert(t, filepath.Join(data, ca.ServerCertFile))
	if err := leaf.CheckSignatureFrom(c.Issuing); err != nil {
		t.Fatalf("server certificate of the resumed init: %v", err)
	}
}

// The TPM URIs go through the same code: the key is a TPM-wrapped blob in
// DIR/ca-keystore, never a PEM key.
func TestIssuingKeyTPMSim(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	uri := "tpmsim:" + t.TempDir()
	if _, errs, code := brokerCLI(t, "init", "--data", data, "--issuing-key-uri", uri); code != 0 {
		t.Fatalf("init: %s", errs)
	}
	if _, err := os.Stat(filepath.Join(data, ca.IssuingKeyFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s written", ca.IssuingKeyFile)
	}
	if _, err := os.Stat(filepath.Join(data, caKeystoreDir, issuingKeyName+".tpmkey")); err != nil {
		t.Fatal(err)
	}
	// server-cert signs through the TPM too
	if _, errs, code := brokerCLI(t, "server-cert", "--data", data, "--host", "mqtt.example.com", "--host", "127.0.0.1"); code != 0 {
		t.Fatalf("server-cert with the issuing key in the TPM: %s", errs)
	}
	leaf := readCert(t, filepath.Join(data, ca.ServerCertFile))
	if err := leaf.CheckSignatureFrom(readCert(t, filepath.Join(data, ca.IssuingCertFile))); err != nil || leaf.VerifyHostname("mqtt.example.com") != nil {
		t.Errorf("re-issued server certificate: names %v, signature %v", leaf.DNSNames, err)
	}
	estAddr, _, _, _, stop := startServe(t, data)
	defer stop()
	lines, errs, code := brokerCLI(t, "token", "--data", data, "--count", "3", "--prefix", "tpm")
	if code != 0 {
		t.Fatal(errs)
	}
	enrollAll(t, estAddr, readCert(t, filepath.Join(data, ca.RootCertFile)), readCert(t, filepath.Join(data, ca.IssuingCertFile)), strings.Split(strings.TrimSpace(lines), "\n"))
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("%s: no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// swtpm: the key survives the TPM's restart; serve without the TPM exits 1
// naming it.
func TestIssuingKeySWTPM(t *testing.T) {
	tpm := swtpmtest.Start(t)
	data := filepath.Join(t.TempDir(), "data")
	uri := "swtpm:" + tpm.Addr
	if _, errs, code := brokerCLI(t, "init", "--data", data, "--issuing-key-uri", uri); code != 0 {
		t.Fatalf("init: %s", errs)
	}
	if keys := privateKeyFiles(t, data); strings.Join(keys, " ") != ca.RootKeyFile+" "+ca.ServerKeyFile {
		t.Fatalf("private keys on disk: %v, want the root's and the server's only", keys)
	}
	if b, err := os.ReadFile(filepath.Join(data, caKeystoreDir, issuingKeyName+".tpmkey")); err != nil || !strings.Contains(string(b), "BEGIN TSS2 PRIVATE KEY") {
		t.Fatalf("TPM-wrapped issuing key: %v", err)
	}
	tpm.Stop()
	serveFails(t, data, uri, "check that the TPM is reachable")
	tpm.Restart(t)
	estAddr, _, _, _, stop := startServe(t, data)
	defer stop()
	lines, errs, code := brokerCLI(t, "token", "--data", data, "--count", "3", "--prefix", "swtpm")
	if code != 0 {
		t.Fatal(errs)
	}
	enrollAll(t, estAddr, readCert(t, filepath.Join(data, ca.RootCertFile)), readCert(t, filepath.Join(data, ca.IssuingCertFile)), strings.Split(strings.TrimSpace(lines), "\n"))
}
