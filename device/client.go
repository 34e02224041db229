package device

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/mqtls/mqtls/keystore"
)

// Errors a caller can act on. Returned errors wrap one of them (and the
// cause) where it applies; compare with errors.Is.
var (
	ErrNotAuthorized = errors.New("device: not authorized by the broker")
	ErrTLS           = errors.New("device: TLS verification failed")
	ErrTimeout       = errors.New("device: timed out")
	ErrClosed        = errors.New("device: client closed")
	ErrOffline       = errors.New("device: not connected (QoS 0 is not queued)")
	ErrQueueFull     = errors.New("device: offline queue full")
)

// State is the client's connection state.
type State int32

// States.
const (
	StateDisconnected State = iota // not yet connected, or reconnecting
	StateConnected
	StateRefused // the broker refused us (revoked, not authorized): no more retries
	StateExpired // the certificate expired before it could be renewed
	StateClosed
)

func (s State) String() string {
	return [...]string{"disconnected", "connected", "refused", "expired", "closed"}[s]
}

// Config configures a Client. Zero values take the defaults noted.
type Config struct {
	// Broker is mqtts://HOST:PORT (required).
	Broker string
	// Identity is the device's loaded identity (required).
	Identity *Identity
	// Store holds the identity's key; it is needed for renewal.
	Store keystore.Store
	// ServerName to verify in the broker's certificate (default: Broker's
	// host).
	ServerName string
	// MinTLS is the lowest TLS version offered (default TLS 1.3).
	MinTLS uint16
	// CurvePreferences, if set, restricts the TLS key exchange groups
	// (default: Go's, hybrid post-quantum first).
	CurvePreferences []tls.CurveID
	// LocalAddr, if set, is the local address to connect from (simulators
	// spread thousands of clients over 127.0.0.x source addresses).
	LocalAddr *net.TCPAddr
	// KeepAlive (default 60s), ConnectTimeout (default 15s).
	KeepAlive, ConnectTimeout time.Duration
	// Reconnect backoff: full jitter over [0, min(MaxBackoff, MinBackoff·2^n)]
	// (defaults 1s and 2min).
	MinBackoff, MaxBackoff time.Duration
	// QueueSize bounds QoS 1 publishes held while offline (default 1000).
	QueueSize int
	// PersistentQueue keeps the offline queue in the identity directory
	// (outbox, fsynced per message) so it survives a restart.
	PersistentQueue bool
	// CleanSession asks the broker to drop the session at disconnect. The
	// default (false) keeps subscriptions and queued QoS 1 messages across
	// reconnects and renewals.
	CleanSession bool
	// Renewal: re-enroll at RenewAt of the certificate's lifetime (default
	// 2/3), jittered by ±RenewJitter of the lifetime (default 5%).
	// DisableRenewal turns it off.
	RenewAt, RenewJitter float64
	DisableRenewal       bool
	// Callbacks (optional, called from the client's goroutines; they must
	// not block).
	OnConnectionLost func(error)
	OnReconnected    func()
	OnRenewed        func(leaf *x509.Certificate)
	OnStateChange    func(State)
	// Logger (default: discard).
	Logger *slog.Logger
}

// Client is an MQTT 3.1.1 client over mutual TLS with the device identity.
// Create it with New, then Connect. It reconnects by itself (exponential
// backoff with full jitter), restores subscriptions, queues QoS 1
// publishes made while offline, and renews its certificate before it
// expires. It is safe for concurrent use.
type Client struct {
	cfg    Config
	log    *slog.Logger
	host   string
	paho   paho.Client
	id     atomic.Pointer[Identity]
	cert   atomic.Pointer[tls.Certificate]
	cache  *sessionCache
	state  atomic.Int32
	queue  *outbox
	subsMu sync.Mutex
	subs   map[string]subscription

	store    *paho.MemoryStore
	mu       sync.Mutex
	lastDial error                // the last dial error, for classification
	lostCh   chan struct{}        // closed (and replaced) at each connection loss
	inflight map[uint16]time.Time // QoS 1 publishes awaiting PUBACK
	refused  map[uint16]bool      // ... that the broker refused (3.1.1)
	wake     chan struct{}        // reconnect now (after renewal)
	lost     chan error
	closed   chan struct{}
	wg       sync.WaitGroup
	attempts atomic.Int64 // reconnect attempts, for tests and metrics
}

type subscription struct {
	qos     byte
	handler func(topic string, payload []byte)
}

