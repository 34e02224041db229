package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/sim"
)

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim run", stderr)
	var brokers stringList
	fs.Var(&brokers, "broker", "broker, mqtts://HOST:PORT (repeatable: devices spread over the nodes of a cluster and move to another when theirs fails)")
	est := fs.String("est", "", "EST server, https://HOST:PORT")
	caFile := fs.String("ca", "", "root CA certificate to pin (PEM)")
	tokensFile := fs.String("tokens", "", `file of "ID TOKEN" lines (broker token --count N)`)
	devices := fs.Int("devices", 0, "devices to simulate (default: one per token)")
	ksURI := fs.String("keystore", "mem", "where device keys live: mem, or tpmsim:DIR (slow: ~1 ms per signature)")
	rate := fs.Float64("connect-rate", 200, "connects started per second")
	interval := fs.Duration("interval", 10*time.Second, "publish interval per device")
	noTraffic := fs.Bool("no-traffic", false, "connect and stay idle (no publishes)")
	qos := fs.Int("qos", 1, "publish QoS, 0 or 1")
	payload := fs.Int("payload", 64, "payload size in bytes (min 16)")
	sample := fs.Int("sample", 20, "devices that subscribe to their telemetry to measure end-to-end latency")
	duration := fs.Duration("duration", 30*time.Second, "traffic phase length after the last connect")
	sources := fs.Int("source-addrs", 0, "spread connections over 127.0.0.1..127.0.0.N (default 1 + devices/20000)")
	serverPID := fs.Int("server-pid", 0, "broker process to read CPU and RSS of (/proc)")
	jsonFile := fs.String("json", "", "write the report as JSON")
	htmlFile := fs.String("html", "", "write the report as a self-contained HTML page")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if len(brokers) == 0 || *est == "" || *caFile == "" || *tokensFile == "" {
		return cli.Usagef("--broker, --est, --ca and --tokens are required")
	}
	if *qos != 0 && *qos != 1 {
		return cli.Usagef("--qos must be 0 or 1")
	}
	roots, err := device.ReadCertFile(*caFile)
	if err != nil {
		return err
	}
	tokens, err := readTokens(*tokensFile)
	if err != nil {
		return err
	}
	u, err := keystore.ParseURI(*ksURI)
	if err != nil {
		return err
	}
	if u.Kind != keystore.KindMem && u.Kind != keystore.KindTPMSim {
		return cli.Usagef("--keystore: mem or tpmsim:DIR")
	}
	// Everything is checked before the first enrollment spends a token.
	if *rate <= 0 {
		return cli.Usagef("--connect-rate %v: must be positive", *rate)
	}
	if *interval <= 0 && !*noTraffic {
		return cli.Usagef("--interval %v: must be positive (or --no-traffic)", *interval)
	}
	if *duration <= 0 {
		return cli.Usagef("--duration %v: must be positive", *duration)
	}
	if *payload < 16 {
		return cli.Usagef("--payload %d: at least 16 bytes (a sequence number and a timestamp)", *payload)
	}
	if *serverPID != 0 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/stat", *serverPID)); err != nil {
			return cli.Usagef("--server-pid %d: no such process (%v)", *serverPID, err)
		}
	}
	for _, out := range []string{*jsonFile, *htmlFile} {
		if out == "" {
			continue
		}
		if fi, err := os.Stat(filepath.Dir(out)); err != nil || !fi.IsDir() {
			return cli.Usagef("%s: its directory does not exist", out)
		}
	}
	cfg := sim.Config{
		Brokers: brokers, EST: *est, Root: roots[0], Tokens: tokens, Devices: *devices,
		ConnectRate: *rate, Interval: *interval, NoTraffic: *noTraffic, QoS: byte(*qos), PayloadSize: *payload,
		Sample: *sample, Duration: *duration, SourceAddrs: *sources, ServerPID: *serverPID,
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	store, err := keystores.Open(ctx, u, filepath.Join(u.Path, "keys"))
	if err != nil {
		return err
	}
	defer store.Close()
	cfg.Store = store

	prog := newProgress(stderr)
	cfg.Progress = prog.update
	rep, err := sim.Run(ctx, cfg)
	prog.done()
	if err != nil {
		return err
	}
	printSummary(stdout, rep)
	if *jsonFile != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*jsonFile, append(data, '\n'), 0o644); err != nil {
			return err
		}
	}
	if *htmlFile != "" {
		f, err := os.Create(*htmlFile)
		if err != nil {
			return err
		}
		if err := sim.WriteHTML(f, rep); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	nerr := 0
	for _, n := range rep.Errors {
		nerr += n
	}
	switch {
	case rep.Interrupted:
		fmt.Fprintln(stderr, "devsim run: interrupted")
	case nerr > 0:
		return fmt.Errorf("%d errors (see the summary)", nerr)
	}
	return nil
}

