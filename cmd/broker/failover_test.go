package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/sim"
)

// serveCluster is three `broker serve` child processes (so one can be
// killed with SIGKILL) over one PostgreSQL registry; EST on n1.
type serveCluster struct {
	t      *testing.T
	bin    string
	args   [][]string
	mqtt   []string
	est    string
	data   string
	cmds   []*exec.Cmd
	logs   []string
	from   []int64 // where each node's log of its current run starts
	regArg []string
}

func startServeCluster(t *testing.T) *serveCluster {
	t.Helper()
	pg := pgtest.Start(t)
	c := &serveCluster{t: t, bin: filepath.Join(t.TempDir(), "broker"), regArg: []string{"--registry", pg.URL(pg.NewDatabase(t))}}
	if out, err := exec.Command("go", "build", "-o", c.bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	base := t.TempDir()
	data := []string{filepath.Join(base, "n1"), filepath.Join(base, "n2"), filepath.Join(base, "n3")}
	c.data = data[0]
	if _, errs, code := brokerCLI(t, append([]string{"init", "--data", data[0]}, c.regArg...)...); code != 0 {
		t.Fatal(errs)
	}
	for _, d := range data[1:] {
		if out, err := exec.Command(testtool.Require(t, "cp"), "-a", data[0], d).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v %s", err, out)
		}
	}
	pol := filepath.Join(base, "policy.yaml")
	os.WriteFile(pol, []byte(policy.Example), 0o600)
	routes := []string{testtool.FreeAddrAside(t), testtool.FreeAddrAside(t), testtool.FreeAddrAside(t)}
	c.mqtt = []string{testtool.FreeAddr(t), testtool.FreeAddr(t), testtool.FreeAddr(t)}
	c.est = testtool.FreeAddr(t)
	for i := range 3 {
		var peers []string
		for j, r := range routes {
			if j != i {
				peers = append(peers, r)
			}
		}
		est := ""
		if i == 0 {
			est = c.est
		}
		c.args = append(c.args, append([]string{"serve", "--data", data[i], "--mqtt-addr", c.mqtt[i], "--est-addr", est, "--metrics-addr", "",
			"--policy", pol, "--log-level", "info", "--node-name", fmt.Sprintf("n%d", i+1), "--cluster-listen", routes[i],
			"--cluster-peers", strings.Join(peers, ",")}, c.regArg...))
		c.logs = append(c.logs, filepath.Join(base, fmt.Sprintf("n%d.log", i+1)))
	}
	c.cmds, c.from = make([]*exec.Cmd, 3), make([]int64, 3)
	for i := range 3 {
		c.start(i)
	}
	t.Cleanup(func() {
		for i, cmd := range c.cmds {
			if cmd != nil && cmd.ProcessState == nil {
				cmd.Process.Signal(syscall.SIGTERM)
				cmd.Wait()
			}
			if t.Failed() {
				log, _ := os.ReadFile(c.logs[i])
				var keep []string
				for line := range strings.Lines(string(log)) {
					if !strings.Contains(line, "to connect to route") && !strings.Contains(line, "handshake failed") {
						keep = append(keep, line)
					}
				}
				t.Logf("node n%d log (tail):\n%s", i+1, tail(strings.Join(keep, ""), 6000))
			}
		}
	})
	for i := range 3 {
		c.waitServing(i)
	}
	return c
}

func tail(s string, n int) string { return s[max(0, len(s)-n):] }

