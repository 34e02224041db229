// Package cluster makes several broker nodes act as one broker over NATS:
// each node runs an embedded NATS server clustered with its peers (mutual
// TLS with the fleet's broker certificates) or joins an external NATS
// cluster, routes its clients' messages to the nodes with matching
// subscribers, keeps retained messages in a JetStream key-value bucket
// every node mirrors, and owns a client ID only while it holds its session
// (a newer claim on another node closes it and hands a persistent session,
// subscriptions and queued messages, over to the new node).
//
// # Experimental
//
// Cross-node delivery is at most once while NATS itself is partitioned
// (core NATS, not a JetStream stream); when a node dies, what it had
// queued for its persistent sessions dies with it (a survivor stands in
// for them from then on: standin.go).
package cluster

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mqtls/mqtls/broker"
)

// Config configures a Node.
type Config struct {
	// Name identifies the node in the cluster (required, unique).
	Name string
	// RouteAddr is where this node's embedded NATS server listens for its
	// peers, HOST:PORT (required).
	RouteAddr string
	// Peers are the other nodes' RouteAddr.
	Peers []string
	// StoreDir holds this node's JetStream data (required).
	StoreDir string
	// Certificate is this node's broker certificate (EKU serverAuth) and
	// Root the fleet's root: nodes accept only peers whose certificate
	// chains to Root with EKU serverAuth, in both directions.
	Certificate tls.Certificate
	Root        *x509.Certificate
	// NATS, instead of RouteAddr and Peers: the URLs of an existing NATS
	// cluster (with JetStream) to join; no NATS server runs here. Every
	// node of the broker cluster must use the same NATS cluster.
	NATS []string
	// NATSCreds is a NATS credentials file (user JWT and seed, as nsc
	// writes it) and NATSTLS the TLS client config (with a client
	// certificate for mutual TLS) for an external NATS.
	NATSCreds string
	NATSTLS   *tls.Config
	// Replicas of the JetStream buckets (default: 3, or the node count if
	// smaller; 1 with an external NATS).
	Replicas int
	// ReadyTimeout bounds the wait for the NATS cluster and JetStream
	// (default 1m).
	ReadyTimeout time.Duration
	// MaxQueued bounds the QoS 1/2 messages a survivor keeps for each
	// failed node's persistent session it stands in for: the brokers'
	// MaxQueuedMessages (default 1024, the broker's default).
	MaxQueued int
	// Logger (default: discard).
	Logger *slog.Logger
}

// Node is one broker's membership in the cluster. Create it with New,
// pass it as broker.Config.Cluster; the broker starts it.
type Node struct {
	cfg Config
	log *slog.Logger
	id  string // name + boot nonce: tells this run's messages apart
	srv *server.Server
	nc  *nats.Conn // NoEcho: our own messages do not come back
	sc  *nats.Conn // for stand-in subscriptions, which want them too (made at the first)
	// connect opens a connection to our NATS
	connect func(...nats.Option) (*nats.Conn, error)
	kvR     jetstream.KeyValue // retained messages
	kvS     jetstream.KeyValue // session claims
	kvP     jetstream.KeyValue // persistent sessions' subscriptions
	node    broker.Node

	msgs     chan *nats.Msg
	retains  chan broker.Message
	claims   chan claim
	persists chan persistOp
	stop     chan struct{}
	ctx      context.Context // ends at Close: bounds requests to other nodes
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	pubMu sync.Mutex
	seq   uint64 // our messages' sequence number (pubMu)

	mu     sync.Mutex
	subs   map[string]*interest // filter -> local interest
	byID   map[string][]string  // client ID -> filters
	last   map[string]uint64    // origin -> last sequence delivered (duplicates from overlapping subscriptions)
	claimT map[string]int64     // client ID -> when this node's session for it went live (unix ns)

	records map[string]record // client ID -> persistent session record (every node's)
	// holders: client ID -> the claim in bucketSess (own lock: the broker
	// asks under its own)
	hmu      sync.Mutex
	holders  map[string]holder
	dead     map[string]bool     // node IDs found failed
	standIns map[string]*standIn // client ID -> failed node's session queued here
}

