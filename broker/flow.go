package broker

import (
	"fmt"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/broker/policy"
)

// Mochi keeps a client's outbound queue length in the unexported
// ClientState.outboundQty (updated atomically). The backpressure below
// needs it; the offset is found by name once and checked at New, so a
// Mochi upgrade that renames it fails loudly instead of misreading memory.
var outboundQtyOffset = func() uintptr {
	f, ok := reflect.TypeFor[mqtt.ClientState]().FieldByName("outboundQty")
	if !ok || f.Type.Kind() != reflect.Int32 {
		return ^uintptr(0)
	}
	return f.Offset
}()

func checkOutboundAccess() error {
	if outboundQtyOffset == ^uintptr(0) {
		return fmt.Errorf("broker: this Mochi version has no ClientState.outboundQty int32; flow control needs it (pinned: v2.7.9)")
	}
	return nil
}

func outboundLen(cl *mqtt.Client) int32 {
	return atomic.LoadInt32((*int32)(unsafe.Add(unsafe.Pointer(&cl.State), outboundQtyOffset)))
}

// flowState is a session's share of the flow control: slots reserved in
// its queue by publishers (as subscriber), and the reservations it holds
// (as publisher, one publish at a time).
type flowState struct {
	reserved   atomic.Int32
	publishing atomic.Bool   // between OnPublish and OnPublished of a QoS>0 publish
	ackStalled atomic.Bool   // its unacknowledged messages are full and it stopped acknowledging
	acks       atomic.Int64  // acknowledgements received from it
	lastAck    atomic.Uint32 // 1<<16 | packet ID of the PUBACK/PUBCOMP being processed, 0: none
	fullSince  atomic.Int64  // unix ns since QoS 0 deliveries found the queue full, 0 if not
	drained    chan struct{} // signalled when the client's writer sends a PUBLISH
	mu         sync.Mutex
	holding    []*session  // subscribers this client's current publish reserved
	retained   []parentSub // retained parents to deliver after the next SUBACK
}

// parentSub is the parent topic X of a new "X/#" subscription and its QoS.
type parentSub struct {
	topic string
	qos   byte
}

// flowHook implements publisher backpressure, the retained-parent fix and
// message metrics. It takes no part in authorization.
type flowHook struct {
	mqtt.HookBase
	b *Broker
}

func (h *flowHook) ID() string { return "mqtls-flow" }

func (h *flowHook) Provides(b byte) bool {
	return b == mqtt.OnPublish || b == mqtt.OnPublished || b == mqtt.OnPublishDropped ||
		b == mqtt.OnSubscribe || b == mqtt.OnPacketSent || b == mqtt.OnPacketEncode || b == mqtt.OnSelectSubscribers ||
		b == mqtt.OnQosComplete
}

// OnQosComplete counts a subscriber's acknowledgements (PUBACK, PUBCOMP):
// publishers waiting for room in its store of unacknowledged messages
// judge its progress by them.
func (h *flowHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	// Mochi also calls it for the client's own inbound QoS 1 publishes:
	// only an acknowledgement the client sent (noted by OnPacketRead)
	// counts, or a device could fake progress by publishing.
	if s := h.b.session(cl); s != nil && s.flow.lastAck.CompareAndSwap(1<<16|uint32(pk.PacketID), 0) {
		s.flow.acks.Add(1)
		select {
		case s.flow.drained <- struct{}{}:
		default:
		}
	}
}

// OnSelectSubscribers picks the member of each shared subscription group
// ($share/GROUP/...) that gets the message: a live member with the most
// room in its queue (Mochi would pick one at random, offline or full). For
// QoS >= 1 it reserves a slot there, waiting while every live member is
// full, as OnPublish does for ordinary subscribers. It runs in the
// publisher's read loop, after OnPublish and before routing.
func (h *flowHook) OnSelectSubscribers(subs *mqtt.Subscribers, pk packets.Packet) *mqtt.Subscribers {
	b := h.b
	var pub *session
	if origin, ok := b.mochi.Clients.Get(pk.Origin); ok {
		pub = b.session(origin)
	}
	limit := b.cfg.MaxWritesPending - 1
	subs.SharedSelected = map[string]packets.Subscription{}
	for _, members := range subs.Shared {
		var best *session
		var bestID string
		var bestSub packets.Subscription
		bestLoad := int32(1 << 30)
		for id, sub := range members {
			cl, ok := b.mochi.Clients.Get(id)
			if !ok {
				continue
			}
			s := b.session(cl)
			if s == nil {
				continue
			}
			load := outboundLen(cl) + s.flow.reserved.Load()
			if cl.Closed() {
				load = 1 << 29 // offline: only if no member is live
			}
			if best == nil || load < bestLoad {
				best, bestID, bestSub, bestLoad = s, id, sub, load
			}
		}
		if best == nil {
			continue
		}
		// Reserve only inside OnPublish..OnPublished: Wills (delayed ones
		// from Mochi's event loop too) never reach OnPublished, and a slot
		// reserved for them would never be released.
		if pk.FixedHeader.Qos > 0 && bestSub.Qos > 0 && pub != nil && pub.flow.publishing.Load() && !best.cl.Closed() {
			ok, stalled := b.reserve(best, limit)
			if stalled {
				b.disconnect(best, fmt.Sprintf("subscriber stalled: outbound queue full for %s", b.cfg.StallTimeout))
			}
			if ok {
				pub.flow.mu.Lock()
				pub.flow.holding = append(pub.flow.holding, best)
				pub.flow.mu.Unlock()
			}
		}
		if prev, ok := subs.SharedSelected[bestID]; ok {
			bestSub = prev.Merge(bestSub)
		}
		subs.SharedSelected[bestID] = bestSub
	}
	return subs
}

