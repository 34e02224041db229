package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/broker/policy"
)

// Config configures a Broker. Zero values take the defaults noted.
type Config struct {
	// Addr is the MQTT over TLS listen address (default 127.0.0.1:8883).
	Addr string
	// Listener, if set, is used instead of listening on Addr (tests).
	Listener net.Listener
	// Certificate is the server's chain and key (required unless
	// GetCertificate is set).
	Certificate tls.Certificate
	// GetCertificate, if set, returns the server's chain and key for each
	// handshake instead of Certificate (give one of them): a certificate
	// re-issued on disk is served without restart. It is called
	// concurrently, as [tls.Config.GetCertificate] is.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// Root is the trust anchor for client certificates (required). Clients
	// send their intermediate.
	Root *x509.Certificate
	// MinTLSVersion is tls.VersionTLS12 by default: constrained devices
	// may lack TLS 1.3.
	MinTLSVersion uint16
	// Policy maps identities to topics (default policy.Default()).
	Policy *policy.Policy
	// Registry, if set, is polled for revoked certificates and device IDs
	// every RevocationPoll (default 500ms), and watched for changes if it
	// can signal them.
	Registry       Registry
	RevocationPoll time.Duration
	// AdmitWhenRegistryDown admits new CONNECTs (checked against the last
	// revocation data read) while the registry cannot be read. By default
	// they are refused: trust data fails closed. Live sessions stay either
	// way.
	AdmitWhenRegistryDown bool
	// CRLFile, if set, is a CRL (PEM or DER) reloaded when it changes; it
	// must be signed by Root or by one of Issuers.
	CRLFile string
	// Issuers are the issuing CAs of this deployment: they may sign the
	// CRL, and only their certificates' attested marker (policy
	// match: {attested: true}) counts. None: no certificate is attested.
	Issuers []*x509.Certificate
	// HandshakeTimeout bounds TLS handshake + CONNECT (default 10s).
	HandshakeTimeout time.Duration
	// MaxPacketSize in bytes (default 256 KiB).
	MaxPacketSize uint32
	// Keepalive bounds in seconds (defaults 10 and 1200); a client asking
	// for 0 or more than the maximum gets the maximum.
	MinKeepalive, MaxKeepalive uint16
	// MaxWritesPending is each client's outbound queue (default 64).
	MaxWritesPending int32
	// MaxIntermediates bounds the client chain: root + this many
	// intermediates + leaf (default 2).
	MaxIntermediates int
	// MaxQueuedMessages bounds each session's QoS 1/2 messages not yet
	// acknowledged, including those queued while a persistent session is
	// offline (default 1024). Past it a delivery is dropped and counted in
	// mqtls_deliveries_dropped_total{reason="offline_queue_full"}.
	MaxQueuedMessages int
	// MaxMessageExpiry, if set, expires messages (retained and queued)
	// older than this even when the publisher set no Message Expiry
	// Interval. Default 0: a message lives until delivered, replaced or
	// cleared; only a v5 publisher's own expiry applies.
	MaxMessageExpiry time.Duration
	// MaxSessionExpiry bounds how long a disconnected persistent session is
	// kept (default 24h).
	MaxSessionExpiry time.Duration
	// StallTimeout: a subscriber whose queue stays full this long is
	// disconnected (default 30s).
	StallTimeout time.Duration
	// Cluster, if set, joins this broker to other nodes (package cluster);
	// the registry must then be shared by all nodes.
	Cluster Cluster
	// Logger for operations and audit lines (default: discard). Audit
	// lines (refusals, denials, closed sessions) are written at Info.
	Logger *slog.Logger
	// LogConnections writes a line at Info for every connection made and
	// ended (and client ID assigned). Off by default: with a large fleet
	// they would drown the audit lines.
	LogConnections bool
	// Metrics, if set, receives the broker's Prometheus collectors.
	Metrics prometheus.Registerer
}

