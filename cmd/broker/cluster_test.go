package main

import (
	"context"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// Three `broker serve` nodes with --cluster-listen/--cluster-peers and one
// PostgreSQL registry act as one broker: a revocation from the CLI closes
// a session on whichever node holds it, and a client ID taken over on
// another node is closed on the first.
func TestServeCluster(t *testing.T) {
	pg := pgtest.Start(t)
	regArgs := []string{"--registry", pg.URL(pg.NewDatabase(t))}
	base := t.TempDir()
	data := []string{filepath.Join(base, "n1"), filepath.Join(base, "n2"), filepath.Join(base, "n3")}
	if _, errs, code := brokerCLI(t, append([]string{"init", "--data", data[0]}, regArgs...)...); code != 0 {
		t.Fatal(errs)
	}
	for _, d := range data[1:] { // each node holds a copy of the PKI
		if out, err := exec.Command(testtool.Require(t, "cp"), "-a", data[0], d).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v %s", err, out)
		}
	}
	routes := []string{testtool.FreeAddrAside(t), testtool.FreeAddrAside(t), testtool.FreeAddrAside(t)}
	mqtt := []string{testtool.FreeAddr(t), testtool.FreeAddr(t), testtool.FreeAddr(t)}
	est := testtool.FreeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	logs := make([]*syncBuffer, 3)
	codes := make([]int, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		var peers []string
		for j, r := range routes {
			if j != i {
				peers = append(peers, r)
			}
		}
		estAddr := ""
		if i == 0 {
			estAddr = est
		}
		args := append([]string{"serve", "--data", data[i], "--mqtt-addr", mqtt[i], "--est-addr", estAddr, "--metrics-addr", "",
			"--node-name", fmt.Sprintf("n%d", i+1), "--cluster-listen", routes[i], "--cluster-peers", strings.Join(peers, ",")}, regArgs...)
		logs[i] = &syncBuffer{}
		wg.Go(func() { codes[i] = run(ctx, args, io.Discard, logs[i]) })
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		for i, c := range codes {
			if c != 0 {
				t.Errorf("node %d exit %d\n%s", i+1, c, logs[i].String())
			}
		}
	})
	for i := range 3 {
		testtool.Eventually(t, 90*time.Second, fmt.Sprintf("node %d serving", i+1), func() bool { return strings.Contains(logs[i].String(), "MQTT listening") })
	}
	token := func(id string) string {
		tok, errs, code := brokerCLI(t, append([]string{"token", "--data", data[0], "--device", id}, regArgs...)...)
		if code != 0 {
			t.Fatal(errs)
		}
		return tok
	}

	// takeover across nodes
	_, lostOn1 := enrollAndConnect(t, data[0], "dev-2", token("dev-2"), est, mqtt[0])
	start := time.Now()
	enrollAndConnect(t, data[0], "dev-2", token("dev-2"), est, mqtt[1])
	select {
	case <-lostOn1:
		t.Logf("session on n1 closed %v after the client connected to n2", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("session on n1 still open after its client ID went live on n2")
	}

	// revocation from the CLI reaches the node holding the session
	_, lost := enrollAndConnect(t, data[0], "dev-1", token("dev-1"), est, mqtt[2])
	start = time.Now()
	if out, errs, code := brokerCLI(t, append([]string{"revoke", "--data", data[0], "--device", "dev-1"}, regArgs...)...); code != 0 {
		t.Fatalf("revoke: %s %s", out, errs)
	}
	select {
	case <-lost:
		t.Logf("session on n3 closed %v after broker revoke returned", time.Since(start))
	case <-time.After(2 * time.Second):
		t.Fatal("revoked device still connected to n3 after 2s")
	}
}

// --nats joins an external NATS instead of running one: an unreachable
// NATS or both modes at once stop the start with a clear error.
func TestServeExternalNATSFlags(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if _, errs, code := brokerCLI(t, "init", "--data", data); code != 0 {
		t.Fatal(errs)
	}
	base := []string{"serve", "--data", data, "--mqtt-addr", testtool.FreeAddr(t), "--est-addr", "", "--metrics-addr", "", "--node-name", "n1"}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--nats", "nats://" + testtool.FreeAddr(t)}, 1, "cluster: connect to NATS"},
		{[]string{"--nats", "nats://s3cret-token@" + testtool.FreeAddr(t)}, 1, "cluster: connect to NATS nats://127.0.0.1:"},
		{[]string{"--nats", "nats://127.0.0.1:4222", "--cluster-listen", testtool.FreeAddr(t)}, 2, "not both"},
		{[]string{"--nats-creds", "x.creds", "--cluster-listen", testtool.FreeAddr(t)}, 2, "for an external NATS"},
		{[]string{"--nats", "http://127.0.0.1:4222"}, 2, "want nats://"},
		{[]string{"--nats", "tls://127.0.0.1:4222", "--nats-ca", filepath.Join(data, "nope.pem")}, 1, "--nats-ca"},
	} {
		_, errs, code := brokerCLI(t, append(base, tc.args...)...)
		if code != tc.code || !strings.Contains(errs, tc.want) {
			t.Errorf("serve %v: exit %d %q, want %d with %q", tc.args, code, errs, tc.code, tc.want)
		}
		if strings.Contains(errs, "s3cret") {
			t.Errorf("serve %v: the NATS credentials in the error: %q", tc.args, errs)
		}
	}
}
