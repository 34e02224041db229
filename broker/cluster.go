package broker

import (
	"errors"
	"fmt"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
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
	// Claim announces that clientID went live here with certificate serial.
	Claim(clientID, serial string)
	Close() error
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
	// TakeOver: node now holds clientID's session; the local one, live or
	// offline, ends. The same certificate live on both is a clone.
	TakeOver(clientID, serial, node string)
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

func (n clusterNode) TakeOver(clientID, serial, node string) {
	b := n.b
	b.mu.RLock()
	s := b.byID[clientID]
	b.mu.RUnlock()
	if s == nil {
		return
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
		return
	}
	// offline here: the session lives on the other node now
	cl := s.cl
	if cur, ok := b.mochi.Clients.Get(clientID); ok && cur == cl {
		b.mochi.UnsubscribeClient(cl)
		cl.ClearInflights()
		b.mochi.Clients.Delete(clientID)
	}
	b.mu.Lock()
	b.releaseLocked(s)
	b.mu.Unlock()
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
}

func (h *clusterHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	for _, f := range pk.Filters {
		h.b.cfg.Cluster.Unsubscribe(cl.ID, f.Filter)
	}
}

func (h *clusterHook) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if pk.TopicName == suppressedWill {
		return
	}
	h.b.cfg.Cluster.Publish(Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain})
}