// Broker is a running MQTT broker. Create it with New, then Start.
type Broker struct {
	cfg     Config
	log     *slog.Logger
	mochi   *mqtt.Server
	tls     *tls.Config
	ln      *listener
	metrics *metrics

	policy atomic.Pointer[policy.Policy]

	mu       sync.RWMutex
	sessions map[*mqtt.Client]*session            // live and offline sessions
	bySerial map[string]map[*mqtt.Client]*session // by certificate serial
	byConn   map[net.Conn]*session                // admitted connections until Mochi is done with them
	byID     map[string]*session                  // the session Mochi holds (or is about to) for each client ID
	claimed  map[string]*session                  // the newest admitted session of each client ID
	idLocks  map[string]*idLock                   // per client ID: one session establishment at a time

	inline       *session // flow state of messages other nodes route here
	connectPause func()   // tests: runs after a CONNECT's revocation check
	dropLog      rateLog
	qos0Drop     atomic.Int64 // unix ns of the last QoS 0 delivery dropped (QoS 0 flow control is on for a second after)

	revoked   *revocations
	stop      chan struct{}
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup
}

// New validates cfg and builds the broker (not yet listening).
func New(cfg Config) (*Broker, error) {
	haveCert := len(cfg.Certificate.Certificate) != 0
	switch {
	case cfg.Root == nil || !haveCert && cfg.GetCertificate == nil:
		return nil, errors.New("broker: Config.Root and Config.Certificate (or Config.GetCertificate) are required")
	case haveCert && cfg.GetCertificate != nil:
		return nil, errors.New("broker: give Config.Certificate or Config.GetCertificate, not both")
	}
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:8883"
	}
	if cfg.MinTLSVersion == 0 {
		cfg.MinTLSVersion = tls.VersionTLS12
	}
	if cfg.Policy == nil {
		cfg.Policy = policy.Default()
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, err
	}
	if cfg.RevocationPoll == 0 {
		cfg.RevocationPoll = 500 * time.Millisecond
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.MaxPacketSize == 0 {
		cfg.MaxPacketSize = 256 << 10
	}
	if cfg.MinKeepalive == 0 {
		cfg.MinKeepalive = 10
	}
	if cfg.MaxKeepalive == 0 {
		cfg.MaxKeepalive = 1200
	}
	if cfg.MinKeepalive > cfg.MaxKeepalive {
		return nil, fmt.Errorf("broker: keepalive bounds %d > %d", cfg.MinKeepalive, cfg.MaxKeepalive)
	}
	if cfg.MaxWritesPending == 0 {
		cfg.MaxWritesPending = 64
	}
	if cfg.MaxWritesPending < 8 {
		return nil, fmt.Errorf("broker: MaxWritesPending %d is below 8", cfg.MaxWritesPending)
	}
	if cfg.MaxIntermediates == 0 {
		cfg.MaxIntermediates = 2
	}
	if cfg.MaxQueuedMessages == 0 {
		cfg.MaxQueuedMessages = 1024
	}
	if cfg.MaxQueuedMessages < 0 || cfg.MaxQueuedMessages > 65535 {
		return nil, fmt.Errorf("broker: MaxQueuedMessages %d outside 1..65535", cfg.MaxQueuedMessages)
	}
	if cfg.MaxSessionExpiry == 0 {
		cfg.MaxSessionExpiry = 24 * time.Hour
	}
	if cfg.StallTimeout == 0 {
		cfg.StallTimeout = 30 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := checkOutboundAccess(); err != nil {
		return nil, err
	}
	b := &Broker{
		cfg:      cfg,
		log:      log,
		sessions: make(map[*mqtt.Client]*session),
		bySerial: make(map[string]map[*mqtt.Client]*session),
		byConn:   make(map[net.Conn]*session),
		byID:     make(map[string]*session),
		claimed:  make(map[string]*session),
		idLocks:  make(map[string]*idLock),
		stop:     make(chan struct{}),
		metrics:  newMetrics(),
	}
	if cfg.Metrics != nil {
		if err := b.metrics.register(cfg.Metrics); err != nil {
			return nil, err
		}
	}
	b.policy.Store(cfg.Policy)
	b.revoked = newRevocations(b, cfg.Registry, cfg.CRLFile, append([]*x509.Certificate{cfg.Root}, cfg.Issuers...))
	pool := x509.NewCertPool()
	pool.AddCert(cfg.Root)
	b.tls = &tls.Config{
		GetCertificate: cfg.GetCertificate,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      pool,
		MinVersion:     cfg.MinTLSVersion,
		// Session resumption stays on (Go's default tickets): devices with
		// slow TPMs depend on it. Identity and revocation checks run at
		// every CONNECT, resumed or not.
	}
	if haveCert {
		b.tls.Certificates = []tls.Certificate{cfg.Certificate}
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumClientWritesPending = cfg.MaxWritesPending
	caps.MaximumPacketSize = cfg.MaxPacketSize
	caps.MaximumSessionExpiryInterval = uint32(cfg.MaxSessionExpiry / time.Second)
	caps.Compatibilities.NoInheritedPropertiesOnAck = true
	caps.MaximumInflight = uint16(cfg.MaxQueuedMessages)
	caps.TopicAliasMaximum = 16 // inbound aliases per client (advertised in CONNACK)
	// Mochi's default (24 h) would expire retained and queued messages
	// that carry no expiry of their own.
	caps.MaximumMessageExpiryInterval = int64(cfg.MaxMessageExpiry / time.Second)
	caps.ReceiveMaximum = 256
	// Mochi logs whole packets (payloads included) at Warn; pass on its
	// errors only.
	mlog := slog.New(minLevel{log.Handler(), slog.LevelError}).With("component", "mochi")
	b.mochi = mqtt.New(&mqtt.Options{
		Capabilities:           caps,
		Logger:                 mlog,
		SysTopicResendInterval: 10,
		InlineClient:           cfg.Cluster != nil, // delivers other nodes' messages
		// Mochi reads each client through a bufio.Reader held for the
		// session's life (default 2 KiB) on top of crypto/tls, which buffers
		// a whole record itself: 512 bytes hold a telemetry PUBLISH or an
		// ack, larger packets are read straight into their own buffer.
		ClientNetReadBufferSize: 512,
	})
	b.inline = &session{flow: flowState{drained: make(chan struct{}, 1)}}
	if err := b.mochi.AddHook(&authHook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	if err := b.mochi.AddHook(&flowHook{b: b}, nil); err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	if cfg.Cluster != nil {
		if err := b.mochi.AddHook(&clusterHook{b: b}, nil); err != nil {
			return nil, fmt.Errorf("broker: %w", err)
		}
	}
	return b, nil
}

// Start listens and serves until Close.
func (b *Broker) Start() error {
	if err := b.revoked.load(); err != nil {
		return err
	}
	b.metrics.registryUp.Set(1)
	ln := b.cfg.Listener
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", b.cfg.Addr); err != nil {
			return fmt.Errorf("broker: listen %s: %w", b.cfg.Addr, err)
		}
	}
	b.ln = newListener("mqtts", ln, b)
	if err := b.mochi.AddListener(b.ln); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	if err := b.mochi.Serve(); err != nil {
		return fmt.Errorf("broker: %w", err)
	}
	if b.cfg.Cluster != nil {
		if err := b.cfg.Cluster.Start(clusterNode{b}); err != nil {
			b.Close()
			return fmt.Errorf("broker: %w", err)
		}
	}
	b.wg.Add(1)
	go func() { defer b.wg.Done(); b.revoked.watch(b.stop, b.cfg.RevocationPoll) }()
	b.log.Info("MQTT listening", "addr", ln.Addr().String(), "min_tls", tls.VersionName(b.cfg.MinTLSVersion))
	return nil
}

// Addr returns the listening address (after Start).
func (b *Broker) Addr() net.Addr { return b.ln.Addr() }

// Close stops accepting, disconnects every client and stops background
// work. It may be called more than once.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		close(b.stop)
		if b.cfg.Cluster != nil {
			b.cfg.Cluster.Close()
		}
		// Mochi's Close writes a DISCONNECT to every client and would wait
		// forever on one that stopped reading (TestStalledV5ClientBlocksClose):
		// after a second, close what is left.
		cut := time.AfterFunc(time.Second, func() {
			b.mu.RLock()
			defer b.mu.RUnlock()
			for cl := range b.sessions {
				cl.Stop(errors.New("broker shutting down"))
			}
		})
		b.closeErr = b.mochi.Close()
		cut.Stop()
		b.wg.Wait()
	})
	return b.closeErr
}