// start runs node i (again), its log appended to its file.
func (c *serveCluster) start(i int) {
	f, err := os.OpenFile(c.logs[i], os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil {
		c.from[i] = fi.Size()
	}
	cmd := exec.Command(c.bin, c.args[i]...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	c.cmds[i] = cmd
}

// logged reports whether node i's current run logged s.
func (c *serveCluster) logged(i int, s string) bool {
	log, _ := os.ReadFile(c.logs[i])
	return strings.Contains(string(log[min(c.from[i], int64(len(log))):]), s)
}

// waitServing waits for node i's current run to serve MQTT (and EST on
// n1): after its cluster link is up.
func (c *serveCluster) waitServing(i int) {
	testtool.Eventually(c.t, 60*time.Second, fmt.Sprintf("n%d serving", i+1), func() bool {
		return c.logged(i, "MQTT listening") && (i != 0 || c.logged(i, "EST listening"))
	})
}

// kill ends node i with SIGKILL: no goodbye to its peers or clients.
func (c *serveCluster) kill(i int) {
	c.cmds[i].Process.Kill()
	c.cmds[i].Wait()
}

// identities enrolls n devices (IDs prefix-00001...) and the listed
// others (ID -> group) over EST on n1.
func (c *serveCluster) identities(prefix string, n int, others map[string]string) map[string]*device.Identity {
	t := c.t
	var tokens []sim.Token
	if n > 0 {
		out, errs, code := brokerCLI(t, append([]string{"token", "--data", c.data, "--count", fmt.Sprint(n), "--prefix", prefix}, c.regArg...)...)
		if code != 0 {
			t.Fatal(errs)
		}
		for line := range strings.Lines(out) {
			id, tok, _ := strings.Cut(strings.TrimSpace(line), " ")
			tokens = append(tokens, sim.Token{ID: id, Token: tok})
		}
	}
	for id, group := range others {
		args := []string{"token", "--data", c.data, "--device", id}
		if group != "" {
			args = append(args, "--group", group)
		}
		tok, errs, code := brokerCLI(t, append(args, c.regArg...)...)
		if code != 0 {
			t.Fatal(errs)
		}
		tokens = append(tokens, sim.Token{ID: id, Token: strings.TrimSpace(tok)})
	}
	root, err := ca.LoadRoot(c.data)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := sim.Enroll(t.Context(), sim.Config{EST: "https://" + c.est, Root: root, Tokens: tokens, Devices: len(tokens)})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]*device.Identity{}
	for _, id := range ids {
		if id == nil {
			t.Fatal("an enrollment failed")
		}
		m[id.Config.DeviceID] = id
	}
	return m
}

// mqttClient is a plain paho client (persistent session unless clean)
// that collects what it receives.
type mqttClient struct {
	paho.Client
	msgs chan string
}

func dialNode(t *testing.T, id *device.Identity, addr string, clean bool) *mqttClient {
	t.Helper()
	cert, err := id.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	c := &mqttClient{msgs: make(chan string, 1000)}
	c.Client = paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + addr).SetClientID(id.Config.DeviceID).
		SetTLSConfig(&tls.Config{RootCAs: id.RootPool(), Certificates: []tls.Certificate{cert}, ServerName: "127.0.0.1"}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(clean).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.msgs <- m.Topic() + " " + string(m.Payload()) }))
	if err := waitTok(c.Connect()); err != nil {
		t.Fatalf("connect %s to %s: %v", id.Config.DeviceID, addr, err)
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

func waitTok(tok paho.Token) error {
	if !tok.WaitTimeout(15 * time.Second) {
		return fmt.Errorf("MQTT operation timed out")
	}
	return tok.Error()
}

// Node failure: 300 devices (device SDK with the three nodes' URLs) over
// three `broker serve` nodes; n1 is killed with SIGKILL. Every device is
// back on n2 or n3 within 60 s; QoS 1 messages published during the
// outage to 30 offline persistent sessions are delivered once their
// clients return on another node: those on n2 and n3 by routing (n2 -> n3
// with n1's NATS gone) and handover, those on n1 through the survivor that
// stands in for n1; n1 restarted rejoins and routes again.
func TestClusterNodeFailure(t *testing.T) {
	c := startServeCluster(t)
	const devices, offline = 300, 30
	others := map[string]string{"ops-1": "backend"}
	ids := c.identities("fleet", devices, others)
	persist := c.identities("persist", offline, nil)
	urls := []string{"mqtts://" + c.mqtt[0], "mqtts://" + c.mqtt[1], "mqtts://" + c.mqtt[2]}

	// persistent sessions on each node that go offline
	var names []string
	home, back := map[string]int{}, map[string]int{}
	for id, ident := range persist {
		node := len(names) % 3
		back[id] = []int{1 + len(names)/3%2, 2, 1}[node] // where it returns: another survivor
		p := dialNode(t, ident, c.mqtt[node], false)
		if err := waitTok(p.Subscribe("devices/"+id+"/commands/#", 1, nil)); err != nil {
			t.Fatal(err)
		}
		p.Disconnect(100)
		names = append(names, id)
		home[id] = node
	}

	// the fleet, spread over the three nodes
	var clients []*device.Client
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	i := 0
	for id, ident := range ids {
		if others[id] != "" {
			continue
		}
		dc, err := device.New(device.Config{Brokers: urls, Identity: ident, ServerName: "127.0.0.1", DisableRenewal: true,
			MinBackoff: 500 * time.Millisecond, MaxBackoff: 5 * time.Second, ConnectTimeout: 10 * time.Second,
			LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(2+i%8))}}) // not 127.0.0.1: its ports stay free for listeners
		if err != nil {
			t.Fatal(err)
		}
		i++
		t.Cleanup(func() { dc.Close() })
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			if err := dc.Connect(ctx); err != nil {
				t.Errorf("connect: %v", err)
				return
			}
			mu.Lock()
			clients = append(clients, dc)
			mu.Unlock()
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	on := map[string]int{}
	for _, dc := range clients {
		on[dc.Broker()]++
	}
	t.Logf("devices per node before: n1 %d, n2 %d, n3 %d", on[c.mqtt[0]], on[c.mqtt[1]], on[c.mqtt[2]])
	if on[c.mqtt[0]] == 0 {
		t.Fatal("no device on n1: the failure would test nothing")
	}

	ops := dialNode(t, ids["ops-1"], c.mqtt[1], true) // the publisher, on n2
	killed := time.Now()
	c.kill(0)
	testtool.Eventually(t, 20*time.Second, "a survivor standing in for n1's persistent sessions", func() bool {
		return c.logged(1, "standing in for a failed node") || c.logged(2, "standing in for a failed node")
	})
	t.Logf("a survivor stands in for n1's sessions %v after the kill", time.Since(killed).Round(time.Millisecond))

	// during the outage: commands to the offline persistent sessions
	for _, id := range names {
		if err := waitTok(ops.Publish("devices/"+id+"/commands/reboot", 1, false, "during-outage")); err != nil {
			t.Fatalf("publish during the outage: %v", err)
		}
	}

	testtool.Eventually(t, 60*time.Second, "every device back on n2 or n3", func() bool {
		for _, dc := range clients {
			if dc.State() != device.StateConnected || dc.Broker() == c.mqtt[0] {
				return false
			}
		}
		return true
	})
	t.Logf("%d devices back on n2/n3 %v after n1 was killed", len(clients), time.Since(killed).Round(time.Millisecond))

	for _, id := range names { // each returns on another node: its session follows
		p := dialNode(t, persist[id], c.mqtt[back[id]], false)
		at := time.Now()
		select {
		case m := <-p.msgs:
			if m != "devices/"+id+"/commands/reboot during-outage" {
				t.Fatalf("%s received %q", id, m)
			}
			t.Logf("%s (session on n%d): its command %v after it connected to n%d", id, home[id]+1, time.Since(at).Round(time.Millisecond), back[id]+1)
		case <-time.After(30 * time.Second):
			t.Fatalf("%s (session on n%d, back on n%d) did not receive the command published during the outage", id, home[id]+1, back[id]+1)
		}
		p.Disconnect(0)
	}

	// n1 rejoins: a device on n1 reaches a subscriber on n3
	c.start(0)
	c.waitServing(0)
	sub := dialNode(t, persist[names[0]], c.mqtt[2], true)
	if err := waitTok(sub.Subscribe("devices/"+names[0]+"/#", 1, nil)); err != nil {
		t.Fatal(err)
	}
	pub := dialNode(t, ids["ops-1"], c.mqtt[0], true)
	testtool.Eventually(t, 30*time.Second, "n1 routes again after its restart", func() bool {
		waitTok(pub.Publish("devices/"+names[0]+"/commands/x", 1, false, "rejoined"))
		select {
		case <-sub.msgs:
			return true
		case <-time.After(200 * time.Millisecond):
			return false
		}
	})
}
