// Package bench runs the side-by-side benchmark behind `devsim bench`
// (`task bench`): the same fleet scenario, driven by package sim, against
// the `broker serve` binary and against mosquitto, with the same
// certificates.
//
// It is a composition, not an engine: it starts the broker binary and reads
// its CA (provisioning/ca), which the fleet engine in package sim must not.
package bench

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/sim"
)

// Config configures Compare.
type Config struct {
	BrokerBin string // the cmd/broker binary (required)
	Mosquitto string // the mosquitto binary (required)
	// RawTLS starts the bare crypto/tls reference server (ServeRawTLS) in
	// its own process: the data directory and the address are appended
	// (required; devsim passes itself and its hidden bench-raw-tls command).
	RawTLS []string
	// Devices held and publishing QoS 1 once a second (default 2000).
	Devices int
	// Duration of the once-a-second traffic and of the flood (default 10s).
	Duration time.Duration
	Out      io.Writer
	Log      io.Writer // child process output (default: discard)
}

// Side is one server's results in a comparison.
type Side struct {
	Name   string
	Steady *sim.Report // connect phase, then every device publishes once a second
	Flood  *sim.Report // publish throughput (nil for the raw TLS server)
}

// Compare runs the same scenario against `broker serve` (default
// settings, info logging), a bare crypto/tls server (ServeRawTLS: the
// connect and idle-session floor of Go's TLS) and mosquitto
// (require_certificate, use_identity_as_username, an ACL equivalent to the
// default policy, set_tcp_nodelay) with the same certificates and the same
// TLS key exchange (X25519 on all: Go would otherwise negotiate a hybrid
// post-quantum group that mosquitto's OpenSSL lacks), and prints the
// figures with their ratios.
func Compare(ctx context.Context, cfg Config) error {
	if cfg.Devices == 0 {
		cfg.Devices = 2000
	}
	if cfg.Duration == 0 {
		cfg.Duration = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if len(cfg.RawTLS) == 0 {
		return errors.New("bench: Config.RawTLS is required")
	}
	out := cfg.Out
	fmt.Fprintf(out, "load average at start: %s\n", loadAvg())
	dir, err := os.MkdirTemp("", "mqtls-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "data")
	if err := runCmd(cfg.BrokerBin, "init", "--data", data); err != nil {
		return err
	}
	tokOut, err := exec.Command(cfg.BrokerBin, "token", "--data", data, "--count", strconv.Itoa(cfg.Devices), "--prefix", "bench").Output()
	if err != nil {
		return fmt.Errorf("broker token: %w", err)
	}
	var tokens []sim.Token
	for _, line := range strings.Split(strings.TrimSpace(string(tokOut)), "\n") {
		id, tok, _ := strings.Cut(line, " ")
		tokens = append(tokens, sim.Token{ID: id, Token: tok})
	}
	c, err := ca.Load(data)
	if err != nil {
		return err
	}
	mqttAddr, estAddr := freePort(), freePort()
	ours, err := startProcess(ctx, cfg.Log, cfg.BrokerBin, "serve", "--data", data, "--mqtt-addr", mqttAddr, "--est-addr", estAddr,
		"--metrics-addr", "")
	if err != nil {
		return err
	}
	defer ours.stop()
	if err := waitListening(estAddr); err != nil {
		return err
	}
	fmt.Fprintf(out, "enrolling %d devices over EST...\n", cfg.Devices)
	ids, err := sim.Enroll(ctx, sim.Config{EST: "https://" + estAddr, Root: c.Root, Tokens: tokens, Devices: cfg.Devices})
	if err != nil {
		return err
	}
	x25519 := func(dc *device.Config) {
		dc.CurvePreferences = []tls.CurveID{tls.X25519}
		dc.ServerName = "127.0.0.1"
		dc.MinTLS = tls.VersionTLS12
	}
	scenario := func(name, addr string, pid int, mqtt bool) (*Side, error) {
		base := sim.Config{Broker: "mqtts://" + addr, EST: "https://" + estAddr, Root: c.Root, Identities: ids, Devices: cfg.Devices,
			ConnectRate: 400, ServerPID: pid, Client: x25519, QoS: 1, Sample: min(100, cfg.Devices)}
		steady := base
		steady.Interval, steady.Duration = time.Second, cfg.Duration
		if mqtt {
			fmt.Fprintf(out, "%s: %d devices, QoS 1 once a second for %v...\n", name, cfg.Devices, cfg.Duration)
		} else {
			fmt.Fprintf(out, "%s: %d idle sessions...\n", name, cfg.Devices)
			steady.NoTraffic, steady.Duration = true, 2*time.Second
		}
		rs, err := sim.Run(ctx, steady)
		if err != nil {
			return nil, err
		}
		side := &Side{Name: name, Steady: rs}
		if !mqtt {
			return side, nil
		}
		fmt.Fprintf(out, "%s: QoS 1 flood from 200 devices for %v...\n", name, cfg.Duration)
		flood := base
		flood.Devices, flood.Flood, flood.Duration, flood.ConnectRate, flood.Sample = min(200, cfg.Devices), true, cfg.Duration, 1000, 20
		if side.Flood, err = sim.Run(ctx, flood); err != nil {
			return nil, err
		}
		return side, nil
	}
	mine, err := scenario("mqtls", mqttAddr, ours.pid(), true)
	if err != nil {
		return err
	}
	ours.stop()

	// the bare crypto/tls server
	rawAddr := freePort()
	raw, err := startProcess(ctx, cfg.Log, cfg.RawTLS[0], append(cfg.RawTLS[1:], data, rawAddr)...)
	if err != nil {
		return err
	}
	defer raw.stop()
	if err := waitListening(rawAddr); err != nil {
		return err
	}
	bare, err := scenario("raw TLS", rawAddr, raw.pid(), false)
	if err != nil {
		return err
	}
	raw.stop()

	// mosquitto with the same certificates
	mqAddr := freePort()
	host, port, _ := net.SplitHostPort(mqAddr)
	acl := filepath.Join(dir, "acl")
	if err := os.WriteFile(acl, []byte("pattern readwrite devices/%u/#\n"), 0o600); err != nil {
		return err
	}
	conf := filepath.Join(dir, "mosquitto.conf")
	user := ""
	if os.Geteuid() == 0 {
		user = "user root\n" // as root mosquitto drops to "mosquitto", which cannot read our 0600 keys
	}
	err = os.WriteFile(conf, []byte(user+fmt.Sprintf(`per_listener_settings false
listener %s %s
cafile %s
certfile %s
keyfile %s
require_certificate true
use_identity_as_username true
acl_file %s
set_tcp_nodelay true
max_connections -1
persistence false
log_dest stderr
log_type error
`, port, host, filepath.Join(data, ca.RootCertFile), filepath.Join(data, ca.ServerCertFile), filepath.Join(data, ca.ServerKeyFile), acl)), 0o600)
	if err != nil {
		return err
	}
	mq, err := startProcess(ctx, cfg.Log, cfg.Mosquitto, "-c", conf)
	if err != nil {
		return err
	}
	defer mq.stop()
	if err := waitListening(mqAddr); err != nil {
		return err
	}
	theirs, err := scenario("mosquitto", mqAddr, mq.pid(), true)
	if err != nil {
		return err
	}
	printComparison(out, cfg, mine, bare, theirs)
	fmt.Fprintf(out, "load average at end: %s\n", loadAvg())
	return nil
}

// printComparison prints mqtls (a) against the raw TLS server (r) and
// mosquitto (m), each figure with its ratios and the goal.
func printComparison(w io.Writer, cfg Config, a, r, m *Side) {
	ratio := func(x, y float64) string {
		if x == 0 || y == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f×", x/y)
	}
	num := func(x float64) string {
		if x == 0 {
			return "-"
		}
		return strconv.FormatFloat(x, 'f', 3, 64)
	}
	row := func(what string, x, raw, mq float64, note string) {
		fmt.Fprintf(w, "%-44s %10s %10s %10s %9s %11s  %s\n", what, num(x), num(raw), num(mq), ratio(x, raw), ratio(x, mq), note)
	}
	fmt.Fprintf(w, "\n%-44s %10s %10s %10s %9s %11s\n", "", a.Name, r.Name, m.Name, "vs raw", "vs mosquitto")
	srv := func(s *Side) *sim.ServerStats {
		if s.Steady.Server == nil {
			return &sim.ServerStats{}
		}
		return s.Steady.Server
	}
	sa, sr, sm := srv(a), srv(r), srv(m)
	row(fmt.Sprintf("RSS per idle session (%d held), KiB", cfg.Devices), sa.RSSPerSession, sr.RSSPerSession, sm.RSSPerSession, "goal ≤ 1.0× raw")
	row("server CPU per mTLS connect, ms", sa.CPUPerConnect, sr.CPUPerConnect, sm.CPUPerConnect, "goal ≤ 1.05× raw")
	row("connect p50, ms", a.Steady.ConnectMS.P50, r.Steady.ConnectMS.P50, m.Steady.ConnectMS.P50, "")
	title := fmt.Sprintf("%d devices × 1 msg/s QoS 1: ", cfg.Devices)
	row(title+"p99 e2e, ms", a.Steady.E2EMS.P99, 0, m.Steady.E2EMS.P99, "goal ≤ 2× mosquitto")
	cpuShare := func(s *Side) float64 {
		if s.Steady.TrafficSeconds == 0 || s.Steady.Server == nil {
			return 0
		}
		return s.Steady.Server.CPUTrafficMS / s.Steady.TrafficSeconds / 10
	}
	row(title+"CPU, % core", cpuShare(a), 0, cpuShare(m), "goal ≤ 1.2× mosquitto")
	row(title+"RSS, MiB", float64(sa.RSSAfterKB)/1024, 0, float64(sm.RSSAfterKB)/1024, "goal ≤ 2× mosquitto")
	row("QoS 1 messages/s (200 publishers)", a.Flood.MessagesPerSec, 0, m.Flood.MessagesPerSec, "higher is better")
	perMsg := func(s *Side) float64 {
		if f := s.Flood; f.Server != nil && f.MessagesSent > 0 {
			return f.Server.CPUTrafficMS * 1000 / float64(f.MessagesSent)
		}
		return 0
	}
	row("server CPU per message (flood), µs", perMsg(a), 0, perMsg(m), "")
	row("end-to-end p50 under flood, ms", a.Flood.E2EMS.P50, 0, m.Flood.E2EMS.P50, "")
	for _, s := range []*Side{a, r, m} {
		for _, rep := range []*sim.Report{s.Steady, s.Flood} {
			if rep == nil {
				continue
			}
			for k, n := range rep.Errors {
				fmt.Fprintf(w, "%s error: %d × %s\n", s.Name, n, k)
			}
		}
	}
}

// ServeRawTLS is the reference server of Compare (and of the broker's
// BenchmarkConnectCPU): a bare crypto/tls server on ln with the broker's
// TLS settings (TLS 1.2+, client certificate required and verified against
// the root of the data directory, session tickets on) and one goroutine
// per connection that answers CONNECT with CONNACK and PINGREQ with
// PINGRESP through a 128-byte buffer, until DISCONNECT. It serves until
// ctx ends, then closes ln.
func ServeRawTLS(ctx context.Context, data string, ln net.Listener) error {
	defer ln.Close()
	c, err := ca.Load(data)
	if err != nil {
		return err
	}
	cert, err := c.ServerCertificate()
	if err != nil {
		return err
	}
	tln := tls.NewListener(ln, &tls.Config{
		Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: c.Pool(), MinVersion: tls.VersionTLS12,
	})
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		conn, err := tln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go rawMQTT(conn)
	}
}

// rawMQTT answers CONNECT and PINGREQ until DISCONNECT or an error.
func rawMQTT(conn net.Conn) {
	defer conn.Close()
	buf := make([]byte, 128)
	for {
		if _, err := io.ReadFull(conn, buf[:1]); err != nil {
			return
		}
		typ := buf[0] >> 4
		n, shift := 0, 0
		for {
			if _, err := io.ReadFull(conn, buf[:1]); err != nil || shift > 21 {
				return
			}
			n |= int(buf[0]&0x7f) << shift
			if buf[0]&0x80 == 0 {
				break
			}
			shift += 7
		}
		for n > 0 {
			k, err := conn.Read(buf[:min(n, len(buf))])
			if err != nil {
				return
			}
			n -= k
		}
		var reply []byte
		switch typ {
		case 1: // CONNECT
			reply = []byte{0x20, 0x02, 0x00, 0x00}
		case 12: // PINGREQ
			reply = []byte{0xd0, 0x00}
		case 14: // DISCONNECT
			return
		}
		if reply != nil {
			if _, err := conn.Write(reply); err != nil {
				return
			}
		}
	}
}

// loadAvg is /proc/loadavg's 1, 5 and 15 minute figures.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func startProcess(ctx context.Context, log io.Writer, bin string, args ...string) (*process, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = log
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			fmt.Fprintln(log, filepath.Base(bin)+": "+sc.Text())
		}
		cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func runCmd(bin string, args ...string) error {
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", bin, strings.Join(args, " "), err, out)
	}
	return nil
}

func freePort() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "127.0.0.1:0"
	}
	defer l.Close()
	return l.Addr().String()
}

func waitListening(addr string) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("nothing listening on " + addr)
}
