package broker

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// session is what the broker knows about an authenticated client, keyed by
// the Mochi client object. It lives as long as Mochi's session for that
// object, not as long as the socket: Mochi ACL-checks the subscribers of
// a disconnected persistent session before queueing for them. It ends when
// a clean session disconnects, when Mochi expires the session, or when a
// newer connection with the same client ID has taken it over.
type session struct {
	cl       *mqtt.Client
	conn     net.Conn
	id       policy.Identity
	serial   string
	issuer   []byte
	notAfter time.Time
	remote   string
	c        atomic.Pointer[compiled]
	children atomic.Pointer[[]string] // a gateway's children (registry)
	revoked  atomic.Bool              // no more deliveries; Mochi drops the session at expiry
	decided  atomic.Int32             // publish decided in OnPacketRead: 0 none, 1 allowed, 2 denied
	flow     flowState

	// guarded by Broker.mu
	expiry      *time.Timer
	established bool     // CONNACK written (OnSessionEstablished)
	ended       bool     // the connection is over
	superseded  bool     // a newer connection took over the client ID
	prev        *session // the session this one took over
	idLocked    bool     // holds its client ID's lock (only its connection's goroutine touches it)
}

// compiled is a session's permissions and the policy they came from.
type compiled struct {
	pol   *policy.Policy
	perms *policy.Perms
}

func (s *session) perms() *policy.Perms { return s.c.Load().perms }

// compile (re)computes s's permissions from p.
func (s *session) compile(p *policy.Policy) {
	id := s.id
	id.Children = s.childList()
	s.c.Store(&compiled{p, p.Compile(id)})
}

// childList is a gateway's children (nil for other identities).
func (s *session) childList() []string {
	if c := s.children.Load(); c != nil {
		return *c
	}
	return nil
}

func (s *session) setChildren(c []string) { s.children.Store(&c) }

// authHook is the broker's only authentication/authorization hook: Mochi
// ORs hook answers, so a second one could only widen access.
type authHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *authHook) ID() string { return "mqtls-auth" }

func (h *authHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablish, mqtt.OnSessionEstablished,
		mqtt.OnACLCheck, mqtt.OnDisconnect, mqtt.OnClientExpired, mqtt.OnWill, mqtt.OnPacketRead:
		return true
	}
	return false
}

// refusal is a CONNECT denial reason.
type refusal struct {
	label  string // metrics label
	reason string // audit text
	badID  bool   // answer "client identifier not valid" instead of "not authorized"
}

// OnConnect runs after the TLS handshake and the CONNECT packet: it
// establishes the identity or refuses with CONNACK "not authorized" itself
// (Mochi's own refusal would say "bad username or password").
func (h *authHook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	b := h.b
	s, ref := b.identify(cl, pk)
	if ref == nil {
		// Registered before the revocation check: a revocation the poller
		// applies after this point finds the session and closes it.
		ref = b.admit(s)
		if ref == nil {
			ref = b.checkRevoked(s)
		}
		if ref != nil {
			b.mu.Lock()
			b.releaseLocked(s)
			delete(b.byConn, s.conn)
			b.mu.Unlock()
		} else if b.connectPause != nil {
			b.connectPause()
		}
	}
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
		switch {
		case ref.badID && cl.Properties.ProtocolVersion < 5:
			code = packets.Err3ClientIdentifierNotValid
		case ref.badID:
			code = packets.ErrClientIdentifierNotValid
		case cl.Properties.ProtocolVersion < 5:
			code = packets.Err3NotAuthorized
		}
		_ = b.mochi.SendConnack(cl, code, false, nil) // the refusal stands even if the ack is lost
		return packets.ErrNotAuthorized
	}
	// Keepalive: 0 (none) or too long gets the maximum. A v5 client is told
	// (Server Keep Alive) when its value is raised to the minimum; 3.1.1 has
	// no way to say so, and MQTT-3.1.2-24 makes the client's value the one
	// the server enforces, so a short 3.1.1 keepalive stays.
	ka := cl.State.Keepalive
	switch {
	case ka == 0 || ka > b.cfg.MaxKeepalive:
		ka = b.cfg.MaxKeepalive
	case ka < b.cfg.MinKeepalive && cl.Properties.ProtocolVersion == 5:
		ka = b.cfg.MinKeepalive
	}
	if ka != cl.State.Keepalive {
		cl.State.Keepalive, cl.State.ServerKeepalive = ka, true
	}
	return nil
}

