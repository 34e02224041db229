// Package softhsmtest makes SoftHSM2 tokens for tests: a SoftHSM
// configuration in a temporary directory (SOFTHSM2_CONF is set for the
// test) and tokens initialised in it with softhsm2-util, each with a random
// user PIN kept in a 0600 file.
//
// SoftHSM reads SOFTHSM2_CONF and its token directory when the module is
// initialised: initialise every token a test needs before opening a store,
// and close all stores by the end of the test. Tests using this package
// cannot run in parallel (the environment is process-wide).
package softhsmtest

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
)

// Module is the path of Debian's SoftHSM2 PKCS#11 module.
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// HSM is a SoftHSM2 configuration private to one test.
type HSM struct {
	Conf string // the softhsm2.conf that SOFTHSM2_CONF names
	dir  string
}

// Token is an initialised token.
type Token struct {
	Label   string
	Slot    uint   // the slot SoftHSM assigned
	PINFile string // holds the user PIN, mode 0600
	// PIN is the user PIN, for tests that hand it to external programs
	// through the environment (pkcs11-tool --pin env:NAME).
	PIN string
	hsm *HSM
}

// Start writes a SoftHSM configuration into a temporary directory and
// points SOFTHSM2_CONF at it for the rest of the test. softhsm2-util must
// be installed (under CI=true its absence fails the test).
func Start(t testing.TB) *HSM {
	t.Helper()
	testtool.Require(t, "softhsm2-util")
	if _, err := os.Stat(Module); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s: %v (CI=true: missing tools are failures): apt-get install softhsm2", Module, err)
		}
		t.Skipf("SKIP: %s: %v: apt-get install softhsm2", Module, err)
	}
	dir := t.TempDir()
	h := &HSM{Conf: filepath.Join(dir, "softhsm2.conf"), dir: dir}
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(h.Conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, ok := t.(interface{ Setenv(string, string) }); ok {
		s.Setenv("SOFTHSM2_CONF", h.Conf)
	} else {
		t.Fatal("softhsmtest: need a *testing.T or *testing.B to set SOFTHSM2_CONF")
	}
	return h
}

var reassigned = regexp.MustCompile(`reassigned to slot (\d+)`)

// InitToken initialises a new token labelled label with random SO and user
// PINs. The PINs are on softhsm2-util's command line (it reads them nowhere
// else without a terminal): they are throwaway test secrets.
func (h *HSM) InitToken(t testing.TB, label string) *Token {
	t.Helper()
	pin, so := randomPIN(t), randomPIN(t)
	cmd := exec.Command(testtool.Require(t, "softhsm2-util"), "--init-token", "--free", "--label", label, "--so-pin", so, "--pin", pin)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+h.Conf)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token --label %s: %v\n%s", label, err, out)
	}
	m := reassigned.FindSubmatch(out)
	if m == nil {
		t.Fatalf("softhsm2-util did not say which slot it assigned:\n%s", out)
	}
	slot, err := strconv.ParseUint(string(m[1]), 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	tok := &Token{Label: label, Slot: uint(slot), PIN: pin, hsm: h}
	tok.PINFile = filepath.Join(h.dir, label+".pin")
	if err := os.WriteFile(tok.PINFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return tok
}

// URI returns the keystore URI of the token, reading the PIN from its file.
func (tok *Token) URI() keystore.PKCS11 {
	return keystore.PKCS11{Token: tok.Label, ModulePath: Module, PINSource: "file:" + tok.PINFile}
}

// Env returns the environment for an external program (pkcs11-tool) on this
// token: SOFTHSM2_CONF, and the user PIN in the variable MQTLS_TEST_PIN for
// pkcs11-tool --pin env:MQTLS_TEST_PIN.
func (tok *Token) Env() []string {
	return append(os.Environ(), "SOFTHSM2_CONF="+tok.hsm.Conf, "MQTLS_TEST_PIN="+tok.PIN)
}

func randomPIN(t testing.TB) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