// OnPacketEncode advertises the Topic Alias Maximum in a v5 CONNACK: Mochi
// (v2.7.9) accepts inbound aliases up to its capability but never says so
// (TestTopicAliases).
func (h *flowHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack && pk.ProtocolVersion == 5 && pk.ReasonCode == 0 {
		pk.Properties.TopicAliasMaximum = h.b.mochi.Options.Capabilities.TopicAliasMaximum
	}
	return pk
}

// OnPublish runs in the publisher's read loop before Mochi routes the
// message. For QoS >= 1 it reserves a queue slot at every subscriber that
// will get the message at QoS >= 1, waiting while one is full.
func (h *flowHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	b := h.b
	b.metrics.msgIn.Inc()
	pub := b.session(cl)
	switch {
	case cl.Net.Inline:
		pub = b.inline // a message another node routed here (one at a time)
	case pub != nil && b.cfg.Cluster != nil:
		b.cfg.Cluster.Publish(Message{Topic: pk.TopicName, Payload: pk.Payload, QoS: pk.FixedHeader.Qos, Retain: pk.FixedHeader.Retain})
	}
	if pub == nil {
		return pk, nil
	}
	if pk.FixedHeader.Qos == 0 {
		// A retained one is routed anyway: the retained store must change
		// even if no subscriber has room (TestQoS0RejectLosesRetainedUpdate).
		// Only while deliveries are being dropped: outside overload the
		// subscriber lookup would double the routing work of every QoS 0
		// message.
		congested := time.Now().UnixNano()-b.qos0Drop.Load() < int64(time.Second)
		if congested && !pk.FixedHeader.Retain && !b.roomForQoS0(pk.TopicName) {
			return pk, packets.ErrRejectPacket // dropped before any routing work
		}
		return pk, nil
	}
	b.flowRelease(pub) // a previous publish that failed before routing
	pub.flow.publishing.Store(true)
	limit := b.cfg.MaxWritesPending - 1
	subs := b.mochi.Topics.Subscribers(pk.TopicName)
	for id, sub := range subs.Subscriptions {
		if sub.Qos == 0 {
			continue
		}
		subCl, ok := b.mochi.Clients.Get(id)
		if !ok {
			continue
		}
		s := b.session(subCl)
		if s == nil {
			continue
		}
		if subCl.Closed() {
			// offline: Mochi keeps QoS>0 in the session's inflight store,
			// up to its bound
			if subCl.State.Inflight.Len() >= int(b.mochi.Options.Capabilities.MaximumInflight) {
				b.metrics.dropped.WithLabelValues("offline_queue_full").Inc()
				b.dropLog.note(b.log, "delivery dropped: offline session queue full", "client_id", id, "topic", pk.TopicName, "qos", sub.Qos)
			}
			continue
		}
		ok, stalled := b.reserve(s, limit)
		if stalled {
			b.disconnect(s, fmt.Sprintf("subscriber stalled: outbound queue full for %s", b.cfg.StallTimeout))
		}
		if !ok {
			continue
		}
		pub.flow.mu.Lock()
		pub.flow.holding = append(pub.flow.holding, s)
		pub.flow.mu.Unlock()
	}
	return pk, nil
}

// qos0Wait is how long a QoS 0 publish waits for a full subscriber queue
// before it is dropped. The wait parks the publisher's read loop: under
// open-loop overload 50 spinning publishers otherwise starve the one
// subscriber's writer of CPU (measured: 1.2k delivered/s against 39k/s
// closed-loop, BenchmarkFanInOverload).
const qos0Wait = 5 * time.Millisecond

