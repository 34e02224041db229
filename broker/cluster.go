package broker

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker/policy"
)

// Cluster joins the broker to other nodes that act as one broker (package
// cluster implements it over NATS). The broker calls Publish, Subscribe,
// Unsubscribe, Forget and Claim from its clients' goroutines (they must
// not block) and Start and Close once.
type Cluster interface {
	Start(n Node) error
	// Publish forwards a message a local client published (its publish
	// permission already checked here).
	Publish(m Message)
	// Subscribe and Unsubscribe track the filters local sessions hold;
	// Forget drops a client ID whose session ended.
	Subscribe(clientID, filter string)
	Unsubscribe(clientID, filter string)
	Forget(clientID string)
	// Claim announces that clientID went live here with certificate
	// serial, held by the identity with common name cn.
	Claim(clientID, serial, cn string)
	// Holder is the common name of the identity whose session holds
	// clientID on another node ("" if none is known): the broker refuses
	// a client ID held by another identity, as it does for its own
	// sessions.
	Holder(clientID string) (cn string)
	Close() error
}

// SessionStore, if a Cluster implements it, keeps a cluster-wide copy of
// the subscriptions of the persistent sessions held here, so that another
// node can stand in for this one (queue their messages) if it fails.
type SessionStore interface {
	// Persist records all the subscriptions of clientID's persistent
	// session here (none: the record goes). Called from clients'
	// goroutines: it must not block.
	Persist(clientID string, subs []Subscription)
}

// Node is what a cluster may ask of this broker.
type Node interface {
	// Deliver hands a message from another node to the local subscribers
	// (each delivery is ACL-checked). Calls come from one goroutine and
	// may block while a subscriber's queue is full (flow control).
	Deliver(m Message)
	// Retain mirrors a retained message set on another node (an empty
	// payload clears it), without delivering it.
	Retain(m Message)
	// TakeOver: node now holds clientID's session, for the identity with
	// common name cn; a live local one is closed (the same certificate
	// live on both is a clone). A session of another identity stays: no
	// handover (!ok). A persistent
	// session is returned (ok) and stays here, offline and queueing,
	// until Release; anything else ends here.
	TakeOver(clientID, serial, cn, node string) (s Session, ok bool)
	// Release ends the local session TakeOver returned once the new owner
	// has it, and returns the messages queued here since.
	Release(clientID string, sent Session) (rest Session)
	// Import gives the local session of clientID (live or offline) the
	// subscriptions and messages of its session on another node: the
	// subscriptions it does not hold yet are added (within its
	// permissions), the messages are queued and sent if it is live.
	// ErrCleanSession: the local session is clean (nothing to import);
	// ErrNoSession: no session here.
	Import(clientID string, s Session) error
}

// Errors of Node.Import.
var (
	ErrCleanSession = errors.New("broker: the session here is clean")
	ErrNoSession    = errors.New("broker: no session here for this client ID")
)

// Session is a persistent session moving between nodes: its
// subscriptions and the QoS 1/2 messages queued or in flight for it.
type Session struct {
	Subscriptions []Subscription
	Messages      []Message
	cl            *mqtt.Client // the exporting node's client
	ids           []uint16     // the messages' packet IDs there
}

// Subscription is one of a moving session's subscriptions.
type Subscription struct {
	Filter            string
	QoS               byte
	NoLocal           bool `json:",omitempty"`
	RetainAsPublished bool `json:",omitempty"`
	RetainHandling    byte `json:",omitempty"`
	Identifier        int  `json:",omitempty"`
}

// Message is a PUBLISH crossing nodes.
type Message struct {
	Topic   string
	Payload []byte
	QoS     byte
	Retain  bool
}

// clusterNode is the broker as a cluster sees it.
type clusterNode struct{ b *Broker }

var _ Node = clusterNode{}

func (n clusterNode) Deliver(m Message) {
	if err := n.b.mochi.Publish(m.Topic, m.Payload, m.Retain, m.QoS); err != nil {
		n.b.log.Error("cluster message not delivered", "topic", m.Topic, "err", err)
	}
}

