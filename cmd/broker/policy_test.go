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

func TestGatewayCLI(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if out, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatalf("init: %d %s %s", code, out, errs)
	}
	if _, errs, code := brokerCLI(t, "gateway", "--data", data, "--device", "gw-1", "--children", "c-1"); code != 1 || !strings.Contains(errs, "not found") {
		t.Errorf("children of an unknown device: exit %d %q", code, errs)
	}
	if out, errs, code := brokerCLI(t, "token", "--data", data, "--device", "gw-1", "--group", "gateway"); code != 0 {
		t.Fatalf("token: %d %s %s", code, out, errs)
	}
	out, errs, code := brokerCLI(t, "gateway", "--data", data, "--device", "gw-1", "--children", "c-2, c-1,c-2")
	if code != 0 || out != "gw-1: 2 children\nc-1\nc-2\n" {
		t.Fatalf("set children: exit %d %q %q", code, out, errs)
	}
	if _, errs, code := brokerCLI(t, "gateway", "--data", data, "--device", "gw-1", "--children", "a/b"); code != 1 || !strings.Contains(errs, "a/b") {
		t.Errorf("bad child: exit %d %q", code, errs)
	}
	if out, _, code := brokerCLI(t, "gateway", "--data", data, "--device", "gw-1"); code != 0 || out != "gw-1: 2 children\nc-1\nc-2\n" {
		t.Errorf("list: exit %d %q", code, out)
	}
	if out, _, code := brokerCLI(t, "gateway", "--data", data, "--device", "gw-1", "--clear"); code != 0 || out != "gw-1: 0 children\n" {
		t.Errorf("clear: exit %d %q", code, out)
	}
}
