package broker_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// lockedBuffer is a log sink shared by the broker's goroutines and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// records returns the JSON log records written so far.
func (l *lockedBuffer) records(t *testing.T) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.b.String()), "\n") {
		if line == "" {
			continue
		}
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, line)
		}
		recs = append(recs, r)
	}
	return recs
}

func (l *lockedBuffer) has(t *testing.T, msg string) bool {
	for _, r := range l.records(t) {
		if r["msg"] == msg {
			return true
		}
	}
	return false
}

// At info level a connection writes no line of its own unless
// Config.LogConnections is set; audit events (a refused CONNECT) are
// written either way, with their fields.
func TestLogConnections(t *testing.T) {
	for _, on := range []bool{false, true} {
		t.Run(map[bool]string{false: "off", true: "on"}[on], func(t *testing.T) {
			logs := &lockedBuffer{}
			env := brokertest.Start(t, func(c *broker.Config) {
				c.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
				c.LogConnections = on
			})
			dev := env.Device(t, "dev-a", 0)
			c := mustDial(t, env, dev)
			testtool.Eventually(t, 5*time.Second, "connection counted", func() bool { return metric(t, env, "mqtls_connections") == 1 })
			c.Disconnect(100)
			testtool.Eventually(t, 5*time.Second, "disconnect counted", func() bool { return metric(t, env, "mqtls_connections") == 0 })
			if _, err := dial(t, env, dev, func(o *paho.ClientOptions) { o.SetClientID("dev-b") }); err == nil {
				t.Fatal("client ID dev-b admitted for CN dev-a")
			}
			testtool.Eventually(t, 5*time.Second, "refusal audited", func() bool { return logs.has(t, "audit") })

			if got := logs.has(t, "connected") && logs.has(t, "disconnected"); got != on {
				t.Errorf("LogConnections %v: connected and disconnected lines written: %v", on, got)
			}
			for _, r := range logs.records(t) {
				if r["msg"] != "audit" {
					continue
				}
				for _, k := range []string{"event", "cn", "serial", "remote", "reason"} {
					if _, ok := r[k]; !ok {
						t.Errorf("audit record lacks %q: %v", k, r)
					}
				}
				if r["level"] != "INFO" || r["cn"] != "dev-a" || r["event"] != "connect refused" {
					t.Errorf("audit record %v, want a connect refused at INFO for dev-a", r)
				}
			}
		})
	}
}
