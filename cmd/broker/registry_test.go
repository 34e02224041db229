package main

import (
	"context"
	"crypto/rand"
	"database/sql"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// initData runs broker init in a new directory and mints one token.
func initData(t *testing.T) string {
	t.Helper()
	data := filepath.Join(t.TempDir(), "data")
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatal(errs)
	}
	if _, errs, code := brokerCLI(t, "token", "--data", data, "--device", "dev-1"); code != 0 {
		t.Fatal(errs)
	}
	return data
}

// serveArgs are serve flags with free loopback addresses.
func serveArgs(t *testing.T, data string, extra ...string) []string {
	return append([]string{"serve", "--data", data, "--mqtt-addr", testtool.FreeAddr(t), "--est-addr", testtool.FreeAddr(t), "--metrics-addr", testtool.FreeAddr(t)}, extra...)
}

// Issue 9 item 5: serve refuses to start, exit 1 with the cause and the
// command that fixes it, on a registry that is missing, empty, damaged or
// another CA's. (On main each of these served, admitting revoked devices.)
func TestServeRefusesUntrustedRegistry(t *testing.T) {
	foreign := initData(t)
	cases := []struct {
		name   string
		damage func(t *testing.T, reg string)
		want   []string
	}{
		{"missing", func(t *testing.T, reg string) { os.Remove(reg) },
			[]string{"registry: missing", "does not exist", "fix:", "broker init --data", "--registry-only"}},
		{"empty", func(t *testing.T, reg string) { os.Truncate(reg, 0) },
			[]string{"registry: empty (0 bytes)", "fix:", "--registry-only"}},
		{"random page", func(t *testing.T, reg string) {
			junk := make([]byte, 4096)
			rand.Read(junk)
			f, err := os.OpenFile(reg, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(junk, 4096); err != nil { // page 2: a table's root
				t.Fatal(err)
			}
		}, []string{"registry: integrity check failed", "fix:", "backup"}},
		{"another init's", func(t *testing.T, reg string) {
			b, err := os.ReadFile(filepath.Join(foreign, RegistryFile))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(reg, b, 0o600)
		}, []string{"registry: belongs to another CA", "fix:"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data := initData(t)
			reg := filepath.Join(data, RegistryFile)
			tc.damage(t, reg)
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			var errs syncBuffer
			code := run(ctx, serveArgs(t, data), io.Discard, &errs)
			if code != 1 {
				t.Fatalf("serve exit %d, want 1\n%s", code, errs.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(errs.String(), w) {
					t.Errorf("serve error lacks %q:\n%s", w, errs.String())
				}
			}
			if tc.name == "missing" {
				if _, err := os.Stat(reg); err == nil {
					t.Error("serve created a registry")
				}
				// the other commands do not create one either
				for _, args := range [][]string{{"token", "--device", "x"}, {"devices"}, {"revoke", "--device", "x"}} {
					if _, _, code := brokerCLI(t, append(args, "--data", data)...); code != 1 {
						t.Errorf("broker %v on a missing registry: exit %d", args, code)
					}
				}
				if _, err := os.Stat(reg); err == nil {
					t.Errorf("a command created a registry")
				}
				// the command the error names fixes it
				if _, errs, code := brokerCLI(t, "init", "--data", data); code != 1 || !strings.Contains(errs, "--registry-only") {
					t.Errorf("init over an existing PKI without registry: %d %s", code, errs)
				}
				if out, errs, code := brokerCLI(t, "init", "--data", data, "--registry-only"); code != 0 || !strings.Contains(out, "created registry") {
					t.Fatalf("init --registry-only: %d %s", code, errs)
				}
				if _, errs, code := brokerCLI(t, "token", "--data", data, "--device", "x"); code != 0 {
					t.Fatalf("token on the re-created registry: %d %s", code, errs)
				}
			}
		})
	}
}

// Issue 9 item 6: a second serve on one data directory exits 1 naming the
// PID of the first.
func TestServeLock(t *testing.T) {
	data := initData(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs := &syncBuffer{}
	served := make(chan int, 1)
	go func() { served <- run(ctx, serveArgs(t, data), io.Discard, logs) }()
	testtool.Eventually(t, 10*time.Second, "first serve listening", func() bool { return strings.Contains(logs.String(), "metrics listening") })

	var errs syncBuffer
	if code := run(t.Context(), serveArgs(t, data), io.Discard, &errs); code != 1 {
		t.Fatalf("second serve exit %d, want 1\n%s", code, errs.String())
	}
	want := "in use by another broker serve (PID " + strconv.Itoa(os.Getpid()) + " holds"
	if !strings.Contains(errs.String(), want) {
		t.Fatalf("second serve error lacks %q:\n%s", want, errs.String())
	}
	cancel()
	if code := <-served; code != 0 {
		t.Fatalf("first serve exit %d\n%s", code, logs.String())
	}
	// released with the first: a new serve starts
	ctx2, cancel2 := context.WithCancel(t.Context())
	logs2 := &syncBuffer{}
	go func() { served <- run(ctx2, serveArgs(t, data), io.Discard, logs2) }()
	testtool.Eventually(t, 10*time.Second, "serve after the first stopped", func() bool { return strings.Contains(logs2.String(), "metrics listening") })
	cancel2()
	if code := <-served; code != 0 {
		t.Fatalf("serve exit %d\n%s", code, logs2.String())
	}
}

// Issue 10 item 1 at the CLI: no token for a revoked device without an
// explicit, audited --reinstate.
func TestTokenReinstate(t *testing.T) {
	data := initData(t)
	if _, errs, code := brokerCLI(t, "revoke", "--data", data, "--device", "dev-1"); code != 0 {
		t.Fatal(errs)
	}
	_, errs, code := brokerCLI(t, "token", "--data", data, "--device", "dev-1")
	if code != 1 || !strings.Contains(errs, "device revoked") || !strings.Contains(errs, "--reinstate") {
		t.Fatalf("token for a revoked device: %d %s", code, errs)
	}
	if tok, errs, code := brokerCLI(t, "token", "--data", data, "--device", "dev-1", "--reinstate", "--reason", "repaired"); code != 0 || len(strings.TrimSpace(tok)) != 43 {
		t.Fatalf("token --reinstate: %d %s", code, errs)
	}
	out, _, _ := brokerCLI(t, "devices", "--data", data)
	if !strings.Contains(out, "pending") {
		t.Fatalf("devices after reinstate:\n%s", out)
	}
}

// Revocation reaches a live session within 1 s, on both backends, when
// `broker revoke` runs while the device is connected.
func TestRevocationWithinOneSecond(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) {
		data := filepath.Join(t.TempDir(), "data")
		liveRevocation(t, data, nil)
	})
	t.Run("postgres", func(t *testing.T) {
		srv := pgtest.Start(t)
		pw := filepath.Join(t.TempDir(), "pgpass")
		os.WriteFile(pw, []byte(srv.Password+"\n"), 0o644)
		data := filepath.Join(t.TempDir(), "data")
		args := []string{"--registry", srv.URLNoPassword(srv.NewDatabase(t)), "--registry-password-file", pw}
		if _, errs, code := brokerCLI(t, append([]string{"init", "--data", data}, args...)...); code != 1 || !strings.Contains(errs, "chmod 600") {
			t.Fatalf("init with a world-readable password file: %d %s", code, errs)
		}
		os.Chmod(pw, 0o600)
		liveRevocation(t, data, args)
		if _, err := os.Stat(filepath.Join(data, RegistryFile)); err == nil {
			t.Error("a SQLite registry was created next to the PostgreSQL one")
		}
	})
}

func liveRevocation(t *testing.T, data string, regArgs []string) {
	_, errs, code := brokerCLI(t, append([]string{"init", "--data", data}, regArgs...)...)
	if code != 0 {
		t.Fatal(errs)
	}
	tok, errs, code := brokerCLI(t, append([]string{"token", "--data", data, "--device", "dev-1"}, regArgs...)...)
	if code != 0 {
		t.Fatal(errs)
	}
	mqttAddr, estAddr := testtool.FreeAddr(t), testtool.FreeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	logs := &syncBuffer{}
	served := make(chan int, 1)
	go func() {
		served <- run(ctx, append([]string{"serve", "--data", data, "--mqtt-addr", mqttAddr, "--est-addr", estAddr, "--metrics-addr", ""}, regArgs...), io.Discard, logs)
	}()
	testtool.Eventually(t, 10*time.Second, "serve listening", func() bool { return strings.Contains(logs.String(), "EST listening") })
	_, lost := enrollAndConnect(t, data, "dev-1", tok, estAddr, mqttAddr)
	start := time.Now()
	if out, errs, code := brokerCLI(t, append([]string{"revoke", "--data", data, "--device", "dev-1"}, regArgs...)...); code != 0 {
		t.Fatalf("revoke: %s %s", out, errs)
	}
	select {
	case <-lost:
		t.Logf("session closed %v after broker revoke returned", time.Since(start))
	case <-time.After(time.Second):
		t.Fatal("session still open 1s after broker revoke")
	}
	cancel()
	if code := <-served; code != 0 {
		t.Fatalf("serve exit %d\n%s", code, logs.String())
	}
}

// /readyz says 503 with the reason when the registry stops answering, and
// /healthz still says the process is up.
func TestReadyzPostgresDown(t *testing.T) {
	srv := pgtest.Start(t)
	data := filepath.Join(t.TempDir(), "data")
	regArgs := []string{"--registry", srv.URL(srv.NewDatabase(t))}
	if _, errs, code := brokerCLI(t, append([]string{"init", "--data", data}, regArgs...)...); code != 0 {
		t.Fatal(errs)
	}
	metricsAddr := testtool.FreeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	logs := &syncBuffer{}
	served := make(chan int, 1)
	go func() {
		served <- run(ctx, append([]string{"serve", "--data", data, "--mqtt-addr", testtool.FreeAddr(t), "--est-addr", testtool.FreeAddr(t), "--metrics-addr", metricsAddr}, regArgs...), io.Discard, logs)
	}()
	testtool.Eventually(t, 10*time.Second, "serve listening", func() bool { return strings.Contains(logs.String(), "metrics listening") })
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/readyz"); code != 200 {
		t.Fatalf("/readyz with PostgreSQL up: %d %s", code, body)
	}
	srv.Stop(t)
	if code, body := get("/readyz"); code != 503 || !strings.Contains(body, "registry unreachable") || strings.Contains(body, srv.Password) {
		t.Fatalf("/readyz with PostgreSQL down: %d %s", code, body)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz: %d", code)
	}
	cancel()
	<-served
	if strings.Contains(logs.String(), srv.Password) {
		t.Fatal("the serve log holds the database password")
	}
}

