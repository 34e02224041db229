package broker

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/provisioning"
)

// session is what the broker knows about an authenticated client. It lives
// from CONNECT to disconnect, keyed by the Mochi client (deliveries are
// checked when cl.Net.Conn may already be gone).
type session struct {
	cl       *mqtt.Client
	id       policy.Identity
	serial   string
	issuer   []byte
	notAfter time.Time
	remote   string
	expiry   *time.Timer
	p        atomic.Pointer[policy.Perms]
	flow     flowState
}

func (s *session) perms() *policy.Perms     { return s.p.Load() }
func (s *session) setPerms(p *policy.Perms) { s.p.Store(p) }

// authHook is the broker's only authentication/authorization hook: Mochi
// ORs hook answers, so a second one could only widen access.
type authHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *authHook) ID() string { return "mqtls-auth" }

func (h *authHook) Provides(b byte) bool {
	return b == mqtt.OnConnect || b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck ||
		b == mqtt.OnDisconnect
}

// refusal is a CONNECT denial reason.
type refusal struct {
	label  string // metrics label
	reason string // audit text
}

// OnConnect runs after the TLS handshake and the CONNECT packet: it
// establishes the identity or refuses with CONNACK "not authorized" itself
// (Mochi's own refusal would say "bad username or password").
func (h *authHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	b := h.b
	s, ref := b.identify(cl, pk)
	if ref != nil {
		b.metrics.refused.WithLabelValues(ref.label).Inc()
		cn, serial := "", ""
		if s != nil {
			cn, serial = s.id.CN, s.serial
		}
		b.log.Info("audit", "event", "connect refused", "cn", cn, "serial", serial, "remote", cl.Net.Remote, "client_id", cl.ID, "reason", ref.reason)
		// Mochi maps only "bad username or password" to a 3.1.1 code; send
		// 3.1.1's own "not authorized" (0x05) or v5's (0x87).
		code := packets.ErrNotAuthorized
		if cl.Properties.ProtocolVersion < 5 {
			code = packets.Err3NotAuthorized
		}
		_ = b.mochi.SendConnack(cl, code, false, nil) // the refusal stands even if the ack is lost
		return packets.ErrNotAuthorized
	}
	// Keepalive bounds: 0 (none) or too long gets the maximum.
	ka := cl.State.Keepalive
	switch {
	case ka == 0 || ka > b.cfg.MaxKeepalive:
		ka = b.cfg.MaxKeepalive
	case ka < b.cfg.MinKeepalive:
		ka = b.cfg.MinKeepalive
	}
	if ka != cl.State.Keepalive {
		cl.State.Keepalive, cl.State.ServerKeepalive = ka, true
	}
	b.register(s)
	return nil
}

// identify checks the connection and CONNECT and compiles permissions.
func (b *Broker) identify(cl *mqtt.Client, pk packets.Packet) (*session, *refusal) {
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return nil, &refusal{"not_tls", "connection is not TLS"}
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return nil, &refusal{"no_certificate", "no verified client certificate"}
	}
	leaf := st.VerifiedChains[0][0]
	s := &session{
		flow:     flowState{drained: make(chan struct{}, 1)},
		cl:       cl,
		id:       identityOf(leaf),
		serial:   leaf.SerialNumber.Text(16),
		issuer:   leaf.RawIssuer,
		notAfter: leaf.NotAfter,
		remote:   cl.Net.Remote,
	}
	switch {
	case leaf.IsCA:
		return s, &refusal{"ca_certificate", "client certificate is a CA certificate"}
	case !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth):
		return s, &refusal{"no_client_auth", "client certificate lacks EKU clientAuth"}
	}
	if err := provisioning.CheckDeviceID(s.id.CN); err != nil {
		return s, &refusal{"bad_cn", fmt.Sprintf("certificate CN %q is not a valid device ID", s.id.CN)}
	}
	if cl.ID != s.id.CN {
		return s, &refusal{"client_id_mismatch", fmt.Sprintf("client ID %q is not the certificate CN %q", cl.ID, s.id.CN)}
	}
	if why := b.revoked.check(s.serial, s.issuer); why != "" {
		return s, &refusal{"revoked", why}
	}
	if time.Now().After(s.notAfter) {
		return s, &refusal{"expired", "certificate expired"}
	}
	b.mu.RLock()
	perms := b.policy.Compile(s.id)
	b.mu.RUnlock()
	s.setPerms(perms)
	if pk.Connect.WillFlag && !perms.Allow(pk.Connect.WillTopic, policy.Publish) {
		return s, &refusal{"will_denied", fmt.Sprintf("Will topic %q not allowed", pk.Connect.WillTopic)}
	}
	return s, nil
}

