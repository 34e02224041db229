package cluster_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/cluster"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// natsAuth is a NATS server's decentralized auth (operator, system
// account, one account with JetStream) and a user credentials file.
type natsAuth struct {
	operator *jwt.OperatorClaims
	resolver *server.MemAccResolver
	sys      string
	account  nkeys.KeyPair
}

func newNATSAuth(t *testing.T) *natsAuth {
	t.Helper()
	okp, _ := nkeys.CreateOperator()
	opub, _ := okp.PublicKey()
	a := &natsAuth{operator: jwt.NewOperatorClaims(opub), resolver: &server.MemAccResolver{}}
	skp, _ := nkeys.CreateAccount()
	a.sys, _ = skp.PublicKey()
	a.operator.SystemAccount = a.sys
	if _, err := a.operator.Encode(okp); err != nil {
		t.Fatal(err)
	}
	store := func(pub string, c *jwt.AccountClaims) {
		tok, err := c.Encode(okp)
		if err != nil {
			t.Fatal(err)
		}
		a.resolver.Store(pub, tok)
	}
	store(a.sys, jwt.NewAccountClaims(a.sys))
	a.account, _ = nkeys.CreateAccount()
	apub, _ := a.account.PublicKey()
	ac := jwt.NewAccountClaims(apub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	store(apub, ac)
	return a
}

// creds writes a credentials file for a new user of account signer.
func creds(t *testing.T, signer nkeys.KeyPair) string {
	t.Helper()
	ukp, _ := nkeys.CreateUser()
	upub, _ := ukp.PublicKey()
	tok, err := jwt.NewUserClaims(upub).Encode(signer)
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := ukp.Seed()
	b, err := jwt.FormatUserConfig(tok, seed)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "user.creds")
	if err := os.WriteFile(f, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// An external NATS (here a nats-server the test runs, with JetStream, TLS
// requiring a client certificate, and user credentials): two nodes joined
// to it with --nats act as one broker; wrong credentials or no client
// certificate are refused with an error that says so.
func TestClusterExternalNATS(t *testing.T) {
	env := brokertest.Start(t, nil)
	srvCert, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	auth := newNATSAuth(t)
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, NoSigs: true, JetStream: true,
		StoreDir: t.TempDir(), TrustedOperators: []*jwt.OperatorClaims{auth.operator}, AccountResolver: auth.resolver,
		SystemAccount: auth.sys,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientAuth: tls.RequireAndVerifyClientCert,
			ClientCAs: env.CA.Pool(), MinVersion: tls.VersionTLS12},
		TLSVerify: true, TLSTimeout: 5})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(ns.Shutdown)
	url := strings.Replace(ns.ClientURL(), "nats://", "tls://", 1)
	goodCreds := creds(t, auth.account)
	clientTLS := func(withCert bool) *tls.Config {
		var d *brokertest.Device
		if withCert {
			d = env.Device(t, "node-client", 0)
		}
		return env.TLS(t, d)
	}

	start := func(name, credsFile string, tlsCfg *tls.Config) (*node, error) {
		cn, err := cluster.New(cluster.Config{Name: name, NATS: []string{url}, NATSCreds: credsFile, NATSTLS: tlsCfg, ReadyTimeout: 20 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		pol, _ := policy.Parse([]byte(policy.Example))
		m := prometheus.NewRegistry()
		b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srvCert, Root: env.CA.Root, Registry: env.Registry,
			Metrics: m, Policy: pol, Cluster: cn})
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Start(); err != nil {
			return nil, err
		}
		t.Cleanup(func() { b.Close() })
		return &node{name: name, b: b, addr: b.Addr().String(), metrics: m}, nil
	}

	t.Run("wrong credentials are refused", func(t *testing.T) {
		stranger, _ := nkeys.CreateAccount() // an account the operator never signed
		_, err := start("bad", creds(t, stranger), clientTLS(true))
		if err == nil || !strings.Contains(err.Error(), "refused our credentials") {
			t.Fatalf("start with foreign credentials: %v", err)
		}
		t.Log(err)
	})
	t.Run("no client certificate is refused", func(t *testing.T) {
		_, err := start("nocert", goodCreds, clientTLS(false))
		if err == nil {
			t.Fatal("a node without a client certificate joined the NATS")
		}
		t.Log(err)
	})
	t.Run("two nodes route through the external NATS", func(t *testing.T) {
		var nodes [2]*node
		var errs [2]error
		var wg sync.WaitGroup
		for i := range nodes {
			wg.Go(func() { nodes[i], errs[i] = start(fmt.Sprintf("x%d", i+1), goodCreds, clientTLS(true)) })
		}
		wg.Wait()
		if err := errors.Join(errs[:]...); err != nil {
			t.Fatal(err)
		}
		sub := mustDial(t, env, nodes[1], env.Device(t, "backend-1", 0, "backend"))
		subscribe(t, sub, "devices/+/telemetry")
		pub := mustDial(t, env, nodes[0], env.Device(t, "dev-a", 0))
		publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")
	})
}

