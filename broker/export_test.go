package broker

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
