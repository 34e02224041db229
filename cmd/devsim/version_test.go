package main

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
)

// devsim --version and devsim version print the build information (issue 12).
// A test binary carries no VCS stamp, so the revision is "unknown".
func TestVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version", "-version"} {
		var out, errb bytes.Buffer
		code := run(t.Context(), []string{arg}, strings.NewReader(""), &out, &errb)
		got := out.String()
		if code != 0 || errb.Len() != 0 || !strings.HasPrefix(got, "devsim\nversion:  ") ||
			!strings.Contains(got, "\nmodule:   github.com/mqtls/mqtls\n") ||
			!strings.Contains(got, "\nrevision: unknown\n") ||
			!strings.Contains(got, "\ngo:       "+runtime.Version()+" ") {
			t.Errorf("devsim %s: exit %d, stdout %q, stderr %q", arg, code, got, errb.String())
		}
	}
	var out, errb bytes.Buffer
	if code := run(t.Context(), []string{"version", "extra"}, strings.NewReader(""), &out, &errb); code != 2 {
		t.Errorf("devsim version extra: exit %d, want 2 (usage)", code)
	}
	out.Reset()
	run(t.Context(), []string{"--help"}, strings.NewReader(""), &out, &errb)
	if !strings.Contains(out.String(), "devsim --version") {
		t.Errorf("devsim --help does not mention --version:\n%s", out.String())
	}
}
