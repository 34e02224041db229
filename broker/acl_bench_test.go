package broker

import (
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

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

// BenchmarkPolicyReload reloads the policy with 10,000 sessions while a
// goroutine keeps checking ACLs, and reports the longest single ACL check
// seen during the reloads (the stall a reload imposes) next to the reload
// time itself.
func BenchmarkPolicyReload(b *testing.B) {
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		b.Fatal(err)
	}
	const n = 10_000
	br := &Broker{sessions: make(map[*mqtt.Client]*session, n), metrics: newMetrics(), log: slog.New(slog.DiscardHandler)}
	br.policy.Store(pol)
	clients := make([]*mqtt.Client, n)
	for i := range n {
		cl := &mqtt.Client{ID: fmt.Sprintf("dev-%07d", i)}
		cl.State.Subscriptions = mqtt.NewSubscriptions()
		s := &session{cl: cl, id: policy.Identity{CN: cl.ID}}
		s.compile(pol)
		br.sessions[cl] = s
		clients[i] = cl
	}
	h := &authHook{b: br}
	stop := make(chan struct{})
	var worst atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i = (i + 7919) % n {
			select {
			case <-stop:
				return
			default:
			}
			start := time.Now()
			if !h.OnACLCheck(clients[i], "devices/"+clients[i].ID+"/telemetry", true) {
				panic("denied")
			}
			if d := int64(time.Since(start)); d > worst.Load() {
				worst.Store(d)
			}
		}
	}()
	for b.Loop() {
		if err := br.SetPolicy(pol); err != nil {
			b.Fatal(err)
		}
	}
	close(stop)
	<-done
	b.ReportMetric(float64(worst.Load())/1e3, "worst-acl-µs")
}