func (n clusterNode) Retain(m Message) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true, Qos: m.QoS},
		TopicName: m.Topic, Payload: m.Payload, Origin: mqtt.InlineClientId}
	n.b.mochi.Topics.RetainMessage(pk.Copy(false))
}

func (n clusterNode) TakeOver(clientID, serial, cn, node string) (Session, bool) {
	b := n.b
	b.mu.RLock()
	s := b.byID[clientID]
	b.mu.RUnlock()
	if s == nil {
		return Session{}, false
	}
	if s.id.CN != cn { // both nodes admitted it at once: neither gets the other's session
		b.log.Warn("audit", "event", "client ID claimed on another node by another identity: session kept here", "cn", s.id.CN, "client_id", clientID, "node", node, "other_cn", cn)
		return Session{}, false
	}
	b.mu.RLock()
	live := s.established && !s.ended
	b.mu.RUnlock()
	if live && s.serial == serial {
		b.metrics.clones.Inc()
		b.log.Warn("audit", "event", "certificate live on two nodes (clone?)", "cn", s.id.CN, "serial", s.serial, "client_id", clientID, "node", node)
	}
	reason := fmt.Sprintf("session taken over by node %s", node)
	if live {
		b.audit("session closed", s, reason)
		if s.cl.Properties.ProtocolVersion == 5 {
			_ = b.mochi.DisconnectClient(s.cl, packets.ErrSessionTakenOver)
		}
		s.cl.Stop(errors.New(reason))
		// Mochi ends the connection on the client's goroutine; the
		// session is offline here once it has (bounded wait).
		for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			b.mu.RLock()
			ended := s.ended
			b.mu.RUnlock()
			if ended {
				break
			}
		}
	}
	cl := s.cl
	if cur, ok := b.mochi.Clients.Get(clientID); ok && cur == cl && !cl.Properties.Clean {
		return exportSession(cl), true
	}
	n.drop(s)
	return Session{}, false
}

// drop ends s here: the session lives on another node now.
func (n clusterNode) drop(s *session) {
	b, cl := n.b, s.cl
	if cur, ok := b.mochi.Clients.Get(cl.ID); ok && cur == cl {
		b.mochi.UnsubscribeClient(cl)
		cl.ClearInflights()
		b.mochi.Clients.Delete(cl.ID)
	}
	b.mu.Lock()
	b.releaseLocked(s)
	b.mu.Unlock()
}

// exportSession copies a session's subscriptions and queued or in-flight
// messages (a QoS 2 message whose PUBREC came is delivered: not copied).
func exportSession(cl *mqtt.Client) Session {
	out := Session{cl: cl, Subscriptions: subscriptions(cl)}
	out.Messages, out.ids = inflight(cl, nil)
	return out
}

func subscriptions(cl *mqtt.Client) []Subscription {
	var subs []Subscription
	for f, sub := range cl.State.Subscriptions.GetAll() {
		subs = append(subs, Subscription{Filter: f, QoS: sub.Qos, NoLocal: sub.NoLocal,
			RetainAsPublished: sub.RetainAsPublished, RetainHandling: sub.RetainHandling, Identifier: sub.Identifier})
	}
	slices.SortFunc(subs, func(a, b Subscription) int { return strings.Compare(a.Filter, b.Filter) })
	return subs
}

// persist gives the cluster a copy of a persistent session's
// subscriptions.
func (b *Broker) persist(cl *mqtt.Client) {
	if st, ok := b.cfg.Cluster.(SessionStore); ok && !cl.Properties.Clean && !cl.Net.Inline {
		st.Persist(cl.ID, subscriptions(cl))
	}
}

// inflight lists cl's queued or in-flight PUBLISHes, oldest first,
// leaving out the packet IDs in skip.
func inflight(cl *mqtt.Client, skip []uint16) ([]Message, []uint16) {
	pks := cl.State.Inflight.GetAll(false)
	slices.SortStableFunc(pks, func(a, b packets.Packet) int {
		if a.Created != b.Created {
			return int(a.Created - b.Created)
		}
		return int(a.PacketID) - int(b.PacketID)
	})
	var msgs []Message
	var ids []uint16
	for _, pk := range pks {
		if pk.FixedHeader.Type != packets.Publish || slices.Contains(skip, pk.PacketID) {
			continue
		}
		msgs = append(msgs, Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain})
		ids = append(ids, pk.PacketID)
	}
	return msgs, ids
}

