package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func enrollCLI(t *testing.T, env *esttest.Env, id string) string {
	t.Helper()
	return enrollCLIGroup(t, env, id, "")
}

func enrollCLIGroup(t *testing.T, env *esttest.Env, id, group string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), id)
	tok := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(tok, []byte(env.Token(t, id, group, time.Hour)), 0o600)
	if out, errs, code := devsim(t, "enroll", "--est", env.URL, "--ca", filepath.Join(env.Dir, ca.RootCertFile), "--device", id, "--token-file", tok, "--out", dir); code != 0 {
		t.Fatalf("enroll: %s %s", out, errs)
	}
	return dir
}

func TestPubSubCLI(t *testing.T) {
	est := esttest.Start(t, nil)
	br := brokertest.StartOn(t, est.Dir, est.Registry, nil)
	dir := enrollCLI(t, est, "dev-1")
	url := "mqtts://" + br.Addr

	// retained publish, then sub picks it up (the client ID is the CN, so
	// one connection at a time per identity)
	if out, errs, code := devsim(t, "pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/status", "--message", "online", "--qos", "1", "--retain"); code != 0 {
		t.Fatalf("pub: %d %s %s", code, out, errs)
	}
	out, errs, code := devsim(t, "sub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/#", "--count", "1", "--timeout", "10s", "-v")
	if code != 0 || out != "devices/dev-1/status online\n" {
		t.Fatalf("sub: %d %q %s", code, out, errs)
	}
	// --broker repeats (the nodes of a cluster): an unreachable one is skipped
	out, errs, code = devsim(t, "sub", "--broker", url, "--broker", "mqtts://127.0.0.1:1", "--identity", dir, "--topic", "devices/dev-1/#", "--count", "1", "--timeout", "10s", "-v")
	if code != 0 || out != "devices/dev-1/status online\n" {
		t.Fatalf("sub with two brokers, one down: %d %q %s", code, out, errs)
	}

	cases := []struct {
		args []string
		msg  string
	}{
		{[]string{"pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-2/x", "--message", "evil", "--qos", "1"}, "connection lost while the publish awaited its PUBACK"},
		{[]string{"pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/+", "--message", "1"}, "wildcard"},
		{[]string{"sub", "--broker", url, "--identity", dir, "--topic", "devices/#", "--count", "1", "--timeout", "5s"}, "subscribe \"devices/#\" refused"},
		{[]string{"sub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/none", "--count", "1", "--timeout", "500ms"}, "received 0 of 1 messages"},
		{[]string{"pub", "--broker", "mqtts://127.0.0.1:1", "--identity", dir, "--topic", "devices/dev-1/x", "--message", "1", "--wait", "0"}, "connection refused"},
		{[]string{"pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/x"}, "give one of -m MSG"},
	}
	for _, c := range cases {
		_, errs, code := devsim(t, c.args...)
		if code == 0 || !strings.Contains(errs, c.msg) {
			t.Errorf("devsim %v: exit %d %q, want an error with %q", c.args[0], code, errs, c.msg)
		}
	}

	// a broker with a certificate from another CA is refused, naming why
	other := testpki.New(t)
	key := testpki.NewKey(t)
	cert, _ := keystore.TLSCertificate(other.Server(t, key.Public(), "127.0.0.1"), key)
	mitm := brokertest.StartOn(t, est.Dir, est.Registry, func(c *broker.Config) { c.Certificate = cert })
	_, errs, code = devsim(t, "pub", "--broker", "mqtts://"+mitm.Addr, "--identity", dir, "--topic", "devices/dev-1/x", "--message", "1")
	if code != 1 || !strings.Contains(errs, "not signed by the pinned root") {
		t.Fatalf("pub to a foreign broker: %d %q", code, errs)
	}
}

