package testtool

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
)

// ReadmeBlock returns the first ```sh block after heading in the README at
// path (tests run the README's commands as they stand).
func ReadmeBlock(t testing.TB, path, heading string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := string(data)
	i := strings.Index(s, heading)
	if i < 0 {
		t.Fatalf("%s has no %q", path, heading)
	}
	s = s[i:]
	start := strings.Index(s, "```sh\n")
	if start < 0 {
		t.Fatalf("no sh block after %q", heading)
	}
	end := strings.Index(s[start+6:], "```")
	if end < 0 {
		t.Fatalf("no end to the sh block after %q", heading)
	}
	return s[start+6 : start+6+end]
}

// RunInNetns runs `bash script` in dir inside a network namespace of its
// own with only loopback up, so fixed ports are free whatever else runs
// on the machine. The whole process group is killed when ctx ends or the
// test does (a broker left running by a failed script). A machine that
// cannot make a namespace stops the test like a missing tool.
func RunInNetns(t testing.TB, ctx context.Context, dir, script string) ([]byte, error) {
	t.Helper()
	Require(t, "unshare")
	Require(t, "ip")
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--", "bash", "-c", "ip link set lo up && exec bash "+script)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	t.Cleanup(func() {
		if cmd.Process != nil {
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		}
	})
	out, err := cmd.CombinedOutput()
	t.Logf("%s output:\n%s", script, out)
	if strings.Contains(string(out), "unshare failed") || strings.Contains(string(out), "Operation not permitted") {
		Missing(t, "a network namespace (unshare --net: run as root)", "util-linux")
	}
	return out, err
}
