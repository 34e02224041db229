package layout_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/mqtls/mqtls/"

// deps returns every production package of the module with the module
// packages it links (tests excluded), paths relative to the module.
func deps(t *testing.T) map[string][]string {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), "go", "list", "-f", "{{.ImportPath}} {{join .Deps \" \"}}", module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	m := map[string][]string{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		var own []string
		for _, d := range f[1:] {
			if p, ok := strings.CutPrefix(d, module); ok {
				own = append(own, p)
			}
		}
		m[strings.TrimPrefix(f[0], module)] = own
	}
	return m
}

// isHarness reports whether p is test support: a *test package or one under
// internal/testing.
func isHarness(p string) bool {
	return strings.HasPrefix(p, "internal/testing/") || strings.HasSuffix(p, "test")
}

func TestImportsFlowOneWay(t *testing.T) {
	m := deps(t)
	if len(m) == 0 {
		t.Fatal("go list found no packages")
	}
	for _, p := range []string{"deviceid", "internal/spki", "internal/atomicfile", "internal/keyfiles"} {
		if d, ok := m[p]; !ok || len(d) > 0 {
			t.Errorf("%s must be a leaf (found %v), links %v", p, ok, d)
		}
	}
	forbidden := map[string][]string{
		"broker/policy": {"broker", "device", "provisioning", "keystore"},
		"broker":        {"provisioning", "provisioning/server", "device"},
		"keystore":      {"hardware/tpm", "hardware/pkcs11", "provisioning", "device"},
		"provisioning":  {"keystore", "provisioning/ca", "broker"},
		"device":        {"broker", "broker/policy", "provisioning/ca", "provisioning/server"},
		"sim":           {"broker", "broker/policy", "provisioning/ca", "provisioning/registry", "provisioning/server"},
	}
	for p, bad := range forbidden {
		d, ok := m[p]
		if !ok {
			t.Errorf("package %s not found", p)
		}
		for _, b := range bad {
			if slices.Contains(d, b) {
				t.Errorf("%s links %s", p, b)
			}
		}
	}
	for p, d := range m {
		if isHarness(p) {
			continue
		}
		for _, x := range d {
			if strings.HasPrefix(x, "internal/testing/") {
				t.Errorf("production package %s links the test harness %s", p, x)
			}
		}
	}
}
