package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// readmeBlock returns the first ```sh block after heading in README.md.
func readmeBlock(t *testing.T, heading string) string {
	t.Helper()
	data, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(data)
	i := strings.Index(s, heading)
	if i < 0 {
		t.Fatalf("README.md has no %q", heading)
	}
	s = s[i:]
	start := strings.Index(s, "```sh\n")
	end := strings.Index(s[start+6:], "```")
	if start < 0 || end < 0 {
		t.Fatalf("no sh block after %q", heading)
	}
	return s[start+6 : start+6+end]
}

// The README's by-hand block runs pasted as it stands: in a temporary
// directory that looks like a checkout (links to the sources), in a network
// namespace of its own so its fixed ports are free. Before, `serve &` then
// `enroll` failed with "connection refused" on a loaded machine and the
// backgrounded `sub --count 1` could wait forever.
func TestReadmeByHand(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds both commands (-short)")
	}
	testtool.Require(t, "unshare")
	testtool.Require(t, "ip")
	block := readmeBlock(t, "## By hand, with the real commands")
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
	// a namespace with only a loopback interface: the block's ports are
	// free whatever else runs on this machine
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--", "bash", "-c", "ip link set lo up && exec bash by-hand.sh")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	t.Cleanup(func() {
		if cmd.Process != nil {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // a broker left running by a failed block
		}
	})
	out, err := cmd.CombinedOutput()
	t.Logf("README block output:\n%s", out)
	if strings.Contains(string(out), "unshare: unshare failed") || strings.Contains(string(out), "Operation not permitted") {
		if os.Getenv("CI") == "true" {
			t.Fatalf("cannot make a network namespace (CI=true: run as root): %s", out)
		}
		t.Skipf("SKIP: cannot make a network namespace here (needs root): %s", out)
	}
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