// identify checks the connection and CONNECT and compiles permissions.
func (b *Broker) identify(cl *mqtt.Client, pk packets.Packet) (*session, *refusal) {
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return nil, &refusal{label: "not_tls", reason: "connection is not TLS"}
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return nil, &refusal{label: "no_certificate", reason: "no verified client certificate"}
	}
	chain := st.VerifiedChains[0]
	leaf := chain[0]
	s := &session{
		flow:     flowState{drained: make(chan struct{}, 1)},
		cl:       cl,
		conn:     tc,
		id:       identityOf(chain, b.cfg.Issuers),
		serial:   leaf.SerialNumber.Text(16),
		issuer:   leaf.RawIssuer,
		notAfter: leaf.NotAfter,
		remote:   cl.Net.Remote,
	}
	switch {
	case leaf.IsCA:
		return s, &refusal{label: "ca_certificate", reason: "client certificate is a CA certificate"}
	case !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth):
		return s, &refusal{label: "no_client_auth", reason: "client certificate lacks EKU clientAuth"}
	case len(chain)-2 > b.cfg.MaxIntermediates:
		return s, &refusal{label: "chain_too_deep", reason: fmt.Sprintf("certificate chain has %d intermediates (maximum %d)", len(chain)-2, b.cfg.MaxIntermediates)}
	}
	// The same key rules as issuance, for the leaf and every intermediate
	// (the root is the configured trust anchor).
	for i, c := range chain[:len(chain)-1] {
		if err := ca.CheckKey(c.PublicKey); err != nil {
			what := "client certificate"
			if i > 0 {
				what = fmt.Sprintf("intermediate %q", c.Subject.CommonName)
			}
			return s, &refusal{label: "weak_key", reason: fmt.Sprintf("%s: %v", what, err)}
		}
	}
	if err := deviceid.Check(s.id.CN); err != nil {
		return s, &refusal{label: "bad_cn", reason: fmt.Sprintf("certificate CN %q is not a valid device ID", s.id.CN)}
	}
	if time.Now().After(s.notAfter) {
		return s, &refusal{label: "expired", reason: "certificate expired"}
	}
	if ref := b.loadChildren(s); ref != nil {
		return s, ref
	}
	s.compile(b.policy.Load())
	if pk.Connect.ClientIdentifier == "" {
		ok, rule := s.perms().AssignedIDs()
		if !ok {
			return s, &refusal{label: "client_id_rejected", reason: "empty client ID (no rule allows assigned IDs)", badID: true}
		}
		// {cn}-<random> instead of Mochi's own assignment; v5 is told.
		var r [8]byte
		rand.Read(r[:])
		cl.ID = s.id.CN + "-" + hex.EncodeToString(r[:])
		cl.Properties.Props.AssignedClientID = cl.ID
		if b.cfg.LogConnections {
			b.log.Info("client ID assigned", "cn", s.id.CN, "client_id", cl.ID, "rule", rule)
		}
	} else if ok, _ := s.perms().AllowClientID(cl.ID); !ok {
		return s, &refusal{label: "client_id_mismatch", reason: fmt.Sprintf("client ID %q not allowed for CN %q (policy client_ids; default: the CN)", cl.ID, s.id.CN)}
	}
	if pk.Connect.WillFlag && !s.perms().Allow(pk.Connect.WillTopic, policy.Publish) {
		return s, &refusal{label: "will_denied", reason: fmt.Sprintf("Will topic %q not allowed", pk.Connect.WillTopic)}
	}
	return s, nil
}

