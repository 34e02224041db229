package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// syncBuffer is a log sink safe for the serving goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

// broker serve end to end: EST enrollment, MQTT with the enrolled
// identity, metrics, policy reload (a bad file keeps the old policy),
// config file with flag override, and a revocation from another process
// closing the live session.
func TestServe(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatal(errs)
	}
	policyFile := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(policyFile, []byte("rules:\n  - name: own\n    match: {cn: \"*\"}\n    publish: [\"devices/{cn}/#\"]\n    subscribe: [\"devices/{cn}/#\"]\n"), 0o600)
	mqttAddr, estAddr, metricsAddr := testtool.FreeAddr(t), testtool.FreeAddr(t), testtool.FreeAddr(t)
	configFile := filepath.Join(t.TempDir(), "broker.yaml")
	os.WriteFile(configFile, []byte("data: "+data+"\nmqtt_addr: "+mqttAddr+"\nest_addr: 127.0.0.1:1\nmetrics_addr: "+metricsAddr+"\npolicy: "+policyFile+"\nlog_level: info\n"), 0o600)

	ctx, cancel := context.WithCancel(t.Context())
	logs := &syncBuffer{}
	served := make(chan int, 1)
	// --est-addr overrides the config file's unusable address
	go func() {
		served <- run(ctx, []string{"serve", "--config", configFile, "--est-addr", estAddr}, io.Discard, logs)
	}()
	testtool.Eventually(t, 10*time.Second, "serve listening", func() bool { return strings.Contains(logs.String(), "metrics listening") })

	// enroll over EST
	tok, _, _ := brokerCLI(t, "token", "--data", data, "--device", "dev-1")
	cl, lost := enrollAndConnect(t, data, "dev-1", tok, estAddr, mqttAddr)

	// the session is counted once established, just after its CONNACK
	var body []byte
	testtool.Eventually(t, 5*time.Second, "the session counted", func() bool {
		resp, err := http.Get("http://" + metricsAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		return strings.Contains(string(body), "mqtls_connections 1")
	})
	for _, want := range []string{"mqtls_connections 1", "mqtls_tls_handshake_seconds_count", "mqtls_connects_accepted_total 1", "go_goroutines",
		`mqtls_est_requests_total{kind="enroll",result="ok"} 1`, "mqtls_registry_errors_total 0"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}

	for path, want := range map[string]string{"/healthz": "ok\n", "/readyz": "ready\n"} {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != want {
			t.Errorf("GET %s: %d %q, want 200 %q", path, resp.StatusCode, body, want)
		}
	}

	// a broken policy is refused with its line; the session keeps working
	os.WriteFile(policyFile, []byte("rules:\n  - name: own\n    match: {cn: \"*\"}\n    publish: [\"devices/#/x\"]\n"), 0o600)
	testtool.Eventually(t, 5*time.Second, "bad policy refused", func() bool {
		return strings.Contains(logs.String(), "policy refused") && strings.Contains(logs.String(), "line 4")
	})
	if tk := cl.Publish("devices/dev-1/t", 1, false, "x"); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Fatalf("publish after a refused reload: %v", tk.Error())
	}

	// revocation from another process
	bin := filepath.Join(t.TempDir(), "broker")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	start := time.Now()
	if out, err := exec.Command(bin, "revoke", "--data", data, "--device", "dev-1", "--reason", "test").CombinedOutput(); err != nil {
		t.Fatalf("broker revoke: %v\n%s", err, out)
	}
	select {
	case <-lost:
		t.Logf("session closed %v after broker revoke returned", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("session still open 2s after broker revoke")
	}

	cancel()
	select {
	case code := <-served:
		if code != 0 {
			t.Fatalf("serve exit %d\n%s", code, logs.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop")
	}
}

// enrollAndConnect enrolls id over EST with token and connects it over
// MQTT (3.1.1, no auto-reconnect); lost receives the connection's end.
func enrollAndConnect(t *testing.T, data, id, token, estAddr, mqttAddr string) (cl paho.Client, lost <-chan error) {
	t.Helper()
	root, err := ca.LoadRoot(data)
	if err != nil {
		t.Fatal(err)
	}
	idDir := filepath.Join(t.TempDir(), "id")
	store, err := keystore.NewFile(idDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	ident, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: idDir, DeviceID: id, Token: strings.TrimSpace(token), EST: "https://" + estAddr, Root: root, Store: store, Keystore: "file"})
	if err != nil {
		t.Fatalf("enroll %s: %v", id, err)
	}
	cert, _ := ident.TLSCertificate()
	lostc := make(chan error, 1)
	cl = paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + mqttAddr).SetClientID(id).
		SetTLSConfig(&tls.Config{RootCAs: ident.RootPool(), Certificates: []tls.Certificate{cert}}).SetProtocolVersion(4).SetAutoReconnect(false).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lostc <- err }))
	if tk := cl.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect %s: %v", id, tk.Error())
	}
	t.Cleanup(func() { cl.Disconnect(0) })
	return cl, lostc
}

