package main

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/sim"
)

// startBrokerServe builds cmd/broker, initialises a data directory, mints
// n tokens and runs `broker serve` until the test ends.
func startBrokerServe(t *testing.T, n int) (data, mqtt, est, tokens string, pid int) {
	t.Helper()
	bin := buildBroker(t)
	data = filepath.Join(t.TempDir(), "data")
	if out, err := exec.Command(bin, "init", "--data", data).CombinedOutput(); err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "token", "--data", data, "--count", strconv.Itoa(n), "--prefix", "sim").Output()
	if err != nil {
		t.Fatal(err)
	}
	tokens = filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(tokens, out, 0o600)
	mqtt, est, pid = serveBroker(t, bin, data)
	return data, mqtt, est, tokens, pid
}

// buildBroker builds cmd/broker and returns the binary.
func buildBroker(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "broker")
	if out, err := exec.Command("go", "build", "-o", bin, "../broker").CombinedOutput(); err != nil {
		t.Fatalf("build broker: %v\n%s", err, out)
	}
	return bin
}

// serveBroker runs `broker serve` over data (with extra flags) until the
// test ends.
func serveBroker(t *testing.T, bin, data string, extra ...string) (mqtt, est string, pid int) {
	t.Helper()
	mqtt, est = testtool.FreeAddr(t), testtool.FreeAddr(t)
	cmd := exec.Command(bin, append([]string{"serve", "--data", data, "--mqtt-addr", mqtt, "--est-addr", est, "--metrics-addr", "", "--log-level", "warn"}, extra...)...)
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); <-exited })
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			t.Log("broker: " + sc.Text())
		}
		cmd.Wait()
		close(exited)
	}()
	testtool.Eventually(t, 10*time.Second, "broker serve listening on "+est, func() bool {
		select {
		case <-exited:
			t.Fatal("broker serve exited")
		default:
		}
		c, err := net.Dial("tcp", est)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return mqtt, est, cmd.Process.Pid
}

func TestRun300(t *testing.T) {
	data, mqtt, est, tokens, pid := startBrokerServe(t, 300)
	dir := t.TempDir()
	jsonFile, htmlFile := filepath.Join(dir, "r.json"), filepath.Join(dir, "r.html")
	out, errs, code := devsim(t, "run", "--broker", "mqtts://"+mqtt, "--est", "https://"+est, "--ca", filepath.Join(data, "ca/root.crt"),
		"--tokens", tokens, "--devices", "300", "--connect-rate", "500", "--interval", "500ms", "--duration", "3s",
		"--server-pid", strconv.Itoa(pid), "--json", jsonFile, "--html", htmlFile)
	t.Logf("stdout:\n%s", out)
	if code != 0 {
		t.Fatalf("devsim run: exit %d\n%s", code, errs)
	}
	var rep sim.Report
	raw, _ := os.ReadFile(jsonFile)
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Devices != 300 || rep.Connected != 300 || len(rep.Errors) != 0 {
		t.Fatalf("report: devices %d connected %d errors %v", rep.Devices, rep.Connected, rep.Errors)
	}
	if rep.MessagesSent < 300*3 || rep.MessagesReceived == 0 || rep.E2EMS.N == 0 || rep.ConnectMS.N != 300 || rep.ConnectRate <= 0 {
		t.Fatalf("report lacks traffic: %+v", rep)
	}
	if rep.Server == nil || rep.Server.CPUPerConnect <= 0 || rep.Server.RSSIdleKB <= 0 {
		t.Fatalf("server stats: %+v", rep.Server)
	}
	for _, key := range []string{`"devices"`, `"connected"`, `"errors"`, `"connect_rate_per_s"`, `"connect_ms"`, `"e2e_ms"`, `"p50"`, `"p90"`, `"p99"`, `"max"`, `"messages_sent"`, `"messages_received"`} {
		if !strings.Contains(string(raw), key) {
			t.Errorf("JSON lacks %s", key)
		}
	}
	html, _ := os.ReadFile(htmlFile)
	if strings.Count(string(html), "<svg") != 3 || strings.Contains(string(html), "<script src") {
		t.Errorf("HTML report: want 3 inline SVG plots and no external resources")
	}
}

// devsim run checks every flag before it enrolls anything: a wrong broker
// URL used to burn every token, then fail every connect.
func TestRunValidatesBeforeEnrolling(t *testing.T) {
	est := esttest.Start(t, nil)
	root := filepath.Join(est.Dir, ca.RootCertFile)
	tokens := filepath.Join(t.TempDir(), "tokens")
	os.WriteFile(tokens, []byte("sim-1 "+est.Token(t, "sim-1", "", time.Hour)+"\n"), 0o600)
	broker := "mqtts://" + testtool.FreeAddr(t)
	base := []string{"run", "--est", est.URL, "--ca", root, "--tokens", tokens, "--duration", "1s"}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--broker", "mqtt://127.0.0.1:1883"}, "want mqtts://HOST:PORT"},
		{[]string{"--broker", "127.0.0.1:8883"}, "want mqtts://HOST:PORT"},
		{[]string{"--broker", broker, "--est", "http://" + strings.TrimPrefix(est.URL, "https://")}, "want https://HOST:PORT"},
		{[]string{"--broker", broker, "--connect-rate", "0"}, "--connect-rate"},
		{[]string{"--broker", broker, "--interval", "-1s"}, "--interval"},
		{[]string{"--broker", broker, "--payload", "8"}, "--payload"},
		{[]string{"--broker", broker, "--devices", "5"}, "need as many tokens"},
		{[]string{"--broker", broker, "--json", "/nonexistent/r.json"}, "directory does not exist"},
		{[]string{"--broker", broker, "--server-pid", "999999999"}, "no such process"},
	} {
		_, errs, code := devsim(t, append(slices.Clone(base), c.args...)...)
		if code != 2 || !strings.Contains(errs, c.msg) {
			t.Errorf("devsim run %v: exit %d %q, want 2 with %q", c.args, code, errs, c.msg)
		}
	}
	// no token was spent: the device still enrolls with it
	tok, _ := os.ReadFile(tokens)
	tf := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(tf, []byte(strings.Fields(string(tok))[1]), 0o600)
	if out, errs, code := devsim(t, "enroll", "--est", est.URL, "--ca", root, "--device", "sim-1", "--token-file", tf, "--out", filepath.Join(t.TempDir(), "id")); code != 0 {
		t.Fatalf("the token was spent by a run that failed validation: %d %s %s", code, out, errs)
	}
}
