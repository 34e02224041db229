package broker

import "strings"

// Test hooks for the external tests (compiled only with the tests).

// SessionCounts returns the sessions with a live connection and those
// kept for a disconnected persistent client.
func SessionCounts(b *Broker) (live, offline int) { return b.sessionCounts() }

// MochiClients is the number of clients Mochi holds (live or offline).
func MochiClients(b *Broker) int { return b.mochi.Clients.Len() }

// SetConnectPause runs f while a CONNECT is admitted, right after its
// revocation check.
func SetConnectPause(b *Broker, f func()) { b.connectPause = f }

// Revoked reports whether the broker knows serial as revoked.
func Revoked(b *Broker, serial string) bool { return b.revoked.check(serial, nil, "") != "" }

// RetainedCount is the number of retained messages Mochi holds outside
// $SYS.
func RetainedCount(b *Broker) int {
	n := 0
	for topic := range b.mochi.Topics.Retained.GetAll() {
		if !strings.HasPrefix(topic, "$") {
			n++
		}
	}
	return n
}

// OutboundLen is Mochi's outbound queue length for a client ID (-1: none).
func OutboundLen(b *Broker, clientID string) int {
	cl, ok := b.mochi.Clients.Get(clientID)
	if !ok {
		return -1
	}
	return int(outboundLen(cl))
}

// Subscribed reports whether client clientID holds subscription filter.
func Subscribed(b *Broker, clientID, filter string) bool {
	cl, ok := b.mochi.Clients.Get(clientID)
	if !ok {
		return false
	}
	_, ok = cl.State.Subscriptions.Get(filter)
	return ok
}
func SessionConsistency(b *Broker) (lost, leaked int) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for id, cl := range b.mochi.Clients.GetAll() {
		if b.sessions[cl] == nil {
			lost++
			_ = id
		}
	}
	for cl := range b.sessions {
		if cur, ok := b.mochi.Clients.Get(cl.ID); !ok || cur != cl {
			leaked++
		}
	}
	return lost, leaked
}

// Inflight is the number of QoS 1/2 messages Mochi holds for clientID.
func Inflight(b *Broker, clientID string) int {
	cl, ok := b.mochi.Clients.Get(clientID)
	if !ok {
		return -1
	}
	return cl.State.Inflight.Len()
}

// RetainedPayload is the retained message's payload on topic ("" if none).
func RetainedPayload(b *Broker, topic string) string {
	pk, ok := b.mochi.Topics.Retained.Get(topic)
	if !ok {
		return ""
	}
	return string(pk.Payload)
}