// The broker's session and trust-data settings are config keys and flags.
func TestServeEdgeSettings(t *testing.T) {
	file := filepath.Join(t.TempDir(), "broker.yaml")
	os.WriteFile(file, []byte("admit_when_registry_down: true\nmax_intermediates: 3\nmax_queued_messages: 100\nmax_message_expiry: 48h\nmax_session_expiry: 2h\n"), 0o600)
	cfg := defaultServeConfig()
	if err := loadServeConfig(file, &cfg); err != nil {
		t.Fatal(err)
	}
	if !cfg.AdmitWhenRegistryDown || cfg.MaxIntermediates != 3 || cfg.MaxQueuedMessages != 100 || cfg.MaxMessageExpiry != 48*time.Hour || cfg.MaxSessionExpiry != 2*time.Hour {
		t.Fatalf("settings not read: %+v", cfg)
	}
	if _, _, code := brokerCLI(t, "serve", "--max-queued-messages", "x"); code != 2 {
		t.Errorf("a bad --max-queued-messages: exit %d, want 2", code)
	}
}

// --pprof serves profiles on a loopback address only.
func TestServePprofLoopbackOnly(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:6060", ":6060", "192.0.2.1:6060", "127.0.0.1"} {
		if _, stderr, code := brokerCLI(t, "serve", "--data", t.TempDir(), "--pprof", addr); code != 2 || !strings.Contains(stderr, "loopback") {
			t.Errorf("--pprof %s: exit %d (%s), want 2 naming loopback", addr, code, stderr)
		}
	}
	hs, err := listenPprof("127.0.0.1:0", slog.New(slog.DiscardHandler), make(chan error, 1))
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Close()
	resp, err := http.Get("http://" + hs.Addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("goroutine profile: %s", resp.Status)
	}
}