func (n clusterNode) Release(clientID string, sent Session) Session {
	b := n.b
	b.mu.RLock()
	s := b.byID[clientID]
	live := s != nil && !s.ended
	b.mu.RUnlock()
	if s == nil || s.cl != sent.cl || live {
		return Session{} // the client came back here meanwhile: its session stays
	}
	b.mochi.UnsubscribeClient(s.cl) // nothing more is queued here
	var rest Session
	rest.Messages, _ = inflight(s.cl, sent.ids)
	n.drop(s)
	return rest
}

func (n clusterNode) Import(clientID string, in Session) error {
	b := n.b
	b.mu.RLock()
	s := b.byID[clientID]
	b.mu.RUnlock()
	if s == nil {
		return ErrNoSession
	}
	cl := s.cl
	if cl.Properties.Clean {
		return ErrCleanSession
	}
	perms := s.perms()
	for _, sub := range in.Subscriptions {
		if _, ok := cl.State.Subscriptions.Get(sub.Filter); ok {
			continue
		}
		if !perms.AllowFilter(sub.Filter) {
			b.log.Info("audit", "event", "subscription from another node not allowed here", "cn", s.id.CN, "client_id", clientID, "topic", sub.Filter)
			continue
		}
		ps := packets.Subscription{Filter: sub.Filter, Qos: sub.QoS, NoLocal: sub.NoLocal, RetainAsPublished: sub.RetainAsPublished,
			RetainHandling: sub.RetainHandling, Identifier: sub.Identifier}
		cl.State.Subscriptions.Add(sub.Filter, ps)
		if b.mochi.Topics.Subscribe(cl.ID, ps) {
			atomic.AddInt64(&b.mochi.Info.Subscriptions, 1)
		}
		if b.cfg.Cluster != nil {
			b.cfg.Cluster.Subscribe(cl.ID, sub.Filter)
		}
	}
	if len(in.Subscriptions) > 0 {
		b.persist(cl)
	}
	for _, m := range in.Messages {
		if s.revoked.Load() || !perms.Allow(m.Topic, policy.Subscribe) {
			continue // each delivery is checked here too
		}
		id, err := cl.NextPacketID()
		if err != nil {
			b.log.Error("message from another node dropped: packet IDs exhausted", "client_id", clientID, "topic", m.Topic)
			continue
		}
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: max(m.QoS, 1), Retain: m.Retain},
			TopicName: m.Topic, Payload: m.Payload, PacketID: uint16(id), Created: time.Now().Unix(), Origin: mqtt.InlineClientId}
		if cl.State.Inflight.Set(pk) {
			atomic.AddInt64(&b.mochi.Info.Inflight, 1)
			cl.State.Inflight.DecreaseSendQuota()
		}
		if !cl.Closed() && cl.Net.Conn != nil {
			if err := cl.WritePacket(pk); err != nil { // it stays in flight: resent at the next connect
				b.log.Debug("message from another node not written yet", "client_id", clientID, "err", err)
			}
		}
	}
	return nil
}

// clusterHook tells the cluster which filters local sessions hold and
// forwards Wills.
type clusterHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *clusterHook) ID() string { return "mqtls-cluster" }

func (h *clusterHook) Provides(b byte) bool {
	return b == mqtt.OnSubscribed || b == mqtt.OnUnsubscribed || b == mqtt.OnWillSent
}

func (h *clusterHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if cl.Net.Inline {
		return
	}
	for i, f := range pk.Filters {
		if i < len(codes) && codes[i] < 0x80 {
			h.b.cfg.Cluster.Subscribe(cl.ID, f.Filter)
		}
	}
	h.b.persist(cl)
}

func (h *clusterHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	for _, f := range pk.Filters {
		h.b.cfg.Cluster.Unsubscribe(cl.ID, f.Filter)
	}
	h.b.persist(cl)
}

func (h *clusterHook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if pk.TopicName == suppressedWill {
		return
	}
	h.b.cfg.Cluster.Publish(Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain})
}