// checkRevoked refuses a revoked certificate or device ID, and any CONNECT
// while the revocation data is unavailable unless configured otherwise.
func (b *Broker) checkRevoked(s *session) *refusal {
	if why := b.revoked.check(s.serial, s.issuer, s.id.CN); why != "" {
		return &refusal{label: "revoked", reason: why}
	}
	if b.revoked.unavailable() && !b.cfg.AdmitWhenRegistryDown {
		return &refusal{label: "registry_unavailable", reason: "revocation data unavailable (registry unreadable); refusing new connections"}
	}
	return nil
}

// identityOf extracts the policy identity from a verified chain. The
// attested marker counts only in a certificate of one of issuers, the CAs
// that set it after verifying a TPM attestation: another CA under the
// same root (an adopted enterprise root has many) may write the same
// policy OIDs for its own reasons.
func identityOf(chain []*x509.Certificate, issuers []*x509.Certificate) policy.Identity {
	leaf := chain[0]
	attested := ca.Attested(leaf) && len(chain) > 1 && slices.ContainsFunc(issuers, func(c *x509.Certificate) bool {
		return bytes.Equal(c.RawSubjectPublicKeyInfo, chain[1].RawSubjectPublicKeyInfo)
	})
	id := policy.Identity{CN: leaf.Subject.CommonName, OUs: leaf.Subject.OrganizationalUnit, Attested: attested}
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

// admit registers s so that revocations and policy reloads find it, or
// refuses it when its client ID belongs to another identity's session
// (Mochi would hand that session, queued messages included, to this
// connection) or its certificate already holds the sessions its policy
// allows (max_sessions counts live and stored sessions; a session with the
// same client ID is taken over, not added).
func (b *Broker) admit(s *session) *refusal {
	b.mu.Lock()
	if other := b.claimed[s.cl.ID]; other != nil && other.id.CN != s.id.CN {
		b.mu.Unlock()
		return &refusal{label: "client_id_in_use", reason: fmt.Sprintf("client ID %q belongs to a session of another identity (%q)", s.cl.ID, other.id.CN)}
	}
	if b.cfg.Cluster != nil {
		if cn := b.cfg.Cluster.Holder(s.cl.ID); cn != "" && cn != s.id.CN {
			b.mu.Unlock()
			return &refusal{label: "client_id_in_use", reason: fmt.Sprintf("client ID %q belongs to a session of another identity (%q) on another node", s.cl.ID, cn)}
		}
	}
	if limit := s.perms().MaxSessions(); limit > 0 {
		n := 0
		for other := range b.bySerial[s.serial] {
			if other.ID != s.cl.ID {
				n++
			}
		}
		if n >= limit {
			b.mu.Unlock()
			b.metrics.clones.Inc()
			return &refusal{label: "max_sessions", reason: fmt.Sprintf("certificate already holds %d sessions, live or stored (max_sessions %d)", n, limit)}
		}
	}
	b.claimed[s.cl.ID] = s
	b.sessions[s.cl] = s
	b.byConn[s.conn] = s
	peers := b.bySerial[s.serial]
	if peers == nil {
		peers = make(map[*mqtt.Client]*session)
		b.bySerial[s.serial] = peers
	}
	peers[s.cl] = s
	b.mu.Unlock()
	// A policy swapped in after identify compiled s but before s was
	// visible to SetPolicy: recompile.
	if p := b.policy.Load(); s.c.Load().pol != p {
		s.compile(p)
	}
	return nil
}

func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	return h.b.session(cl) != nil
}

// idLock serialises session establishment per client ID: from
// OnSessionEstablish (before Mochi takes over the ID's session) to
// OnSessionEstablished or the end of a connection whose CONNACK failed, so
// the broker's view of which connection holds an ID follows Mochi's.
type idLock struct {
	mu   sync.Mutex
	refs int
}

