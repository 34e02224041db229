package cluster

// ClientURL is the embedded NATS server's client URL (tests only).
func ClientURL(n *Node) string { return n.srv.ClientURL() }