// New validates cfg. It does not connect.
func New(cfg Config) (*Client, error) {
	if cfg.Identity == nil {
		return nil, errors.New("device: Config.Identity is required")
	}
	u, err := url.Parse(cfg.Broker)
	if err != nil || u.Scheme != "mqtts" || u.Hostname() == "" || u.Port() == "" {
		return nil, fmt.Errorf("device: broker URL %q: want mqtts://HOST:PORT", cfg.Broker)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = u.Hostname()
	}
	if cfg.MinTLS == 0 {
		cfg.MinTLS = tls.VersionTLS13
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 60 * time.Second
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 15 * time.Second
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 2 * time.Minute
	}
	if cfg.QueueSize == 0 {
		cfg.QueueSize = 1000
	}
	if cfg.RenewAt == 0 {
		cfg.RenewAt = 2.0 / 3
	}
	if cfg.RenewJitter == 0 {
		cfg.RenewJitter = 0.05
	}
	if cfg.RenewAt <= 0 || cfg.RenewAt >= 1 || cfg.RenewJitter < 0 || cfg.RenewJitter > 0.2 {
		return nil, fmt.Errorf("device: RenewAt %v must be in (0,1) and RenewJitter in [0,0.2]", cfg.RenewAt)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		cfg: cfg, log: log, host: u.Host, cache: newSessionCache(),
		subs: map[string]subscription{}, wake: make(chan struct{}, 1),
		lost: make(chan error, 1), closed: make(chan struct{}), store: paho.NewMemoryStore(),
		inflight: map[uint16]time.Time{}, refused: map[uint16]bool{}, lostCh: make(chan struct{}),
	}
	if c.queue, err = newOutbox(cfg.QueueSize, cfg.PersistentQueue, cfg.Identity.Dir); err != nil {
		return nil, err
	}
	if err := c.setIdentity(cfg.Identity); err != nil {
		return nil, err
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + u.Host).
		SetClientID(cfg.Identity.Leaf().Subject.CommonName).
		SetProtocolVersion(4). // 3.1.1, never a silent fallback to 3.1
		SetCleanSession(cfg.CleanSession).
		SetKeepAlive(cfg.KeepAlive).
		SetConnectTimeout(cfg.ConnectTimeout).
		SetWriteTimeout(cfg.ConnectTimeout).
		SetAutoReconnect(false). // ours has jitter and restores state
		SetConnectRetry(false).
		SetOrderMatters(true).
		SetResumeSubs(false). // we restore subscriptions ourselves (resubscribe)
		SetCustomOpenConnectionFn(c.dial).
		SetStore(c.store).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.noteRefusal(err)
			select {
			case c.lost <- err:
			default:
			}
		})
	c.paho = paho.NewClient(opts)
	return c, nil
}

// setIdentity swaps the identity used by the next TLS handshake.
func (c *Client) setIdentity(id *Identity) error {
	cert, err := id.TLSCertificate()
	if err != nil {
		return err
	}
	c.id.Store(id)
	c.cert.Store(&cert)
	c.cache.reset() // a resumed session would present the old certificate
	return nil
}

// Identity returns the identity in use.
func (c *Client) Identity() *Identity { return c.id.Load() }

// State returns the connection state.
func (c *Client) State() State { return State(c.state.Load()) }

func (c *Client) setState(s State) {
	if State(c.state.Swap(int32(s))) != s && c.cfg.OnStateChange != nil {
		c.cfg.OnStateChange(s)
	}
}

// tlsConfig trusts the pinned root only and presents the current
// certificate through GetClientCertificate.
func (c *Client) tlsConfig() *tls.Config {
	return &tls.Config{
		RootCAs:            c.id.Load().RootPool(),
		ServerName:         c.cfg.ServerName,
		MinVersion:         c.cfg.MinTLS,
		CurvePreferences:   c.cfg.CurvePreferences,
		ClientSessionCache: c.cache,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.cert.Load(), nil
		},
	}
}

// dial is paho's connection function: TLS with our config, errors kept
// for classification.
func (c *Client) dial(_ *url.URL, _ paho.ClientOptions) (net.Conn, error) {
	d := &net.Dialer{Timeout: c.cfg.ConnectTimeout}
	if c.cfg.LocalAddr != nil {
		d.LocalAddr = c.cfg.LocalAddr
	}
	conn, err := tls.DialWithDialer(d, "tcp", c.host, c.tlsConfig())
	c.mu.Lock()
	c.lastDial = err
	c.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return conn, nil
}

