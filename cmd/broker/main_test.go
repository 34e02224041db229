package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

func brokerCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(t.Context(), args, &out, &errb)
	return out.String(), errb.String(), code
}

func TestBrokerCLI(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if out, errs, code := brokerCLI(t, "init", "--data", data, "--host", "localhost", "--host", "127.0.0.1"); code != 0 {
		t.Fatalf("init: %d %s %s", code, out, errs)
	}
	for _, f := range []string{ca.RootCertFile, ca.RootKeyFile, ca.IssuingCertFile, ca.IssuingKeyFile, ca.ServerCertFile, ca.ServerKeyFile, RegistryFile} {
		fi, err := os.Stat(filepath.Join(data, f))
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(f, ".key") || f == RegistryFile {
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s mode %04o, want 0600", f, fi.Mode().Perm())
			}
		}
	}
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 1 || !strings.Contains(errs, "already exists") {
		t.Fatalf("second init: %d %q, want a refusal", code, errs)
	}

	tok, _, code := brokerCLI(t, "token", "--data", data, "--device", "dev-1", "--group", "sensors")
	if code != 0 || !regexp.MustCompile(`^[A-Za-z0-9_-]{43}\n$`).MatchString(tok) {
		t.Fatalf("token: %d %q", code, tok)
	}
	lines, _, code := brokerCLI(t, "token", "--data", data, "--count", "3", "--prefix", "sim", "--ttl", "1h")
	if code != 0 || !regexp.MustCompile(`^(sim-00000[123] [A-Za-z0-9_-]{43}\n){3}$`).MatchString(lines) {
		t.Fatalf("token --count: %d %q", code, lines)
	}
	for _, bad := range []string{"a+b", "a/b", "$x", "#"} {
		if _, errs, code := brokerCLI(t, "token", "--data", data, "--device", bad); code != 1 || !strings.Contains(errs, "invalid device ID") {
			t.Errorf("token --device %q: %d %q", bad, code, errs)
		}
	}

	// serve EST and enroll through it
	addr := testtool.FreeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	served := make(chan int, 1)
	var serveErr bytes.Buffer
	go func() {
		served <- run(ctx, []string{"serve", "--data", data, "--est-addr", addr}, &bytes.Buffer{}, &serveErr)
	}()
	c, err := ca.Load(data)
	if err != nil {
		t.Fatal(err)
	}
	client, _ := provisioning.NewClient("https://"+addr, c.Root)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var chain []*x509.Certificate
	deadline := time.Now().Add(10 * time.Second)
	for {
		certs, err := client.Enroll(t.Context(), key, "dev-1", strings.TrimSpace(tok))
		if err == nil {
			chain = certs
			break
		}
		var ne *net.OpError
		if !errors.As(err, &ne) || time.Now().After(deadline) {
			t.Fatalf("enroll against broker serve: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if chain[0].Subject.OrganizationalUnit[0] != "sensors" {
		t.Fatalf("group not applied: %v", chain[0].Subject)
	}

	out, _, code := brokerCLI(t, "devices", "--data", data, "--json")
	var devs []registry.Device
	if code != 0 || json.Unmarshal([]byte(out), &devs) != nil || len(devs) != 4 {
		t.Fatalf("devices --json: %d %s", code, out)
	}
	if devs[0].ID != "dev-1" || devs[0].Status != "enrolled" || devs[0].Certificates != 1 || devs[0].Group != "sensors" {
		t.Fatalf("devices[0] = %+v", devs[0])
	}
	table, _, _ := brokerCLI(t, "devices", "--data", data)
	if !regexp.MustCompile(`(?m)^dev-1\s+sensors\s+enrolled\s+1\s+20`).MatchString(table) {
		t.Fatalf("devices table:\n%s", table)
	}

	out, _, code = brokerCLI(t, "revoke", "--data", data, "--device", "dev-1", "--reason", "stolen")
	if code != 0 || !strings.Contains(out, "revoked 1 certificate(s) of dev-1") {
		t.Fatalf("revoke: %d %q", code, out)
	}
	if _, errs, code := brokerCLI(t, "revoke", "--data", data, "--device", "nobody"); code != 1 || !strings.Contains(errs, "not found") {
		t.Fatalf("revoke unknown: %d %q", code, errs)
	}

	cancel()
	select {
	case code := <-served:
		if code != 0 {
			t.Fatalf("serve exited %d: %s", code, serveErr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop on cancel")
	}
	if !strings.Contains(serveErr.String(), "EST listening") || !strings.Contains(serveErr.String(), "enrolled") {
		t.Fatalf("serve log:\n%s", serveErr.String())
	}
	if strings.Contains(serveErr.String(), strings.TrimSpace(tok)) {
		t.Fatal("serve log contains the token")
	}
}

func TestBrokerUsage(t *testing.T) {
	for _, args := range [][]string{{"nope"}, {"token"}, {"token", "--data", "x"}, {"init", "--bogus"}} {
		if _, _, code := brokerCLI(t, args...); code != 2 {
			t.Errorf("broker %v exit %d, want 2", args, code)
		}
	}
}

// Errors that name their fix (issue 12, item 4).
func TestBrokerErrorsNameTheFix(t *testing.T) {
	t.Run("no arguments", func(t *testing.T) {
		out, errs, code := brokerCLI(t)
		if code != 2 || out != "" || !strings.Contains(errs, "usage: broker <command>") {
			t.Errorf("broker: exit %d, stdout %q, stderr %q; want 2 and the usage on stderr", code, out, errs)
		}
	})
	t.Run("missing data directory", func(t *testing.T) {
		data := filepath.Join(t.TempDir(), "data")
		_, errs, code := brokerCLI(t, "serve", "--data", data, "--mqtt-addr", "", "--est-addr", "", "--metrics-addr", "")
		if want := `run "broker init --data ` + data + `"`; code != 1 || !strings.Contains(errs, want) {
			t.Errorf("serve on a missing data dir: exit %d, stderr %q; want 1 and %q", code, errs, want)
		}
	})
	t.Run("missing data directory, registry commands", func(t *testing.T) {
		data := filepath.Join(t.TempDir(), "data")
		for _, args := range [][]string{{"token", "--device", "dev-1"}, {"devices"}, {"revoke", "--device", "dev-1"}, {"gateway", "--device", "gw-1"}} {
			_, errs, code := brokerCLI(t, append(args, "--data", data)...)
			if want := `run "broker init --data ` + data + `"`; code != 1 || !strings.Contains(errs, want) || strings.Contains(errs, "--registry-only") {
				t.Errorf("broker %s on a missing data dir: exit %d, stderr %q; want 1 and %q", args[0], code, errs, want)
			}
		}
	})
	for _, tc := range []struct {
		name, yaml string
		want       []string // in the error
		not        string
	}{
		{"unknown key", "data: x\nmqtt_adr: 127.0.0.1:8883\n", []string{`line 2: unknown key "mqtt_adr"`, "mqtt_addr"}, "serveConfig"},
		{"unknown key after comments", "# broker\n\ndata: x\nlog_level: info\nbogus: 1\n", []string{`line 5: unknown key "bogus"`}, "serveConfig"},
		{"unclosed flow sequence", "data: x\nmqtt_addr: a\nest_addr: [b\nlog_level: info\n", []string{"line 3:"}, "line 2:"},
		{"list item in a mapping", "# c\n\ndata: x\nmqtt_addr: a\n- x\n", []string{"line 5:"}, "line 2:"},
		{"unclosed flow mapping", "data: x\nmqtt_addr: a\nmetrics_addr: {a\n", []string{"line 3:"}, "line 2:"},
		{"bad indentation", "data: x\nmqtt_addr: a\n est_addr: b\n", []string{"line 3:"}, "line 2:"},
		{"unterminated quote", "data: x\nmqtt_addr: a\nest_addr: \"b\nlog_level: info\n", []string{"line 3:"}, "line 2:"},
		{"tab", "data: x\n\tmqtt_addr: a\n", []string{"line 2:"}, "line 1:"},
		{"not a mapping", "- data: x\n", []string{"line 1:", "mapping"}, "serveConfig"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "broker.yaml")
			os.WriteFile(file, []byte(tc.yaml), 0o600)
			cfg := defaultServeConfig()
			err := loadServeConfig(file, &cfg)
			if err == nil {
				t.Fatalf("loadServeConfig accepted\n%s", tc.yaml)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), tc.not) {
				t.Errorf("error %q holds %q", err, tc.not)
			}
			if !strings.Contains(err.Error(), file) {
				t.Errorf("error %q does not name the file", err)
			}
		})
	}
	t.Run("empty file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "broker.yaml")
		os.WriteFile(file, []byte("# nothing yet\n"), 0o600)
		cfg := defaultServeConfig()
		if err := loadServeConfig(file, &cfg); err != nil || !reflect.DeepEqual(cfg, defaultServeConfig()) {
			t.Errorf("an empty config file: %v, %+v", err, cfg)
		}
	})
}
