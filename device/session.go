package device

import (
	"slices"
	"strconv"
	"sync"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"
)

// sessionStore is the paho.Store of the client's MQTT session: the QoS 1
// PUBLISHes sent and not yet acknowledged, kept across reconnects and
// resent by paho after each one (clean session off).
//
// This is the one place where the SDK leans on paho's internals; it
// replaces paho's MemoryStore because (TestPahoSessionContract fails if a
// paho upgrade changes any of it):
//   - Acknowledgement. paho deletes a PUBLISH from its store when the
//     PUBACK arrives, and only then. A publish token is no such signal: it
//     also completes, without error, when paho resends the message after a
//     reconnect (messageIds.claimID), and it completes with an error when
//     the connection is closed while the message stays queued.
//   - MemoryStore drops a Put while it is closed (between a Disconnect and
//     the next Connect), so a publish racing a reconnect was lost; this
//     store keeps it.
//   - MemoryStore resends in map order; this store in the order sent.
//   - It keeps its own copy of a PUBLISH. paho's resume sets Dup on the
//     stored packet and sends it, while a Publish that raced the reconnect
//     (blocked handing the same packet to the shared outbound channel) may
//     be written by the new connection at the same time: a data race on
//     the packet (seen under -race in TestBrokerRestartsLoseNothing), and
//     the message goes out twice (harmless: at least once).
type sessionStore struct {
	mu      sync.Mutex
	seq     uint64
	entries map[string]*storeEntry
}

// storeEntry is one stored packet. done is closed when it leaves the
// store; acked tells whether it left because paho saw its PUBACK.
type storeEntry struct {
	pkt   packets.ControlPacket
	seq   uint64
	done  chan struct{}
	acked bool
}

var _ paho.Store = (*sessionStore)(nil)

func newSessionStore() *sessionStore { return &sessionStore{entries: map[string]*storeEntry{}} }

// outboundKey is paho's store key of an outbound packet (store.go
// outboundKeyFromMID).
func outboundKey(mid uint16) string { return "o." + strconv.Itoa(int(mid)) }

func (s *sessionStore) Open()  {}
func (s *sessionStore) Close() {}

func (s *sessionStore) Put(key string, pkt packets.ControlPacket) {
	if p, ok := pkt.(*packets.PublishPacket); ok {
		cp := *p // paho writes p (sent) and the stored one (resume) apart
		pkt = &cp
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.entries[key]; ok {
		e.pkt = pkt
		return
	}
	s.seq++
	s.entries[key] = &storeEntry{pkt: pkt, seq: s.seq, done: make(chan struct{})}
}

func (s *sessionStore) Get(key string) packets.ControlPacket {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.entries[key]; ok {
		return e.pkt
	}
	return nil
}

// All returns the keys in the order the packets were stored (paho resends
// in this order).
func (s *sessionStore) All() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.entries))
	for k := range s.entries {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int { return int(s.entries[a].seq - s.entries[b].seq) })
	return keys
}

// Del is paho's: it deletes an outbound packet when its acknowledgement
// arrives (or a packet it will not resend).
func (s *sessionStore) Del(key string) { s.remove(key, true) }

// Reset is paho's: a clean session starts empty.
func (s *sessionStore) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, e := range s.entries {
		close(e.done)
		delete(s.entries, k)
	}
}

// withdraw takes a packet out of the session (it will not be resent). It
// reports false if the packet was no longer there.
func (s *sessionStore) withdraw(key string) bool { return s.remove(key, false) }

func (s *sessionStore) remove(key string, acked bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.entries[key]
	if !ok {
		return false
	}
	e.acked = acked
	close(e.done)
	delete(s.entries, key)
	return true
}

// entry returns the stored entry for key, or nil.
func (s *sessionStore) entry(key string) *storeEntry {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.entries[key]
}

// wasAcked reports, after e.done is closed, whether e left the store
// because it was acknowledged.
func (s *sessionStore) wasAcked(e *storeEntry) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return e.acked
}

// len returns the number of stored packets.
func (s *sessionStore) len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.entries)
}
