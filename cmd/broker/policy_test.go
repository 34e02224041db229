package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestPolicyCheck(t *testing.T) {
	example := filepath.Join("..", "..", "deploy", "policy.yaml")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--policy", example, "--cn", "ops", "--ou", "backend", "--topic", "devices/+/telemetry", "--subscribe"}, 0,
			`subscribe "devices/+/telemetry": allowed by rule "backend" (filter devices/+/telemetry)`},
		{[]string{"--policy", example, "--cn", "lab-1", "--ou", "backend", "--topic", "$SYS/#", "--subscribe"}, 1,
			`subscribe "$SYS/#": denied by rule "quarantine"`},
		{[]string{"--policy", example, "--cn", "dev-a", "--topic", "devices/dev-b/x", "--publish"}, 1,
			`publish "devices/dev-b/x": denied (no rule grants it)`},
		{[]string{"--cn", "dev-a", "--topic", "devices/dev-a/x", "--publish"}, 0,
			`publish "devices/dev-a/x": allowed by rule "own-namespace"`},
		{[]string{"--cn", "dev-a", "--client-id", "dev-b"}, 1, `client ID "dev-b": denied`},
		{[]string{"--cn", "dev-a", "--empty-client-id"}, 1, `empty client ID: denied`},
		{[]string{"--cn", "dev-a", "--topic", "x"}, 2, ""},
		{[]string{"--topic", "x", "--publish"}, 2, ""},
	} {
		out, errs, code := brokerCLI(t, append([]string{"policy", "check"}, tc.args...)...)
		if code != tc.code || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d %q %q, want exit %d and %q", tc.args, code, out, errs, tc.code, tc.want)
		}
	}
	if _, _, code := brokerCLI(t, "policy"); code != 2 {
		t.Errorf("broker policy without check: exit %d, want 2", code)
	}
}
