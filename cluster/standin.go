package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mqtls/mqtls/broker"
)

// A node that fails takes its persistent sessions with it (they live in
// its memory). So that messages published to them while their clients
// come back are not lost, every node records the subscriptions of its
// persistent sessions in a bucket; when a node stops answering, one
// survivor (the lowest node ID it knows alive) stands in: it subscribes
// to their filters and queues their QoS 1/2 messages, and hands each one
// over like a session (handOver) when its client claims it again
// anywhere. Messages published between the failure and the stand-in
// (about a second) and those the failed node had queued are lost.

const (
	bucketPersist = "mqtls_persistent"
	standInAge    = 24 * time.Hour // a stood-in session is dropped after this
	pingEvery     = time.Second
)

// record is a persistent session's entry in bucketPersist.
type record struct {
	Owner string // node ID
	Subs  []broker.Subscription
}

// persistOp is a record write (nil subs: delete our record).
type persistOp struct {
	clientID string
	subs     []broker.Subscription
}

// standIn is a failed node's persistent session queued here.
type standIn struct {
	subs    []broker.Subscription
	msgs    []broker.Message
	nsubs   []*nats.Subscription
	seen    map[string]bool // origin:seq of msgs, against overlapping filters
	dropped int             // messages past Config.MaxQueued
	since   time.Time
	handing bool // a handover is under way
	closed  bool
}

var _ broker.SessionStore = (*Node)(nil)

// Persist records a persistent session's subscriptions cluster-wide.
func (n *Node) Persist(clientID string, subs []broker.Subscription) {
	select {
	case n.persists <- persistOp{clientID, subs}:
	default:
		n.log.Error("persistent session not recorded cluster-wide: queue full", "client_id", clientID)
	}
}

// writePersist runs on writeLoop.
func (n *Node) writePersist(op persistOp) error {
	key := EncodeTopic(op.clientID)
	return n.retry(func(ctx context.Context) error {
		if len(op.subs) > 0 {
			v, err := json.Marshal(record{Owner: n.id, Subs: op.subs})
			if err != nil {
				return err
			}
			_, err = n.kvP.Put(ctx, key, v)
			return err
		}
		return n.deleteOwn(ctx, n.kvP, key, func(v []byte) bool {
			var r record
			return json.Unmarshal(v, &r) == nil && r.Owner == n.id // not another node's by now
		})
	})
}

// recorded mirrors bucketPersist.
func (n *Node) recorded(e jetstream.KeyValueEntry) {
	clientID, err := DecodeTopic(e.Key())
	if err != nil {
		return
	}
	var r record
	put := e.Operation() == jetstream.KeyValuePut && json.Unmarshal(e.Value(), &r) == nil
	n.mu.Lock()
	defer n.mu.Unlock()
	if !put {
		delete(n.records, clientID)
		return
	}
	n.records[clientID] = r
	if n.standIns[clientID] != nil && r.Owner != n.id && !n.dead[r.Owner] {
		// its client came back on another node before we stood in (and
		// subscribed there): the queued messages go to that node
		n.wg.Go(func() { n.handStandIn(clientID, r.Owner) })
	}
}

// standInLoop pings the nodes that own persistent sessions and stands in
// for those that are gone.
func (n *Node) standInLoop() {
	defer n.wg.Done()
	tick := time.NewTicker(pingEvery)
	defer tick.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-tick.C:
		}
		n.mu.Lock()
		owners := map[string]bool{}
		for _, r := range n.records {
			if r.Owner != n.id && !n.dead[r.Owner] {
				owners[r.Owner] = true
			}
		}
		for id, a := range n.standIns { // bounded life
			if time.Since(a.since) > standInAge {
				n.closeStandInLocked(id, a)
			}
		}
		n.mu.Unlock()
		alive, dead := []string{n.id}, []string{}
		for o := range owners {
			ctx, cancel := context.WithTimeout(n.ctx, time.Second)
			_, err := n.nc.RequestWithContext(ctx, sessPrefix+o, []byte(ping))
			cancel()
			if errors.Is(err, nats.ErrNoResponders) {
				dead = append(dead, o)
			} else {
				alive = append(alive, o) // or unknown: not failed as far as we can tell
			}
		}
		if len(dead) == 0 {
			continue
		}
		slices.Sort(alive)
		if alive[0] != n.id {
			continue // the lowest live node stands in
		}
		for _, d := range dead {
			n.standInFor(d)
		}
	}
}

const ping = "ping"

