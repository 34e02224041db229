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
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

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
	ErrInvalidTopic  = errors.New("device: invalid topic for a publish")
	// ErrLostInFlight comes with ErrTimeout when the connection was lost
	// while a QoS 1 publish awaited its PUBACK: a 3.1.1 broker refuses a
	// publish by closing the connection, which a client cannot tell from a
	// network drop or a restart.
	ErrLostInFlight = errors.New("device: connection lost while the publish awaited its PUBACK")
	ErrTooLarge     = errors.New("device: message too large")
)

// MaxMessage is the largest topic + payload a publish may carry: MQTT's
// packet limit (268,435,455 bytes) less the PUBLISH header. Brokers often
// set a lower one (mqtls: 256 KiB).
const MaxMessage = 268435455 - 4

// checkTopic refuses what no broker accepts as a PUBLISH topic: wildcards,
// NUL, invalid UTF-8, empty or over 65535 bytes.
func checkTopic(topic string) error {
	switch {
	case topic == "":
		return fmt.Errorf("%w: empty", ErrInvalidTopic)
	case len(topic) > 65535:
		return fmt.Errorf("%w: %d bytes (at most 65535)", ErrInvalidTopic, len(topic))
	case strings.ContainsAny(topic, "+#"):
		return fmt.Errorf("%w: %q holds a wildcard ('+' or '#'), which only subscriptions may use", ErrInvalidTopic, topic)
	case strings.ContainsRune(topic, 0):
		return fmt.Errorf("%w: %q holds a NUL character", ErrInvalidTopic, topic)
	case !utf8.ValidString(topic):
		return fmt.Errorf("%w: %q is not valid UTF-8", ErrInvalidTopic, topic)
	}
	return nil
}

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
	// Broker is mqtts://HOST:PORT (required, unless Brokers).
	Broker string
	// Brokers, instead of Broker, lists the nodes of one cluster
	// (mqtts://HOST:PORT each). The client starts with a random one, which
	// spreads a fleet over them, and moves to the next one after a lost
	// connection or a failed attempt.
	Brokers []string
	// Identity is the device's loaded identity (required).
	Identity *Identity
	// Store holds the identity's key; it is needed for renewal.
	Store keystore.Store
	// ServerName to verify in the broker's certificate (default: the host
	// of the broker URL in use).
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
	// (defaults 1s and 2min); the first attempt after a lost connection
	// waits up to MinBackoff, so a fleet that loses its broker does not
	// come back all at once.
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
	addrs  []brokerAddr
	cur    atomic.Int32 // index in addrs of the broker in use
	paho   paho.Client
	id     atomic.Pointer[Identity]
	cert   atomic.Pointer[tls.Certificate]
	cache  *sessionCache
	state  atomic.Int32
	queue  *outbox
	subsMu sync.Mutex
	subs   map[string]subscription

	session  *sessionStore // paho's store: QoS 1 publishes awaiting PUBACK
	mu       sync.Mutex
	lastDial error           // the last dial error, for classification
	dialCtx  context.Context // bounds the dial of the connect in progress
	conn     net.Conn        // the connection of the connect in progress
	lostCh   chan struct{}   // closed (and replaced) at each connection loss
	losses   int             // connection losses so far
	wake     chan struct{}   // reconnect now (after renewal)
	lost     chan error
	closed   chan struct{}
	stopped  chan struct{} // closed when the client stops for good (closed, refused, expired)
	stopErr  error         // why it stopped (refused, expired); under mu
	stopOnce sync.Once
	ctx      context.Context // ends at Close: bounds every background wait
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	attempts atomic.Int64 // reconnect attempts, for tests and metrics
}

// brokerAddr is one broker the client may connect to.
type brokerAddr struct{ host, serverName string }

type subscription struct {
	qos     byte
	handler func(topic string, payload []byte)
}

