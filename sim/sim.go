// Package sim is the fleet simulation engine behind `devsim run`: it
// enrolls N devices over EST (each with its own key and certificate),
// connects them over mutual TLS at a ramp rate from spread loopback source
// addresses, publishes telemetry, measures end-to-end latency on a sample of
// devices, and reports statistics (JSON, HTML).
//
// It is device-side only: it imports device, keystore, provisioning (the EST
// client) and deviceid, never the broker, its policy or the CA and EST
// server. Whole-system compositions live apart: sim/demo (everything in one
// process) and sim/bench (the broker binary against mosquitto).
package sim

import (
	"context"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
)

// Token is one line of `broker token --count`: a device ID and its token.
type Token struct{ ID, Token string }

// Config describes a run. Zero values take the defaults noted.
type Config struct {
	Broker string // mqtts://HOST:PORT (required, unless Brokers)
	// Brokers, instead of Broker: the nodes of a cluster; each device
	// starts on a random one and moves to another when its node fails.
	Brokers []string
	EST     string            // https://HOST:PORT (required)
	Root    *x509.Certificate // pinned root (required)
	Tokens  []Token           // one per device (required, at least Devices, unless Identities)
	// Identities, if set, are used instead of enrolling (see Enroll): the
	// same certificates against several brokers.
	Identities []*device.Identity
	// Devices to simulate (default: all tokens).
	Devices int
	// Store holds the device keys (default: a memory store). Keys are
	// named after the device ID.
	Store keystore.Store
	// Alg of the device keys (default ECDSA P-256).
	Alg keystore.KeyAlg
	// ConnectRate: connects started per second (default 200).
	ConnectRate float64
	// Interval between two publishes of one device (default 10s; 0 with
	// NoTraffic); QoS 0 or 1 (default 1); PayloadSize bytes (min and
	// default 16).
	Interval  time.Duration
	NoTraffic bool
	// Flood: every device publishes back to back (waiting for each PUBACK
	// at QoS 1) instead of every Interval - a throughput test.
	Flood       bool
	QoS         byte
	PayloadSize int
	// Sample devices subscribe to their own telemetry to measure latency
	// (default min(20, Devices)).
	Sample int
	// Duration of the traffic phase after the last connect (default 30s).
	Duration time.Duration
	// SourceAddrs spreads connections over 127.0.0.1..127.0.0.SourceAddrs
	// when the broker is on loopback (default 1 + Devices/20000: one
	// address reaches ~28k ports).
	SourceAddrs int
	// EnrollWorkers in parallel (default 16).
	EnrollWorkers int
	// ServerPID, if set, is read from /proc for the broker's CPU and RSS.
	ServerPID int
	// Progress is called about every 250 ms.
	Progress func(Snapshot)
	// Client tweaks each device client's config (optional).
	Client func(*device.Config)
}

// Snapshot is the run's state at one moment.
type Snapshot struct {
	Elapsed   time.Duration
	Phase     string
	Enrolled  int
	Connected int
	Devices   int
	Errors    int
	Sent      int64
	Received  int64
}

// Percentiles of a distribution, in milliseconds.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
	N   int     `json:"n"`
}

// Point is one sample of the connection count over time.
type Point struct {
	T         float64 `json:"t_s"`
	Connected int     `json:"connected"`
}

// ServerStats are read from /proc/PID when Config.ServerPID is set.
type ServerStats struct {
	CPUConnectMS  float64 `json:"cpu_connect_ms"` // broker CPU during the connect phase
	CPUPerConnect float64 `json:"cpu_per_connect_ms"`
	CPUTrafficMS  float64 `json:"cpu_traffic_ms"`
	RSSBeforeKB   int64   `json:"rss_before_kb"`
	RSSIdleKB     int64   `json:"rss_connected_kb"` // after the connect phase, before traffic
	RSSPerSession float64 `json:"rss_per_session_kb"`
	RSSAfterKB    int64   `json:"rss_after_kb"` // at the end of the traffic phase
}

// Report is the result of a run.
type Report struct {
	Devices          int            `json:"devices"`
	Enrolled         int            `json:"enrolled"`
	Connected        int            `json:"connected"`
	Errors           map[string]int `json:"errors"`
	EnrollSeconds    float64        `json:"enroll_s"`
	ConnectSeconds   float64        `json:"connect_s"`
	ConnectRate      float64        `json:"connect_rate_per_s"`
	ConnectMS        Percentiles    `json:"connect_ms"`
	E2EMS            Percentiles    `json:"e2e_ms"`
	MessagesSent     int64          `json:"messages_sent"`
	MessagesReceived int64          `json:"messages_received"`
	MessagesPerSec   float64        `json:"messages_per_s"`
	TrafficSeconds   float64        `json:"traffic_s"`
	QoS              byte           `json:"qos"`
	PayloadSize      int            `json:"payload_bytes"`
	Timeline         []Point        `json:"timeline"`
	E2EHistogram     []Bucket       `json:"e2e_histogram"`
	ConnectHistogram []Bucket       `json:"connect_histogram"`
	Server           *ServerStats   `json:"server,omitempty"`
	Interrupted      bool           `json:"interrupted,omitempty"`
}