func (b *Broker) lockID(id string) {
	b.mu.Lock()
	l := b.idLocks[id]
	if l == nil {
		l = &idLock{}
		b.idLocks[id] = l
	}
	l.refs++
	b.mu.Unlock()
	l.mu.Lock()
}

func (b *Broker) unlockID(id string) {
	b.mu.Lock()
	l := b.idLocks[id]
	if l.refs--; l.refs == 0 {
		delete(b.idLocks, id)
	}
	b.mu.Unlock()
	l.mu.Unlock()
}

// OnSessionEstablish runs before Mochi takes over an existing session of
// the same client ID: note the takeover and clones.
func (h *authHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	if s := b.session(cl); s != nil {
		b.lockID(cl.ID) // held until OnSessionEstablished or connEnded
		s.idLocked = true
	}
	b.mu.Lock()
	s := b.sessions[cl]
	if s == nil {
		b.mu.Unlock()
		return
	}
	if prev := b.byID[cl.ID]; prev != nil && prev != s {
		prev.superseded, s.prev = true, prev
	}
	b.byID[cl.ID] = s
	clones := 0 // the same certificate and client ID live twice
	for other, o := range b.bySerial[s.serial] {
		if other != cl && other.ID == cl.ID && !o.ended && !other.Closed() {
			clones++
		}
	}
	b.mu.Unlock()
	if clones > 0 {
		b.metrics.clones.Inc()
		b.log.Warn("audit", "event", "certificate in use by another live session (clone?)", "cn", s.id.CN, "serial", s.serial, "remote", s.remote)
	}
}

// OnSessionEstablished runs once the CONNACK is written: the session is
// live.
func (h *authHook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	b := h.b
	b.mu.Lock()
	s := b.sessions[cl]
	if s == nil {
		b.mu.Unlock()
		return
	}
	s.established = true
	b.releasePrevLocked(s)
	s.expiry = time.AfterFunc(time.Until(s.notAfter), func() { b.disconnect(s, "certificate expired") })
	b.mu.Unlock()
	if s.idLocked {
		s.idLocked = false
		b.unlockID(cl.ID)
	}
	b.metrics.connections.Inc()
	b.metrics.accepted.Inc()
	if b.cfg.Cluster != nil {
		b.cfg.Cluster.Claim(cl.ID, s.serial, s.id.CN)
	}
	if b.cfg.LogConnections && b.log.Enabled(context.Background(), slog.LevelInfo) {
		b.log.Info("connected", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "rules", strings.Join(s.perms().Rules(), ","))
	}
}

// releasePrevLocked forgets the session s took over once it is offline:
// Mochi's client map now holds s, so nothing routes to the old one.
func (b *Broker) releasePrevLocked(s *session) {
	if p := s.prev; p != nil && p.ended {
		b.releaseLocked(p)
		s.prev = nil
	}
}

func (h *authHook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	b := h.b
	b.mu.Lock()
	s := b.sessions[cl]
	if s == nil || s.ended {
		b.mu.Unlock()
		return
	}
	s.ended = true
	live := s.established
	if expire || s.superseded || cl.IsTakenOver() {
		b.releaseLocked(s)
	}
	if s.expiry != nil {
		s.expiry.Stop()
	}
	b.mu.Unlock()
	b.flowRelease(s)
	if live {
		b.metrics.connections.Dec()
		if b.cfg.LogConnections {
			b.log.Info("disconnected", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "err", err)
		}
	}
}