// Connect makes the first connection and starts the background work
// (reconnects, renewal). It returns ErrNotAuthorized, ErrTLS or ErrTimeout
// (wrapping the cause) without retrying: those need a human.
func (c *Client) Connect(ctx context.Context) error {
	if c.State() == StateClosed {
		return ErrClosed
	}
	if err := c.connectOnce(ctx); err != nil {
		return err
	}
	c.wg.Add(2)
	go c.supervise()
	go c.renewLoop()
	return nil
}

func (c *Client) connectOnce(ctx context.Context) error {
	tok := c.paho.Connect()
	if err := wait(ctx, tok, c.cfg.ConnectTimeout+5*time.Second); err != nil {
		return c.classify(err, tok.(*paho.ConnectToken).ReturnCode())
	}
	ct := tok.(*paho.ConnectToken)
	if !ct.SessionPresent() {
		if err := c.resubscribe(ctx); err != nil {
			c.paho.Disconnect(0)
			return err
		}
	}
	c.setState(StateConnected)
	c.flush(ctx)
	return nil
}

// classify maps a connect failure to the package errors.
func (c *Client) classify(err error, rc byte) error {
	c.mu.Lock()
	dialErr := c.lastDial
	c.mu.Unlock()
	switch {
	case rc == packets.ErrRefusedNotAuthorised || rc == packets.ErrRefusedBadUsernameOrPassword:
		return fmt.Errorf("%w (CONNACK %d: revoked, expired, or client ID/Will not allowed): %v", ErrNotAuthorized, rc, err)
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: connecting to %s: %v", ErrTimeout, c.host, err)
	}
	if dialErr != nil {
		var unknown x509.UnknownAuthorityError
		var host x509.HostnameError
		var invalid x509.CertificateInvalidError
		var verify *tls.CertificateVerificationError
		switch {
		case errors.As(dialErr, &unknown):
			return fmt.Errorf("%w: broker certificate is not signed by the pinned root CA (wrong CA, or a man in the middle): %w", ErrTLS, dialErr)
		case errors.As(dialErr, &host):
			return fmt.Errorf("%w: broker certificate does not name %q: %w", ErrTLS, c.cfg.ServerName, dialErr)
		case errors.As(dialErr, &invalid), errors.As(dialErr, &verify):
			return fmt.Errorf("%w: broker certificate: %w", ErrTLS, dialErr)
		case isTimeout(dialErr):
			return fmt.Errorf("%w: connecting to %s: %w", ErrTimeout, c.host, dialErr)
		case strings.Contains(dialErr.Error(), "remote error: tls"):
			return fmt.Errorf("%w: the broker refused our certificate: %w", ErrTLS, dialErr)
		}
		return fmt.Errorf("device: connect to %s: %w", c.host, dialErr)
	}
	return fmt.Errorf("device: connect to %s: %w", c.host, err)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// wait waits for a paho token, the context, or a bound (paho's Wait can
// hang), and never lets the token escape.
func wait(ctx context.Context, tok paho.Token, bound time.Duration) error {
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-tok.Done():
		return tok.Error()
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	case <-t.C:
		return fmt.Errorf("%w: no answer within %v", ErrTimeout, bound)
	}
}

// supervise reconnects after a loss, with backoff and full jitter, until
// Close, a refusal, or expiry.
func (c *Client) supervise() {
	defer c.wg.Done()
	for {
		select {
		case <-c.closed:
			return
		case err := <-c.lost:
			c.setState(StateDisconnected)
			c.log.Warn("connection lost", "err", err)
			if c.cfg.OnConnectionLost != nil {
				c.cfg.OnConnectionLost(err)
			}
		case <-c.wake:
			// renewal: reconnect now with the new certificate; publishes
			// made meanwhile go to the offline queue
			c.setState(StateDisconnected)
			c.paho.Disconnect(250)
		}
		if !c.reconnect() {
			return
		}
	}
}