func readTokens(path string) ([]sim.Token, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []sim.Token
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		id, tok, ok := strings.Cut(line, " ")
		if !ok || strings.TrimSpace(tok) == "" {
			return nil, fmt.Errorf("%s:%d: want \"ID TOKEN\"", path, n)
		}
		out = append(out, sim.Token{ID: id, Token: strings.TrimSpace(tok)})
	}
	return out, sc.Err()
}

func printSummary(w io.Writer, r *sim.Report) {
	fmt.Fprintf(w, "devices    %d enrolled in %.1fs, %d connected in %.1fs (%.0f/s)\n", r.Enrolled, r.EnrollSeconds, r.Connected, r.ConnectSeconds, r.ConnectRate)
	fmt.Fprintf(w, "connect    p50 %.1f ms  p90 %.1f ms  p99 %.1f ms  max %.1f ms\n", r.ConnectMS.P50, r.ConnectMS.P90, r.ConnectMS.P99, r.ConnectMS.Max)
	fmt.Fprintf(w, "messages   %d sent (%.0f/s, QoS %d, %d B), %d received by the sample\n", r.MessagesSent, r.MessagesPerSec, r.QoS, r.PayloadSize, r.MessagesReceived)
	fmt.Fprintf(w, "end to end p50 %.1f ms  p90 %.1f ms  p99 %.1f ms  max %.1f ms\n", r.E2EMS.P50, r.E2EMS.P90, r.E2EMS.P99, r.E2EMS.Max)
	if s := r.Server; s != nil {
		fmt.Fprintf(w, "broker     %.3f ms CPU per connect, %.1f KiB RSS per session, %.0f ms CPU during traffic\n", s.CPUPerConnect, s.RSSPerSession, s.CPUTrafficMS)
	}
	if len(r.Errors) == 0 {
		fmt.Fprintln(w, "errors     none")
		return
	}
	keys := make([]string, 0, len(r.Errors))
	for k := range r.Errors {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "error      %d × %s\n", r.Errors[k], k)
	}
}

// progress draws a bar on a terminal and plain lines (every 2s) otherwise.
type progress struct {
	w    io.Writer
	tty  bool
	mu   sync.Mutex
	last time.Time
}

func newProgress(w io.Writer) *progress {
	p := &progress{w: w}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	return p
}

func (p *progress) update(s sim.Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	done := s.Connected
	if s.Phase == "enroll" {
		done = s.Enrolled
	}
	if p.tty {
		const width = 30
		n := 0
		if s.Devices > 0 {
			n = done * width / s.Devices
		}
		fmt.Fprintf(p.w, "\r%-9s [%s%s] %d/%d  sent %d  recv %d  errors %d  %4.0fs ", s.Phase,
			strings.Repeat("=", n), strings.Repeat(" ", width-n), done, s.Devices, s.Sent, s.Received, s.Errors, s.Elapsed.Seconds())
		return
	}
	if time.Since(p.last) < 2*time.Second {
		return
	}
	p.last = time.Now()
	fmt.Fprintf(p.w, "%6.1fs %s: enrolled %d, connected %d/%d, sent %d, received %d, errors %d\n",
		s.Elapsed.Seconds(), s.Phase, s.Enrolled, s.Connected, s.Devices, s.Sent, s.Received, s.Errors)
}

func (p *progress) done() {
	if p.tty {
		fmt.Fprintln(p.w)
	}
}
