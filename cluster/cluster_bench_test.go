package cluster_test

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/cluster"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// latencies collects the delivery delay of timestamped payloads.
type latencies struct {
	mu sync.Mutex
	ms []float64
	n  atomic.Int64
}

func (l *latencies) handler(_ paho.Client, m paho.Message) {
	if len(m.Payload()) < 8 {
		return
	}
	d := time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(m.Payload()))))
	l.n.Add(1)
	l.mu.Lock()
	l.ms = append(l.ms, float64(d.Microseconds())/1000)
	l.mu.Unlock()
}

func (l *latencies) reset() {
	l.mu.Lock()
	l.ms = l.ms[:0]
	l.mu.Unlock()
	l.n.Store(0)
}

func (l *latencies) pct(p float64) float64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.ms) == 0 {
		return 0
	}
	s := slices.Clone(l.ms)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkCrossNode: 2,000 devices on n1 of a 3-node cluster (in one
// process) publish QoS 1 once a second; a backend on n1 and one on n3
// subscribe to all of it. Phase 1 (both subscribers) gives the same-node
// and cross-node delivery latency of the same messages; phases 2 and 3
// (one subscriber, n1 then n3) the process CPU per delivered message, the
// difference being the cost of routing a message to another node.
// Run with -benchtime 1x; DEVICES and the phase length are constants.
func BenchmarkCrossNode(b *testing.B) {
	const devices, rate, phase = 2000, 1.0, 10 * time.Second
	env := brokertest.Start(b, nil)
	nodes := startCluster(b, env, 3, nil)
	n1, n3 := nodes[0], nodes[2]
	same, cross := &latencies{}, &latencies{}
	subOn := func(n *node, id string, l *latencies) *client {
		c := mustDial(b, env, n, env.Device(b, id, 0, "backend"))
		if err := wait(b, c.Subscribe("devices/+/telemetry", 1, l.handler)); err != nil {
			b.Fatal(err)
		}
		return c
	}
	s1, s3 := subOn(n1, "backend-1", same), subOn(n3, "backend-3", cross)
	var pubs []*client
	for i := range devices {
		pubs = append(pubs, mustDial(b, env, n1, env.Device(b, fmt.Sprintf("dev-%04d", i), 0)))
	}
	stop := make(chan struct{})
	var sent atomic.Int64
	var wg sync.WaitGroup
	for i, p := range pubs {
		topic := fmt.Sprintf("devices/dev-%04d/telemetry", i)
		wg.Go(func() {
			period := time.Duration(float64(time.Second) / rate)
			timer := time.NewTimer(rand.N(period))
			defer timer.Stop()
			buf := make([]byte, 64)
			for {
				select {
				case <-stop:
					return
				case <-timer.C:
				}
				binary.BigEndian.PutUint64(buf, uint64(time.Now().UnixNano()))
				p.Publish(topic, 1, false, slices.Clone(buf))
				sent.Add(1)
				timer.Reset(period)
			}
		})
	}
	if !testtool.Poll(20*time.Second, func() bool { return cross.n.Load() > 0 }) { // the cross-node subscription propagates
		b.Fatal("no message crossed to n3")
	}
	same.reset()
	cross.reset()
	time.Sleep(phase)
	b.ReportMetric(same.pct(0.5), "same-p50-ms")
	b.ReportMetric(same.pct(0.99), "same-p99-ms")
	b.ReportMetric(cross.pct(0.5), "cross-p50-ms")
	b.ReportMetric(cross.pct(0.99), "cross-p99-ms")
	b.Logf("phase 1: %d same-node and %d cross-node deliveries in %v", same.n.Load(), cross.n.Load(), phase)

	// CPU per delivered message with one subscriber, on n1 then on n3
	cpuPer := func(l *latencies) float64 {
		l.reset()
		c0 := cpuTime()
		time.Sleep(phase)
		return float64((cpuTime() - c0).Microseconds()) / float64(max(l.n.Load(), 1))
	}
	// n3's interest leaves n1 before n1's own delivery is measured alone
	interest := cluster.Interest(n1.cluster, "devices/dev-0000/telemetry")
	if err := wait(b, s3.Unsubscribe("devices/+/telemetry")); err != nil {
		b.Fatal(err)
	}
	if !testtool.Poll(20*time.Second, func() bool { return cluster.Interest(n1.cluster, "devices/dev-0000/telemetry") < interest }) {
		b.Fatal("n3's unsubscription did not reach n1")
	}
	local := cpuPer(same)
	if err := wait(b, s1.Unsubscribe("devices/+/telemetry")); err != nil {
		b.Fatal(err)
	}
	cross.reset()
	if err := wait(b, s3.Subscribe("devices/+/telemetry", 1, cross.handler)); err != nil {
		b.Fatal(err)
	}
	if !testtool.Poll(20*time.Second, func() bool { return cross.n.Load() > 0 }) { // routed to n3 again
		b.Fatal("no message crossed to n3 after it subscribed again")
	}
	remote := cpuPer(cross)
	close(stop)
	wg.Wait()
	b.ReportMetric(local, "cpu-us/msg-same")
	b.ReportMetric(remote, "cpu-us/msg-cross")
	b.Logf("sent %d; CPU per delivered message (whole process: brokers, NATS and clients): %.0f µs same node, %.0f µs across nodes", sent.Load(), local, remote)
}
