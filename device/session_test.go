package device

import (
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// recordingStore logs what paho does to the session store.
type recordingStore struct {
	*sessionStore
	mu       sync.Mutex
	put, del []string
}

func (r *recordingStore) Put(key string, pkt packets.ControlPacket) {
	r.mu.Lock()
	r.put = append(r.put, key)
	r.mu.Unlock()
	r.sessionStore.Put(key, pkt)
}

func (r *recordingStore) Del(key string) {
	r.mu.Lock()
	r.del = append(r.del, key)
	r.mu.Unlock()
	r.sessionStore.Del(key)
}

func (r *recordingStore) deleted(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.del, key)
}

// What sessionStore relies on in paho (v1.5.1). If an upgrade changes any
// of it, this test fails, and sessionStore (the one place that leans on
// paho's internals) must be revisited:
//   - a QoS 1 PUBLISH is Put under outboundKey(mid) before Publish returns;
//   - it is Del'd when its PUBACK arrives, before its token completes;
//   - with clean session off, Connect resends what the store holds (a
//     message left from a dropped connection), iterating All(), and
//     Del's each one on its PUBACK.
func TestPahoSessionContract(t *testing.T) {
	env := brokertest.Start(t, nil)
	d := env.Device(t, "dev-1", time.Hour)
	store := &recordingStore{sessionStore: newSessionStore()}
	// left over from a connection that dropped before the PUBACKs
	for _, mid := range []uint16{9, 3, 5} {
		p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
		p.Qos, p.TopicName, p.MessageID, p.Payload = 1, "devices/dev-1/left", mid, []byte("left over")
		store.sessionStore.Put(outboundKey(mid), p)
	}
	if got := store.All(); !slices.Equal(got, []string{"o.9", "o.3", "o.5"}) {
		t.Fatalf("All() = %v, want the order stored", got)
	}
	opts := paho.NewClientOptions().AddBroker("tls://" + env.Addr).SetClientID("dev-1").
		SetTLSConfig(env.TLS(t, d)).SetProtocolVersion(4).SetCleanSession(false).
		SetAutoReconnect(false).SetResumeSubs(false).SetStore(store)
	c := paho.NewClient(opts)
	tok := c.Connect()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no CONNACK")
	}
	defer c.Disconnect(0)
	testtool.Eventually(t, 5*time.Second, "the stored messages resent and acknowledged", func() bool {
		return store.deleted("o.9") && store.deleted("o.3") && store.deleted("o.5") && store.len() == 0
	})

	pt := c.Publish("devices/dev-1/fresh", 1, false, []byte("x")).(*paho.PublishToken)
	key := outboundKey(pt.MessageID())
	store.mu.Lock()
	put := slices.Contains(store.put, key)
	store.mu.Unlock()
	if !put {
		t.Fatalf("Publish returned without storing %s (stored: %v)", key, store.put)
	}
	select {
	case <-pt.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("no PUBACK")
	}
	if err := pt.Error(); err != nil || !store.deleted(key) {
		t.Fatalf("token complete (err %v) but %s deleted = %v", err, key, store.deleted(key))
	}
}

// The store keeps its own copy of a PUBLISH: paho's resume writes Dup on
// the packet it gets from the store while the packet a racing Publish
// handed over may be being written on the new connection.
func TestSessionStoreCopiesPublish(t *testing.T) {
	s := newSessionStore()
	p := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	p.Qos, p.TopicName, p.MessageID, p.Payload = 1, "t", 1, []byte("x")
	s.Put(outboundKey(1), p)
	got, ok := s.Get(outboundKey(1)).(*packets.PublishPacket)
	if !ok || got == p || got.TopicName != "t" || got.MessageID != 1 || string(got.Payload) != "x" {
		t.Fatalf("Get = %p %+v, want a copy of %p", got, got, p)
	}
	done := make(chan struct{})
	go func() { p.Write(io.Discard); close(done) }() // the outgoing goroutine
	got.Dup = true                                   // resume
	<-done
}