// standInFor queues the persistent sessions of failed node d here.
func (n *Node) standInFor(d string) {
	n.mu.Lock()
	sc := n.sc
	n.mu.Unlock()
	if sc == nil {
		var err error
		if sc, err = n.connect(nats.Name(n.id + "-standin")); err != nil {
			n.log.Error("cannot stand in for a failed node", "failed", d, "err", err)
			return
		}
	}
	n.mu.Lock()
	n.sc = sc
	n.dead[d] = true
	count := 0
	for clientID, r := range n.records {
		if r.Owner != d || n.standIns[clientID] != nil {
			continue
		}
		a := &standIn{subs: r.Subs, seen: map[string]bool{}, since: time.Now()}
		for _, sub := range r.Subs {
			for _, subj := range FilterSubjects(sharedFilter(sub.Filter)) {
				if len(msgPrefix+subj) > maxSubject {
					continue // never routed (Subscribe)
				}
				s, err := sc.Subscribe(msgPrefix+subj, func(m *nats.Msg) { n.captured(clientID, a, m) })
				if err != nil {
					n.log.Error("cannot stand in for a subscription", "client_id", clientID, "filter", sub.Filter, "err", err)
					continue
				}
				a.nsubs = append(a.nsubs, s)
			}
		}
		n.standIns[clientID] = a
		count++
	}
	n.mu.Unlock()
	if err := sc.Flush(); err != nil { // the subscriptions are in place
		n.log.Error("standing in: NATS flush", "err", err)
	}
	n.log.Info("standing in for a failed node's persistent sessions", "failed", d, "sessions", count)
}

// captured queues a message for a stood-in session.
func (n *Node) captured(clientID string, a *standIn, m *nats.Msg) {
	qos, _ := strconv.Atoi(m.Header.Get(hdrQoS))
	if qos == 0 {
		return // not queued for offline sessions
	}
	topic, err := DecodeTopic(strings.TrimPrefix(m.Subject, msgPrefix))
	if err != nil {
		return
	}
	key := m.Header.Get(hdrOrigin) + ":" + m.Header.Get(hdrSeq)
	n.mu.Lock()
	defer n.mu.Unlock()
	if a.closed || a.seen[key] {
		return
	}
	if len(a.msgs) >= n.cfg.MaxQueued {
		if a.dropped++; a.dropped == 1 {
			n.log.Warn("messages for a stood-in session dropped from now on: queue full", "client_id", clientID, "topic", topic)
		}
		return
	}
	a.seen[key] = true
	a.msgs = append(a.msgs, broker.Message{Topic: topic, Payload: m.Data, QoS: byte(min(qos, 2)), Retain: m.Header.Get(hdrRetain) == "1"})
}

func (n *Node) closeStandInLocked(clientID string, a *standIn) {
	for _, s := range a.nsubs {
		s.Unsubscribe()
	}
	a.closed = true
	delete(n.standIns, clientID)
}

// handStandIn hands a stood-in session to the node whose client claimed
// it (owner: its node ID; ours: imported here), as handOver does.
func (n *Node) handStandIn(clientID, owner string) {
	n.mu.Lock()
	a := n.standIns[clientID]
	if a == nil || a.handing {
		n.mu.Unlock()
		return
	}
	a.handing = true
	sess := broker.Session{Subscriptions: a.subs, Messages: slices.Clone(a.msgs)}
	sent := len(a.msgs)
	n.mu.Unlock()
	give := func(s broker.Session) error {
		if owner == n.id {
			err := n.node.Import(clientID, s)
			if errors.Is(err, broker.ErrCleanSession) {
				return nil
			}
			return err
		}
		_, err := n.send(owner, clientID, s)
		return err
	}
	if err := give(sess); err != nil {
		n.log.Warn("stood-in session not handed over; kept", "client_id", clientID, "err", err)
		n.mu.Lock()
		a.handing = false
		n.mu.Unlock()
		return
	}
	n.mu.Lock()
	rest := slices.Clone(a.msgs[sent:])
	if n.standIns[clientID] == a {
		n.closeStandInLocked(clientID, a)
	}
	n.mu.Unlock()
	n.log.Info("stood-in session handed over", "client_id", clientID, "to", owner, "messages", sent+len(rest), "dropped", a.dropped)
	if len(rest) > 0 {
		if err := give(broker.Session{Messages: rest}); err != nil {
			n.log.Error("messages queued during a handover lost", "client_id", clientID, "count", len(rest), "err", err)
		}
	}
}