// SetPolicy replaces the policy. Sessions (live and offline) are
// re-evaluated: their permissions are recompiled and subscriptions the new
// policy no longer allows are removed (the client is not told; it stops
// receiving on them). A Will is checked against the policy in force when
// it is sent. ACL checks are not stalled: each session's permissions are
// swapped atomically, outside the broker's lock.
func (b *Broker) SetPolicy(p *policy.Policy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	b.policy.Store(p)
	b.mu.RLock()
	affected := make([]*session, 0, len(b.sessions))
	for _, s := range b.sessions {
		affected = append(affected, s)
	}
	b.mu.RUnlock()
	for _, s := range affected {
		if s.children.Load() == nil {
			b.loadChildren(s) // a policy that now has {child} templates for it
		}
		s.compile(p)
		b.prune(s)
	}
	b.log.Info("policy applied", "rules", len(p.Rules), "clients", len(affected))
	return nil
}

// prune drops the subscriptions a session's permissions no longer allow.
func (b *Broker) prune(s *session) {
	perms := s.perms()
	for filter := range s.cl.State.Subscriptions.GetAll() {
		if !perms.AllowFilter(filter) {
			b.mochi.Topics.Unsubscribe(filter, s.cl.ID)
			s.cl.State.Subscriptions.Delete(filter)
			if b.cfg.Cluster != nil {
				b.cfg.Cluster.Unsubscribe(s.cl.ID, filter)
			}
			b.audit("subscription removed", s, "policy no longer allows "+filter)
		}
	}
}