// identityOf extracts the policy identity from a verified leaf.
func identityOf(leaf *x509.Certificate) policy.Identity {
	id := policy.Identity{CN: leaf.Subject.CommonName, OUs: leaf.Subject.OrganizationalUnit}
	id.SANs = append(id.SANs, leaf.DNSNames...)
	id.SANs = append(id.SANs, leaf.EmailAddresses...)
	for _, u := range leaf.URIs {
		id.SANs = append(id.SANs, u.String())
	}
	for _, ip := range leaf.IPAddresses {
		id.SANs = append(id.SANs, ip.String())
	}
	return id
}

// register records an authenticated session, notes clones and arms the
// expiry timer.
func (b *Broker) register(s *session) {
	b.mu.Lock()
	b.sessions[s.cl] = s
	peers := b.bySerial[s.serial]
	if peers == nil {
		peers = make(map[*mqtt.Client]*session)
		b.bySerial[s.serial] = peers
	}
	clones := 0
	for other := range peers {
		if !other.Closed() {
			clones++
		}
	}
	peers[s.cl] = s
	b.mu.Unlock()
	if clones > 0 {
		b.metrics.clones.Inc()
		b.log.Warn("audit", "event", "certificate in use by another live session (clone?)", "cn", s.id.CN, "serial", s.serial, "remote", s.remote)
	}
	s.expiry = time.AfterFunc(time.Until(s.notAfter), func() { b.disconnect(s, "certificate expired") })
	b.metrics.connections.Inc()
	b.metrics.accepted.Inc()
	if b.log.Enabled(context.Background(), slog.LevelInfo) {
		b.log.Info("connected", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "rules", strings.Join(s.perms().Rules(), ","))
	}
}

func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	return h.b.session(cl) != nil
}

func (b *Broker) session(cl *mqtt.Client) *session {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.sessions[cl]
}

// OnACLCheck is called for PUBLISH (write), SUBSCRIBE (a filter) and every
// delivery (a topic).
func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	s := h.b.session(cl)
	if s == nil {
		return false
	}
	perms := s.perms()
	var ok bool
	action := "publish"
	switch {
	case write:
		ok = perms.Allow(topic, policy.Publish)
	case strings.ContainsAny(topic, "+#"):
		action = "subscribe"
		ok = perms.AllowFilter(topic)
	default:
		// a delivery, or a filter without wildcards: the same question
		action = "receive"
		ok = perms.Allow(topic, policy.Subscribe)
	}
	if !ok {
		h.b.metrics.aclDenied.WithLabelValues(action).Inc()
		h.b.log.Info("audit", "event", action+" denied", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "topic", topic)
	}
	return ok
}

func (h *authHook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	b := h.b
	b.mu.Lock()
	s := b.sessions[cl]
	delete(b.sessions, cl)
	if s != nil {
		delete(b.bySerial[s.serial], cl)
		if len(b.bySerial[s.serial]) == 0 {
			delete(b.bySerial, s.serial)
		}
	}
	b.mu.Unlock()
	if s == nil {
		return
	}
	s.expiry.Stop()
	b.flowRelease(s)
	b.metrics.connections.Dec()
	b.log.Info("disconnected", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "err", err)
}

// sessionsOf returns the live sessions of a certificate.
func (b *Broker) sessionsOf(serial string, issuer []byte) []*session {
	b.mu.RLock()
	defer b.mu.RUnlock()
	var out []*session
	for _, s := range b.bySerial[serial] {
		if issuer == nil || bytes.Equal(s.issuer, issuer) {
			out = append(out, s)
		}
	}
	return out
}