// New validates cfg. It does not connect.
func New(cfg Config) (*Client, error) {
	if cfg.Identity == nil {
		return nil, errors.New("device: Config.Identity is required")
	}
	urls := cfg.Brokers
	switch {
	case cfg.Broker != "" && len(urls) > 0:
		return nil, errors.New("device: Config.Broker and Config.Brokers are exclusive")
	case cfg.Broker != "":
		urls = []string{cfg.Broker}
	case len(urls) == 0:
		return nil, errors.New("device: Config.Broker (or Brokers) is required")
	}
	var addrs []brokerAddr
	for _, b := range urls {
		u, err := url.Parse(b)
		if err != nil || u.Scheme != "mqtts" || u.Hostname() == "" || u.Port() == "" {
			return nil, fmt.Errorf("device: broker URL %q: want mqtts://HOST:PORT", b)
		}
		name := cfg.ServerName
		if name == "" {
			name = u.Hostname()
		}
		addrs = append(addrs, brokerAddr{host: u.Host, serverName: name})
	}
	cfg.Brokers = slices.Clone(cfg.Brokers)
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
		cfg: cfg, log: log, addrs: addrs, cache: newSessionCache(),
		subs: map[string]subscription{}, wake: make(chan struct{}, 1),
		lost: make(chan error, 1), closed: make(chan struct{}), stopped: make(chan struct{}),
		session: newSessionStore(), lostCh: make(chan struct{}),
	}
	var err error
	if c.queue, err = newOutbox(cfg.QueueSize, cfg.PersistentQueue, cfg.Identity.Dir); err != nil {
		return nil, err
	}
	c.cur.Store(int32(rand.N(len(addrs))))
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if err := c.setIdentity(cfg.Identity); err != nil {
		return nil, err
	}
	opts := paho.NewClientOptions().
		AddBroker("tls://" + addrs[0].host). // unused: dial picks the broker
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
		SetStore(c.session).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.mu.Lock()
			close(c.lostCh) // wakes the publishes waiting for a PUBACK
			c.lostCh = make(chan struct{})
			c.losses++
			c.mu.Unlock()
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

// Err returns why the client stopped reconnecting: the broker's refusal
// (wrapping ErrNotAuthorized) in StateRefused, ErrExpired in StateExpired;
// nil otherwise.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopErr
}

// fail records why the client stops and enters the terminal state s.
func (c *Client) fail(s State, err error) {
	c.mu.Lock()
	c.stopErr = err
	c.mu.Unlock()
	c.setState(s)
}

// State returns the connection state.
func (c *Client) State() State { return State(c.state.Load()) }

func (c *Client) setState(s State) {
	if s == StateRefused || s == StateExpired {
		c.stop()
	}
	if State(c.state.Swap(int32(s))) != s && c.cfg.OnStateChange != nil {
		c.cfg.OnStateChange(s)
	}
}

// stop marks the end of the client's useful life (closed, refused,
// expired): waiting publishes give up.
func (c *Client) stop() { c.stopOnce.Do(func() { close(c.stopped) }) }

// tlsConfig trusts the pinned root only and presents the current
// certificate through GetClientCertificate.
func (c *Client) tlsConfig(serverName string) *tls.Config {
	return &tls.Config{
		RootCAs:            c.id.Load().RootPool(),
		ServerName:         serverName,
		MinVersion:         c.cfg.MinTLS,
		CurvePreferences:   c.cfg.CurvePreferences,
		ClientSessionCache: c.cache,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.cert.Load(), nil
		},
	}
}

// dial is paho's connection function: TLS with our config, bounded by
// the context of the connect in progress, errors kept for classification.
func (c *Client) dial(_ *url.URL, _ paho.ClientOptions) (net.Conn, error) {
	d := &net.Dialer{Timeout: c.cfg.ConnectTimeout}
	if c.cfg.LocalAddr != nil {
		d.LocalAddr = c.cfg.LocalAddr
	}
	c.mu.Lock()
	ctx := c.dialCtx
	c.mu.Unlock()
	if ctx == nil {
		ctx = c.ctx
	}
	a := c.broker()
	conn, err := (&tls.Dialer{NetDialer: d, Config: c.tlsConfig(a.serverName)}).DialContext(ctx, "tcp", a.host)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lastDial = err
	if err != nil {
		return nil, err
	}
	if ctx.Err() != nil { // the connect gave up while we dialled
		conn.Close()
		return nil, ctx.Err()
	}
	c.conn = conn
	return conn, nil
}

// broker is the broker in use; next moves to the following one.
func (c *Client) broker() brokerAddr { return c.addrs[c.cur.Load()] }

func (c *Client) next() {
	if len(c.addrs) > 1 {
		c.cur.Store((c.cur.Load() + 1) % int32(len(c.addrs)))
	}
}

// Broker returns the address (HOST:PORT) of the broker the client uses or
// will try next.
func (c *Client) Broker() string { return c.broker().host }