// reconnect loops until connected (true) or until there is no point
// (false: closed, refused, expired).
func (c *Client) reconnect() bool {
	for n := 0; ; n++ {
		if n > 0 {
			ceiling := min(c.cfg.MaxBackoff, c.cfg.MinBackoff<<min(n-1, 30))
			delay := rand.N(ceiling + 1) // full jitter
			select {
			case <-c.closed:
				return false
			case <-time.After(delay):
			}
		}
		if time.Now().After(c.id.Load().Leaf().NotAfter) {
			c.log.Error("certificate expired; not reconnecting: enroll again", "not_after", c.id.Load().Leaf().NotAfter)
			c.setState(StateExpired)
			return false
		}
		c.attempts.Add(1)
		ctx, cancel := context.WithTimeout(context.Background(), c.cfg.ConnectTimeout+5*time.Second)
		err := c.connectOnce(ctx)
		cancel()
		switch {
		case err == nil:
			c.log.Info("reconnected", "attempt", n+1)
			if c.cfg.OnReconnected != nil {
				c.cfg.OnReconnected()
			}
			return true
		case errors.Is(err, ErrNotAuthorized):
			c.log.Error("broker refused the device; not reconnecting", "err", err)
			c.setState(StateRefused)
			return false
		}
		c.log.Info("reconnect failed", "attempt", n+1, "err", err)
		select {
		case <-c.closed:
			return false
		default:
		}
	}
}

// Publish sends a message. QoS 1 publishes made while offline are queued
// (bounded: ErrQueueFull) and sent after the reconnect — delivery is at
// least once. QoS 0 while offline fails with ErrOffline. A publish the
// broker refuses is reported as ErrNotAuthorized: a 3.1.1 broker cannot
// say no to a publish and closes the connection instead, which the client
// detects when it happens right after the PUBLISH.
func (c *Client) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	switch c.State() {
	case StateClosed:
		return ErrClosed
	case StateRefused:
		return fmt.Errorf("%w: the broker refused the connection", ErrNotAuthorized)
	case StateExpired:
		return ErrExpired
	}
	if qos > 1 {
		return fmt.Errorf("device: QoS %d not supported (0 or 1)", qos)
	}
	if c.State() != StateConnected {
		if qos == 0 {
			return ErrOffline
		}
		return c.queue.push(message{Topic: topic, Payload: payload, Retain: retain})
	}
	c.mu.Lock()
	lost := c.lostCh
	c.mu.Unlock()
	tok := c.paho.Publish(topic, qos, retain, payload)
	mid := tok.(*paho.PublishToken).MessageID()
	if qos > 0 && mid != 0 {
		c.mu.Lock()
		c.inflight[mid] = time.Now()
		c.mu.Unlock()
		defer func() {
			c.mu.Lock()
			delete(c.inflight, mid)
			delete(c.refused, mid)
			c.mu.Unlock()
		}()
	}
	timer := time.NewTimer(c.cfg.ConnectTimeout + 5*time.Second)
	defer timer.Stop()
	var err error
	select {
	case <-tok.Done():
		err = tok.Error()
		if errors.Is(err, paho.ErrNotConnected) { // lost between our state check and paho's
			if qos == 0 {
				return ErrOffline
			}
			return c.queue.push(message{Topic: topic, Payload: payload, Retain: retain})
		}
		if err == nil || qos == 0 {
			return err
		}
		// Our own disconnect (renewal) ended the connection: paho keeps the
		// message in its store and resends it on the reconnect.
		if strings.Contains(err.Error(), "connection lost before Publish completed") && !c.cfg.CleanSession {
			return nil
		}
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	case <-timer.C:
		return fmt.Errorf("%w: no PUBACK within %v", ErrTimeout, c.cfg.ConnectTimeout+5*time.Second)
	case <-lost:
		// With the session kept (clean session off), paho holds the
		// unacknowledged message and resends it after the reconnect: it is
		// accepted, at least once - unless the broker refused it.
		c.mu.Lock()
		refused := c.refused[mid]
		c.mu.Unlock()
		if refused {
			return fmt.Errorf("%w: publish to %q: the broker closed the connection on it (a 3.1.1 broker's only way to refuse)", ErrNotAuthorized, topic)
		}
		if !c.cfg.CleanSession {
			return nil
		}
	}
	// With a clean session paho forgets it: queue it again.
	if c.cfg.CleanSession && qos == 1 {
		return c.queue.push(message{Topic: topic, Payload: payload, Retain: retain})
	}
	return err
}

// noteRefusal runs when the connection is lost. A 3.1.1 broker refuses a
// QoS 1 publish by closing the connection: if it closed (EOF) with
// publishes awaiting PUBACK, the oldest one - the first the broker had not
// acknowledged - was refused. It is removed from paho's store before the
// reconnect, or every reconnect would resend it and be closed again.
func (c *Client) noteRefusal(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer func() { close(c.lostCh); c.lostCh = make(chan struct{}) }()
	if err == nil || !strings.Contains(err.Error(), "EOF") {
		return
	}
	var oldest uint16
	var at time.Time
	for mid, sent := range c.inflight {
		if oldest == 0 || sent.Before(at) {
			oldest, at = mid, sent
		}
	}
	if oldest != 0 && time.Since(at) < 2*time.Second {
		c.store.Del(fmt.Sprintf("o.%d", oldest))
		c.refused[oldest] = true
	}
}

