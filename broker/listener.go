package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// listener is the broker's Mochi listener: it completes the TLS handshake
// itself, under a deadline that also covers the CONNECT packet, and keeps
// accepting after transient errors such as EMFILE (Mochi's TCP listener
// stops serving on the first Accept error).
type listener struct {
	id   string
	ln   net.Listener
	b    *Broker
	mu   sync.Mutex
	done bool
}

var _ listeners.Listener = (*listener)(nil)

func newListener(id string, ln net.Listener, b *Broker) *listener {
	return &listener{id: id, ln: ln, b: b}
}

func (l *listener) Init(*slog.Logger) error { return nil }
func (l *listener) ID() string              { return l.id }
func (l *listener) Address() string         { return l.ln.Addr().String() }
func (l *listener) Protocol() string        { return "mqtts" }
func (l *listener) Addr() net.Addr          { return l.ln.Addr() }

func (l *listener) closed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.done
}

// Serve accepts until Close. Accept errors are logged, counted and retried
// with a backoff of up to one second.
func (l *listener) Serve(establish listeners.EstablishFn) {
	backoff := 5 * time.Millisecond
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.closed() || errors.Is(err, net.ErrClosed) {
				return
			}
			l.b.metrics.acceptErrors.Inc()
			l.b.log.Error("accept failed; retrying", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		go l.handle(conn, establish) // bounded by the handshake deadline, then Mochi's client lifetime
	}
}

func (l *listener) handle(conn net.Conn, establish listeners.EstablishFn) {
	b := l.b
	deadline := time.Now().Add(b.cfg.HandshakeTimeout)
	// The deadline stays set through the CONNECT read; Mochi replaces it
	// with the keepalive deadline once the client is admitted.
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return
	}
	tc := tls.Server(conn, b.tls)
	start := time.Now()
	err := tc.Handshake() // bounded by the connection deadline

	if err != nil {
		b.handshakeFailed(tc, err)
		tc.Close()
		return
	}
	b.metrics.handshake.Observe(time.Since(start).Seconds())
	// Mochi's Close waits on Listeners.ClientsWg once the listeners are
	// closed, and EstablishConnection adds to it: a handshake finishing
	// during Close would Add concurrently with that Wait (-race reports
	// it: TestCloseRacesHandshakes). Count the connection here, under the
	// lock where Close marks the listener done, so every count precedes
	// the Wait; Mochi's own Add then happens while the count is positive.
	l.mu.Lock()
	if l.done {
		l.mu.Unlock()
		tc.Close()
		return
	}
	b.mochi.Listeners.ClientsWg.Add(1)
	l.mu.Unlock()
	defer b.mochi.Listeners.ClientsWg.Done()
	err = establish(l.id, tc) // Mochi logs and counts client errors itself
	if !b.connEnded(tc) && isTimeout(err) {
		// TLS done, but no CONNECT before the deadline.
		b.metrics.refused.WithLabelValues("connect_timeout").Inc()
		b.log.Info("audit", "event", "no CONNECT before the deadline", "cn", peerCN(tc), "remote", tc.RemoteAddr().String(), "reason", err.Error())
	}
}

// peerCN is the verified client certificate's CN, or "".
func peerCN(tc *tls.Conn) string {
	if ch := tc.ConnectionState().VerifiedChains; len(ch) > 0 {
		return ch[0][0].Subject.CommonName
	}
	return ""
}

// Close stops accepting and disconnects the listener's clients. It does
// not call Mochi's closer (Server.closeListenerClients): that reads
// Clients.GetByListener, which takes the clients' read lock twice (Len
// inside the locked loop), so a client added or removed in between waits
// for the write lock, the second read lock waits behind it, and Close
// never returns (a hang seen in CI; TestCloseRacesConnects). GetAll takes
// the lock once.
func (l *listener) Close(listeners.CloseFn) {
	l.mu.Lock()
	l.done = true
	l.mu.Unlock()
	l.ln.Close()
	for _, cl := range l.b.mochi.Clients.GetAll() {
		if cl.Net.Listener == l.id && !cl.Closed() {
			_ = l.b.mochi.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// handshakeFailed writes the audit line of a failed handshake, naming the
// certificate when the client presented one.
func (b *Broker) handshakeFailed(tc *tls.Conn, err error) {
	cn, serial, label := "", "", "handshake"
	var verr *tls.CertificateVerificationError
	if errors.As(err, &verr) && len(verr.UnverifiedCertificates) > 0 {
		leaf := verr.UnverifiedCertificates[0]
		cn, serial, label = leaf.Subject.CommonName, leaf.SerialNumber.Text(16), "certificate"
	}
	if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
		label = "handshake_timeout"
	}
	b.metrics.refused.WithLabelValues(label).Inc()
	b.log.Info("audit", "event", "handshake failed", "cn", cn, "serial", serial, "remote", tc.RemoteAddr().String(), "reason", err.Error())
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
