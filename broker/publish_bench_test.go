package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// BenchmarkPublishQoS1 is the broker's publish path as most devices of
// `devsim bench` use it: a device publishes QoS 1 to its own telemetry
// topic (no subscriber) and waits for the PUBACK. Client and broker share
// the process: compare cpu-ns/op (process CPU, steadier than the time on a
// loaded machine), allocs/op and profiles (-cpuprofile) between versions.
func BenchmarkPublishQoS1(b *testing.B) {
	env := brokertest.Start(b, nil)
	dev := env.Device(b, "dev-1", 0)
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(b, dev))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	var buf bytes.Buffer
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: dev.ID, Keepalive: 60, Clean: true}}
	pk.ConnectEncode(&buf)
	conn.Write(buf.Bytes())
	r := bufio.NewReader(conn)
	if _, err := readPacket(r); err != nil {
		b.Fatal(err)
	}
	payload := bytes.Repeat([]byte{'x'}, 64)
	id := uint16(0)
	b.ReportAllocs()
	cpu0 := processCPU()
	for b.Loop() {
		if id++; id == 0 {
			id = 1
		}
		buf.Reset()
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
			TopicName: "devices/dev-1/telemetry", Payload: payload, PacketID: id}
		pk.PublishEncode(&buf)
		if _, err := conn.Write(buf.Bytes()); err != nil {
			b.Fatal(err)
		}
		ack, err := readPacket(r)
		if err != nil || len(ack) < 2 || uint16(ack[0])<<8|uint16(ack[1]) != id {
			b.Fatalf("PUBACK %x: %v", ack, err)
		}
	}
	b.ReportMetric(float64(processCPU()-cpu0)/float64(b.N), "cpu-ns/op")
}
