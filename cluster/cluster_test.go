package cluster_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/cluster"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// node is one broker of a test cluster.
type node struct {
	cluster *cluster.Node
	name    string
	b       *broker.Broker
	addr    string
	metrics *prometheus.Registry
}

// startCluster runs n broker nodes sharing env's PKI and registry, each
// with an embedded NATS server clustered with the others (mutual TLS with
// the broker certificate). Nodes start concurrently: JetStream needs a
// quorum. pol nil: policy.Example.
func startCluster(t testing.TB, env *brokertest.Env, n int, pol *policy.Policy) []*node {
	t.Helper()
	if pol == nil {
		var err error
		if pol, err = policy.Parse([]byte(policy.Example)); err != nil {
			t.Fatal(err)
		}
	}
	srvCert, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	routes := make([]string, n)
	for i := range routes {
		routes[i] = testtool.FreeAddrAside(t)
	}
	nodes := make([]*node, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		var peers []string
		for j, r := range routes {
			if j != i {
				peers = append(peers, r)
			}
		}
		name := fmt.Sprintf("n%d", i+1)
		cn, err := cluster.New(cluster.Config{Name: name, RouteAddr: routes[i], Peers: peers,
			StoreDir: filepath.Join(t.TempDir(), "js"), Certificate: srvCert, Root: env.CA.Root, ReadyTimeout: 90 * time.Second,
			Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)})
		if err != nil {
			t.Fatal(err)
		}
		m := prometheus.NewRegistry()
		b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srvCert, Root: env.CA.Root, Registry: env.Registry,
			RevocationPoll: 100 * time.Millisecond, Metrics: m, Policy: pol, Cluster: cn,
			Logger: slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", name)})
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = &node{name: name, b: b, metrics: m, cluster: cn}
		wg.Go(func() { errs[i] = b.Start() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i+1, err)
		}
		nodes[i].addr = nodes[i].b.Addr().String()
		t.Cleanup(func() { nodes[i].b.Close() })
	}
	return nodes
}

type client struct {
	paho.Client
	lost chan error
	msgs chan string
}

func dial(t testing.TB, env *brokertest.Env, n *node, d *brokertest.Device, clean bool) (*client, error) {
	t.Helper()
	return dialAs(t, env, n, d, d.ID, clean)
}

// dialAs connects d with client ID id.
func dialAs(t testing.TB, env *brokertest.Env, n *node, d *brokertest.Device, id string, clean bool) (*client, error) {
	t.Helper()
	c := &client{lost: make(chan error, 1), msgs: make(chan string, 20000)}
	o := paho.NewClientOptions().AddBroker("ssl://" + n.addr).SetClientID(id).SetTLSConfig(env.TLS(t, d)).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).SetCleanSession(clean).
		SetConnectionLostHandler(func(_ paho.Client, err error) { c.lost <- err }).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { c.msgs <- m.Topic() + " " + string(m.Payload()) })
	c.Client = paho.NewClient(o)
	if err := wait(t, c.Connect()); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c, nil
}

func mustDial(t testing.TB, env *brokertest.Env, n *node, d *brokertest.Device) *client {
	t.Helper()
	c, err := dial(t, env, n, d, true)
	if err != nil {
		t.Fatalf("connect %s to %s: %v", d.ID, n.name, err)
	}
	return c
}

func wait(t testing.TB, tok paho.Token) error {
	t.Helper()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-time.After(15 * time.Second):
		t.Fatal("MQTT operation timed out")
		return nil
	}
}

func subscribe(t testing.TB, c *client, filter string) {
	t.Helper()
	tok := c.Subscribe(filter, 1, nil)
	if err := wait(t, tok); err != nil || tok.(*paho.SubscribeToken).Result()[filter] != 1 {
		t.Fatalf("subscribe %s: %v %v", filter, err, tok.(*paho.SubscribeToken).Result())
	}
}

