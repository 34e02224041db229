package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// The README's by-hand block runs pasted as it stands: in a temporary
// directory that looks like a checkout (links to the sources), in a network
// namespace of its own so its fixed ports are free. Before, `serve &` then
// `enroll` failed with "connection refused" on a loaded machine and the
// backgrounded `sub --count 1` could wait forever.
func TestReadmeByHand(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds both commands (-short)")
	}
	block := testtool.ReadmeBlock(t, "../../README.md", "## By hand, with the real commands")
	dir := t.TempDir()
	entries, err := os.ReadDir("../..")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || e.Name() == "bin" || e.Name() == "data" {
			continue
		}
		abs, _ := filepath.Abs(filepath.Join("../..", e.Name()))
		if err := os.Symlink(abs, filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	script := filepath.Join(dir, "by-hand.sh")
	os.WriteFile(script, []byte(block), 0o600)
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	out, err := testtool.RunInNetns(t, ctx, dir, "by-hand.sh")
	if err != nil {
		t.Fatalf("the README block failed: %v", err)
	}
	for _, want := range []string{
		"enrolled sensor-1", "enrolled ops",
		"devices/sensor-1/telemetry 21.5",
		"connection lost while the publish awaited its PUBACK", "refused: exit 1",
		"revoked",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the README block's output lacks %q", want)
		}
	}
}