type interest struct {
	clients map[string]bool
	subs    []*nats.Subscription
}

type claim struct {
	clientID, serial, cn string
	at                   int64 // unix ns the session went live
	forget               bool  // the session ended here: our claim goes
}

// holder is a claim as seen in bucketSess.
type holder struct{ owner, cn string }

const (
	msgPrefix   = "mqtls.m."
	sessPrefix  = "mqtls.s." // + node ID: sessions handed over to that node
	hdrOrigin   = "Mqtls-Origin"
	hdrSeq      = "Mqtls-Seq"
	hdrQoS      = "Mqtls-Qos"
	hdrRetain   = "Mqtls-Retain"
	bucketRet   = "mqtls_retained"
	bucketSess  = "mqtls_sessions"
	clusterName = "mqtls"
	// maxSubject bounds the subjects a topic or filter maps to: a NATS
	// server closes a connection that sends a protocol line over 4 KiB
	// (its max_control_line; the line holds the subject, a reply subject
	// and sizes), and a client replays its subscriptions at each reconnect.
	// Longer topics stay on their node.
	maxSubject = 3 << 10
)

// New validates cfg. Nothing runs until the broker calls Start.
func New(cfg Config) (*Node, error) {
	if cfg.MaxQueued <= 0 {
		cfg.MaxQueued = 1024
	}
	switch {
	case cfg.Name == "" || strings.ContainsAny(cfg.Name, " \t\n/.*>"):
		return nil, fmt.Errorf("cluster: node name %q: want a non-empty name without spaces, '/', '.', '*' or '>'", cfg.Name)
	case cfg.StoreDir == "" && len(cfg.NATS) == 0:
		return nil, errors.New("cluster: StoreDir is required")
	case len(cfg.NATS) > 0 && (cfg.RouteAddr != "" || len(cfg.Peers) > 0):
		return nil, errors.New("cluster: an external NATS (NATS) or an embedded one (RouteAddr, Peers), not both")
	case len(cfg.NATS) == 0 && (cfg.NATSCreds != "" || cfg.NATSTLS != nil):
		return nil, errors.New("cluster: NATS credentials and TLS are for an external NATS: NATS URLs are missing")
	case len(cfg.NATS) > 0:
		for _, u := range cfg.NATS {
			if pu, err := url.Parse(u); err != nil || (pu.Scheme != "nats" && pu.Scheme != "tls") || pu.Host == "" {
				return nil, fmt.Errorf("cluster: NATS URL %q: want nats://HOST:PORT or tls://HOST:PORT", u)
			}
		}
		if cfg.Replicas == 0 {
			cfg.Replicas = 1
		}
	case cfg.Root == nil || len(cfg.Certificate.Certificate) == 0:
		return nil, errors.New("cluster: the node's certificate and the root are required (nodes authenticate each other with mutual TLS)")
	}
	if _, _, err := net.SplitHostPort(cfg.RouteAddr); len(cfg.NATS) == 0 && err != nil {
		return nil, fmt.Errorf("cluster: route address %q: %w", cfg.RouteAddr, err)
	}
	for _, p := range cfg.Peers {
		if _, _, err := net.SplitHostPort(p); err != nil {
			return nil, fmt.Errorf("cluster: peer %q: %w", p, err)
		}
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = min(3, 1+len(cfg.Peers))
	}
	if cfg.ReadyTimeout == 0 {
		cfg.ReadyTimeout = time.Minute
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var nonce [4]byte
	rand.Read(nonce[:])
	ctx, cancel := context.WithCancel(context.Background())
	return &Node{ctx: ctx, cancel: cancel,
		cfg: cfg, log: log.With("node", cfg.Name), id: cfg.Name + "-" + hex.EncodeToString(nonce[:]),
		msgs: make(chan *nats.Msg, 65536), retains: make(chan broker.Message, 4096), claims: make(chan claim, 4096),
		stop: make(chan struct{}), subs: map[string]*interest{}, byID: map[string][]string{},
		last: map[string]uint64{}, claimT: map[string]int64{}, holders: map[string]holder{},
		persists: make(chan persistOp, 4096), records: map[string]record{}, dead: map[string]bool{}, standIns: map[string]*standIn{},
	}, nil
}

// routeTLS is the mutual TLS between nodes: a peer must present a
// certificate that chains to the root with EKU serverAuth (the brokers'
// certificates), whichever side dialled.
func (n *Node) routeTLS() *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(n.cfg.Root)
	verify := func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("cluster: peer sent no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, r := range raw {
			c, err := x509.ParseCertificate(r)
			if err != nil {
				return err
			}
			certs[i] = c
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		_, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		return err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{n.cfg.Certificate},
		MinVersion:   tls.VersionTLS13,
		// Peers are dialled by address; the chain is checked by verify
		// (server and client side alike), not by host name.
		ClientAuth:            tls.RequireAnyClientCert,
		InsecureSkipVerify:    true, //nolint:gosec // VerifyPeerCertificate verifies the chain
		VerifyPeerCertificate: verify,
	}
}