// --log-format json writes every line as JSON, audit lines with their
// fields; per-connection lines only with --log-connections (or the config
// key log_connections). An unknown format is a usage error.
func TestServeLogs(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatal(errs)
	}
	// serveUntil runs serve with args until stop holds, then stops it and
	// returns its log.
	serveUntil := func(t *testing.T, args []string, device string, stop func(logs string) bool) string {
		t.Helper()
		mqttAddr, estAddr := testtool.FreeAddr(t), testtool.FreeAddr(t)
		ctx, cancel := context.WithCancel(t.Context())
		logs := &syncBuffer{}
		served := make(chan int, 1)
		go func() {
			served <- run(ctx, append([]string{"serve", "--data", data, "--mqtt-addr", mqttAddr, "--est-addr", estAddr, "--metrics-addr", ""}, args...), io.Discard, logs)
		}()
		testtool.Eventually(t, 10*time.Second, "serve listening", func() bool { return strings.Contains(logs.String(), "EST listening") })
		tok, _, _ := brokerCLI(t, "token", "--data", data, "--device", device)
		cl, lost := enrollAndConnect(t, data, device, tok, estAddr, mqttAddr)
		if _, errs, code := brokerCLI(t, "revoke", "--data", data, "--device", device, "--reason", "lost"); code != 0 {
			t.Fatal(errs)
		}
		select {
		case <-lost:
		case <-time.After(5 * time.Second):
			t.Fatal("session still open 5s after broker revoke")
		}
		cl.Disconnect(0)
		testtool.Eventually(t, 5*time.Second, "log complete", func() bool { return stop(logs.String()) })
		cancel()
		select {
		case code := <-served:
			if code != 0 {
				t.Fatalf("serve exit %d\n%s", code, logs.String())
			}
		case <-time.After(15 * time.Second):
			t.Fatal("serve did not stop")
		}
		return logs.String()
	}

	t.Run("json", func(t *testing.T) {
		logs := serveUntil(t, []string{"--log-format", "json"}, "dev-json", func(logs string) bool { return strings.Contains(logs, `"event":"session closed"`) })
		var sawAudit, sawEnrolled bool
		for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
			var rec map[string]any
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Fatalf("not a JSON line: %v: %s", err, line)
			}
			switch rec["msg"] {
			case "connected", "disconnected":
				t.Errorf("per-connection line without --log-connections: %s", line)
			case "enrolled":
				sawEnrolled = rec["cn"] == "dev-json" && rec["level"] == "INFO"
			case "audit":
				for _, k := range []string{"event", "cn", "serial", "remote", "reason"} {
					if rec[k] == nil || rec[k] == "" {
						t.Errorf("audit line lacks %s: %s", k, line)
					}
				}
				sawAudit = sawAudit || (rec["event"] == "session closed" && rec["cn"] == "dev-json" && rec["level"] == "INFO")
			}
		}
		if !sawAudit || !sawEnrolled {
			t.Errorf("want the enrollment and the revocation's audit line at INFO; log:\n%s", logs)
		}
	})
	t.Run("text with connections from the config file", func(t *testing.T) {
		config := filepath.Join(t.TempDir(), "broker.yaml")
		os.WriteFile(config, []byte("log_format: text\nlog_connections: true\n"), 0o600)
		logs := serveUntil(t, []string{"--config", config}, "dev-text", func(logs string) bool { return strings.Contains(logs, "msg=disconnected") })
		for _, want := range []string{"msg=connected cn=dev-text", `msg=audit event="session closed" cn=dev-text serial=`} {
			if !strings.Contains(logs, want) {
				t.Errorf("log lacks %q:\n%s", want, logs)
			}
		}
	})
	t.Run("unknown format", func(t *testing.T) {
		if _, errs, code := brokerCLI(t, "serve", "--data", data, "--log-format", "xml"); code != 2 || !strings.Contains(errs, `"xml"`) {
			t.Errorf("--log-format xml: exit %d %q, want 2", code, errs)
		}
	})
}

// Every serve flag is a config key (and the config file supplies the
// flags' defaults), so a new flag cannot be silently dropped when
// --config is given.
func TestServeFlagsAreConfigKeys(t *testing.T) {
	keys := map[string]bool{}
	typ := reflect.TypeFor[serveConfig]()
	for i := range typ.NumField() {
		keys[strings.Split(typ.Field(i).Tag.Get("yaml"), ",")[0]] = true
	}
	cfg := defaultServeConfig()
	fs := cli.NewFlags("broker serve", io.Discard)
	serveFlags(fs, &cfg)
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		if key := strings.ReplaceAll(f.Name, "-", "_"); f.Name != "config" && !keys[key] {
			t.Errorf("flag --%s has no config key %q", f.Name, key)
		}
	})
	if n < 25 {
		t.Fatalf("only %d flags seen", n)
	}
	// a value from the file applies unless the flag is given
	file := filepath.Join(t.TempDir(), "broker.yaml")
	os.WriteFile(file, []byte("mqtt_addr: 127.0.0.1:1\nmax_packet_size: 1000\ncluster_peers: [a:1, b:2]\n"), 0o600)
	for _, tc := range []struct {
		args []string
		addr string
		size uint32
	}{
		{[]string{"--config", file}, "127.0.0.1:1", 1000},
		{[]string{"-config=" + file, "--mqtt-addr", "127.0.0.1:2", "--max-packet-size", "2000"}, "127.0.0.1:2", 2000},
	} {
		path, err := configArg(tc.args)
		if err != nil || path != file {
			t.Fatalf("configArg(%v) = %q, %v", tc.args, path, err)
		}
		cfg := defaultServeConfig()
		if err := loadServeConfig(path, &cfg); err != nil {
			t.Fatal(err)
		}
		fs := cli.NewFlags("broker serve", io.Discard)
		_, peers := serveFlags(fs, &cfg)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		if cfg.MQTTAddr != tc.addr || cfg.MaxPacketSize != tc.size || *peers != "a:1,b:2" {
			t.Errorf("%v: mqtt_addr %q max_packet_size %d peers %q", tc.args, cfg.MQTTAddr, cfg.MaxPacketSize, *peers)
		}
	}
}
