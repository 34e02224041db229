package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/brokertest"
	"github.com/mqtls/mqtls/internal/esttest"
	"github.com/mqtls/mqtls/internal/testpki"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func enrollCLI(t *testing.T, env *esttest.Env, id string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), id)
	tok := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(tok, []byte(env.Token(t, id, "", time.Hour)), 0o600)
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
	out, errs, code := devsim(t, "sub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/#", "--count", "1", "--timeout", "10s")
	if code != 0 || out != "devices/dev-1/status online\n" {
		t.Fatalf("sub: %d %q %s", code, out, errs)
	}

	cases := []struct {
		args []string
		msg  string
	}{
		{[]string{"pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-2/x", "--message", "evil", "--qos", "1"}, "not authorized"},
		{[]string{"sub", "--broker", url, "--identity", dir, "--topic", "devices/#", "--count", "1", "--timeout", "5s"}, "subscribe \"devices/#\" refused"},
		{[]string{"sub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/none", "--count", "1", "--timeout", "500ms"}, "received 0 of 1 messages"},
		{[]string{"pub", "--broker", "mqtts://127.0.0.1:1", "--identity", dir, "--topic", "devices/dev-1/x", "--message", "1"}, "connection refused"},
		{[]string{"pub", "--broker", url, "--identity", dir, "--topic", "devices/dev-1/x"}, "give --message M or --file F"},
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