// Start runs the embedded NATS server and joins the peers (or connects to
// the external NATS), waits for JetStream and starts routing. The broker
// calls it once.
func (n *Node) Start(b broker.Node) error {
	n.node = b
	if len(n.cfg.NATS) > 0 {
		if err := n.connectExternal(); err != nil {
			return err
		}
	} else if err := n.startEmbedded(); err != nil {
		return err
	}
	n.nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		n.log.Error("NATS error", "err", err)
	})
	if err := n.buckets(); err != nil {
		n.shutdown()
		return err
	}
	if _, err := n.nc.Subscribe(sessPrefix+n.id, n.imported); err != nil {
		n.shutdown()
		return fmt.Errorf("cluster: %w", err)
	}
	n.wg.Add(4)
	go n.deliverLoop()
	go n.writeLoop()
	go n.watchLoop()
	go n.standInLoop()
	if len(n.cfg.NATS) > 0 {
		n.log.Info("cluster node started", "nats", n.nc.ConnectedUrlRedacted())
	} else {
		n.log.Info("cluster node started", "route", n.cfg.RouteAddr, "peers", strings.Join(n.cfg.Peers, ","))
	}
	return nil
}

// shutdown closes the NATS connection and the embedded server.
func (n *Node) shutdown() {
	if n.nc != nil {
		n.nc.Close()
	}
	n.mu.Lock()
	sc := n.sc
	n.mu.Unlock()
	if sc != nil {
		sc.Close()
	}
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
	}
}

// connectExternal joins an existing NATS cluster.
func (n *Node) connectExternal() error {
	opts := []nats.Option{nats.Name(n.id), nats.MaxReconnects(-1)}
	if n.cfg.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(n.cfg.NATSCreds))
	}
	if n.cfg.NATSTLS != nil {
		opts = append(opts, nats.Secure(n.cfg.NATSTLS.Clone()))
	}
	n.connect = func(more ...nats.Option) (*nats.Conn, error) {
		return nats.Connect(strings.Join(n.cfg.NATS, ","), append(slices.Clone(opts), more...)...)
	}
	var err error
	if n.nc, err = n.connect(nats.NoEcho()); err != nil {
		hint := ""
		if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) {
			hint = " (the NATS server refused our credentials: check the credentials file / the client certificate)"
		}
		return fmt.Errorf("cluster: connect to NATS %s: %w%s", redact(n.cfg.NATS), err, hint)
	}
	return nil
}

// redact drops the credentials (user, password or token) from NATS URLs
// for errors and logs.
func redact(urls []string) string {
	out := make([]string, len(urls))
	for i, s := range urls {
		u, err := url.Parse(s)
		if err != nil {
			out[i] = "(unparsable URL)"
			continue
		}
		u.User = nil
		out[i] = u.String()
	}
	return strings.Join(out, ",")
}