// connEnded runs when Mochi is done with a connection, on every path.
// Mochi skips OnDisconnect when the CONNACK (or the inflight resend) cannot
// be written; such a session is settled here. It reports whether the
// connection had an admitted CONNECT.
func (b *Broker) connEnded(conn net.Conn) bool {
	b.mu.Lock()
	s := b.byConn[conn]
	delete(b.byConn, conn)
	if s != nil && s.idLocked { // the CONNACK or the resend failed
		s.idLocked = false
		defer b.unlockID(s.cl.ID)
	}
	if s == nil || s.established || s.ended {
		b.mu.Unlock()
		return s != nil
	}
	s.ended = true
	b.releasePrevLocked(s)
	cl := s.cl
	expire := (cl.Properties.ProtocolVersion == 5 && cl.Properties.Props.SessionExpiryInterval == 0) ||
		(cl.Properties.ProtocolVersion < 5 && cl.Properties.Clean)
	if expire || s.superseded {
		b.releaseLocked(s)
	}
	b.mu.Unlock()
	b.flowRelease(s)
	if expire {
		// What Mochi does after OnDisconnect for a clean session.
		if cur, ok := b.mochi.Clients.Get(cl.ID); ok && cur == cl {
			b.mochi.UnsubscribeClient(cl)
			cl.ClearInflights()
			b.mochi.Clients.Delete(cl.ID)
		}
	}
	return true
}

// OnClientExpired: Mochi dropped a disconnected persistent session.
func (h *authHook) OnClientExpired(cl *mqtt.Client) {
	h.b.mu.Lock()
	if s := h.b.sessions[cl]; s != nil {
		h.b.releaseLocked(s)
	}
	h.b.mu.Unlock()
}

// releaseLocked forgets s (byConn is left to connEnded).
func (b *Broker) releaseLocked(s *session) {
	if b.sessions[s.cl] == s {
		delete(b.sessions, s.cl)
	}
	if peers := b.bySerial[s.serial]; peers != nil && peers[s.cl] == s {
		delete(peers, s.cl)
		if len(peers) == 0 {
			delete(b.bySerial, s.serial)
		}
	}
	if b.claimed[s.cl.ID] == s {
		delete(b.claimed, s.cl.ID)
	}
	if b.byID[s.cl.ID] == s {
		delete(b.byID, s.cl.ID)
		if b.cfg.Cluster != nil {
			b.cfg.Cluster.Forget(s.cl.ID) // the client ID's session is over here
		}
	}
}

// sessionCounts returns the live sessions and those kept for offline
// persistent clients.
func (b *Broker) sessionCounts() (live, offline int) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, s := range b.sessions {
		switch {
		case s.ended:
			offline++
		case s.established:
			live++
		}
	}
	return live, offline
}

func (b *Broker) session(cl *mqtt.Client) *session {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.sessions[cl]
}

// OnACLCheck is called for PUBLISH (write), SUBSCRIBE (a filter) and every
// delivery (a topic), for offline persistent sessions too.
func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	s := h.b.session(cl)
	if s == nil {
		return false
	}
	perms := s.perms()
	var ok bool
	action := "publish"
	switch {
	case strings.HasPrefix(topic, suppressedWill):
		return false
	case write:
		switch s.decided.Swap(0) { // OnPacketRead decided (and audited) it
		case 1:
			return true
		case 2:
			return false
		}
		ok = perms.Allow(topic, policy.Publish)
	case strings.ContainsAny(topic, "+#") || strings.HasPrefix(topic, "$share/"):
		action = "subscribe"
		ok = !s.revoked.Load() && perms.AllowFilter(topic)
		if ok && perms.Filtering() && perms.OverlapsDeny(topic) {
			h.b.log.Info("audit", "event", "subscription granted; denied topics withheld", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "topic", topic)
		}
	default:
		// a delivery, or a filter without wildcards: the same question
		action = "receive"
		ok = !s.revoked.Load() && perms.Allow(topic, policy.Subscribe)
		if !ok && perms.Filtering() {
			// withheld under overlap: filter: counted, audited once at SUBSCRIBE
			h.b.metrics.aclDenied.WithLabelValues("withheld").Inc()
			return false
		}
	}
	if !ok {
		h.b.metrics.aclDenied.WithLabelValues(action).Inc()
		h.b.log.Info("audit", "event", action+" denied", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "topic", topic)
	}
	return ok
}

