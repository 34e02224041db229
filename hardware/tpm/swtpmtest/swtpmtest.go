// Package swtpmtest starts swtpm processes for tests: a TPM 2.0 emulator on
// a free loopback port pair (command port P, control port P+1) on an address
// of its own in 127.0.0.0/8, stopped when the test ends.
package swtpmtest

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// SWTPM is a running swtpm.
type SWTPM struct {
	Addr     string // command port, HOST:P; control port is P+1
	StateDir string // TPM state; survives Restart
	host     string // a loopback address away from 127.0.0.1, where tests' clients take ephemeral ports
	port     int
	cmd      *exec.Cmd
	exited   chan struct{}
	log      *bytes.Buffer
}

// Start starts a fresh swtpm whose state lives in a temporary directory.
func Start(t testing.TB) *SWTPM {
	t.Helper()
	s := &SWTPM{StateDir: t.TempDir()}
	testtool.Require(t, "swtpm")
	s.launch(t)
	return s
}

// launch starts swtpm on a free port pair, trying other pairs if one is
// taken between the probe and swtpm's bind.
func (s *SWTPM) launch(t testing.TB) {
	t.Helper()
	var err error
	for range 5 {
		if s.host, s.port, err = freePortPair(); err != nil {
			continue
		}
		if err = s.start(); err == nil {
			t.Cleanup(s.Stop)
			return
		}
	}
	t.Fatalf("start swtpm: %v", err)
}

// Manufactured is a swtpm whose TPM state swtpm_setup --create-ek-cert
// made: RSA 2048 and ECC P-384 EKs with EK certificates in NV (0x01c00002,
// 0x01c00016) signed by swtpm's local CA, made for this test in CADir.
type Manufactured struct {
	*SWTPM
	CADir string // swtpm-localca-rootca-cert.pem (root) and issuercert.pem (intermediate)
}

// StartManufactured manufactures a TPM state with EK certificates, then
// starts swtpm on it.
func StartManufactured(t testing.TB) *Manufactured {
	t.Helper()
	setup := testtool.Require(t, "swtpm_setup")
	localca := testtool.Require(t, "swtpm_localca")
	testtool.Require(t, "swtpm")
	dir := t.TempDir()
	m := &Manufactured{CADir: filepath.Join(dir, "ca")}
	state := filepath.Join(dir, "state")
	for _, d := range []string{m.CADir, state} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"localca.conf":    fmt.Sprintf("statedir = %[1]s\nsigningkey = %[1]s/signkey.pem\nissuercert = %[1]s/issuercert.pem\ncertserial = %[1]s/certserial\n", m.CADir),
		"localca.options": "",
		"setup.conf": fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
			localca, filepath.Join(dir, "localca.conf"), filepath.Join(dir, "localca.options")),
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(setup, "--tpm2", "--tpmstate", state, "--create-ek-cert", "--config", filepath.Join(dir, "setup.conf")).CombinedOutput()
	if err != nil {
		t.Fatalf("swtpm_setup --create-ek-cert: %v\n%s", err, out)
	}
	m.SWTPM = &SWTPM{StateDir: state}
	m.launch(t)
	return m
}

// TCTI returns the tpm2-tss TCTI string for tpm2-tools and openssl's tpm2
// provider.
func (s *SWTPM) TCTI() string {
	return fmt.Sprintf("swtpm:host=%s,port=%d", s.host, s.port)
}

// Restart stops swtpm and starts it again on the same ports and state.
func (s *SWTPM) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		t.Fatalf("restart swtpm: %v", err)
	}
}

// Stop terminates swtpm and waits for it to exit.
func (s *SWTPM) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill() // swtpm writes its state to files as it goes
	<-s.exited
	s.cmd = nil
}

func (s *SWTPM) start() error {
	s.Addr = net.JoinHostPort(s.host, strconv.Itoa(s.port))
	s.log = new(bytes.Buffer)
	s.cmd = exec.Command("swtpm", "socket", "--tpm2",
		"--tpmstate", "dir="+s.StateDir,
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", s.port, s.host),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=%s", s.port+1, s.host),
		"--flags", "not-need-init,startup-clear")
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	s.exited = exited
	go func() { _ = s.cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			s.cmd = nil
			return fmt.Errorf("swtpm exited: %s", s.log)
		default:
		}
		c, err := net.DialTimeout("tcp", s.Addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = s.cmd.Process.Kill()
	<-exited
	s.cmd = nil
	return fmt.Errorf("swtpm did not listen on %s within 10s: %s", s.Addr, s.log)
}

// freePortPair picks a random address in 127.213.0.0/16 and two free
// consecutive ports on it. On 127.0.0.1 a pair was sometimes not found in
// 20 tries while other tests' clients held thousands of ephemeral ports
// there.
func freePortPair() (string, int, error) {
	for range 50 {
		host := fmt.Sprintf("127.213.%d.%d", rand.IntN(256), 1+rand.IntN(254))
		l1, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return "", 0, err
		}
		p := l1.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(p+1)))
		l1.Close()
		if err == nil {
			l2.Close()
			return host, p, nil
		}
	}
	return "", 0, fmt.Errorf("no free loopback port pair")
}
