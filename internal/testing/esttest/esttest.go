// Package esttest runs a real EST server (CA, SQLite registry, HTTPS on
// loopback) for tests.
package esttest

import (
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/server"
)

// Env is a running EST server over a fresh data directory.
type Env struct {
	Dir      string // data directory (ca/, tls/, registry.db)
	CA       *ca.CA
	Registry registry.Registry
	Server   *server.Server
	URL      string // https://127.0.0.1:PORT
}

// Start initialises a PKI in a temporary directory and serves EST on a
// loopback port until the test ends. tweak may adjust the server config
// (and put another CA or registry in place: Env reports the ones served).
func Start(t testing.TB, tweak func(*server.Config)) *Env {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		t.Fatal(err)
	}
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.CreateSQLite(t.Context(), filepath.Join(dir, "registry.db"), ca.Fingerprint(c.Root))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	cfg := server.Config{CA: c, Registry: reg}
	if tweak != nil {
		tweak(&cfg) // may put another registry in place
	}
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := srv.TLSConfig()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: srv.Handler(), TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: log.New(io.Discard, "", 0)} // handshake failures are what negative tests cause
	done := make(chan error, 1)
	go func() { done <- hs.Serve(tls.NewListener(ln, tlsCfg)) }()
	t.Cleanup(func() {
		hs.Close()
		if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("EST server: %v", err)
		}
	})
	return &Env{Dir: dir, CA: cfg.CA, Registry: cfg.Registry, Server: srv, URL: "https://" + ln.Addr().String()}
}

// Token mints an enrollment token for id.
func (e *Env) Token(t testing.TB, id, group string, ttl time.Duration) string {
	t.Helper()
	tok, err := e.Registry.CreateToken(t.Context(), id, group, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Events returns the whole audit trail.
func (e *Env) Events(t testing.TB) []registry.Event {
	t.Helper()
	ev, _, err := e.Registry.Events(t.Context(), 0, 100000)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}