// Connect makes the first connection and starts the background work
// (reconnects, renewal). It returns ErrNotAuthorized, ErrTLS or ErrTimeout
// (wrapping the cause) without retrying: those need a human. With several
// brokers it tries each once while they are unreachable or time out.
//
// Cancelling ctx ends the attempt at once (dial, TLS handshake, or the
// wait for the CONNACK).
func (c *Client) Connect(ctx context.Context) error {
	if c.State() == StateClosed {
		return ErrClosed
	}
	for i := range c.addrs {
		err := c.connectOnce(ctx)
		if err == nil {
			break
		}
		if i == len(c.addrs)-1 || errors.Is(err, ErrNotAuthorized) || errors.Is(err, ErrTLS) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
			return err
		}
		c.log.Info("broker unreachable, trying the next one", "broker", c.broker().host, "err", err)
		c.next()
		// a short jittered pause: a fleet starting against a dead node does
		// not land on the next one all at once
		pause := time.NewTimer(rand.N(c.cfg.MinBackoff + 1))
		select {
		case <-ctx.Done():
			pause.Stop()
			return err
		case <-pause.C:
		}
	}
	c.wg.Add(2)
	go c.supervise()
	go c.renewLoop()
	return nil
}

func (c *Client) connectOnce(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopClose := context.AfterFunc(c.ctx, cancel) // Close ends a connect in progress
	defer stopClose()
	c.mu.Lock()
	c.dialCtx, c.conn, c.lastDial = ctx, nil, nil
	c.mu.Unlock()
	tok := c.paho.Connect()
	err := wait(ctx, tok, c.cfg.ConnectTimeout+5*time.Second)
	if err != nil {
		// paho's attempt goes on (its wait for the CONNACK is not
		// cancellable): end it by closing its connection. A dial still
		// under way sees ctx cancelled and closes its own.
		cancel()
	}
	c.mu.Lock()
	conn := c.conn
	c.dialCtx, c.conn = nil, nil
	c.mu.Unlock()
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		if c.ctx.Err() != nil {
			return ErrClosed
		}
		var rc byte // read only once paho is done with the token
		select {
		case <-tok.Done():
			rc = tok.(*paho.ConnectToken).ReturnCode()
		default:
		}
		return c.classify(err, rc)
	}
	ct := tok.(*paho.ConnectToken)
	if !ct.SessionPresent() {
		if err := c.resubscribe(ctx); err != nil {
			c.paho.Disconnect(0)
			return err
		}
	}
	c.setState(StateConnected)
	return nil
}

// classify maps a connect failure to the package errors.
func (c *Client) classify(err error, rc byte) error {
	addr := c.broker().host
	c.mu.Lock()
	dialErr := c.lastDial
	c.mu.Unlock()
	switch {
	case rc == packets.ErrRefusedNotAuthorised || rc == packets.ErrRefusedBadUsernameOrPassword:
		return fmt.Errorf("%w (CONNACK %d: revoked, expired, or client ID/Will not allowed): %v", ErrNotAuthorized, rc, err)
	case errors.Is(err, ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: connecting to %s: %v", ErrTimeout, addr, err)
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
			// The fix is on the broker: a certificate naming this host.
			return fmt.Errorf("%w: broker certificate does not name %q (on the broker, add the name: broker server-cert --data DIR --host %s, keeping its other --host names; or connect by a name it has): %w",
				ErrTLS, host.Host, host.Host, dialErr)
		case errors.As(dialErr, &invalid), errors.As(dialErr, &verify):
			return fmt.Errorf("%w: broker certificate: %w", ErrTLS, dialErr)
		case isTimeout(dialErr):
			return fmt.Errorf("%w: connecting to %s: %w", ErrTimeout, addr, dialErr)
		case isTLSAlert(dialErr):
			return fmt.Errorf("%w: the broker refused our certificate: %w", ErrTLS, dialErr)
		}
		return fmt.Errorf("device: connect to %s: %w", addr, dialErr)
	}
	if isTLSAlert(err) { // TLS 1.3: the alert comes after the handshake, with the CONNACK read
		return fmt.Errorf("%w: the broker refused our certificate: %w", ErrTLS, err)
	}
	return fmt.Errorf("device: connect to %s: %w", addr, err)
}