// OnPacketRead decides a PUBLISH before Mochi does, because Mochi (v2.7.9)
// drops a PUBLISH to $SYS/... before any hook (a QoS 1 publisher waits for
// a PUBACK forever), checks the ACL before resolving a topic alias (an
// alias to an allowed topic was refused), and answers a denied 3.1.1
// QoS>0 publish with a DISCONNECT packet, which 3.1.1 does not define. The
// decision is handed to OnACLCheck, which runs next on the same client's
// read loop. Tested by TestSysPublishAnswered, TestTopicAliases and
// TestDenied311PublishJustCloses.
func (h *authHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	b := h.b
	switch pk.FixedHeader.Type {
	case packets.Puback, packets.Pubcomp:
		// an acknowledgement from the client: OnQosComplete counts it if
		// it completes a delivery (flow control judges progress by them)
		if s := b.session(cl); s != nil {
			s.flow.lastAck.Store(1<<16 | uint32(pk.PacketID))
		}
		return pk, nil
	case packets.Publish:
	default:
		return pk, nil
	}
	s := b.session(cl)
	if s == nil {
		return pk, nil // OnACLCheck refuses
	}
	s.flow.lastAck.Store(0)
	topic := pk.TopicName
	if topic == "" && pk.Properties.TopicAliasFlag && pk.Properties.TopicAlias > 0 && pk.Properties.TopicAlias <= b.mochi.Options.Capabilities.TopicAliasMaximum {
		topic = cl.State.TopicAliases.Inbound.Set(pk.Properties.TopicAlias, "") // the registered topic, if any
	}
	sys := len(topic) >= len(mqtt.SysPrefix) && strings.EqualFold(topic[:len(mqtt.SysPrefix)], mqtt.SysPrefix)
	if !sys && topic != "" && !s.revoked.Load() && s.perms().Allow(topic, policy.Publish) {
		pk.TopicName = topic
		s.decided.Store(1)
		return pk, nil
	}
	b.metrics.aclDenied.WithLabelValues("publish").Inc()
	b.log.Info("audit", "event", "publish denied", "cn", s.id.CN, "serial", s.serial, "remote", s.remote, "topic", topic, "alias", pk.Properties.TopicAlias)
	switch {
	case pk.FixedHeader.Qos == 0:
	case cl.Properties.ProtocolVersion < 5:
		cl.Stop(fmt.Errorf("publish to %q not allowed", topic)) // 3.1.1: close, no DISCONNECT
	case sys:
		// Mochi drops it without an answer: answer here.
		ack := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: pk.PacketID, ReasonCode: packets.ErrNotAuthorized.Code}
		if pk.FixedHeader.Qos == 2 {
			ack.FixedHeader.Type = packets.Pubrec
		}
		_ = cl.WritePacket(ack) // a failed write ends the connection anyway
	}
	if !sys {
		pk.TopicName = topic
		s.decided.Store(2)
	}
	return pk, nil
}

// suppressedWill is where a Will the policy no longer allows goes: Mochi
// has no way to cancel a Will from a hook, and OnACLCheck refuses every
// delivery and subscription under this prefix.
const suppressedWill = "$mqtls/suppressed-will"

// OnWill checks the Will against the permissions in force when it is sent
// (the policy may have changed since CONNECT).
func (h *authHook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	s := h.b.session(cl)
	if s != nil && !s.revoked.Load() && s.perms().Allow(will.TopicName, policy.Publish) {
		return will, nil
	}
	if s != nil {
		h.b.audit("will suppressed", s, "policy no longer allows Will topic "+will.TopicName)
	}
	return mqtt.Will{TopicName: suppressedWill, Flag: will.Flag}, nil
}

// sessionsOf returns the sessions of a certificate (issuer nil: any
// issuer), live or offline.
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

// sessionsOfDevice returns the sessions whose certificate names deviceID.
func (b *Broker) sessionsOfDevice(deviceID string) []*session {
	b.mu.RLock()
	defer b.mu.RUnlock()
	var out []*session
	for _, s := range b.sessions {
		if s.id.CN == deviceID {
			out = append(out, s)
		}
	}
	return out
}