// syncBuffer is a bytes.Buffer safe to read while a command writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// started runs devsim in the background; the returned channel yields its
// exit code.
func started(t *testing.T, stdin string, args ...string) (out, errs *syncBuffer, code <-chan int) {
	t.Helper()
	out, errs = &syncBuffer{}, &syncBuffer{}
	c := make(chan int, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { c <- run(ctx, args, strings.NewReader(stdin), out, errs) }()
	t.Cleanup(cancel)
	return out, errs, c
}

func exited(t *testing.T, code <-chan int, within time.Duration, what string) int {
	t.Helper()
	select {
	case n := <-code:
		return n
	case <-time.After(within):
		t.Fatalf("%s: still running after %v", what, within)
		return -1
	}
}

// devsim sub whose certificate is revoked: the broker closes the session
// and refuses every reconnect; sub ends with exit 5 (mosquitto_sub's code
// for "not authorised") and the broker's reason instead of hanging. So
// does pub with a revoked certificate.
func TestSubEndsWhenRevoked(t *testing.T) {
	est := esttest.Start(t, nil)
	br := brokertest.StartOn(t, est.Dir, est.Registry, func(c *broker.Config) { c.RevocationPoll = 50 * time.Millisecond })
	dir := enrollCLI(t, est, "dev-1")
	url := "mqtts://" + br.Addr
	_, errs, code := started(t, "", "sub", "--broker", url, "-i", dir, "-t", "devices/dev-1/#")
	testtool.Eventually(t, 10*time.Second, "sub connected", func() bool { return br.Broker.Sessions() == 1 })
	if _, err := est.Registry.Revoke(t.Context(), "dev-1", "test"); err != nil {
		t.Fatal(err)
	}
	if n := exited(t, code, 10*time.Second, "sub after its certificate was revoked"); n != 5 || !strings.Contains(errs.String(), "not authorized") {
		t.Fatalf("sub after revocation: exit %d %q, want 5 naming the refusal", n, errs)
	}
	_, perrs, n := devsim(t, "pub", "--broker", url, "-i", dir, "-t", "devices/dev-1/x", "-m", "1")
	if n != 5 || !strings.Contains(perrs, "CONNACK 5") {
		t.Fatalf("pub with a revoked certificate: exit %d %q, want 5", n, perrs)
	}
}

// mosquitto's fingers: short flags, repeatable -t on sub, payload-only
// output unless -v, the same default QoS for pub and sub (1), stdin with
// -s and -l, -W in seconds, exit codes in --help.
func TestPubSubLikeMosquitto(t *testing.T) {
	est := esttest.Start(t, nil)
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		t.Fatal(err)
	}
	br := brokertest.StartOn(t, est.Dir, est.Registry, func(c *broker.Config) { c.Policy = pol })
	dev1, dev2 := enrollCLI(t, est, "dev-1"), enrollCLI(t, est, "dev-2")
	backend := enrollCLIGroup(t, est, "backend-1", "backend")
	url := "mqtts://" + br.Addr

	// retained, so the subscriber gets them whenever it subscribes
	for _, c := range []struct {
		stdin string
		args  []string
	}{
		{"", []string{"pub", "--broker", url, "-i", dev1, "-t", "devices/dev-1/telemetry", "-m", "one", "-r"}},
		{"two\n", []string{"pub", "--broker", url, "-i", dev2, "-t", "devices/dev-2/telemetry", "-s", "-r"}},
	} {
		var out, errs bytes.Buffer
		if code := run(t.Context(), c.args, strings.NewReader(c.stdin), &out, &errs); code != 0 {
			t.Fatalf("%v: exit %d %s", c.args, code, errs.String())
		}
	}
	// two -t (before, the last one won silently), -C, -W in seconds
	out, errs, code := devsim(t, "sub", "--broker", url, "-i", backend, "-t", "devices/dev-1/telemetry", "-t", "devices/dev-2/telemetry", "-C", "2", "-W", "10")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	slices.Sort(lines)
	if code != 0 || !slices.Equal(lines, []string{"one", "two"}) {
		t.Fatalf("sub on two filters: exit %d %q %s, want the two payloads", code, out, errs)
	}
	out, errs, code = devsim(t, "sub", "--broker", url, "-i", backend, "-t", "devices/dev-1/telemetry", "-C", "1", "-W", "10", "-v")
	if code != 0 || out != "devices/dev-1/telemetry one\n" {
		t.Fatalf("sub -v: exit %d %q %s", code, out, errs)
	}

	// -l: a message per line, each acknowledged (QoS 1 by default, as sub)
	subOut, subErrs, subCode := started(t, "", "sub", "--broker", url, "-i", backend, "-t", "devices/dev-1/telemetry", "-C", "4", "-W", "20")
	testtool.Eventually(t, 10*time.Second, "sub subscribed", func() bool { return strings.Contains(subOut.String(), "one") })
	var pout, perrs bytes.Buffer
	if code := run(t.Context(), []string{"pub", "--broker", url, "-i", dev1, "-t", "devices/dev-1/telemetry", "-l"}, strings.NewReader("a\nb\nc\n"), &pout, &perrs); code != 0 {
		t.Fatalf("pub -l: exit %d %s", code, perrs.String())
	}
	if n := exited(t, subCode, 20*time.Second, "sub -C 4"); n != 0 || subOut.String() != "one\na\nb\nc\n" {
		t.Fatalf("sub after pub -l: exit %d %q %s", n, subOut, subErrs)
	}

	// help names the short flags and the exit codes
	_, help, _ := devsim(t, "pub", "-h")
	for _, want := range []string{"-t", "-m", "-q", "-i", "-r", "-W", "-s", "-l", "5  not authorised"} {
		if !strings.Contains(help, want) {
			t.Errorf("devsim pub -h does not mention %q:\n%s", want, help)
		}
	}
	_, help, _ = devsim(t, "sub", "-h")
	for _, want := range []string{"-t", "-C", "-v", "-W", "repeatable", "(pub and sub alike) (default 1)"} {
		if !strings.Contains(help, want) {
			t.Errorf("devsim sub -h does not mention %q:\n%s", want, help)
		}
	}
	if top, _, _ := devsim(t, "--help"); !strings.Contains(top, "Exit status") {
		t.Errorf("devsim --help has no exit codes:\n%s", top)
	}
}