// isTLSAlert reports an alert received from the peer (crypto/tls returns
// it as a *net.OpError with Op "remote error").
func isTLSAlert(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "remote error"
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

// supervise flushes the offline queue and reconnects after a loss, with
// backoff and full jitter, until Close, a refusal, or expiry.
func (c *Client) supervise() {
	defer c.wg.Done()
	flaps := 0 // connections in a row that ended soon after they were made
	for {
		lost := false
		up := time.Now()
		c.flush()
		select {
		case <-c.closed:
			return
		case err := <-c.lost:
			c.setState(StateDisconnected)
			c.log.Warn("connection lost", "err", err)
			if c.cfg.OnConnectionLost != nil {
				c.cfg.OnConnectionLost(err)
			}
			// A connection that ends soon after it was made counts as a
			// failed attempt, so a broker that closes the connection each
			// time (a 3.1.1 broker refusing a publish that is resent after
			// every reconnect) is retried with a growing backoff, not in a
			// loop.
			if time.Since(up) < max(10*time.Second, 4*c.cfg.MinBackoff) {
				flaps++
			} else {
				flaps = 0
			}
			lost = true
			c.next() // the broker may be gone: another node of the cluster
		case <-c.wake:
			// renewal: reconnect at once with the new certificate (the
			// session is offline meanwhile); publishes made meanwhile go to
			// the offline queue
			c.setState(StateDisconnected)
			c.paho.Disconnect(250)
			flaps = 0
		}
		if !c.reconnect(flaps, lost) {
			return
		}
	}
}

// reconnect loops until connected (true) or until there is no point
// (false: closed, refused, expired). The first attempt waits the backoff
// of attempt n0, or up to MinBackoff after a lost connection (jitter).
func (c *Client) reconnect(n0 int, lost bool) bool {
	for n := n0; ; n++ {
		if n > 0 || lost {
			ceiling := min(c.cfg.MaxBackoff, c.cfg.MinBackoff<<max(min(n-1, 30), 0))
			delay := time.NewTimer(rand.N(ceiling + 1)) // full jitter
			select {
			case <-c.closed:
				delay.Stop()
				return false
			case <-delay.C:
			}
		}
		if time.Now().After(c.id.Load().Leaf().NotAfter) {
			c.log.Error("certificate expired; not reconnecting: enroll again", "not_after", c.id.Load().Leaf().NotAfter)
			c.fail(StateExpired, fmt.Errorf("%w at %s: enroll again", ErrExpired, c.id.Load().Leaf().NotAfter.UTC().Format(time.RFC3339)))
			return false
		}
		c.attempts.Add(1)
		ctx, cancel := context.WithTimeout(c.ctx, c.cfg.ConnectTimeout+5*time.Second)
		err := c.connectOnce(ctx)
		cancel()
		switch {
		case err == nil:
			c.log.Info("reconnected", "attempt", n-n0+1)
			if c.cfg.OnReconnected != nil {
				c.cfg.OnReconnected()
			}
			return true
		case errors.Is(err, ErrClosed):
			return false
		case errors.Is(err, ErrNotAuthorized):
			c.log.Error("broker refused the device; not reconnecting", "err", err)
			c.fail(StateRefused, err)
			return false
		}
		c.log.Info("reconnect failed", "attempt", n-n0+1, "broker", c.broker().host, "err", err)
		c.next()
		select {
		case <-c.closed:
			return false
		default:
		}
	}
}

// Publish sends a message.
//
// QoS 1: Publish returns nil once the broker has acknowledged the message
// (PUBACK), or once it is in the offline queue (the client is not
// connected; bounded: ErrQueueFull), from where it is sent after the
// reconnect. A message in flight when the connection drops stays in the
// session and is resent after the reconnect: Publish goes on waiting for
// its acknowledgement. Delivery is at least once. If ctx ends (or no
// PUBACK comes within ConnectTimeout+5s), the message is withdrawn - it
// may still have reached the broker - and Publish returns ErrTimeout.
//
// MQTT 3.1.1 has no way to refuse a publish: a broker that refuses one
// closes the connection, which a client cannot tell from a network drop or
// a broker restart. So a refused message is resent after each reconnect
// (the reconnect backoff grows while connections keep ending at once)
// until ctx ends; the ErrTimeout then says how many times the connection
// was lost while the message was in flight.
//
// QoS 0 while offline fails with ErrOffline. A topic with a wildcard ('+',
// '#'), a NUL, invalid UTF-8, or outside 1-65535 bytes fails with
// ErrInvalidTopic; topic and payload over MaxMessage with ErrTooLarge.
func (c *Client) Publish(ctx context.Context, topic string, payload []byte, qos byte, retain bool) error {
	if err := checkTopic(topic); err != nil {
		return err
	}
	if qos > 1 {
		return fmt.Errorf("device: QoS %d not supported (0 or 1)", qos)
	}
	if err := c.usable(); err != nil {
		return err
	}
	m := message{Topic: topic, Payload: payload, Retain: retain}
	if err := c.queue.check(m); err != nil {
		return err
	}
	if c.State() != StateConnected {
		if qos == 0 {
			return ErrOffline
		}
		return c.queue.push(m)
	}
	if qos == 0 {
		err := wait(ctx, c.paho.Publish(topic, 0, retain, payload), c.cfg.ConnectTimeout+5*time.Second)
		if errors.Is(err, paho.ErrNotConnected) {
			return ErrOffline
		}
		return err
	}
	err := c.publish1(ctx, m, true)
	if errors.Is(err, errNotSent) { // lost between our state check and paho's
		return c.queue.push(m)
	}
	return err
}

// usable returns the error for a client that will not connect again.
func (c *Client) usable() error {
	if err := c.Err(); err != nil {
		return err
	}
	switch c.State() {
	case StateClosed:
		return ErrClosed
	case StateRefused:
		return fmt.Errorf("%w: the broker refused the connection", ErrNotAuthorized)
	case StateExpired:
		return ErrExpired
	}
	return nil
}

// errNotSent: paho did not take the message (not connected).
var errNotSent = errors.New("device: not sent")

// publish1 sends a QoS 1 message and waits for its PUBACK. If the
// connection drops meanwhile, the message stays in the session to be
// resent after the reconnect and publish1 goes on waiting (keep), or it
// is withdrawn and publish1 returns at once (!keep: the offline queue
// still holds it).
func (c *Client) publish1(ctx context.Context, m message, keep bool) error {
	c.mu.Lock()
	lost, losses := c.lostCh, c.losses
	c.mu.Unlock()
	tok := c.paho.Publish(m.Topic, 1, m.Retain, m.Payload)
	mid := tok.(*paho.PublishToken).MessageID()
	if mid == 0 { // not stored: the token is complete
		err := wait(ctx, tok, c.cfg.ConnectTimeout+5*time.Second)
		if errors.Is(err, paho.ErrNotConnected) {
			return errNotSent
		}
		return fmt.Errorf("device: publish to %q: %w", m.Topic, err)
	}
	key := outboundKey(mid)
	e := c.session.entry(key)
	if e == nil {
		return nil // already acknowledged
	}
	bound := c.cfg.ConnectTimeout + 5*time.Second
	timer := time.NewTimer(bound)
	defer timer.Stop()
	withdraw := func(why error) error {
		if !c.session.withdraw(key) && c.session.wasAcked(e) {
			return nil // the PUBACK won the race
		}
		c.mu.Lock()
		n := c.losses - losses
		c.mu.Unlock()
		if n > 0 {
			return fmt.Errorf("%w (withdrawn; %w, %d times - a 3.1.1 broker closes the connection on a publish it refuses: check the topic against the device's policy)", why, ErrLostInFlight, n)
		}
		return fmt.Errorf("%w (withdrawn)", why)
	}
	for {
		select {
		case <-e.done:
			if c.session.wasAcked(e) {
				return nil
			}
			// the session was reset (clean session): send it again later
			if keep {
				return c.queue.push(m)
			}
			return errNotSent
		case <-lost:
			if !keep || c.cfg.CleanSession {
				if !c.session.withdraw(key) && c.session.wasAcked(e) {
					return nil
				}
				if keep { // a clean session forgets it: queue it again
					return c.queue.push(m)
				}
				return errNotSent
			}
			c.mu.Lock()
			lost = c.lostCh
			c.mu.Unlock()
		case <-ctx.Done():
			return withdraw(fmt.Errorf("%w: publish to %q: no PUBACK: %w", ErrTimeout, m.Topic, ctx.Err()))
		case <-timer.C:
			return withdraw(fmt.Errorf("%w: publish to %q: no PUBACK within %v", ErrTimeout, m.Topic, bound))
		case <-c.stopped:
			err := c.usable()
			if err == nil {
				err = ErrClosed
			}
			return withdraw(fmt.Errorf("publish to %q: not acknowledged: %w", m.Topic, err))
		}
	}
}

// flush sends the offline queue after a (re)connect, one message at a
// time, each removed once acknowledged. If the connection drops, what is
// left waits for the next reconnect.
func (c *Client) flush() {
	for {
		m, ok := c.queue.peek()
		if !ok {
			return
		}
		if err := c.publish1(c.ctx, m, false); err != nil {
			if !errors.Is(err, errNotSent) && c.ctx.Err() == nil {
				c.log.Warn("offline queue not flushed; will retry after the next reconnect", "err", err, "queued", c.queue.len())
			}
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
	c.cancel() // ends a connect, renewal or flush in progress
	c.stop()
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