// Bucket is a histogram bar: count of values in [From, To) ms.
type Bucket struct {
	From  float64 `json:"from_ms"`
	To    float64 `json:"to_ms"`
	Count int     `json:"count"`
}

type runner struct {
	cfg       Config
	start     time.Time
	phase     atomic.Value
	enrolled  atomic.Int64
	connected atomic.Int64
	sent      atomic.Int64
	received  atomic.Int64

	mu        sync.Mutex
	errors    map[string]int
	connectMS []float64
	e2eMS     []float64
	timeline  []Point
}

// urls are the brokers' URLs.
func (cfg *Config) urls() []string {
	if cfg.Broker != "" {
		return []string{cfg.Broker}
	}
	return cfg.Brokers
}

// Validate checks cfg before anything is done with it (Run calls it
// first): a scenario that cannot work must not spend enrollment tokens.
func (cfg *Config) Validate() error {
	if (cfg.Broker == "") == (len(cfg.Brokers) == 0) || cfg.EST == "" || cfg.Root == nil {
		return errors.New("sim: Broker (or Brokers, not both), EST and Root are required")
	}
	for _, b := range cfg.urls() {
		if err := checkURL(b, "mqtts"); err != nil {
			return fmt.Errorf("sim: broker: %w", err)
		}
	}
	if err := checkURL(cfg.EST, "https"); err != nil {
		return fmt.Errorf("sim: EST server: %w", err)
	}
	have := len(cfg.Tokens)
	if cfg.Identities != nil {
		have = len(cfg.Identities)
	}
	switch {
	case cfg.Devices < 0 || have < cfg.Devices || have == 0:
		return fmt.Errorf("sim: %d devices need as many tokens or identities, have %d", cfg.Devices, have)
	case cfg.ConnectRate < 0:
		return fmt.Errorf("sim: connect rate %v: must be positive", cfg.ConnectRate)
	case cfg.Interval < 0 || (cfg.Interval > 0 && cfg.Interval < time.Millisecond):
		return fmt.Errorf("sim: publish interval %v: at least 1ms", cfg.Interval)
	case cfg.QoS > 1:
		return fmt.Errorf("sim: QoS %d (0 or 1)", cfg.QoS)
	case cfg.PayloadSize < 0 || cfg.PayloadSize > 256<<10:
		return fmt.Errorf("sim: payload size %d: 16 to 262144 bytes", cfg.PayloadSize)
	case cfg.Sample < 0:
		return fmt.Errorf("sim: sample %d: must not be negative", cfg.Sample)
	case cfg.Duration < 0:
		return fmt.Errorf("sim: duration %v: must not be negative", cfg.Duration)
	case cfg.SourceAddrs < 0 || cfg.SourceAddrs > 254:
		return fmt.Errorf("sim: source addresses %d: 1 to 254", cfg.SourceAddrs)
	case cfg.EnrollWorkers < 0:
		return fmt.Errorf("sim: enroll workers %d: must not be negative", cfg.EnrollWorkers)
	}
	for i, tk := range cfg.Tokens {
		if err := deviceid.Check(tk.ID); err != nil {
			return fmt.Errorf("sim: token %d: %w", i+1, err)
		}
	}
	return nil
}

// checkURL accepts scheme://HOST:PORT with nothing else.
func checkURL(raw, scheme string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != scheme || u.Hostname() == "" || u.Port() == "" || (u.Path != "" && u.Path != "/") {
		return fmt.Errorf("%q: want %s://HOST:PORT", raw, scheme)
	}
	return nil
}