// A registry without a CA binding (an older release's) is refused by serve
// with the command that binds it, and serve starts after it.
func TestServeUnboundRegistry(t *testing.T) {
	data := initData(t)
	db, err := sql.Open("sqlite", filepath.Join(data, RegistryFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("DELETE FROM meta"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	var errs syncBuffer
	if code := run(t.Context(), serveArgs(t, data), io.Discard, &errs); code != 1 || !strings.Contains(errs.String(), "--bind-registry") {
		t.Fatalf("serve on an unbound registry: %d\n%s", code, errs.String())
	}
	if out, errs, code := brokerCLI(t, "init", "--data", data, "--bind-registry"); code != 0 || !strings.Contains(out, "bound to root CA") {
		t.Fatalf("init --bind-registry: %d %s", code, errs)
	}
	ctx, cancel := context.WithCancel(t.Context())
	logs := &syncBuffer{}
	served := make(chan int, 1)
	go func() { served <- run(ctx, serveArgs(t, data), io.Discard, logs) }()
	testtool.Eventually(t, 10*time.Second, "serve after binding", func() bool { return strings.Contains(logs.String(), "metrics listening") })
	cancel()
	if code := <-served; code != 0 {
		t.Fatalf("serve exit %d\n%s", code, logs.String())
	}
}

// The config file's registry key is honoured (and a flag overrides it).
func TestServeConfigRegistry(t *testing.T) {
	data := initData(t)
	other := filepath.Join(t.TempDir(), "elsewhere.db")
	configFile := filepath.Join(t.TempDir(), "broker.yaml")
	os.WriteFile(configFile, []byte("data: "+data+"\nregistry: sqlite:"+other+"\nmqtt_addr: "+testtool.FreeAddr(t)+"\nest_addr: \"\"\nmetrics_addr: \"\"\n"), 0o600)
	var errs syncBuffer
	if code := run(t.Context(), []string{"serve", "--config", configFile}, io.Discard, &errs); code != 1 || !strings.Contains(errs.String(), other+" does not exist") {
		t.Fatalf("serve with registry: sqlite:%s in the config: %d\n%s", other, code, errs.String())
	}
	ctx, cancel := context.WithCancel(t.Context())
	logs := &syncBuffer{}
	served := make(chan int, 1)
	go func() {
		served <- run(ctx, []string{"serve", "--config", configFile, "--registry", "sqlite:" + filepath.Join(data, RegistryFile)}, io.Discard, logs)
	}()
	testtool.Eventually(t, 10*time.Second, "serve with --registry overriding the config", func() bool { return strings.Contains(logs.String(), "MQTT listening") })
	cancel()
	if code := <-served; code != 0 {
		t.Fatalf("serve exit %d\n%s", code, logs.String())
	}
}

// The attestation CLI: token --attest takes required or optional only;
// ek release names a device without a binding; serve refuses a required
// default without --tpm-ca and an unusable --tpm-ca (fails closed).
func TestAttestCLI(t *testing.T) {
	data := initData(t)
	if _, errs, code := brokerCLI(t, "token", "--data", data, "--device", "dev-2", "--attest", "always"); code != 2 || !strings.Contains(errs, "want required or optional") {
		t.Fatalf("token --attest always: %d %s", code, errs)
	}
	if _, errs, code := brokerCLI(t, "token", "--data", data, "--device", "dev-2", "--attest", "required"); code != 0 {
		t.Fatalf("token --attest required: %d %s", code, errs)
	}
	if _, errs, code := brokerCLI(t, "ek", "release", "--data", data, "--device", "dev-2", "--reason", "test"); code != 1 || !strings.Contains(errs, "no endorsement key bound") {
		t.Fatalf("ek release without a binding: %d %s", code, errs)
	}
	if _, errs, code := brokerCLI(t, "ek", "release", "--data", data, "--device", "dev-2"); code != 2 || !strings.Contains(errs, "--reason") {
		t.Fatalf("ek release without a reason: %d %s", code, errs)
	}
	// Both refusals come before any listener: the MQTT address is taken,
	// so a serve that listened first would fail on it instead.
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	held := func(extra ...string) []string {
		return append([]string{"serve", "--data", data, "--mqtt-addr", busy.Addr().String(), "--est-addr", testtool.FreeAddr(t), "--metrics-addr", testtool.FreeAddr(t)}, extra...)
	}
	var errs strings.Builder
	if code := run(t.Context(), held("--attest", "required"), io.Discard, &errs); code != 1 || !strings.Contains(errs.String(), "--tpm-ca") {
		t.Fatalf("serve --attest required without --tpm-ca: %d %s", code, errs.String())
	}
	errs.Reset()
	empty := t.TempDir()
	if code := run(t.Context(), held("--tpm-ca", empty), io.Discard, &errs); code != 1 || !strings.Contains(errs.String(), "no TPM CA certificate") {
		t.Fatalf("serve --tpm-ca EMPTYDIR: %d %s", code, errs.String())
	}
	errs.Reset()
	if code := run(t.Context(), held("--tpm-ca", empty, "--attest", "always"), io.Discard, &errs); code == 0 || !strings.Contains(errs.String(), "want") {
		t.Fatalf("serve --attest always: %d %s", code, errs.String())
	}
}