func expect(t testing.TB, c *client, want string) {
	t.Helper()
	select {
	case m := <-c.msgs:
		if m != want {
			t.Fatalf("received %q, want %q", m, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("did not receive %q", want)
	}
}

// A subscription made on one node reaches the others; expect tolerates
// the moment it takes to propagate by publishing until one arrives.
func publishUntilRouted(t testing.TB, pub, sub *client, topic string) {
	t.Helper()
	testtool.Eventually(t, 30*time.Second, "first message routed across nodes", func() bool {
		wait(t, pub.Publish(topic, 1, false, "probe"))
		select {
		case <-sub.msgs:
			return true
		case <-time.After(100 * time.Millisecond):
			return false
		}
	})
	// Probes still on their way would arrive after the caller's next
	// message (TestClusterCloseLeaksNothing saw one queued in a session):
	// a last one, routed in order behind them, marks the end.
	if err := wait(t, pub.Publish(topic, 1, false, "last probe")); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case m := <-sub.msgs:
			if m == topic+" last probe" {
				return
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("the last probe on %s was not routed", topic)
		}
	}
}

func metric(t testing.TB, n *node, name string) float64 { return brokertest.Metric(t, n.metrics, name) }

func TestCluster(t *testing.T) {
	env := brokertest.Start(t, nil) // the PKI and the shared registry
	nodes := startCluster(t, env, 3, nil)
	n1, n2, n3 := nodes[0], nodes[1], nodes[2]
	devA := env.Device(t, "dev-a", 0)
	be := env.Device(t, "backend-1", 0, "backend")

	t.Run("the embedded NATS refuses a client without the token", func(t *testing.T) {
		cn := n1.cluster
		for _, opts := range [][]nats.Option{nil, {nats.Token("guess")}} {
			nc, err := nats.Connect(cluster.ClientURL(cn), append(opts, nats.MaxReconnects(0))...)
			if err == nil {
				nc.Close()
				t.Fatal("connected to a node's NATS without its token")
			}
			if !errors.Is(err, nats.ErrAuthorization) {
				t.Fatalf("connect without the token: %v, want an authorization error", err)
			}
		}
	})

	t.Run("cross-node QoS 1, no loss, no duplicates", func(t *testing.T) {
		sub := mustDial(t, env, n3, be)
		subscribe(t, sub, "devices/+/telemetry")
		pub := mustDial(t, env, n1, devA)
		publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")
		const count = 10_000
		var toks []paho.Token
		for i := range count {
			toks = append(toks, pub.Publish("devices/dev-a/telemetry", 1, false, fmt.Sprint(i)))
		}
		for _, tok := range toks {
			if err := wait(t, tok); err != nil {
				t.Fatal(err)
			}
		}
		seen := map[string]int{}
		deadline := time.After(30 * time.Second)
		for len(seen) < count {
			select {
			case m := <-sub.msgs:
				seen[m]++
			case <-deadline:
				t.Fatalf("%d of %d messages crossed n1 -> n3", len(seen), count)
			}
		}
		select {
		case m := <-sub.msgs:
			seen[m]++
		case <-time.After(300 * time.Millisecond):
		}
		for m, n := range seen {
			if n > 1 {
				t.Fatalf("%q delivered %d times", m, n)
			}
		}
	})

	t.Run("a device on n1 cannot reach another device's topic on n2", func(t *testing.T) {
		devB := env.Device(t, "dev-b", 0)
		b := mustDial(t, env, n2, devB)
		subscribe(t, b, "devices/dev-b/#")
		backend := mustDial(t, env, n1, be)
		publishUntilRouted(t, backend, b, "devices/dev-b/commands/probe")
		a := mustDial(t, env, n1, devA)
		a.Publish("devices/dev-b/commands/evil", 0, false, "x") // denied on n1 (QoS 0: silently)
		wait(t, backend.Publish("devices/dev-b/commands/ok", 1, false, "fine"))
		expect(t, b, "devices/dev-b/commands/ok fine")
	})

	t.Run("retained set on n1, read on n2 and n3, cleared on n3", func(t *testing.T) {
		a := mustDial(t, env, n1, devA)
		if err := wait(t, a.Publish("devices/dev-a/state", 1, true, "on")); err != nil {
			t.Fatal(err)
		}
		for _, n := range []*node{n2, n3} {
			testtool.Eventually(t, 30*time.Second, "retained state on "+n.name, func() bool {
				c := mustDial(t, env, n, devA)
				defer c.Disconnect(0)
				c.Subscribe("devices/dev-a/state", 1, nil)
				select {
				case m := <-c.msgs:
					return m == "devices/dev-a/state on"
				case <-time.After(500 * time.Millisecond):
					return false
				}
			})
		}
		c3 := mustDial(t, env, n3, devA)
		wait(t, c3.Publish("devices/dev-a/state", 1, true, ""))
		c3.Disconnect(0)
		for _, n := range []*node{n1, n2} {
			testtool.Eventually(t, 30*time.Second, "retained state cleared on "+n.name, func() bool {
				c := mustDial(t, env, n, devA)
				defer c.Disconnect(0)
				c.Subscribe("devices/dev-a/state", 1, nil)
				select {
				case <-c.msgs:
					return false
				case <-time.After(300 * time.Millisecond):
					return true
				}
			})
		}
	})

	t.Run("takeover across nodes closes the old session within 1s; a clone is flagged", func(t *testing.T) {
		devC := env.Device(t, "dev-c", 0)
		old := mustDial(t, env, n1, devC)
		clones := metric(t, n1, "mqtls_certificate_clones_total")
		start := time.Now()
		mustDial(t, env, n2, devC)
		select {
		case <-old.lost:
			if d := time.Since(start); d > time.Second {
				t.Errorf("old session closed after %v, want <= 1s", d)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("session on n1 still open after the client took it over on n2")
		}
		if got := metric(t, n1, "mqtls_certificate_clones_total"); got != clones+1 {
			t.Errorf("clone across nodes counted %v, want %v", got, clones+1)
		}
	})

	t.Run("a persistent session's queued QoS 1 messages follow its client to another node", func(t *testing.T) {
		devP := env.Device(t, "dev-p", 0)
		p, err := dial(t, env, n1, devP, false)
		if err != nil {
			t.Fatal(err)
		}
		subscribe(t, p, "devices/dev-p/commands/#")
		backend := mustDial(t, env, n2, be)
		publishUntilRouted(t, backend, p, "devices/dev-p/commands/probe")
		p.Disconnect(100) // offline on n1, its session kept
		const count = 100
		for i := range count {
			if err := wait(t, backend.Publish("devices/dev-p/commands/c", 1, false, fmt.Sprint(i))); err != nil {
				t.Fatal(err)
			}
		}

		// a device with another certificate cannot take the client ID (and
		// so cannot make n1 hand the session over)
		thief := env.Device(t, "dev-thief", 0)
		tc := &client{lost: make(chan error, 1), msgs: make(chan string, 10)}
		tc.Client = paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + n2.addr).SetClientID("dev-p").SetTLSConfig(env.TLS(t, thief)).
			SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(false))
		if err := wait(t, tc.Connect()); err == nil {
			tc.Disconnect(0)
			t.Fatal("a device connected with another device's client ID")
		}

		p3, err := dial(t, env, n3, devP, false) // no SUBSCRIBE: the session brings it
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		deadline := time.After(20 * time.Second)
		for len(seen) < count {
			select {
			case m := <-p3.msgs:
				if strings.HasPrefix(m, "devices/dev-p/commands/c ") {
					seen[m] = true
				}
			case <-deadline:
				t.Fatalf("%d of %d queued messages reached the client on n3", len(seen), count)
			}
		}
		// the subscription came along: a new command reaches n3
		wait(t, backend.Publish("devices/dev-p/commands/after", 1, false, "x"))
		testtool.Eventually(t, 30*time.Second, "command after the move", func() bool {
			for {
				select {
				case m := <-p3.msgs:
					if m == "devices/dev-p/commands/after x" {
						return true
					}
				default:
					return false
				}
			}
		})
	})

	t.Run("revocation closes a session on any node within 2s and is refused everywhere", func(t *testing.T) {
		devD := env.Device(t, "dev-d", 0)
		c := mustDial(t, env, n3, devD)
		start := time.Now()
		if _, err := env.Registry.Revoke(t.Context(), "dev-d", "stolen"); err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.lost:
			t.Logf("closed %v after the revocation", time.Since(start))
		case <-time.After(2 * time.Second):
			t.Fatal("revoked device still connected on n3 after 2s")
		}
		for _, n := range nodes { // each node within its registry poll (100 ms); a TLS dial under -race load takes seconds
			testtool.Eventually(t, 10*time.Second, n.name+" refuses the revoked device", func() bool {
				c, err := dial(t, env, n, devD, true)
				if err == nil {
					c.Disconnect(0)
				}
				return err != nil && strings.Contains(err.Error(), "not Authorized")
			})
		}
	})
}