// roomForQoS0 reports whether some live subscriber of topic has room in
// its outbound queue, waiting up to qos0Wait for one. When none has, the
// drops are counted and the message is rejected before routing. A
// subscriber that stays full for the stall timeout is disconnected.
func (b *Broker) roomForQoS0(topic string) bool {
	subs := b.mochi.Topics.Subscribers(topic)
	if len(subs.Subscriptions) == 0 || len(subs.Shared) > 0 || len(subs.InlineSubscriptions) > 0 {
		return true
	}
	limit := b.cfg.MaxWritesPending - 1
	var full []*session
	for id := range subs.Subscriptions {
		subCl, ok := b.mochi.Clients.Get(id)
		if !ok || subCl.Closed() {
			continue
		}
		s := b.session(subCl)
		if s == nil {
			continue
		}
		if outboundLen(subCl)+s.flow.reserved.Load() < limit {
			s.flow.fullSince.Store(0)
			return true
		}
		full = append(full, s)
	}
	if len(full) == 0 {
		return true
	}
	deadline := time.Now().Add(qos0Wait)
	for _, s := range full {
		if b.waitRoom(s, limit, deadline) {
			s.flow.fullSince.Store(0)
			return true
		}
	}
	now := time.Now()
	for _, s := range full {
		since := s.flow.fullSince.Load()
		switch {
		case since == 0:
			s.flow.fullSince.CompareAndSwap(0, now.UnixNano())
		case now.Sub(time.Unix(0, since)) > b.cfg.StallTimeout:
			b.disconnect(s, fmt.Sprintf("subscriber stalled: outbound queue full for %s", b.cfg.StallTimeout))
		}
		b.metrics.dropped.WithLabelValues("queue_full_qos0").Inc()
		b.qos0Drop.Store(now.UnixNano())
	}
	b.dropLog.note(b.log, "delivery dropped: outbound queue full", "client_id", full[0].cl.ID, "topic", topic, "qos", 0, "subscribers", len(full))
	return false
}

// waitRoom waits until deadline for a free slot in s's outbound queue.
func (b *Broker) waitRoom(s *session, limit int32, deadline time.Time) bool {
	for {
		if outboundLen(s.cl)+s.flow.reserved.Load() < limit {
			return true
		}
		d := time.Until(deadline)
		if d <= 0 || s.cl.Closed() {
			return false
		}
		t := time.NewTimer(d)
		select { // woken when the subscriber's writer sends
		case <-s.flow.drained:
		case <-t.C:
		}
		t.Stop()
	}
}

// ackWait is how long a publisher waits for a subscriber whose store of
// unacknowledged messages is full to acknowledge anything. A subscriber
// that acknowledges, however slowly, is waited for (no QoS 1 loss); one
// that stopped acknowledging must not hold the publisher, and every other
// subscriber of its messages, for the whole stall timeout
// (TestNonAckingSubscriberStallsPublisher).
const ackWait = time.Second

