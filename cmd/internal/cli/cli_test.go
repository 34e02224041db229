package cli

import (
	"bytes"
	"strings"
	"testing"
)

// No command is a usage error: the usage on stderr, exit 2 (as for an
// unknown command); asking for help is not: the usage on stdout, exit 0.
func TestRunWithoutCommand(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Run(t.Context(), "p", "usage: p <command>\n", nil, nil, &out, &errb); code != 2 || out.Len() != 0 || !strings.Contains(errb.String(), "usage: p <command>") {
		t.Errorf("p: exit %d, stdout %q, stderr %q; want 2 and the usage on stderr", code, out.String(), errb.String())
	}
	for _, arg := range []string{"-h", "--help", "help"} {
		var out, errb bytes.Buffer
		if code := Run(t.Context(), "p", "usage: p <command>\n", nil, []string{arg}, &out, &errb); code != 0 || !strings.Contains(out.String(), "usage: p <command>") || errb.Len() != 0 {
			t.Errorf("p %s: exit %d, stdout %q, stderr %q; want 0 and the usage on stdout", arg, code, out.String(), errb.String())
		}
	}
}