// Run executes the scenario: enroll, connect, traffic, disconnect. It stops
// early (with Report.Interrupted) when ctx is cancelled.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	have := len(cfg.Tokens)
	if cfg.Identities != nil {
		have = len(cfg.Identities)
	}
	if cfg.Devices == 0 {
		cfg.Devices = have
	}
	if cfg.Devices <= 0 || have < cfg.Devices {
		return nil, fmt.Errorf("sim: %d devices need as many tokens or identities, have %d", cfg.Devices, have)
	}
	if cfg.Store == nil {
		cfg.Store = keystore.NewMemory()
	}
	if cfg.ConnectRate <= 0 {
		cfg.ConnectRate = 200
	}
	if cfg.Interval == 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.QoS > 1 {
		return nil, fmt.Errorf("sim: QoS %d (0 or 1)", cfg.QoS)
	}
	if cfg.PayloadSize < 16 {
		cfg.PayloadSize = 16
	}
	if cfg.Sample == 0 {
		cfg.Sample = min(20, cfg.Devices)
	}
	if cfg.Duration == 0 {
		cfg.Duration = 30 * time.Second
	}
	if cfg.SourceAddrs == 0 {
		cfg.SourceAddrs = 1 + cfg.Devices/20000
	}
	if cfg.EnrollWorkers == 0 {
		cfg.EnrollWorkers = 16
	}
	r := &runner{cfg: cfg, start: time.Now(), errors: map[string]int{}}
	r.phase.Store("enroll")
	stopProgress := r.progress(ctx)
	defer stopProgress()
	rep := &Report{Devices: cfg.Devices, QoS: cfg.QoS, PayloadSize: cfg.PayloadSize}

	// 1. enroll
	t0 := time.Now()
	var ids []*device.Identity
	if cfg.Identities != nil {
		ids = cfg.Identities[:cfg.Devices]
		r.enrolled.Store(int64(cfg.Devices))
	} else {
		ids = r.enrollAll(ctx)
	}
	rep.EnrollSeconds = time.Since(t0).Seconds()
	rep.Enrolled = int(r.enrolled.Load())

	// 2. connect at the ramp rate
	r.phase.Store("connect")
	var srv *ServerStats
	var cpu0 time.Duration
	if cfg.ServerPID > 0 {
		srv = &ServerStats{}
		cpu0, srv.RSSBeforeKB = procStats(cfg.ServerPID)
	}
	t1 := time.Now()
	clients := r.connectAll(ctx, ids)
	defer func() {
		r.phase.Store("disconnect")
		var wg sync.WaitGroup
		for _, c := range clients {
			if c != nil {
				wg.Go(func() { c.Close() })
			}
		}
		wg.Wait()
	}()
	rep.ConnectSeconds = time.Since(t1).Seconds()
	rep.Connected = int(r.connected.Load())
	if rep.ConnectSeconds > 0 {
		rep.ConnectRate = float64(rep.Connected) / rep.ConnectSeconds
	}
	if srv != nil {
		time.Sleep(200 * time.Millisecond) // let the broker settle
		cpu1, rss := procStats(cfg.ServerPID)
		srv.CPUConnectMS = float64(cpu1-cpu0) / 1e6
		srv.RSSIdleKB = rss
		if rep.Connected > 0 {
			srv.CPUPerConnect = srv.CPUConnectMS / float64(rep.Connected)
			srv.RSSPerSession = float64(srv.RSSIdleKB-srv.RSSBeforeKB) / float64(rep.Connected)
		}
		cpu0 = cpu1
	}

	// 3. traffic
	r.phase.Store("traffic")
	t2 := time.Now()
	if !cfg.NoTraffic {
		r.traffic(ctx, clients, ids)
	} else {
		select {
		case <-ctx.Done():
		case <-time.After(cfg.Duration):
		}
	}
	rep.TrafficSeconds = time.Since(t2).Seconds()
	if srv != nil {
		cpu1, rss := procStats(cfg.ServerPID)
		srv.CPUTrafficMS = float64(cpu1-cpu0) / 1e6
		srv.RSSAfterKB = rss
		rep.Server = srv
	}
	rep.Interrupted = ctx.Err() != nil
	rep.MessagesSent, rep.MessagesReceived = r.sent.Load(), r.received.Load()
	if rep.TrafficSeconds > 0 {
		rep.MessagesPerSec = float64(rep.MessagesSent) / rep.TrafficSeconds
	}
	r.mu.Lock()
	rep.Errors = r.errors
	rep.ConnectMS = percentiles(r.connectMS)
	rep.E2EMS = percentiles(r.e2eMS)
	rep.ConnectHistogram = histogram(r.connectMS, 20)
	rep.E2EHistogram = histogram(r.e2eMS, 20)
	rep.Timeline = r.timeline
	r.mu.Unlock()
	return rep, nil
}

