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
	Devices   int    // default 2000
	Duration  time.Duration
	Out       io.Writer
	Log       io.Writer // child process output (default: discard)
}

// Side is one broker's results in a comparison.
type Side struct {
	Name   string
	Idle   *sim.Report // connect phase and idle sessions
	Flood  *sim.Report // publish throughput
	PID    int
	Broker string
}

// Compare runs the same scenario against `broker serve` and against
// mosquitto (require_certificate, use_identity_as_username, an ACL
// equivalent to the default policy, set_tcp_nodelay) with the same
// certificates and the same TLS key exchange (X25519 on both: Go would
// otherwise negotiate a hybrid post-quantum group that mosquitto's OpenSSL
// lacks), and prints the ratios.
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
	out := cfg.Out
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
		"--metrics-addr", "", "--log-level", "warn")
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
	scenario := func(name, addr string, pid int) (*Side, error) {
		fmt.Fprintf(out, "%s: %d idle connections...\n", name, cfg.Devices)
		base := sim.Config{Broker: "mqtts://" + addr, EST: "https://" + estAddr, Root: c.Root, Identities: ids, Devices: cfg.Devices,
			ConnectRate: 400, ServerPID: pid, Client: x25519, QoS: 1, Sample: 20}
		idle := base
		idle.NoTraffic, idle.Duration = true, 2*time.Second
		ri, err := sim.Run(ctx, idle)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(out, "%s: QoS 1 flood from 200 devices for %v...\n", name, cfg.Duration)
		flood := base
		flood.Devices, flood.Flood, flood.Duration, flood.ConnectRate = min(200, cfg.Devices), true, cfg.Duration, 1000
		rf, err := sim.Run(ctx, flood)
		if err != nil {
			return nil, err
		}
		return &Side{Name: name, Idle: ri, Flood: rf, PID: pid, Broker: addr}, nil
	}
	mine, err := scenario("mqtls", mqttAddr, ours.pid())
	if err != nil {
		return err
	}
	ours.stop()

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
	theirs, err := scenario("mosquitto", mqAddr, mq.pid())
	if err != nil {
		return err
	}
	printComparison(out, mine, theirs)
	return nil
}

func printComparison(w io.Writer, a, b *Side) {
	row := func(what string, x, y float64, unit string, higherBetter bool) {
		ratio := 0.0
		if y > 0 {
			ratio = x / y
		}
		better := "lower is better"
		if higherBetter {
			better = "higher is better"
		}
		fmt.Fprintf(w, "%-34s %12.3f %12.3f %8.2f×  (%s, %s)\n", what, x, y, ratio, unit, better)
	}
	fmt.Fprintf(w, "\n%-34s %12s %12s %9s\n", "", a.Name, b.Name, "ratio")
	sa, sb := a.Idle.Server, b.Idle.Server
	if sa != nil && sb != nil {
		row("server CPU per mTLS connect", sa.CPUPerConnect, sb.CPUPerConnect, "ms", false)
		rate := func(s *sim.ServerStats) float64 {
			if s.CPUPerConnect == 0 {
				return 0
			}
			return 1000 / s.CPUPerConnect
		}
		row("connects per server CPU-second", rate(sa), rate(sb), "1/s", true)
		row("RSS per idle session", sa.RSSPerSession, sb.RSSPerSession, "KiB", false)
	}
	row("QoS 1 messages/s (200 publishers)", a.Flood.MessagesPerSec, b.Flood.MessagesPerSec, "msg/s", true)
	if fa, fb := a.Flood.Server, b.Flood.Server; fa != nil && fb != nil && a.Flood.MessagesSent > 0 && b.Flood.MessagesSent > 0 {
		row("server CPU per message", fa.CPUTrafficMS*1000/float64(a.Flood.MessagesSent), fb.CPUTrafficMS*1000/float64(b.Flood.MessagesSent), "µs", false)
	}
	row("connect p50", a.Idle.ConnectMS.P50, b.Idle.ConnectMS.P50, "ms", false)
	row("end-to-end p50 under flood", a.Flood.E2EMS.P50, b.Flood.E2EMS.P50, "ms", false)
	for _, s := range []*Side{a, b} {
		for _, r := range []*sim.Report{s.Idle, s.Flood} {
			for k, n := range r.Errors {
				fmt.Fprintf(w, "%s error: %d × %s\n", s.Name, n, k)
			}
		}
	}
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
