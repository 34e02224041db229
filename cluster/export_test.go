package cluster

import "testing"

// ClientURL is the embedded NATS server's client URL (tests only).
func ClientURL(n *Node) string { return n.srv.ClientURL() }

// Claims counts the keys in the session claims bucket.
func Claims(t testing.TB, n *Node) int {
	t.Helper()
	keys, err := n.kvS.ListKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	count := 0
	for range keys.Keys() {
		count++
	}
	return count
}

// StandIn reports n's stand-in for clientID: messages queued, dropped
// and remembered against duplicates.
func StandIn(n *Node, clientID string) (queued, dropped, seen int, ok bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a := n.standIns[clientID]
	if a == nil {
		return 0, 0, 0, false
	}
	return len(a.msgs), a.dropped, len(a.seen), true
}

// Recorded: n has seen clientID's persistent session record.
func Recorded(n *Node, clientID string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, ok := n.records[clientID]
	return ok
}

// Interest counts the subscriptions, local and routed from other nodes,
// that n's embedded NATS server knows for an MQTT topic.
func Interest(n *Node, topic string) int {
	return n.srv.GlobalAccount().Interest(msgPrefix + EncodeTopic(topic))
}