// Enroll enrolls the devices of cfg (Tokens, Devices, Store, EST, Root)
// and returns their identities, for runs against several brokers with the
// same certificates. Devices that failed are nil; the error counts them.
func Enroll(ctx context.Context, cfg Config) ([]*device.Identity, error) {
	if cfg.Devices == 0 || cfg.Devices > len(cfg.Tokens) {
		cfg.Devices = len(cfg.Tokens)
	}
	if cfg.Store == nil {
		cfg.Store = keystore.NewMemory()
	}
	if cfg.EnrollWorkers == 0 {
		cfg.EnrollWorkers = 16
	}
	r := &runner{cfg: cfg, errors: map[string]int{}}
	ids := r.enrollAll(ctx)
	if n := int(r.enrolled.Load()); n != cfg.Devices {
		return ids, fmt.Errorf("sim: %d of %d enrollments failed: %v", cfg.Devices-n, cfg.Devices, r.errors)
	}
	return ids, nil
}

// fail counts an error by cause.
func (r *runner) fail(stage string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors[stage+": "+cause(err)]++
}

// cause names an error's class for the report.
func cause(err error) string {
	for _, e := range []error{device.ErrNotAuthorized, device.ErrTLS, device.ErrTimeout, device.ErrOffline, device.ErrQueueFull,
		device.ErrExpired, device.ErrClosed, provisioning.ErrUnauthorized, provisioning.ErrForbidden, provisioning.ErrRateLimited,
		provisioning.ErrBadRequest, provisioning.ErrBadResponse, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, e) {
			return e.Error()
		}
	}
	for _, known := range []struct {
		err  error
		name string
	}{
		{syscall.ECONNREFUSED, "connection refused"}, {syscall.ECONNRESET, "connection reset"},
		{syscall.EMFILE, "too many open files"}, {syscall.EADDRNOTAVAIL, "cannot assign requested address"},
		{os.ErrDeadlineExceeded, "i/o timeout"}, {io.EOF, "EOF"}, {io.ErrUnexpectedEOF, "EOF"},
	} {
		if errors.Is(err, known.err) {
			return known.name
		}
	}
	msg := err.Error()
	if len(msg) > 80 {
		msg = msg[:80]
	}
	return msg
}

func (r *runner) enrollAll(ctx context.Context) []*device.Identity {
	ids := make([]*device.Identity, r.cfg.Devices)
	client, err := provisioning.NewClient(r.cfg.EST, r.cfg.Root)
	if err != nil {
		r.fail("enroll", err)
		return ids
	}
	next := atomic.Int64{}
	var wg sync.WaitGroup
	for range r.cfg.EnrollWorkers {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= r.cfg.Devices {
					return
				}
				tok := r.cfg.Tokens[i]
				id, err := r.enroll(ctx, client, tok)
				if err != nil {
					r.fail("enroll", err)
					continue
				}
				ids[i] = id
				r.enrolled.Add(1)
			}
		})
	}
	wg.Wait()
	return ids
}

func (r *runner) enroll(ctx context.Context, client *provisioning.Client, tok Token) (*device.Identity, error) {
	signer, err := r.cfg.Store.Signer(ctx, tok.ID)
	if errors.Is(err, keystore.ErrNotFound) {
		signer, err = r.cfg.Store.Generate(ctx, tok.ID, r.cfg.Alg)
	}
	if err != nil {
		return nil, err
	}
	chain, err := client.Enroll(ctx, signer, tok.ID, tok.Token)
	if err != nil {
		return nil, err
	}
	return &device.Identity{Chain: chain, Root: r.cfg.Root, Signer: signer,
		Config: device.IdentityConfig{DeviceID: tok.ID, EST: r.cfg.EST}}, nil
}

// connectAll starts connects at the configured rate and waits for them.
func (r *runner) connectAll(ctx context.Context, ids []*device.Identity) []*device.Client {
	clients := make([]*device.Client, len(ids))
	loopback := true
	for _, b := range r.cfg.urls() {
		u, err := url.Parse(b)
		if err != nil {
			loopback = false
			break
		}
		if ip := net.ParseIP(u.Hostname()); ip == nil || !ip.IsLoopback() || ip.To4() == nil {
			loopback = false
		}
	}
	tick := time.NewTicker(time.Duration(float64(time.Second) / r.cfg.ConnectRate))
	defer tick.Stop()
	var wg sync.WaitGroup
	for i, id := range ids {
		if id == nil {
			continue
		}
		select {
		case <-ctx.Done():
			wg.Wait()
			return clients
		case <-tick.C:
		}
		cfg := device.Config{Broker: r.cfg.Broker, Brokers: r.cfg.Brokers, Identity: id, DisableRenewal: true, MinBackoff: time.Second, MaxBackoff: 30 * time.Second}
		if loopback && r.cfg.SourceAddrs > 1 {
			cfg.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%r.cfg.SourceAddrs))}
		}
		if r.cfg.Client != nil {
			r.cfg.Client(&cfg)
		}
		c, err := device.New(cfg)
		if err != nil {
			r.fail("connect", err)
			continue
		}
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			t := time.Now()
			if err := c.Connect(cctx); err != nil {
				r.fail("connect", err)
				c.Close()
				return
			}
			ms := float64(time.Since(t).Microseconds()) / 1000
			r.mu.Lock()
			r.connectMS = append(r.connectMS, ms)
			r.mu.Unlock()
			r.connected.Add(1)
			clients[i] = c
		})
	}
	wg.Wait()
	return clients
}

