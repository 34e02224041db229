package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

func TestVersionText(t *testing.T) {
	goLine := "go:       go1.26.8 " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	for _, tc := range []struct {
		name string
		info *debug.BuildInfo
		want string
	}{
		{"no build info", nil,
			"p\nversion:  unknown\nmodule:   unknown\nrevision: unknown\ngo:       " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"},
		{"checkout without VCS stamp (-buildvcs=false)", &debug.BuildInfo{
			GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/mqtls/mqtls", Version: "(devel)"},
			Settings: []debug.BuildSetting{{Key: "-buildvcs", Value: "false"}, {Key: "CGO_ENABLED", Value: "1"}},
		}, "p\nversion:  (devel)\nmodule:   github.com/mqtls/mqtls\nrevision: unknown\n" + goLine},
		{"released, clean", &debug.BuildInfo{
			GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/mqtls/mqtls", Version: "v1.2.3"},
			Settings: []debug.BuildSetting{{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123456789abcdef0123456789abcdef01234567"},
				{Key: "vcs.time", Value: "2026-12-01T14:00:00Z"}, {Key: "vcs.modified", Value: "false"}},
		}, "p\nversion:  v1.2.3\nmodule:   github.com/mqtls/mqtls\nrevision: 0123456789abcdef0123456789abcdef01234567 (2026-12-01T14:00:00Z)\n" + goLine},
		{"local changes", &debug.BuildInfo{
			GoVersion: "go1.26.8", Main: debug.Module{Path: "github.com/mqtls/mqtls", Version: "v0.0.0-20261201140000-0123456789ab+dirty"},
			Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789ab"}, {Key: "vcs.modified", Value: "true"}},
		}, "p\nversion:  v0.0.0-20261201140000-0123456789ab+dirty\nmodule:   github.com/mqtls/mqtls\nrevision: 0123456789ab (modified)\n" + goLine},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Version("p", tc.info); got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestRunVersion(t *testing.T) {
	readBuildInfo = func() (*debug.BuildInfo, bool) { return nil, false }
	t.Cleanup(func() { readBuildInfo = debug.ReadBuildInfo })
	want := Version("p", nil)
	for _, arg := range []string{"version", "--version", "-version"} {
		var out, errb bytes.Buffer
		if code := Run(t.Context(), "p", "usage\n", nil, []string{arg}, &out, &errb); code != 0 || out.String() != want || errb.Len() != 0 {
			t.Errorf("p %s: exit %d, stdout %q, stderr %q; want 0 and %q", arg, code, out.String(), errb.String(), want)
		}
	}
	var out, errb bytes.Buffer
	if code := Run(t.Context(), "p", "usage\n", nil, []string{"version", "x"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "no arguments") {
		t.Errorf("p version x: exit %d, stderr %q; want 2", code, errb.String())
	}
	out.Reset()
	Run(t.Context(), "p", "usage\n", nil, []string{"--help"}, &out, &errb)
	if !strings.Contains(out.String(), `"p version" or "p --version"`) {
		t.Errorf("usage does not mention version: %q", out.String())
	}
}

// TestVersionFromBuild builds a command on this package in a new git
// repository and runs it: with VCS stamping it names the commit, then the
// local change, and without stamping (-buildvcs=false, this environment's
// GOFLAGS) it says "unknown". A repository of its own because the go
// command stamps nothing in a git worktree (.git is a file there).
func TestVersionFromBuild(t *testing.T) {
	git := testtool.Require(t, "git")
	goBin, err := exec.LookPath("go") // go test puts its own GOROOT/bin first in PATH
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(dir, "cli"), 0o755)
	for _, e := range src {
		if strings.HasSuffix(e.Name(), ".go") && !strings.HasSuffix(e.Name(), "_test.go") {
			b, err := os.ReadFile(e.Name())
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(dir, "cli", e.Name()), b, 0o644)
		}
	}
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module example.com/vp\n\ngo 1.26\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "main.go"), []byte(`package main

import (
	"context"
	"os"

	"example.com/vp/cli"
)

func main() {
	os.Exit(cli.Run(context.Background(), "vp", "usage: vp version\n", nil, os.Args[1:], os.Stdout, os.Stderr))
}
`), 0o644)
	cmd := func(name string, args ...string) string {
		t.Helper()
		c := exec.Command(name, args...)
		c.Dir = dir
		c.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-buildvcs=false", "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL="+os.DevNull)
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	cmd(git, "init", "-q")
	cmd(git, "add", ".")
	cmd(git, "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "v")
	head := strings.TrimSpace(cmd(git, "rev-parse", "HEAD"))

	bins := t.TempDir() // outside the repository: an untracked file is a local change
	version := func(buildvcs string) map[string]string {
		t.Helper()
		bin := filepath.Join(bins, "vp")
		cmd(goBin, "build", "-buildvcs="+buildvcs, "-o", bin, ".")
		out := cmd(bin, "--version")
		lines := map[string]string{}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n")[1:] {
			k, v, _ := strings.Cut(l, ":")
			lines[k] = strings.TrimSpace(v)
		}
		if lines["module"] != "example.com/vp" || !strings.HasPrefix(lines["go"], runtime.Version()+" ") {
			t.Errorf("-buildvcs=%s: vp --version printed\n%s", buildvcs, out)
		}
		return lines
	}
	if got := version("true"); !regexp.MustCompile(`^`+head+` \(\d{4}-\d\d-\d\dT[0-9:]+Z\)$`).MatchString(got["revision"]) ||
		!strings.Contains(got["version"], head[:12]) {
		t.Errorf("stamped build: version %q, revision %q; want the commit %s and its time", got["version"], got["revision"], head)
	}
	f, err := os.OpenFile(filepath.Join(dir, "main.go"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("// a local change\n")
	f.Close()
	if got := version("true"); !strings.HasSuffix(got["revision"], ", modified)") || !strings.HasSuffix(got["version"], "+dirty") {
		t.Errorf("stamped build of a changed tree: version %q, revision %q; want +dirty and modified", got["version"], got["revision"])
	}
	if got := version("false"); got["revision"] != "unknown" || got["version"] != "(devel)" {
		t.Errorf("unstamped build: version %q, revision %q; want (devel) and unknown", got["version"], got["revision"])
	}
}