// Nodes accept only peers with a broker certificate of the same root: a
// node with another CA's certificate never joins (it cannot reach its
// JetStream quorum and its start fails), the two genuine ones route.
func TestClusterRefusesForeignNode(t *testing.T) {
	env := brokertest.Start(t, nil)
	other := brokertest.Start(t, nil) // another CA
	srv, _ := env.CA.ServerCertificate()
	foreign, _ := other.CA.ServerCertificate()
	routes := []string{testtool.FreeAddrAside(t), testtool.FreeAddrAside(t), testtool.FreeAddrAside(t)}
	certs := []tls.Certificate{srv, srv, foreign}
	readyTimeout := []time.Duration{90 * time.Second, 90 * time.Second, 10 * time.Second} // the foreign one is expected to fail
	brokers := make([]*broker.Broker, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range 3 {
		var peers []string
		for j, r := range routes {
			if j != i {
				peers = append(peers, r)
			}
		}
		cn, err := cluster.New(cluster.Config{Name: fmt.Sprintf("n%d", i+1), RouteAddr: routes[i], Peers: peers, StoreDir: t.TempDir(),
			Certificate: certs[i], Root: env.CA.Root, Replicas: 1, ReadyTimeout: readyTimeout[i]})
		if err != nil {
			t.Fatal(err)
		}
		pol, _ := policy.Parse([]byte(policy.Example))
		br, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srv, Root: env.CA.Root, Cluster: cn, Policy: pol})
		if err != nil {
			t.Fatal(err)
		}
		brokers[i] = br
		t.Cleanup(func() { br.Close() })
		wg.Go(func() { errs[i] = br.Start() })
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatalf("genuine nodes: %v, %v", errs[0], errs[1])
	}
	if errs[2] == nil {
		t.Fatal("a node with another CA's certificate joined the cluster")
	}
	t.Logf("foreign node: %v", errs[2])
	sub := mustDial(t, env, &node{name: "n2", addr: brokers[1].Addr().String()}, env.Device(t, "backend-1", 0, "backend"))
	subscribe(t, sub, "devices/+/telemetry")
	pub := mustDial(t, env, &node{name: "n1", addr: brokers[0].Addr().String()}, env.Device(t, "dev-a", 0))
	publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")
}

