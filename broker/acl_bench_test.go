package broker

import (
	"fmt"
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/mqtls/mqtls/broker/policy"
)

// BenchmarkACLCheck measures one OnACLCheck (session lookup + compiled
// permissions) with 10, 10k and 1M connected identities. The work per check
// does not depend on the fleet; "publish" walks clients at random, so at 1M
// it also pays DRAM misses for the session it touches, while
// "publish-same-client" shows the cost with that client's state in cache.
func BenchmarkACLCheck(b *testing.B) {
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		b.Fatal(err)
	}
	for _, n := range []int{10, 10_000, 1_000_000} {
		br := &Broker{sessions: make(map[*mqtt.Client]*session, n), metrics: newMetrics()}
		br.policy.Store(pol)
		clients := make([]*mqtt.Client, n)
		topics := make([]string, n)
		for i := range n {
			cl := &mqtt.Client{ID: fmt.Sprintf("dev-%07d", i)}
			s := &session{cl: cl, id: policy.Identity{CN: cl.ID}}
			s.compile(pol)
			br.sessions[cl] = s
			clients[i], topics[i] = cl, "devices/"+cl.ID+"/telemetry"
		}
		h := &authHook{b: br}
		b.Run(fmt.Sprintf("publish/identities=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				if !h.OnACLCheck(clients[i], topics[i], true) {
					b.Fatal("denied")
				}
				i = (i + 7919) % n
			}
		})
		b.Run(fmt.Sprintf("publish-same-client/identities=%d", n), func(b *testing.B) {
			for b.Loop() {
				if !h.OnACLCheck(clients[n/2], topics[n/2], true) {
					b.Fatal("denied")
				}
			}
		})
		b.Run(fmt.Sprintf("subscribe-filter/identities=%d", n), func(b *testing.B) {
			i := 0
			for b.Loop() {
				if !h.OnACLCheck(clients[i], "devices/"+clients[i].ID+"/+/x", false) {
					b.Fatal("denied")
				}
				i = (i + 7919) % n
			}
		})
	}
}