// pub, sub and enroll started just before the server (README: "serve &"
// then a command) wait for it, for --wait, and say so.
func TestCommandsWaitForTheServer(t *testing.T) {
	est := esttest.Start(t, nil)
	br := brokertest.StartOn(t, est.Dir, est.Registry, nil)
	dir := enrollCLI(t, est, "dev-1")
	url := "mqtts://" + br.Addr
	br.Stop()
	_, errs, code := started(t, "", "pub", "--broker", url, "-i", dir, "-t", "devices/dev-1/x", "-m", "1", "--wait", "20s")
	testtool.Eventually(t, 10*time.Second, "pub says it waits", func() bool { return strings.Contains(errs.String(), "waiting up to 20s") })
	br.Restart(t)
	if n := exited(t, code, 20*time.Second, "pub waiting for the broker"); n != 0 {
		t.Fatalf("pub once the broker is up: exit %d %s", n, errs)
	}
	// bounded: with nothing listening it gives up after --wait
	start := time.Now()
	_, e, n := devsim(t, "pub", "--broker", "mqtts://"+testtool.FreeAddr(t), "-i", dir, "-t", "devices/dev-1/x", "-m", "1", "--wait", "500ms")
	if n != 1 || !strings.Contains(e, "connection refused") || !strings.Contains(e, "waited 500ms") || time.Since(start) > 5*time.Second {
		t.Fatalf("pub with no broker: exit %d %q after %v", n, e, time.Since(start))
	}
	// enroll waits for the EST server the same way
	estAddr := testtool.FreeAddr(t)
	_, eerrs, ecode := started(t, "", "enroll", "--est", "https://"+estAddr, "--ca", filepath.Join(est.Dir, ca.RootCertFile), "--device", "dev-9", "--token", "x", "--out", filepath.Join(t.TempDir(), "id"), "--wait", "1s")
	if n := exited(t, ecode, 10*time.Second, "enroll"); n != 1 || !strings.Contains(eerrs.String(), "waiting up to 1s") || !strings.Contains(eerrs.String(), "waited 1s") {
		t.Fatalf("enroll with no EST server: exit %d %q", n, eerrs)
	}
}