// startEmbedded runs this node's NATS server, clustered with the peers.
func (n *Node) startEmbedded() error {
	host, portStr, _ := net.SplitHostPort(n.cfg.RouteAddr)
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("cluster: route port %q: %w", portStr, err)
	}
	var routes []*url.URL
	for _, p := range n.cfg.Peers {
		routes = append(routes, &url.URL{Scheme: "nats", Host: p})
	}
	// The client port is needed (nats-server starts routing only after its
	// client listener; DontListen would never route): loopback, a random
	// port, and a random token only this process knows.
	var tok [32]byte
	rand.Read(tok[:])
	token := hex.EncodeToString(tok[:])
	opts := &server.Options{
		ServerName: n.cfg.Name, Host: "127.0.0.1", Port: server.RANDOM_PORT, Authorization: token, NoSigs: true,
		JetStream: true, StoreDir: n.cfg.StoreDir,
		Cluster: server.ClusterOpts{Name: clusterName, Host: host, Port: port, TLSConfig: n.routeTLS(), TLSTimeout: 5},
		Routes:  routes,
	}
	if n.srv, err = server.NewServer(opts); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	// nats-server reports a listener it cannot open with Fatalf and runs
	// on without it (a node without its route listener waits alone)
	fatal := make(chan string, 1)
	n.srv.SetLoggerV2(natsLog{n.log, fatal}, false, false, false)
	go n.srv.Start()
	for deadline := time.Now().Add(n.cfg.ReadyTimeout); !n.srv.ReadyForConnections(250 * time.Millisecond); {
		select {
		case msg := <-fatal:
			n.srv.Shutdown()
			return fmt.Errorf("cluster: embedded NATS: %s", msg)
		default:
		}
		if time.Now().After(deadline) {
			n.srv.Shutdown()
			return fmt.Errorf("cluster: embedded NATS not ready after %s", n.cfg.ReadyTimeout)
		}
	}
	n.connect = func(more ...nats.Option) (*nats.Conn, error) {
		return nats.Connect("", append([]nats.Option{nats.InProcessServer(n.srv), nats.Token(token), nats.Name(n.id), nats.MaxReconnects(-1)}, more...)...)
	}
	if n.nc, err = n.connect(nats.NoEcho()); err != nil {
		n.srv.Shutdown()
		return fmt.Errorf("cluster: connect to the embedded NATS: %w", err)
	}
	return nil
}

