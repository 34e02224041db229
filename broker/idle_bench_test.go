package broker_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/sim/bench"
)

// BenchmarkIdleSession holds b.N idle mTLS sessions (CONNECT/CONNACK done)
// on the broker and on devsim bench's bare crypto/tls reference server, in
// this process, and reports what the server side holds per session: stack
// bytes (before and after a forced GC: an idle server may not collect for
// a long time), goroutines, and heap bytes (this includes the client ends,
// the same in both). Run with -benchtime 1000x.
func BenchmarkIdleSession(b *testing.B) {
	env := brokertest.Start(b, nil)
	var devs []*brokertest.Device
	var cfgs []*tls.Config
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	rawAddr := ln.Addr().String()
	go bench.ServeRawTLS(b.Context(), env.Dir, ln)
	for _, side := range []struct{ name, addr string }{{"raw", rawAddr}, {"broker", env.Addr}} {
		b.Run(side.name, func(b *testing.B) {
			for i := len(devs); i < b.N; i++ {
				devs = append(devs, env.Device(b, fmt.Sprintf("idle-%d", i), 0))
				cfgs = append(cfgs, env.TLS(b, devs[i]))
				cfgs[i].CurvePreferences = []tls.CurveID{tls.X25519}
			}
			conns := make([]net.Conn, 0, b.N)
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			var m0, m1, m2 runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&m0)
			g0 := runtime.NumGoroutine()
			for i, d := range devs[:b.N] {
				c, err := dialConnect(side.addr, cfgs[i], d.ID)
				if err != nil {
					b.Fatal(err)
				}
				conns = append(conns, c)
			}
			runtime.ReadMemStats(&m1)
			g1 := runtime.NumGoroutine()
			runtime.GC()
			runtime.GC()
			runtime.ReadMemStats(&m2)
			n := float64(len(conns))
			b.ReportMetric(float64(int64(m1.StackInuse)-int64(m0.StackInuse))/n, "stack-B/session")
			b.ReportMetric(float64(int64(m2.StackInuse)-int64(m0.StackInuse))/n, "stack-B/session-gc")
			b.ReportMetric(float64(int64(m2.HeapInuse)-int64(m0.HeapInuse))/n, "heap-B/session-gc")
			b.ReportMetric(float64(g1-g0)/n, "goroutines/session")
		})
	}
}

// dialConnect makes an mTLS connection and completes CONNECT/CONNACK.
func dialConnect(addr string, cfg *tls.Config, id string) (net.Conn, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	ack := make([]byte, 4)
	if _, err := conn.Write(connectPacket(id)); err == nil {
		_, err = io.ReadFull(conn, ack)
	}
	if err != nil || ack[0] != 0x20 || ack[3] != 0 {
		conn.Close()
		return nil, fmt.Errorf("CONNECT %s: %v (CONNACK %x)", id, err, ack)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}
