package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"io"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// A v5 QoS 1 PUBLISH carrying properties must get a valid PUBACK: Mochi
// copies the properties into the ack with reason code 0x01 (invalid for a
// PUBACK; MQTT.js drops the connection) unless NoInheritedPropertiesOnAck
// is set.
func TestV5PubackWithProperties(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var buf bytes.Buffer
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: "dev-a", Keepalive: 30, Clean: true}}
	if err := connect.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	pub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 5, PacketID: 7,
		TopicName: "devices/dev-a/x", Payload: []byte("p"),
		Properties: packets.Properties{User: []packets.UserProperty{{Key: "k", Val: "v"}}, ContentType: "text/plain"}}
	if err := pub.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	read := func() (byte, []byte) {
		t.Helper()
		h, err := r.ReadByte()
		if err != nil {
			t.Fatal(err)
		}
		n, shift := 0, 0
		for {
			b, _ := r.ReadByte()
			n |= int(b&0x7f) << shift
			if b&0x80 == 0 {
				break
			}
			shift += 7
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			t.Fatal(err)
		}
		return h, body
	}
	if h, body := read(); h>>4 != packets.Connack || body[1] != 0 {
		t.Fatalf("CONNACK %x %x", h, body)
	}
	h, body := read()
	if h>>4 != packets.Puback || body[0] != 0 || body[1] != 7 {
		t.Fatalf("want PUBACK for packet 7, got %x %x", h, body)
	}
	if len(body) > 2 && body[2] != 0x00 {
		t.Fatalf("PUBACK reason code %#x, want 0x00 (success)", body[2])
	}
}