// buckets creates or binds the JetStream buckets, retrying while the
// cluster elects its JetStream leader.
func (n *Node) buckets() error {
	js, err := jetstream.New(n.nc)
	if err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	deadline := time.Now().Add(n.cfg.ReadyTimeout)
	// Short attempts at first: while JetStream has no leader a request
	// goes unanswered until it times out, and the leader may come any moment.
	for wait := time.Second; ; wait = min(2*wait, 5*time.Second) {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		n.kvR, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketRet, History: 1, Replicas: n.cfg.Replicas})
		if err == nil {
			n.kvS, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketSess, History: 1, Replicas: n.cfg.Replicas, TTL: 0})
		}
		if err == nil {
			n.kvP, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketPersist, History: 1, Replicas: n.cfg.Replicas, TTL: standInAge})
		}
		cancel()
		if err == nil {
			return nil
		}
		n.log.Debug("JetStream buckets not ready yet", "err", err)
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster: JetStream buckets not available after %s (are %d nodes up? replicas need them): %w", n.cfg.ReadyTimeout, n.cfg.Replicas, err)
		}
		select {
		case <-n.stop:
			return errors.New("cluster: closed")
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Publish forwards a message a local client published to the other nodes.
// Retained messages also go to the cluster-wide store.
func (n *Node) Publish(m broker.Message) {
	if strings.HasPrefix(m.Topic, "$SYS/") {
		return // each node's own
	}
	subject := msgPrefix + EncodeTopic(m.Topic)
	if len(subject) > maxSubject {
		n.log.Warn("message not routed to the cluster: topic too long", "topic", m.Topic[:64], "bytes", len(m.Topic))
		return
	}
	if m.Retain {
		select {
		case n.retains <- m:
		default:
			n.log.Error("retained message not stored cluster-wide: queue full", "topic", m.Topic)
		}
	}
	msg := &nats.Msg{Subject: subject, Data: m.Payload, Header: nats.Header{}}
	msg.Header.Set(hdrOrigin, n.id)
	msg.Header.Set(hdrQoS, strconv.Itoa(int(m.QoS)))
	if m.Retain {
		msg.Header.Set(hdrRetain, "1")
	}
	// sequence numbers go out in order: a receiver drops one not above
	// the last it saw from us (a duplicate through overlapping filters)
	n.pubMu.Lock()
	n.seq++
	msg.Header.Set(hdrSeq, strconv.FormatUint(n.seq, 10))
	err := n.nc.PublishMsg(msg)
	n.pubMu.Unlock()
	if err != nil {
		n.log.Error("message not routed to the cluster", "topic", m.Topic, "err", err)
	}
}

// Subscribe notes that a local client holds filter; the first holder of a
// filter subscribes this node to the matching subjects.
func (n *Node) Subscribe(clientID, filter string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	in := n.subs[filter]
	if in == nil {
		in = &interest{clients: map[string]bool{}}
		for _, subj := range FilterSubjects(sharedFilter(filter)) {
			if len(msgPrefix+subj) > maxSubject {
				n.log.Warn("no messages from the cluster for a filter: too long", "filter", filter[:64], "bytes", len(filter))
				continue
			}
			s, err := n.nc.ChanSubscribe(msgPrefix+subj, n.msgs)
			if err != nil {
				n.log.Error("cluster subscription failed", "filter", filter, "err", err)
				continue
			}
			s.SetPendingLimits(-1, -1) // the channel bounds it
			in.subs = append(in.subs, s)
		}
		n.subs[filter] = in
	}
	if !in.clients[clientID] {
		in.clients[clientID] = true
		n.byID[clientID] = append(n.byID[clientID], filter)
	}
}

// sharedFilter strips $share/GROUP/ (the group is chosen on each node).
func sharedFilter(f string) string {
	if rest, ok := strings.CutPrefix(f, "$share/"); ok {
		if _, filter, ok := strings.Cut(rest, "/"); ok {
			return filter
		}
	}
	return f
}

// Unsubscribe drops a client's interest in filter.
func (n *Node) Unsubscribe(clientID, filter string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.dropLocked(clientID, filter)
	fs := n.byID[clientID]
	for i, f := range fs {
		if f == filter {
			n.byID[clientID] = append(fs[:i], fs[i+1:]...)
			break
		}
	}
	if len(n.byID[clientID]) == 0 {
		delete(n.byID, clientID)
	}
}

// Forget drops every interest of a client whose session ended.
func (n *Node) Forget(clientID string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, f := range n.byID[clientID] {
		n.dropLocked(clientID, f)
	}
	delete(n.byID, clientID)
	delete(n.claimT, clientID)
	select {
	case n.claims <- claim{clientID: clientID, forget: true}:
	default:
		n.log.Error("ended session's claim not removed: queue full", "client_id", clientID)
	}
	n.Persist(clientID, nil) // its record too (if ours): no stand-in for a session that is gone
}

// Holder is the CN of the identity whose session holds clientID on
// another node, as far as this node has seen the claims.
func (n *Node) Holder(clientID string) string {
	n.hmu.Lock()
	defer n.hmu.Unlock()
	if h, ok := n.holders[clientID]; ok && h.owner != n.id {
		return h.cn
	}
	return ""
}

func (n *Node) dropLocked(clientID, filter string) {
	in := n.subs[filter]
	if in == nil || !in.clients[clientID] {
		return
	}
	delete(in.clients, clientID)
	if len(in.clients) == 0 {
		for _, s := range in.subs {
			s.Unsubscribe()
		}
		delete(n.subs, filter)
	}
}

// Claim records that clientID is live on this node; the node that held it
// before closes its session. Claims are ordered by the time the session
// went live (the nodes' clocks must agree, as with NTP), not by when the
// claim reached JetStream.
func (n *Node) Claim(clientID, serial, cn string) {
	at := time.Now().UnixNano()
	n.mu.Lock()
	n.claimT[clientID] = at
	stood := n.standIns[clientID] != nil
	n.mu.Unlock()
	if stood { // its node failed and we stood in: the session is back here
		go n.handStandIn(clientID, n.id)
	}
	select {
	case n.claims <- claim{clientID: clientID, serial: serial, cn: cn, at: at}:
	default:
		n.log.Error("session claim not published: queue full", "client_id", clientID)
	}
}

// deliverLoop hands messages from other nodes to the broker, one at a time
// (the broker's flow control holds this loop when a subscriber is full).
func (n *Node) deliverLoop() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case msg := <-n.msgs:
			origin := msg.Header.Get(hdrOrigin)
			seq, _ := strconv.ParseUint(msg.Header.Get(hdrSeq), 10, 64)
			n.mu.Lock()
			dup := seq != 0 && seq <= n.last[origin]
			if !dup {
				n.last[origin] = seq
			}
			n.mu.Unlock()
			if dup {
				continue // the same message through an overlapping subscription
			}
			topic, err := DecodeTopic(strings.TrimPrefix(msg.Subject, msgPrefix))
			if err != nil {
				n.log.Error("undecodable subject from the cluster", "subject", msg.Subject)
				continue
			}
			qos, _ := strconv.Atoi(msg.Header.Get(hdrQoS))
			n.node.Deliver(broker.Message{Topic: topic, Payload: msg.Data, QoS: byte(min(max(qos, 0), 2)), Retain: msg.Header.Get(hdrRetain) == "1"})
		}
	}
}

