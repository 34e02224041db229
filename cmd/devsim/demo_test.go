package main

import (
	"os"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

// The README's main job: the whole system in one process, every step
// checked, under 60 s, nothing left behind.
func TestDemo(t *testing.T) {
	before := runtime.NumGoroutine()
	start := time.Now()
	out, errs, code := devsim(t, "demo")
	t.Logf("demo output:\n%s", out)
	if code != 0 {
		t.Fatalf("demo exit %d: %s", code, errs)
	}
	if d := time.Since(start); d > 60*time.Second {
		t.Fatalf("demo took %v", d)
	}
	for _, want := range []string{"TPM simulator", "telemetry: 100 QoS 1 messages", "command: backend -> demo-01",
		"refused: demo-03", "revoked demo-05", "was refused", "renewed demo-02", "all checks passed"} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	m := regexp.MustCompile(`registry (\S+)/data/registry\.db`).FindStringSubmatch(out)
	if m == nil {
		t.Fatal("demo did not say where its data was")
	}
	if _, err := os.Stat(m[1]); !os.IsNotExist(err) {
		t.Errorf("demo left %s behind", m[1])
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before+2 {
		buf := make([]byte, 1<<16)
		t.Errorf("demo left %d goroutines running (before: %d)\n%s", n, before, buf[:runtime.Stack(buf, true)])
	}
}
