package broker_test

import (
	"fmt"
	"testing"

	"github.com/mqtls/mqtls/broker"
)

// max_sessions bounds live sessions only: one certificate with
// max_sessions 3 and client_ids {cn}-* leaves any number of offline
// persistent sessions behind (each with subscriptions and up to
// MaxQueuedMessages queued messages, kept MaxSessionExpiry = 24 h).
func TestMaxSessionsIgnoresOfflineSessions(t *testing.T) {
	env := identitiesEnv(t) // README policy: backend {cn}-*, max_sessions 3
	be := env.Device(t, "svc", 0, "backend")
	admitted := 0
	for i := range 20 {
		c, err := dial(t, env, be, withID(fmt.Sprintf("svc-%d", i)), persistent)
		if err != nil {
			continue
		}
		admitted++
		subscribe(t, c, "devices/+/telemetry", 1)
		c.Disconnect(50)
	}
	if admitted != 3 {
		t.Errorf("%d persistent sessions admitted for one certificate with max_sessions 3", admitted)
	}
	// a stored session's own client ID may come back
	mustDial(t, env, be, withID("svc-0"), persistent)
	if live, offline := broker.SessionCounts(env.Broker); live+offline > 3 {
		t.Fatalf("one certificate with max_sessions 3 holds %d sessions", live+offline)
	}
}
