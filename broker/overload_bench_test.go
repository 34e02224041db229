package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// fanIn drives 50 publishers into one subscriber of devices/+/telemetry
// for d. open: publishers send as fast as they can (open loop); otherwise
// each publisher sends its next message only after the subscriber got the
// previous one (closed loop: the broker's capacity without overload). It
// returns the messages delivered until the last publisher stopped, that
// time, and the process CPU used.
func fanIn(b *testing.B, env *brokertest.Env, qos byte, open bool, d time.Duration) (delivered int64, elapsed, cpu time.Duration) {
	b.Helper()
	const publishers = 50
	dial := func(dev *brokertest.Device) (*tls.Conn, *bufio.Reader) {
		conn, err := tls.Dial("tcp", env.Addr, env.TLS(b, dev))
		if err != nil {
			b.Fatal(err)
		}
		var buf bytes.Buffer
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: dev.ID, Keepalive: 60, Clean: true}}
		pk.ConnectEncode(&buf)
		conn.Write(buf.Bytes())
		r := bufio.NewReaderSize(conn, 64<<10)
		if _, err := readPacket(r); err != nil {
			b.Fatal(err)
		}
		return conn, r
	}
	subConn, subR := dial(env.Device(b, "backend-1", 0, "backend"))
	defer subConn.Close()
	var buf bytes.Buffer
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: "devices/+/telemetry", Qos: qos}}}
	sub.SubscribeEncode(&buf)
	subConn.Write(buf.Bytes())
	if _, err := readPacket(subR); err != nil {
		b.Fatal(err)
	}
	var got atomic.Int64
	perPub := make([]chan struct{}, publishers) // closed loop: a token per delivered message
	for i := range perPub {
		perPub[i] = make(chan struct{}, 1)
	}
	go func() {
		w := bufio.NewWriter(subConn)
		for {
			h, err := subR.ReadByte()
			if err != nil {
				return
			}
			subR.UnreadByte()
			body, err := readPacket(subR)
			if err != nil {
				return
			}
			if h>>4 != packets.Publish {
				continue
			}
			got.Add(1)
			n := int(body[0])<<8 | int(body[1])
			topic := string(body[2 : 2+n])
			var p int
			fmt.Sscanf(topic, "devices/dev-%02d/telemetry", &p)
			select {
			case perPub[p] <- struct{}{}:
			default:
			}
			if h&0x06 != 0 { // QoS 1: PUBACK
				id := body[2+n : 4+n]
				w.Write([]byte{0x40, 2, id[0], id[1]})
				if subR.Buffered() == 0 {
					w.Flush()
				}
			}
		}
	}()
	conns := make([]*tls.Conn, publishers)
	for p := range publishers {
		c, r := dial(env.Device(b, fmt.Sprintf("dev-%02d", p), 0))
		conns[p] = c
		go io.Copy(io.Discard, r) // PUBACKs
		defer c.Close()
	}
	start := time.Now()
	cpu0 := processCPU()
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for p, c := range conns {
		wg.Go(func() {
			topic := fmt.Sprintf("devices/dev-%02d/telemetry", p)
			w := bufio.NewWriterSize(c, 32<<10)
			payload := bytes.Repeat([]byte{'x'}, 64)
			for id := uint16(1); time.Now().Before(stop); id++ {
				if id == 0 {
					id = 1
				}
				var out bytes.Buffer
				pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, ProtocolVersion: 4, TopicName: topic, Payload: payload}
				if qos > 0 {
					pk.PacketID = id
				}
				pk.PublishEncode(&out)
				w.Write(out.Bytes())
				if open {
					if w.Buffered() > 16<<10 {
						w.Flush()
					}
					continue
				}
				w.Flush()
				select {
				case <-perPub[p]:
				case <-time.After(time.Second):
				}
			}
			w.Flush()
		})
	}
	wg.Wait()
	return got.Load(), time.Since(start), processCPU() - cpu0
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkFanInOverload: 50 publishers into one subscriber (64 B
// payloads, 3 s each), closed loop (capacity) and open loop (overload) at
// QoS 0 and 1. Reports delivered messages per second, drops and the
// process CPU (broker and clients share it) per delivered message.
func BenchmarkFanInOverload(b *testing.B) {
	for _, tc := range []struct {
		name string
		qos  byte
		open bool
	}{{"qos0-closed", 0, false}, {"qos0-open", 0, true}, {"qos1-closed", 1, false}, {"qos1-open", 1, true}} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				env := backendEnv(b, nil)
				const d = 3 * time.Second
				n, elapsed, cpu := fanIn(b, env, tc.qos, tc.open, d)
				b.ReportMetric(float64(n)/elapsed.Seconds(), "delivered/s")
				b.ReportMetric(metric(b, env, "mqtls_deliveries_dropped_total"), "dropped")
				if n > 0 {
					b.ReportMetric(float64(cpu.Microseconds())/float64(n), "cpu-µs/delivered")
				}
				env.Stop()
			}
		})
	}
}
