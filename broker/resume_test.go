package broker_test

import (
	"crypto/tls"
	"io"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
)

// A resumed TLS session (no client signature: what saves a TPM device
// 25-200 ms) still identifies the device, and identity and revocation are
// checked again at its CONNECT.
func TestResumedSession(t *testing.T) {
	env := brokertest.Start(t, nil)
	dev := env.Device(t, "dev-a", 0)
	cfg := env.TLS(t, dev)
	cfg.ClientSessionCache = tls.NewLRUClientSessionCache(4)
	connect := func() (resumed bool, code byte) {
		t.Helper()
		c, err := tls.Dial("tcp", env.Addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write(connectPacket("dev-a"))
		ack := make([]byte, 4)
		if _, err := io.ReadFull(c, ack); err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{0xe0, 0x00})
		return c.ConnectionState().DidResume, ack[3]
	}
	if resumed, code := connect(); resumed || code != 0 {
		t.Fatalf("first connect: resumed %v, CONNACK %d", resumed, code)
	}
	time.Sleep(100 * time.Millisecond) // the ticket arrives after the handshake
	if resumed, code := connect(); !resumed || code != 0 {
		t.Fatalf("second connect: resumed %v, CONNACK %d; want a resumed, accepted session", resumed, code)
	}
	if _, err := env.Registry.Revoke(t.Context(), "dev-a", "test"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if resumed, code := connect(); !resumed || code != 5 {
		t.Fatalf("after revocation: resumed %v, CONNACK %d; want the resumed session refused (5)", resumed, code)
	}
}
