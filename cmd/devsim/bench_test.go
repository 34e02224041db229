package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// devsim bench runs end to end (small: the real figures come from task bench).
func TestBenchSmall(t *testing.T) {
	mosq := testtool.Require(t, "mosquitto")
	bin := filepath.Join(t.TempDir(), "broker")
	if out, err := exec.Command("go", "build", "-o", bin, "../broker").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	self := filepath.Join(t.TempDir(), "devsim")
	if out, err := exec.Command("go", "build", "-o", self, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	out, errs, code := devsim(t, "bench", "--broker-bin", bin, "--devsim-bin", self, "--mosquitto", mosq, "--devices", "40", "--duration", "1s")
	t.Log(out)
	if code != 0 {
		t.Fatalf("bench: %d %s", code, errs)
	}
	for _, want := range []string{"server CPU per mTLS connect", "RSS per idle session", "QoS 1 messages/s", "p99 e2e", "mqtls", "raw TLS", "mosquitto"} {
		if !strings.Contains(out, want) {
			t.Errorf("bench output lacks %q", want)
		}
	}
	if strings.Contains(out, " error: ") {
		t.Errorf("bench had errors:\n%s", out)
	}
}
