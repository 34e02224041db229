package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

const (
	unitFile   = "../../deploy/mqtls-broker.service"
	configFile = "../../deploy/broker.yaml"
	readmeFile = "../../README.md"
)

// The systemd unit in deploy/ runs the binary the README builds and
// installs, as the user the README creates, with a command line and a
// config that broker serve accepts, on the data directory the README
// initialises and the unit makes writable (issue 12).
func TestDeploySystemdUnit(t *testing.T) {
	unit, readme := readText(t, unitFile), readText(t, readmeFile)
	args := strings.Fields(unitValue(t, unit, "ExecStart"))
	bin := args[0]

	// The binary: built as bin/broker, installed where the unit runs it.
	if path.Base(bin) != "broker" {
		t.Errorf("ExecStart runs %s; the README builds bin/broker", bin)
	}
	if !strings.Contains(readme, "go build -o bin/broker ./cmd/broker") {
		t.Error("README does not build bin/broker")
	}
	if !regexp.MustCompile(`(?m)\binstall\b.* bin/broker ` + regexp.QuoteMeta(bin) + `(\s|$)`).MatchString(readme) {
		t.Errorf("README does not install bin/broker as %s, the unit's ExecStart", bin)
	}
	if !regexp.MustCompile(`(?m)\binstall\b.* deploy/mqtls-broker\.service /etc/systemd/system/`).MatchString(readme) {
		t.Error("README does not install deploy/mqtls-broker.service into /etc/systemd/system/")
	}
	if user := unitValue(t, unit, "User"); !regexp.MustCompile(`(?m)\buseradd\b.* ` + regexp.QuoteMeta(user) + `(\s|$)`).MatchString(readme) {
		t.Errorf("the unit runs as User=%s, which the README does not create", user)
	}

	// Files under /etc/mqtls named by the unit or by the config are
	// deploy/ files that the README installs there.
	cfgText := readText(t, configFile)
	for _, p := range regexp.MustCompile(`/etc/mqtls/[A-Za-z0-9._-]+`).FindAllString(unit+"\n"+uncommented(cfgText), -1) {
		name := path.Base(p)
		if _, err := os.Stat("../../deploy/" + name); err != nil {
			t.Errorf("%s is named by the unit or config, but deploy/%s does not exist", p, name)
		}
		if !regexp.MustCompile(`(?m)\binstall\b.* deploy/` + regexp.QuoteMeta(name) + `\b.* /etc/mqtls/?(\s|$)`).MatchString(readme) {
			t.Errorf("README does not install deploy/%s into /etc/mqtls/", name)
		}
	}

	// The data directory is the unit's state directory, initialised as
	// the README says.
	cfg := defaultServeConfig()
	if err := loadServeConfig(configFile, &cfg); err != nil {
		t.Fatal(err)
	}
	if want := "/var/lib/" + unitValue(t, unit, "StateDirectory"); cfg.Data != want {
		t.Errorf("deploy/broker.yaml data: %s, but the unit's StateDirectory is %s", cfg.Data, want)
	}
	if !regexp.MustCompile(`(?m)broker init --data ` + regexp.QuoteMeta(cfg.Data) + `\b`).MatchString(readme) {
		t.Errorf("README does not run broker init --data %s", cfg.Data)
	}

	// The unit's command line, files mapped to deploy/, serves: flags and
	// config keys parse, the policy loads. Addresses and data directory are
	// the test's.
	if args[1] != "serve" {
		t.Fatalf("ExecStart runs broker %s, not broker serve", args[1])
	}
	data := filepath.Join(t.TempDir(), "data")
	if out, errs, code := brokerCLI(t, "init", "--data", data, "--host", "localhost"); code != 0 {
		t.Fatalf("init: %d %s %s", code, out, errs)
	}
	serveArgs := []string{}
	for _, a := range args[1:] {
		serveArgs = append(serveArgs, strings.Replace(a, "/etc/mqtls/", "../../deploy/", 1))
	}
	mqttAddr, metricsAddr := testtool.FreeAddr(t), testtool.FreeAddr(t)
	serveArgs = append(serveArgs, "--data", data, "--mqtt-addr", mqttAddr, "--est-addr", testtool.FreeAddr(t),
		"--metrics-addr", metricsAddr, "--policy", "../../deploy/policy.yaml")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var log lockedBuffer
	served := make(chan int, 1)
	go func() { served <- run(ctx, serveArgs, &bytes.Buffer{}, &log) }()
	testtool.Eventually(t, 15*time.Second, "broker "+strings.Join(serveArgs, " ")+" answering /metrics", func() bool {
		select {
		case code := <-served:
			t.Fatalf("broker %s exited %d:\n%s", strings.Join(serveArgs, " "), code, log.String())
		default:
		}
		resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if c, err := net.Dial("tcp", mqttAddr); err != nil {
		t.Errorf("MQTT listener: %v", err)
	} else {
		c.Close()
	}
	cancel()
	select {
	case code := <-served:
		if code != 0 {
			t.Fatalf("serve exited %d:\n%s", code, log.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop on cancel")
	}
}

// systemd itself reads the unit without complaint: no unknown key, no
// value it cannot parse. ExecStart is pointed at an existing program, since
// systemd-analyze also checks that it is executable (the path is checked
// against the README above).
func TestDeploySystemdUnitVerify(t *testing.T) {
	analyze := testtool.Require(t, "systemd-analyze")
	unit := readText(t, unitFile)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := strings.Fields(unitValue(t, unit, "ExecStart"))[0]
	copyFile := filepath.Join(t.TempDir(), "mqtls-broker.service")
	if err := os.WriteFile(copyFile, []byte(strings.Replace(unit, "ExecStart="+bin, "ExecStart="+self, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", copyFile).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify deploy/mqtls-broker.service: %v\n%s", err, out)
	}
}

func readText(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// unitValue returns the value of the one KEY= line of a systemd unit.
func unitValue(t *testing.T, unit, key string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^`+key+`=(.*)$`).FindAllStringSubmatch(unit, -1)
	if len(m) != 1 || strings.TrimSpace(m[0][1]) == "" {
		t.Fatalf("the unit has %d %s= lines, want one with a value", len(m), key)
	}
	return strings.TrimSpace(m[0][1])
}

// uncommented drops YAML comments (the examples in them are not settings).
func uncommented(yaml string) string {
	var b strings.Builder
	for _, l := range strings.Split(yaml, "\n") {
		l, _, _ = strings.Cut(l, "#")
		b.WriteString(l + "\n")
	}
	return b.String()
}

// lockedBuffer is a bytes.Buffer that serve's goroutines may write to while
// the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
