// Package testtool finds the external programs tests run against (swtpm,
// openssl, mosquitto, ...). Under CI=true a missing program fails the test;
// elsewhere the test is skipped with a message that names the package to
// install.
package testtool

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"
)

// packages maps a program to the Debian package that provides it.
var packages = map[string]string{
	"systemd-analyze":    "systemd",
	"swtpm":              "swtpm",
	"swtpm_setup":        "swtpm-tools",
	"swtpm_localca":      "swtpm-tools",
	"tpm2_load":          "tpm2-tools",
	"tpm2_sign":          "tpm2-tools",
	"tpm2_createprimary": "tpm2-tools",
	"openssl":            "openssl",
	"curl":               "curl",
	"mosquitto":          "mosquitto",
	"mosquitto_pub":      "mosquitto-clients",
	"mosquitto_sub":      "mosquitto-clients",
	"runuser":            "util-linux",
	"softhsm2-util":      "softhsm2",
	"pkcs11-tool":        "opensc",
	"unshare":            "util-linux",
	"ip":                 "iproute2",
	"git":                "git",
	"cp":                 "coreutils",
}

// Require returns the path of program, or stops the test: Fatal under
// CI=true, Skip otherwise.
func Require(t testing.TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err == nil {
		return path
	}
	if _, err := os.Stat("/usr/sbin/" + program); err == nil { // mosquitto, for users without sbin in PATH
		return "/usr/sbin/" + program
	}
	pkg := packages[program]
	if pkg == "" {
		pkg = program
	}
	Missing(t, program, pkg)
	return ""
}

// Missing stops the test for a missing tool (what) that Debian package pkg
// provides: Fatal under CI=true, Skip otherwise.
func Missing(t testing.TB, what, pkg string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found (CI=true: missing tools are failures): apt-get install %s", what, pkg)
	}
	t.Skipf("SKIP: %s not found: apt-get install %s (or run the README's test command, which installs it)", what, pkg)
}

// RandomHex returns n random bytes in hex (test passwords).
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}

// Eventually polls cond every 20 ms and fails the test if it does not hold
// within the given time.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	if !Poll(within, cond) {
		t.Fatalf("%s: not within %v", what, within)
	}
}

// Poll polls cond every 20 ms until it holds (true) or within has passed
// (false), for callers that report a failure with their own details.
func Poll(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// FreeAddrAside returns a port that was free a moment ago on a random
// address in 127.214.0.0/16, away from 127.0.0.1 where other tests'
// clients take ephemeral ports (one of them took a cluster route port
// between FreeAddr and the listen): for listeners no client checks by
// host name.
func FreeAddrAside(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", fmt.Sprintf("127.214.%d.%d:0", mathrand.IntN(256), 1+mathrand.IntN(254)))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreeAddr returns a loopback address with a port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