// traffic publishes from every connected device for Duration; the first
// Sample devices also subscribe to their own telemetry and time delivery.
func (r *runner) traffic(ctx context.Context, clients []*device.Client, ids []*device.Identity) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.Duration)
	defer cancel()
	sampled := 0
	for i, c := range clients {
		if c == nil || sampled >= r.cfg.Sample {
			continue
		}
		topic := "devices/" + ids[i].Config.DeviceID + "/telemetry"
		err := c.Subscribe(ctx, topic, r.cfg.QoS, func(_ string, payload []byte) {
			if len(payload) < 8 {
				return
			}
			sent := time.Unix(0, int64(binary.BigEndian.Uint64(payload)))
			r.received.Add(1)
			ms := float64(time.Since(sent).Microseconds()) / 1000
			r.mu.Lock()
			if len(r.e2eMS) < 1_000_000 {
				r.e2eMS = append(r.e2eMS, ms)
			}
			r.mu.Unlock()
		})
		if err != nil {
			r.fail("subscribe", err)
			continue
		}
		sampled++
	}
	var wg sync.WaitGroup
	for i, c := range clients {
		if c == nil {
			continue
		}
		topic := "devices/" + ids[i].Config.DeviceID + "/telemetry"
		wg.Go(func() {
			// spread the first publish over one interval
			offset := time.Duration(int64(i) * int64(r.cfg.Interval) / int64(len(clients)))
			if r.cfg.Flood {
				offset = 0
			}
			timer := time.NewTimer(offset)
			defer timer.Stop()
			payload := make([]byte, r.cfg.PayloadSize)
			for {
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
				binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
				pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
				err := c.Publish(pctx, topic, payload, r.cfg.QoS, false)
				pcancel()
				switch {
				case err == nil:
					r.sent.Add(1)
				case ctx.Err() != nil:
					return
				default:
					r.fail("publish", err)
				}
				if r.cfg.Flood {
					timer.Reset(0)
				} else {
					timer.Reset(r.cfg.Interval)
				}
			}
		})
	}
	wg.Wait()
}

// progress samples the run for the timeline and the Progress callback.
func (r *runner) progress(ctx context.Context) func() {
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			s := r.snapshot()
			r.mu.Lock()
			r.timeline = append(r.timeline, Point{T: math.Round(s.Elapsed.Seconds()*100) / 100, Connected: s.Connected})
			r.mu.Unlock()
			if r.cfg.Progress != nil {
				r.cfg.Progress(s)
			}
		}
	}()
	return func() { close(done); <-stopped }
}

func (r *runner) snapshot() Snapshot {
	r.mu.Lock()
	errs := 0
	for _, n := range r.errors {
		errs += n
	}
	r.mu.Unlock()
	return Snapshot{
		Elapsed: time.Since(r.start), Phase: r.phase.Load().(string), Devices: r.cfg.Devices,
		Enrolled: int(r.enrolled.Load()), Connected: int(r.connected.Load()), Errors: errs,
		Sent: r.sent.Load(), Received: r.received.Load(),
	}
}

func percentiles(v []float64) Percentiles {
	if len(v) == 0 {
		return Percentiles{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	at := func(q float64) float64 { return round3(s[min(len(s)-1, int(q*float64(len(s))))]) }
	return Percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: round3(s[len(s)-1]), N: len(s)}
}

func histogram(v []float64, bars int) []Bucket {
	if len(v) == 0 {
		return nil
	}
	hi := slices.Max(v)
	if hi <= 0 {
		hi = 1
	}
	width := hi / float64(bars)
	out := make([]Bucket, bars)
	for i := range out {
		out[i] = Bucket{From: round3(float64(i) * width), To: round3(float64(i+1) * width)}
	}
	for _, x := range v {
		out[min(bars-1, int(x/width))].Count++
	}
	return out
}

func round3(x float64) float64 { return math.Round(x*1000) / 1000 }
