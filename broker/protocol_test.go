package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// raw is a hand-driven MQTT connection for protocol details paho hides.
type raw struct {
	t    *testing.T
	conn *tls.Conn
	r    *bufio.Reader
	v    byte
}

func dialRaw(t *testing.T, env *brokertest.Env, d *brokertest.Device, version byte) (*raw, packets.Packet) {
	t.Helper()
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, d))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c := &raw{t: t, conn: conn, r: bufio.NewReader(conn), v: version}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: version,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), ClientIdentifier: d.ID, Keepalive: 30, Clean: true}})
	ack, err := c.read()
	if err != nil || ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		t.Fatalf("CONNACK %+v: %v", ack, err)
	}
	return c, ack
}

func (c *raw) send(pk packets.Packet) {
	c.t.Helper()
	var buf bytes.Buffer
	pk.ProtocolVersion = c.v
	var err error
	switch pk.FixedHeader.Type {
	case packets.Connect:
		err = pk.ConnectEncode(&buf)
	case packets.Publish:
		err = pk.PublishEncode(&buf)
	case packets.Subscribe:
		err = pk.SubscribeEncode(&buf)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.conn.Write(buf.Bytes()); err != nil {
		c.t.Fatal(err)
	}
}

// read returns the next packet (io.EOF when the broker closed).
func (c *raw) read() (packets.Packet, error) {
	var pk packets.Packet
	b, err := c.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(b); err != nil {
		return pk, err
	}
	n, shift := 0, 0
	for {
		b, err := c.r.ReadByte()
		if err != nil {
			return pk, err
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
		shift += 7
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c.r, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = c.v
	pk.FixedHeader.Remaining = n
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Puback:
		err = pk.PubackDecode(body)
	case packets.Pubrec:
		err = pk.PubrecDecode(body)
	case packets.Publish:
		err = pk.PublishDecode(body)
	case packets.Suback:
		err = pk.SubackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

func publish(id uint16, qos byte, topic string, alias uint16) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, PacketID: id, TopicName: topic, Payload: []byte("p")}
	if alias > 0 {
		pk.Properties.TopicAlias, pk.Properties.TopicAliasFlag = alias, true
	}
	return pk
}

// A QoS 1/2 PUBLISH to $SYS/... is refused with a reason (v5) instead of
// silently dropped before any hook (Mochi), and audited.
func TestSysPublishAnswered(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	c, _ := dialRaw(t, env, dev, 5)
	c.send(publish(1, 1, "$SYS/x", 0))
	if ack, err := c.read(); err != nil || ack.FixedHeader.Type != packets.Puback || ack.PacketID != 1 || ack.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("QoS 1 to $SYS/x: %+v %v, want PUBACK 0x87", ack.FixedHeader, err)
	}
	c.send(publish(2, 2, "$sys/y", 0))
	if ack, err := c.read(); err != nil || ack.FixedHeader.Type != packets.Pubrec || ack.ReasonCode != packets.ErrNotAuthorized.Code {
		t.Fatalf("QoS 2 to $sys/y: %+v %v, want PUBREC 0x87", ack.FixedHeader, err)
	}
	if got := metricLabel(t, env, "mqtls_acl_denied_total", "action", "publish"); got != 2 {
		t.Errorf("publish denials counted = %v, want 2", got)
	}
	// 3.1.1 has no negative PUBACK: the connection is closed, without a
	// DISCONNECT packet (3.1.1 servers do not send one).
	c3, _ := dialRaw(t, env, dev, 4)
	c3.send(publish(1, 1, "$SYS/x", 0))
	if pk, err := c3.read(); !errors.Is(err, io.EOF) {
		t.Fatalf("3.1.1 QoS 1 to $SYS/x: got %v %v, want the connection closed", pk.FixedHeader, err)
	}
}

// A denied 3.1.1 QoS 1 publish closes the connection without writing a
// DISCONNECT packet (which 3.1.1 does not define for servers).
func TestDenied311PublishJustCloses(t *testing.T) {
	env := brokertest.Start(t, nil)
	c, _ := dialRaw(t, env, env.Device(t, "dev-a", 0), 4)
	c.send(publish(1, 1, "devices/dev-b/x", 0))
	if pk, err := c.read(); !errors.Is(err, io.EOF) {
		t.Fatalf("denied 3.1.1 publish: got %v %v, want the connection closed", pk.FixedHeader, err)
	}
}

// v5 topic aliases: the broker advertises a maximum and checks the ACL on
// the topic the alias stands for.
func TestTopicAliases(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	c, ack := dialRaw(t, env, dev, 5)
	if ack.Properties.TopicAliasMaximum == 0 {
		t.Fatal("CONNACK advertises no Topic Alias Maximum")
	}
	c.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 9,
		Filters: packets.Subscriptions{{Filter: "devices/dev-a/#", Qos: 0}}})
	if sa, err := c.read(); err != nil || sa.FixedHeader.Type != packets.Suback || sa.ReasonCodes[0] != 0 {
		t.Fatalf("SUBACK %+v %v", sa, err)
	}
	expectAck := func(id uint16, reason byte) {
		t.Helper()
		for {
			pk, err := c.read()
			if err != nil {
				t.Fatalf("waiting for PUBACK %d: %v", id, err)
			}
			if pk.FixedHeader.Type == packets.Puback {
				if pk.PacketID != id || pk.ReasonCode != reason {
					t.Fatalf("PUBACK %d reason %#x, want %d reason %#x", pk.PacketID, pk.ReasonCode, id, reason)
				}
				return
			}
		}
	}
	c.send(publish(1, 1, "devices/dev-a/x", 1))
	expectAck(1, 0)
	c.send(publish(2, 1, "", 1)) // alias 1 = devices/dev-a/x
	expectAck(2, 0)
	c.send(publish(3, 1, "devices/dev-b/x", 2))
	expectAck(3, packets.ErrNotAuthorized.Code)
	c.send(publish(4, 1, "", 2)) // alias 2 = devices/dev-b/x: still denied
	expectAck(4, packets.ErrNotAuthorized.Code)
}

func rawDial(t *testing.T, env *brokertest.Env, d *brokertest.Device) *tls.Conn {
	t.Helper()
	conn, err := tls.Dial("tcp", env.Addr, env.TLS(t, d))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn
}

func newReader(conn *tls.Conn) *bufio.Reader { return bufio.NewReader(conn) }