// writeLoop writes retained messages and session claims to JetStream in
// order, off the clients' read loops.
func (n *Node) writeLoop() {
	defer n.wg.Done()
	for {
		select {
		case <-n.stop:
			return
		case m := <-n.retains:
			key := EncodeTopic(m.Topic)
			err := n.retry(func(ctx context.Context) error {
				if len(m.Payload) == 0 {
					return n.kvR.Delete(ctx, key)
				}
				_, err := n.kvR.Put(ctx, key, append([]byte{m.QoS, byte(len(n.id))}, append([]byte(n.id), m.Payload...)...))
				return err
			})
			if err != nil {
				n.log.Error("retained message not stored cluster-wide", "topic", m.Topic, "err", err)
			}
		case c := <-n.claims:
			err := n.retry(func(ctx context.Context) error {
				if c.forget {
					return n.unclaim(ctx, c.clientID)
				}
				_, err := n.kvS.Put(ctx, EncodeTopic(c.clientID), []byte(n.id+"\n"+c.serial+"\n"+strconv.FormatInt(c.at, 10)+"\n"+c.cn))
				return err
			})
			if err != nil {
				n.log.Error("session claim not published", "client_id", c.clientID, "err", err)
			}
		case op := <-n.persists:
			if err := n.writePersist(op); err != nil {
				n.log.Error("persistent session not recorded cluster-wide", "client_id", op.clientID, "err", err)
			}
		}
	}
}