// flush sends the offline queue after a (re)connect.
func (c *Client) flush(ctx context.Context) {
	for {
		m, ok := c.queue.peek()
		if !ok {
			return
		}
		tok := c.paho.Publish(m.Topic, 1, m.Retain, m.Payload)
		if err := wait(ctx, tok, c.cfg.ConnectTimeout+5*time.Second); err != nil {
			c.log.Warn("offline queue not flushed; will retry after the next reconnect", "err", err, "queued", c.queue.len())
			return
		}
		if err := c.queue.pop(); err != nil {
			c.log.Error("offline queue", "err", err)
			return
		}
	}
}

// Subscribe subscribes to filter and calls handler for each message
// (sequentially, in order). A filter the broker refuses yields
// ErrNotAuthorized. The subscription is restored after reconnects.
func (c *Client) Subscribe(ctx context.Context, filter string, qos byte, handler func(topic string, payload []byte)) error {
	if c.State() != StateConnected {
		return ErrOffline
	}
	c.subsMu.Lock()
	c.subs[filter] = subscription{qos: qos, handler: handler}
	c.subsMu.Unlock()
	if err := c.subscribe(ctx, filter, qos, handler); err != nil {
		c.subsMu.Lock()
		delete(c.subs, filter)
		c.subsMu.Unlock()
		return err
	}
	return nil
}

func (c *Client) subscribe(ctx context.Context, filter string, qos byte, handler func(string, []byte)) error {
	tok := c.paho.Subscribe(filter, qos, func(_ paho.Client, m paho.Message) { handler(m.Topic(), m.Payload()) })
	if err := wait(ctx, tok, c.cfg.ConnectTimeout+5*time.Second); err != nil {
		return fmt.Errorf("device: subscribe %q: %w", filter, err)
	}
	// A refusal (SUBACK 0x80) is not a paho error: check the result.
	granted, ok := tok.(*paho.SubscribeToken).Result()[filter]
	switch {
	case !ok:
		return fmt.Errorf("device: subscribe %q: no SUBACK for it (connection lost?)", filter)
	case granted == 0x80:
		return fmt.Errorf("%w: subscribe %q refused (SUBACK 0x80)", ErrNotAuthorized, filter)
	}
	return nil
}

// resubscribe restores subscriptions when the broker has no session.
func (c *Client) resubscribe(ctx context.Context) error {
	c.subsMu.Lock()
	subs := make(map[string]subscription, len(c.subs))
	for f, s := range c.subs {
		subs[f] = s
	}
	c.subsMu.Unlock()
	for f, s := range subs {
		if err := c.subscribe(ctx, f, s.qos, s.handler); err != nil {
			return err
		}
	}
	return nil
}

// Unsubscribe removes a subscription.
func (c *Client) Unsubscribe(ctx context.Context, filter string) error {
	c.subsMu.Lock()
	delete(c.subs, filter)
	c.subsMu.Unlock()
	if c.State() != StateConnected {
		return nil
	}
	return wait(ctx, c.paho.Unsubscribe(filter), c.cfg.ConnectTimeout+5*time.Second)
}

// Close disconnects (waiting up to 250 ms for in-flight messages) and
// stops the background work. The persistent queue keeps what was not sent.
func (c *Client) Close() error {
	if State(c.state.Swap(int32(StateClosed))) == StateClosed {
		return nil
	}
	close(c.closed)
	c.paho.Disconnect(250)
	c.wg.Wait()
	c.paho.Disconnect(0) // a reconnect that was in flight during the first one
	return c.queue.close()
}

// ReconnectAttempts returns how many reconnect attempts were made.
func (c *Client) ReconnectAttempts() int64 { return c.attempts.Load() }

// sessionCache is a TLS session cache that renewal can empty, so that a
// resumption never presents the previous certificate.
type sessionCache struct {
	inner atomic.Pointer[tls.ClientSessionCache]
}

func newSessionCache() *sessionCache {
	s := &sessionCache{}
	s.reset()
	return s
}

func (s *sessionCache) reset() {
	c := tls.NewLRUClientSessionCache(4)
	s.inner.Store(&c)
}

func (s *sessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	return (*s.inner.Load()).Get(key)
}

func (s *sessionCache) Put(key string, cs *tls.ClientSessionState) {
	(*s.inner.Load()).Put(key, cs)
}