// reserve waits until s has a free outbound slot and takes it (ok). When
// s's unacknowledged messages fill MaxQueuedMessages and none is
// acknowledged for ackWait, it gives up on s (Mochi drops that delivery,
// counted here) until s acknowledges again. stalled: the outbound queue
// stayed full for the stall timeout.
func (b *Broker) reserve(s *session, limit int32) (ok, stalled bool) {
	now := time.Now()
	deadline := now.Add(b.cfg.StallTimeout)
	maxInflight := int(b.mochi.Options.Capabilities.MaximumInflight)
	waited := false
	lastAcks, progress := s.flow.acks.Load(), now
	for {
		r := s.flow.reserved.Add(1)
		inflight := s.cl.State.Inflight.Len()
		switch {
		case inflight+int(r) >= maxInflight:
			s.flow.reserved.Add(-1)
			switch acks := s.flow.acks.Load(); {
			case acks != lastAcks:
				lastAcks, progress = acks, time.Now()
			case s.flow.ackStalled.Load() || time.Since(progress) > ackWait:
				s.flow.ackStalled.Store(true)
				b.metrics.dropped.WithLabelValues("inflight_full").Inc()
				b.dropLog.note(b.log, "delivery dropped: the subscriber does not acknowledge and holds MaxQueuedMessages", "client_id", s.cl.ID)
				return false, false
			}
		case outboundLen(s.cl)+r <= limit:
			s.flow.ackStalled.Store(false)
			if waited {
				b.metrics.backpressure.Inc()
			}
			return true, false
		default:
			s.flow.ackStalled.Store(false)
			s.flow.reserved.Add(-1)
		}
		if s.cl.Closed() {
			return false, false // nothing to protect: Mochi stores it in the inflight store
		}
		if time.Now().After(deadline) {
			return false, true
		}
		waited = true
		select { // woken when the subscriber's writer frees a slot
		case <-s.flow.drained:
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// OnPublished runs after Mochi queued the message to every subscriber: the
// reservations have become real queue entries.
func (h *flowHook) OnPublished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		h.b.flowRelease(h.b.inline)
	} else if s := h.b.session(cl); s != nil {
		h.b.flowRelease(s)
	}
}

func (b *Broker) flowRelease(pub *session) {
	pub.flow.publishing.Store(false)
	pub.flow.mu.Lock()
	held := pub.flow.holding
	pub.flow.holding = nil
	pub.flow.mu.Unlock()
	for _, s := range held {
		s.flow.reserved.Add(-1)
	}
}

func (h *flowHook) OnPublishDropped(cl *mqtt.Client, pk packets.Packet) {
	if pk.FixedHeader.Qos == 0 {
		h.b.qos0Drop.Store(time.Now().UnixNano())
	}
	h.b.metrics.dropped.WithLabelValues(fmt.Sprintf("queue_full_qos%d", pk.FixedHeader.Qos)).Inc()
	h.b.dropLog.note(h.b.log, "delivery dropped: outbound queue full", "client_id", cl.ID, "topic", pk.TopicName, "qos", pk.FixedHeader.Qos)
}

// rateLog writes at most one line per second and says how many it left
// out: under overload a line per dropped message costs more than the
// message (the metric counts every one).
type rateLog struct {
	next    atomic.Int64 // unix nanoseconds before which lines are counted, not written
	skipped atomic.Int64
}

func (r *rateLog) note(log *slog.Logger, msg string, args ...any) {
	now := time.Now().UnixNano()
	next := r.next.Load()
	if now < next || !r.next.CompareAndSwap(next, now+int64(time.Second)) {
		r.skipped.Add(1)
		return
	}
	if n := r.skipped.Swap(0); n > 0 {
		args = append(args, "similar_lines_skipped", n)
	}
	log.Warn(msg, args...)
}

// OnSubscribe notes, for each "X/#" filter, the retained message on X
// itself: Mochi v2.7.9 does not deliver it although '#' includes the parent
// level (MQTT 4.7.1.2). It is sent right after the SUBACK.
func (h *flowHook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	s := h.b.session(cl)
	if s == nil {
		return pk
	}
	var parents []parentSub
	for _, sub := range pk.Filters {
		parent, ok := strings.CutSuffix(sub.Filter, "/#")
		if !ok || parent == "" || strings.ContainsAny(parent, "+#") || mqtt.IsSharedFilter(sub.Filter) || sub.RetainHandling == 2 {
			continue
		}
		if _, existed := cl.State.Subscriptions.Get(sub.Filter); existed && sub.RetainHandling == 1 {
			continue
		}
		parents = append(parents, parentSub{parent, sub.Qos})
	}
	s.flow.mu.Lock()
	s.flow.retained = parents
	s.flow.mu.Unlock()
	return pk
}

func (h *flowHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	switch pk.FixedHeader.Type {
	case packets.Publish:
		h.b.metrics.msgOut.Inc()
		if s := h.b.session(cl); s != nil {
			select {
			case s.flow.drained <- struct{}{}:
			default:
			}
		}
	case packets.Suback:
		h.b.sendRetainedParents(cl, pk)
	}
}

func (b *Broker) sendRetainedParents(cl *mqtt.Client, ack packets.Packet) {
	s := b.session(cl)
	if s == nil {
		return
	}
	s.flow.mu.Lock()
	parents := s.flow.retained
	s.flow.retained = nil
	s.flow.mu.Unlock()
	for _, p := range parents {
		topic := p.topic
		if _, granted := cl.State.Subscriptions.Get(topic + "/#"); !granted || s.revoked.Load() || !s.perms().Allow(topic, policy.Subscribe) {
			continue
		}
		msg, ok := b.mochi.Topics.Retained.Get(topic)
		if !ok {
			continue
		}
		out := msg.Copy(false)
		out.FixedHeader.Retain = true
		out.FixedHeader.Qos = min(out.FixedHeader.Qos, p.qos)
		if out.FixedHeader.Qos > 0 {
			id, err := cl.NextPacketID()
			if err != nil {
				continue
			}
			out.PacketID = uint16(id)
			cl.State.Inflight.Set(out)
		}
		_ = cl.WritePacket(out) // a failed write ends the connection anyway
	}
}