// NATS failure: the broker nodes use an external 3-server NATS cluster
// (JetStream, 3 replicas) and each knows every server's URL; one NATS
// server stops and routing, retained messages and takeovers go on over
// the other two.
func TestClusterNATSServerFailure(t *testing.T) {
	env := brokertest.Start(t, nil)
	srvCert, err := env.CA.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	const token = "nats-test-token"
	routes := []string{testtool.FreeAddrAside(t), testtool.FreeAddrAside(t), testtool.FreeAddrAside(t)}
	servers := make([]*server.Server, 3)
	var urls []string
	for i := range servers {
		host, port := splitAddr(t, routes[i])
		var rs []*url.URL
		for j, r := range routes {
			if j != i {
				rs = append(rs, &url.URL{Scheme: "nats", Host: r})
			}
		}
		s, err := server.NewServer(&server.Options{ServerName: fmt.Sprintf("nats%d", i+1), Host: "127.0.0.1", Port: server.RANDOM_PORT,
			Authorization: token, NoSigs: true, JetStream: true, StoreDir: t.TempDir(),
			Cluster: server.ClusterOpts{Name: "ext", Host: host, Port: port}, Routes: rs})
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		t.Cleanup(s.Shutdown)
		servers[i] = s
	}
	for _, s := range servers {
		if !s.ReadyForConnections(20 * time.Second) {
			t.Fatal("nats-server not ready")
		}
		u, _ := url.Parse(s.ClientURL())
		u.User = url.User(token)
		urls = append(urls, u.String())
	}
	var nodes [2]*node
	var errs [2]error
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() {
			cn, err := cluster.New(cluster.Config{Name: fmt.Sprintf("x%d", i+1), NATS: urls, Replicas: 3, ReadyTimeout: 60 * time.Second})
			if err != nil {
				errs[i] = err
				return
			}
			pol, _ := policy.Parse([]byte(policy.Example))
			b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srvCert, Root: env.CA.Root, Registry: env.Registry, Policy: pol, Cluster: cn})
			if err != nil {
				errs[i] = err
				return
			}
			if errs[i] = b.Start(); errs[i] == nil {
				t.Cleanup(func() { b.Close() })
				nodes[i] = &node{name: fmt.Sprintf("x%d", i+1), b: b, addr: b.Addr().String()}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	sub := mustDial(t, env, nodes[1], env.Device(t, "backend-1", 0, "backend"))
	subscribe(t, sub, "devices/+/telemetry")
	devA := env.Device(t, "dev-a", 0)
	pub := mustDial(t, env, nodes[0], devA)
	publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")

	servers[0].Shutdown() // one NATS server of three
	servers[0].WaitForShutdown()
	publishUntilRouted(t, pub, sub, "devices/dev-a/telemetry")
	if err := wait(t, pub.Publish("devices/dev-a/state", 1, true, "on")); err != nil {
		t.Fatal(err)
	}
	set := time.Now()
	defer func() { t.Logf("retained message on x2 %v after it was set", time.Since(set).Round(time.Millisecond)) }()
	// JetStream moves the bucket's leader and the watchers reconnect:
	// seconds, up to half a minute under load
	testtool.Eventually(t, 60*time.Second, "retained state on x2 after the NATS server stopped", func() bool {
		c := mustDial(t, env, nodes[1], devA)
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

func splitAddr(t *testing.T, addr string) (string, int) {
	t.Helper()
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return host, port
}
