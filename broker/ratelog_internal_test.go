package broker

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// Drops under overload are logged at most once a second, with the number
// of lines left out.
func TestRateLog(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	var r rateLog
	for range 10_000 {
		r.note(log, "delivery dropped", "qos", 0)
	}
	if lines := strings.Count(buf.String(), "\n"); lines < 1 || lines > 2 {
		t.Fatalf("%d lines for 10,000 drops in well under a second or two:\n%s", lines, buf.String())
	}
	r.next.Store(0) // a second later
	r.note(log, "delivery dropped", "qos", 0)
	if !strings.Contains(buf.String(), "similar_lines_skipped=") {
		t.Fatalf("skipped lines not reported:\n%s", buf.String())
	}
}