// retry runs a JetStream write until it succeeds, for up to 30 s: while
// a bucket elects a new leader (its node failed) writes fail for seconds,
// and a lost claim would leave a session behind. Later writes wait: the
// order stays.
func (n *Node) retry(write func(context.Context) error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(n.ctx, 5*time.Second)
		err := write(ctx)
		cancel()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-n.stop:
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// unclaim deletes our claim of clientID (not a newer one of another node).
func (n *Node) unclaim(ctx context.Context, clientID string) error {
	return n.deleteOwn(ctx, n.kvS, EncodeTopic(clientID), func(v []byte) bool {
		owner, _, _ := strings.Cut(string(v), "\n")
		return owner == n.id
	})
}

// deleteOwn deletes key if its value is ours, unless it changes
// meanwhile. A read may come from a replica a write has not reached yet
// (an older value of ours, so the revision-checked delete fails): read
// again until the delete goes or the value is another node's.
func (n *Node) deleteOwn(ctx context.Context, kv jetstream.KeyValue, key string, ours func([]byte) bool) error {
	for {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if !ours(e.Value()) {
			return nil
		}
		err = kv.Delete(ctx, key, jetstream.LastRevision(e.Revision()))
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// watchLoop mirrors the cluster's retained messages and reacts to other
// nodes' session claims.
func (n *Node) watchLoop() {
	defer n.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	wr, err := n.kvR.WatchAll(ctx)
	if err != nil {
		n.log.Error("cannot watch retained messages", "err", err)
		return
	}
	ws, err := n.kvS.WatchAll(ctx)
	if err != nil {
		n.log.Error("cannot watch session claims", "err", err)
		return
	}
	claimsLoaded := false
	wp, err := n.kvP.WatchAll(ctx)
	if err != nil {
		n.log.Error("cannot watch persistent sessions", "err", err)
		return
	}
	for {
		select {
		case <-n.stop:
			return
		case e := <-wr.Updates():
			if e == nil {
				continue // initial values done
			}
			n.retained(e)
		case e := <-ws.Updates():
			switch {
			case e == nil:
				claimsLoaded = true
			case !claimsLoaded: // a session from before we started: note who holds it
				n.held(e)
			default:
				n.claimed(e)
			}
		case e := <-wp.Updates():
			if e != nil {
				n.recorded(e)
			}
		}
	}
}

func (n *Node) retained(e jetstream.KeyValueEntry) {
	topic, err := DecodeTopic(e.Key())
	if err != nil {
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		n.node.Retain(broker.Message{Topic: topic, Retain: true})
		return
	}
	v := e.Value()
	if len(v) < 2 || len(v) < 2+int(v[1]) {
		return
	}
	if string(v[2:2+int(v[1])]) == n.id {
		return // ours: already in the local store
	}
	n.node.Retain(broker.Message{Topic: topic, QoS: v[0], Retain: true, Payload: v[2+int(v[1]):]})
}

// held notes which identity's session holds a client ID; ok: a claim
// (not a deletion).
func (n *Node) held(e jetstream.KeyValueEntry) (clientID string, parts []string, ok bool) {
	clientID, err := DecodeTopic(e.Key())
	if err != nil {
		return "", nil, false
	}
	parts = strings.SplitN(string(e.Value()), "\n", 4)
	n.hmu.Lock()
	defer n.hmu.Unlock()
	if e.Operation() != jetstream.KeyValuePut || len(parts) != 4 {
		delete(n.holders, clientID)
		return "", nil, false
	}
	n.holders[clientID] = holder{owner: parts[0], cn: parts[3]}
	return clientID, parts, true
}

// claimed handles a session claim: another node's newer claim closes ours.
func (n *Node) claimed(e jetstream.KeyValueEntry) {
	clientID, parts, ok := n.held(e)
	if !ok || parts[0] == n.id {
		return
	}
	owner, serial, cn := parts[0], parts[1], parts[3]
	at, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return
	}
	n.mu.Lock()
	if n.standIns[clientID] != nil {
		n.wg.Go(func() { n.handStandIn(clientID, owner) })
	}
	mine, ok := n.claimT[clientID]
	newer := ok && at > mine
	if newer {
		delete(n.claimT, clientID)
	}
	n.mu.Unlock()
	if !newer {
		return // not ours, or ours went live later
	}
	node := owner
	if i := strings.LastIndexByte(owner, '-'); i > 0 {
		node = owner[:i]
	}
	n.wg.Go(func() { n.handOver(clientID, serial, cn, owner, node) })
}

// handoff is a session sent to its new owner.
type handoff struct {
	ClientID string
	Session  broker.Session
}

// handOver closes the local session of a client ID another node now owns
// and sends it a persistent session's subscriptions and queued messages.
// The local copy ends only once the new owner has it (it stays here,
// offline, if the owner cannot be reached); what was queued meanwhile
// follows (duplicates possible, as QoS 1 allows).
func (n *Node) handOver(clientID, serial, cn, owner, node string) {
	sess, ok := n.node.TakeOver(clientID, serial, cn, node)
	if !ok {
		return
	}
	clean, err := n.send(owner, clientID, sess)
	if err != nil {
		n.log.Warn("session not handed over; kept here until its client returns or it expires", "client_id", clientID, "node", node, "err", err)
		return
	}
	rest := n.node.Release(clientID, sess)
	n.log.Info("session handed over", "client_id", clientID, "node", node, "subscriptions", len(sess.Subscriptions), "messages", len(sess.Messages)+len(rest.Messages))
	if len(rest.Messages) == 0 || clean {
		return
	}
	if _, err := n.send(owner, clientID, rest); err != nil {
		n.log.Error("messages queued during a session handover lost", "client_id", clientID, "node", node, "count", len(rest.Messages), "err", err)
	}
}

// send hands a session to the node with ID owner; clean: that node's
// session is clean (nothing kept). A session larger than a NATS message
// goes in parts, the subscriptions first, the messages in order.
func (n *Node) send(owner, clientID string, s broker.Session) (clean bool, err error) {
	data, err := json.Marshal(handoff{ClientID: clientID, Session: s})
	if err != nil {
		return false, err
	}
	if max := n.nc.MaxPayload(); int64(len(data)) > max {
		if len(s.Messages) == 0 || len(s.Messages) == 1 && len(s.Subscriptions) == 0 {
			return false, fmt.Errorf("session handoff of %d bytes: larger than a NATS message (%d)", len(data), max)
		}
		half := len(s.Messages) / 2
		if clean, err := n.send(owner, clientID, broker.Session{Subscriptions: s.Subscriptions, Messages: s.Messages[:half]}); clean || err != nil {
			return clean, err
		}
		return n.send(owner, clientID, broker.Session{Messages: s.Messages[half:]})
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	reply, err := n.nc.RequestWithContext(ctx, sessPrefix+owner, data)
	if err != nil {
		return false, err
	}
	switch string(reply.Data) {
	case "ok":
		return false, nil
	case "clean":
		return true, nil
	}
	return false, fmt.Errorf("node %s: %s", owner, reply.Data)
}

// imported applies a session another node handed over. Only nodes reach
// this subject (the NATS cluster is the nodes' own: a token and mutual
// TLS; MQTT topics map under msgPrefix).
func (n *Node) imported(msg *nats.Msg) {
	if string(msg.Data) == ping {
		msg.Respond([]byte("pong"))
		return
	}
	var h handoff
	if err := json.Unmarshal(msg.Data, &h); err != nil {
		msg.Respond([]byte("bad handoff: " + err.Error()))
		return
	}
	err := n.node.Import(h.ClientID, h.Session)
	switch {
	case errors.Is(err, broker.ErrCleanSession):
		msg.Respond([]byte("clean"))
	case err != nil:
		msg.Respond([]byte(err.Error()))
	default:
		// our subscriptions reach the NATS server before the old owner
		// stops queueing
		if err := n.nc.Flush(); err != nil {
			msg.Respond([]byte(err.Error()))
			return
		}
		n.log.Debug("session handed over", "client_id", h.ClientID, "subscriptions", len(h.Session.Subscriptions), "messages", len(h.Session.Messages))
		msg.Respond([]byte("ok"))
	}
}

// Close leaves the cluster: stops routing and the embedded NATS server.
func (n *Node) Close() error {
	select {
	case <-n.stop:
		return nil
	default:
	}
	close(n.stop)
	n.cancel()
	n.wg.Wait()
	n.shutdown()
	return nil
}

// natsLog passes the embedded NATS server's log to slog (notices at
// debug: routine cluster chatter; warnings and errors as such).
type natsLog struct {
	l     *slog.Logger
	fatal chan<- string // the first fatal error
}

func (n natsLog) Noticef(f string, a ...any) { n.l.Debug("nats: " + fmt.Sprintf(f, a...)) }
func (n natsLog) Warnf(f string, a ...any)   { n.l.Warn("nats: " + fmt.Sprintf(f, a...)) }
func (n natsLog) Fatalf(f string, a ...any) {
	msg := fmt.Sprintf(f, a...)
	n.l.Error("nats: " + msg)
	select {
	case n.fatal <- msg:
	default:
	}
}
func (n natsLog) Errorf(f string, a ...any) { n.l.Error("nats: " + fmt.Sprintf(f, a...)) }
func (n natsLog) Debugf(f string, a ...any) { n.l.Debug("nats: " + fmt.Sprintf(f, a...)) }
func (n natsLog) Tracef(f string, a ...any) {}
