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