// Sessions returns the number of authenticated live sessions.
func (b *Broker) Sessions() int {
	live, _ := b.sessionCounts()
	return live
}

// minLevel drops records below a level.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (h minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h minLevel) WithAttrs(a []slog.Attr) slog.Handler {
	return minLevel{h.Handler.WithAttrs(a), h.min}
}
func (h minLevel) WithGroup(g string) slog.Handler { return minLevel{h.Handler.WithGroup(g), h.min} }

// revoke ends a revoked session: a live one is closed, an offline one gets
// no more deliveries (and cannot reconnect).
func (b *Broker) revoke(s *session, reason string) {
	s.revoked.Store(true)
	b.disconnect(s, reason)
}

// disconnect ends a session's connection for reason (revoked, expired,
// stalled).
//
// It does not block its caller (the revocation poller, a publisher's read
// loop): a v5 client is sent DISCONNECT first, but Mochi's writer holds
// the client's write lock while blocked on a client that stopped reading,
// so the connection is closed after a second whether or not the DISCONNECT
// went out (TestStalledV5ClientBlocksRevocationsIndefinitely).
func (b *Broker) disconnect(s *session, reason string) {
	b.audit("session closed", s, reason)
	b.metrics.kicked.WithLabelValues(reasonLabel(reason)).Inc()
	cl := s.cl
	go func() {
		if cl.Properties.ProtocolVersion == 5 && !cl.Closed() {
			sent := make(chan struct{})
			go func() { _ = b.mochi.DisconnectClient(cl, packets.ErrNotAuthorized); close(sent) }()
			t := time.NewTimer(time.Second)
			select {
			case <-sent:
			case <-t.C:
			}
			t.Stop()
		}
		cl.Stop(errors.New(reason)) // also ends a DisconnectClient still waiting
	}()
}

func (b *Broker) audit(event string, s *session, reason string) {
	b.log.Info("audit", "event", event, "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "reason", reason)
}
