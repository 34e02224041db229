package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// pub and sub write the SDK's log (connection lost, reconnects, refusals)
// to stderr when asked, as text or JSON lines; by default nothing.
func TestPubSubLogs(t *testing.T) {
	est := esttest.Start(t, nil)
	br := brokertest.StartOn(t, est.Dir, est.Registry, func(c *broker.Config) { c.RevocationPoll = 50 * time.Millisecond })
	dir := enrollCLI(t, est, "dev-1")
	url := "mqtts://" + br.Addr

	_, perrs, pcode := devsim(t, "pub", "--broker", url, "-i", dir, "-t", "devices/dev-1/x", "-m", "1", "-r", "--log-format", "json", "--log-level", "debug")
	if pcode != 0 {
		t.Fatalf("pub --log-format json: exit %d, stderr %q", pcode, perrs)
	}
	for _, line := range strings.Split(strings.TrimSpace(perrs), "\n") {
		if line != "" && !json.Valid([]byte(line)) {
			t.Errorf("pub: stderr line is not JSON: %q", line)
		}
	}
	out, errs, code := started(t, "", "sub", "--broker", url, "-i", dir, "-t", "devices/dev-1/#", "--log-format", "json")
	// subscribed (it got the retained message): the revocation lands on an
	// established sub, which learns it at its reconnect
	testtool.Eventually(t, 10*time.Second, "sub subscribed", func() bool { return strings.Contains(out.String(), "1") })
	if _, err := est.Registry.Revoke(t.Context(), "dev-1", "test"); err != nil {
		t.Fatal(err)
	}
	if n := exited(t, code, 10*time.Second, "sub after its certificate was revoked"); n != 5 {
		t.Fatalf("sub after revocation: exit %d %q, want 5", n, errs)
	}
	var msgs []string
	for _, line := range strings.Split(strings.TrimSpace(errs.String()), "\n") {
		if strings.HasPrefix(line, "devsim sub: ") { // the command's own error
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("stderr line is not JSON: %v: %q", err, line)
		}
		msgs = append(msgs, rec["level"].(string)+" "+rec["msg"].(string))
	}
	if want := "ERROR broker refused the device; not reconnecting"; !strings.Contains(strings.Join(msgs, "\n"), want) {
		t.Errorf("log records %q lack %q; stderr %q", msgs, want, errs.String())
	}

	for _, bad := range [][]string{{"--log-format", "xml"}, {"--log-level", "loud"}} {
		if _, errs, code := devsim(t, append([]string{"sub", "--broker", url, "-i", dir, "-t", "devices/dev-1/#"}, bad...)...); code != 2 || !strings.Contains(errs, bad[1]) {
			t.Errorf("sub %v: exit %d %q, want 2 naming the value", bad, code, errs)
		}
	}
}