// Client-ID patterns let two identities share a client ID namespace
// (device "plant" may use "plant-1", device plant-1's own ID). On one node
// the broker refuses such a CONNECT while plant-1 holds a session; across
// nodes the claim must be refused too: no kicking plant-1 off n1, no
// handover of its session to the other identity.
func TestClusterCrossIdentityTakeover(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: own-namespace
    match: {cn: "*"}
    client_ids: ["{cn}", "{cn}-*"]
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#", "devices/plant-1/status"]
`))
	if err != nil {
		t.Fatal(err)
	}
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 2, pol)
	n1, n2 := nodes[0], nodes[1]
	victim := env.Device(t, "plant-1", 0)
	v, err := dial(t, env, n1, victim, false)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, v, "devices/plant-1/status")
	testtool.Eventually(t, 20*time.Second, "plant-1's claim seen on n2", func() bool {
		return n2.cluster.Holder("plant-1") == "plant-1"
	})

	attacker := env.Device(t, "plant", 0)
	if c, err := dialAs(t, env, n2, attacker, "plant-1", false); err == nil {
		c.Disconnect(0)
		t.Error("device plant connected on n2 with the client ID of device plant-1's session on n1")
	}
	select {
	case err := <-v.lost:
		t.Fatalf("plant-1 kicked off n1 by another identity's claim: %v", err)
	case <-time.After(2 * time.Second):
	}
}

// A session that ends removes its claim from mqtls_sessions (the bucket
// does not grow with every client ID ever seen) and its record from
// mqtls_persistent, and frees the client ID for the other identities its
// patterns allow.
func TestClusterClaimEndsWithSession(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: own-namespace
    match: {cn: "*"}
    client_ids: ["{cn}", "{cn}-*"]
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 2, pol)
	n1, n2 := nodes[0], nodes[1]
	c := mustDial(t, env, n1, env.Device(t, "plant-2", 0))
	testtool.Eventually(t, 20*time.Second, "plant-2's claim seen on n2", func() bool {
		return n2.cluster.Holder("plant-2") == "plant-2"
	})
	c.Disconnect(100)
	// a persistent session's record goes with it: here it ends as its
	// client comes back with a clean session and leaves
	devP := env.Device(t, "plant-3", 0)
	p, err := dial(t, env, n1, devP, false)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, p, "devices/plant-3/#")
	testtool.Eventually(t, 20*time.Second, "plant-3's session recorded on n2", func() bool { return cluster.Recorded(n2.cluster, "plant-3") })
	p.Disconnect(100)
	p, err = dial(t, env, n1, devP, true)
	if err != nil {
		t.Fatal(err)
	}
	p.Disconnect(100)
	testtool.Eventually(t, 20*time.Second, "plant-3's record gone once its session ended", func() bool { return !cluster.Recorded(n2.cluster, "plant-3") })
	testtool.Eventually(t, 20*time.Second, "plant-2's claim gone once its session ended", func() bool {
		return n2.cluster.Holder("plant-2") == "" && cluster.Claims(t, n1.cluster) == 0
	})
	if _, err := dialAs(t, env, n2, env.Device(t, "plant", 0), "plant-2", true); err != nil {
		t.Fatalf("client ID of an ended session still refused to another identity: %v", err)
	}
}

// A persistent session whose queued messages together exceed NATS's
// maximum payload (1 MiB) still follows its client: eight messages of
// 200 KB (each within the broker's packet size) queued on n1 reach it on
// n2.
func TestClusterLargeSessionFollowsClient(t *testing.T) {
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 2, nil)
	n1, n2 := nodes[0], nodes[1]
	devP := env.Device(t, "dev-big", 0)
	p, err := dial(t, env, n1, devP, false)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, p, "devices/dev-big/commands/#")
	backend := mustDial(t, env, n1, env.Device(t, "backend-1", 0, "backend"))
	p.Disconnect(100)
	const count = 8
	payload := strings.Repeat("x", 200_000)
	for i := range count {
		if err := wait(t, backend.Publish("devices/dev-big/commands/c", 1, false, fmt.Sprint(i, payload))); err != nil {
			t.Fatal(err)
		}
	}
	p2, err := dial(t, env, n2, devP, false)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	deadline := time.After(30 * time.Second)
	for len(seen) < count {
		select {
		case m := <-p2.msgs:
			seen[m[:len("devices/dev-big/commands/c 0")]] = true
		case <-deadline:
			t.Fatalf("%d of %d queued messages reached the client on n2", len(seen), count)
		}
	}
}

// MQTT topics may be 65,535 bytes long and every level byte but
// [A-Za-z0-9-] takes three in a subject: a device's long topic or filter
// (within its own namespace) must not cost the node its NATS connection
// (a NATS server closes a connection whose protocol line exceeds 4 KiB,
// and a client replays its subscriptions at each reconnect).
func TestClusterLongTopics(t *testing.T) {
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 2, nil)
	n1, n2 := nodes[0], nodes[1]
	devA := env.Device(t, "dev-a", 0)
	be := env.Device(t, "backend-1", 0, "backend")
	sub := mustDial(t, env, n1, be)
	subscribe(t, sub, "devices/+/telemetry")
	pub := mustDial(t, env, n2, devA)
	publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")

	long := "devices/dev-b/" + strings.Repeat(".", 5000)
	a := mustDial(t, env, n1, env.Device(t, "dev-b", 0))
	tok := a.Subscribe(long+"/#", 1, nil)
	if err := wait(t, tok); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, a.Publish(long, 1, false, "x")); err != nil {
		t.Fatal(err)
	}
	// routing goes on, both ways
	const count = 50
	for i := range count {
		if err := wait(t, pub.Publish("devices/dev-a/telemetry", 1, false, fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := range count {
		expect(t, sub, fmt.Sprint("devices/dev-a/telemetry ", i))
	}
}

// Closing the nodes ends every goroutine the cluster started (routing,
// watchers, stand-in pings, handovers) and the embedded NATS servers'.
func TestClusterCloseLeaksNothing(t *testing.T) {
	env := brokertest.Start(t, nil) // no NATS: its goroutines may stay
	t.Run("cluster", func(t *testing.T) {
		nodes := startCluster(t, env, 2, nil)
		n1, n2 := nodes[0], nodes[1]
		devP := env.Device(t, "dev-p", 0)
		p, err := dial(t, env, n1, devP, false)
		if err != nil {
			t.Fatal(err)
		}
		subscribe(t, p, "devices/dev-p/commands/#")
		backend := mustDial(t, env, n2, env.Device(t, "backend-1", 0, "backend"))
		publishUntilRouted(t, backend, p, "devices/dev-p/commands/probe")
		p.Disconnect(100)
		if err := wait(t, backend.Publish("devices/dev-p/commands/c", 1, false, "queued")); err != nil {
			t.Fatal(err)
		}
		p2, err := dial(t, env, n2, devP, false) // the session moves n1 -> n2
		if err != nil {
			t.Fatal(err)
		}
		expect(t, p2, "devices/dev-p/commands/c queued")
	})
	var left []string
	if !testtool.Poll(20*time.Second, func() bool { left = clusterGoroutines(); return len(left) == 0 }) {
		t.Fatalf("%d cluster or NATS goroutines left after Close:\n%s", len(left), strings.Join(left, "\n\n"))
	}
}

// A node whose route address is taken fails at once (nats-server only
// logs it and would run isolated until ReadyTimeout).
func TestClusterRouteAddrInUse(t *testing.T) {
	env := brokertest.Start(t, nil)
	busy, err := net.Listen("tcp", testtool.FreeAddrAside(t))
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	srv, _ := env.CA.ServerCertificate()
	cn, err := cluster.New(cluster.Config{Name: "n1", RouteAddr: busy.Addr().String(), Peers: []string{testtool.FreeAddrAside(t)},
		StoreDir: t.TempDir(), Certificate: srv, Root: env.CA.Root, ReadyTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srv, Root: env.CA.Root, Registry: env.Registry, Cluster: cn})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = b.Start()
	if err == nil {
		b.Close()
		t.Fatal("node started without its route listener")
	}
	if !strings.Contains(err.Error(), busy.Addr().String()) || time.Since(start) > 30*time.Second {
		t.Fatalf("start: %v after %v, want a quick error naming %s", err, time.Since(start), busy.Addr())
	}
}

// clusterGoroutines lists the goroutines running cluster or NATS code.
func clusterGoroutines() []string {
	buf := make([]byte, 4<<20)
	var out []string
	for g := range strings.SplitSeq(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "nats-io/") || strings.Contains(g, "mqtls/cluster.") {
			out = append(out, g)
		}
	}
	return out
}

// A survivor standing in for a failed node's persistent session keeps at
// most MaxQueued messages (1024 by default), and no more bookkeeping than that, however
// many are published to the session's filters while it waits (up to
// 24 h).
func TestClusterStandInBounded(t *testing.T) {
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 3, nil)
	n1, n3 := nodes[0], nodes[2]
	devS := env.Device(t, "dev-s", 0)
	s, err := dial(t, env, n3, devS, false)
	if err != nil {
		t.Fatal(err)
	}
	subscribe(t, s, "devices/dev-s/commands/#")
	s.Disconnect(100)
	testtool.Eventually(t, 30*time.Second, "dev-s's session recorded on n1", func() bool { return cluster.Recorded(n1.cluster, "dev-s") })
	n3.b.Close() // n3 "fails": its records stay
	testtool.Eventually(t, 30*time.Second, "n1 standing in for dev-s", func() bool {
		_, _, _, ok := cluster.StandIn(n1.cluster, "dev-s")
		return ok
	})
	backend := mustDial(t, env, n1, env.Device(t, "backend-1", 0, "backend"))
	const count = 1200
	for i := range count {
		if err := wait(t, backend.Publish("devices/dev-s/commands/c", 1, false, fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	testtool.Eventually(t, 30*time.Second, "every message queued or dropped by the stand-in", func() bool {
		q, d, _, _ := cluster.StandIn(n1.cluster, "dev-s")
		return q+d == count
	})
	if q, _, seen, _ := cluster.StandIn(n1.cluster, "dev-s"); q != 1024 || seen > q {
		t.Fatalf("stand-in holds %d messages and remembers %d, want 1024 and at most 1024", q, seen)
	}
}

// Publishers on one node publish concurrently: every message reaches a
// subscriber on another node (the receiving node tells duplicates from
// overlapping subscriptions by the origin's sequence numbers, which must
// then go out in order).
func TestClusterConcurrentPublishers(t *testing.T) {
	env := brokertest.Start(t, nil)
	nodes := startCluster(t, env, 2, nil)
	n1, n2 := nodes[0], nodes[1]
	sub := mustDial(t, env, n2, env.Device(t, "backend-1", 0, "backend"))
	subscribe(t, sub, "devices/+/telemetry")
	const pubs, count = 8, 300
	clients := make([]*client, pubs)
	for i := range clients {
		clients[i] = mustDial(t, env, n1, env.Device(t, fmt.Sprintf("dev-%d", i), 0))
	}
	publishUntilRouted(t, clients[0], sub, "devices/dev-0/telemetry")
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			for j := range count {
				tok := c.Publish(fmt.Sprintf("devices/dev-%d/telemetry", i), 1, false, fmt.Sprint(j))
				select { // not wait: no t.Fatal off the test's goroutine
				case <-tok.Done():
					if err := tok.Error(); err != nil {
						t.Error(err)
						return
					}
				case <-time.After(15 * time.Second):
					t.Error("publish timed out")
					return
				}
			}
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	deadline := time.After(30 * time.Second)
	for len(seen) < pubs*count {
		select {
		case m := <-sub.msgs:
			seen[m] = true
		case <-deadline:
			t.Fatalf("%d of %d messages from %d concurrent publishers crossed n1 -> n2", len(seen), pubs*count, pubs)
		}
	}
}
