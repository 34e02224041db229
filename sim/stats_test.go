package sim

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/mqtls/mqtls/device"
)

func TestPercentiles(t *testing.T) {
	var v []float64
	for i := 1; i <= 1000; i++ {
		v = append(v, float64(i))
	}
	p := percentiles(v)
	if p.P50 != 501 || p.P90 != 901 || p.P99 != 991 || p.Max != 1000 || p.N != 1000 {
		t.Fatalf("percentiles = %+v", p)
	}
	if (percentiles(nil) != Percentiles{}) {
		t.Fatal("empty input")
	}
	h := histogram(v, 10)
	total := 0
	for _, b := range h {
		total += b.Count
	}
	if len(h) != 10 || total != 1000 || h[9].To != 1000 {
		t.Fatalf("histogram = %+v", h)
	}
}

func TestHTMLSelfContained(t *testing.T) {
	r := &Report{Devices: 2, Connected: 2, Errors: map[string]int{"connect: <x>": 1},
		Timeline: []Point{{0, 0}, {1, 2}}, ConnectHistogram: histogram([]float64{1, 2}, 2), E2EHistogram: histogram([]float64{0.5}, 2)}
	var b strings.Builder
	if err := WriteHTML(&b, r); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if strings.Count(out, "<svg") != 3 || strings.Contains(out, "<x>") || strings.Contains(out, "src=") || strings.Contains(out, "href=") {
		t.Fatal("HTML report is not self-contained or does not escape error text")
	}
}

// With the broker's statistics (--server-pid), the page shows its CPU per
// connect and RSS per session, not only the raw JSON.
func TestHTMLShowsBrokerCost(t *testing.T) {
	r := &Report{Devices: 2, Connected: 2, Server: &ServerStats{CPUPerConnect: 1.234, CPUConnectMS: 2.5, RSSPerSession: 57.89, RSSBeforeKB: 1000, RSSIdleKB: 1116}}
	var b strings.Builder
	if err := WriteHTML(&b, r); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	body := page[:strings.Index(page, "<h2>Raw report")]
	for _, want := range []string{"CPU per connect</td><td>1.23 ms", "RSS per session</td><td>57.9 KiB"} {
		if !strings.Contains(body, want) {
			t.Errorf("HTML report lacks %q outside the raw JSON", want)
		}
	}
	b.Reset()
	WriteHTML(&b, &Report{})
	if strings.Contains(b.String(), "Broker (from /proc)") {
		t.Error("broker section shown without --server-pid")
	}
}

// Causes are told apart by type, not by the text of a dependency's error.
func TestCauseTyped(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
	}{
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, "connection refused"},
		{fmt.Errorf("device: connect: %w", &net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}), "connection reset"},
		{fmt.Errorf("wrapped: %w", io.EOF), "EOF"},
		{fmt.Errorf("x: %w", device.ErrTimeout), device.ErrTimeout.Error()},
	} {
		if got := cause(c.err); got != c.want {
			t.Errorf("cause(%v) = %q, want %q", c.err, got, c.want)
		}
	}
}
