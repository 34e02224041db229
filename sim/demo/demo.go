// Package demo composes the whole system in one process — CA, SQLite
// registry, EST server, broker, a backend and simulated devices — for
// `devsim demo` (the README's first command).
//
// It is a composition, not an engine: it may import both sides (broker,
// broker/policy, provisioning/...) and the device side, which the fleet
// engine in package sim must not.
package demo

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/server"
)

// Config configures Run.
type Config struct {
	Out     io.Writer
	Devices int // default 20 (one of them with a TPM-simulator key)
	// OpenTPMSim opens a TPM-simulator keystore with key blobs in dir; nil
	// puts every key in memory.
	OpenTPMSim func(ctx context.Context, dir string) (keystore.Store, io.Closer, error)
}

// Run runs the whole system in one process on loopback, in a temporary
// directory it removes: CA, SQLite registry, EST, broker, a backend and
// devices; then traffic, a command, a refused cross-device publish, a
// revocation closing a live session and a renewal. It returns an error if
// any step does not behave as it should.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.Devices == 0 {
		cfg.Devices = 20
	}
	out := cfg.Out
	start := time.Now()
	step := func(format string, a ...any) {
		fmt.Fprintf(out, "[%5.2fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, a...))
	}
	dir, err := os.MkdirTemp("", "mqtls-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "data")

	// PKI, registry, EST, broker
	if err := ca.Init(data, ca.InitConfig{}); err != nil {
		return err
	}
	c, err := ca.Load(data)
	if err != nil {
		return err
	}
	reg, err := registry.CreateSQLite(ctx, filepath.Join(data, "registry.db"), ca.Fingerprint(c.Root))
	if err != nil {
		return err
	}
	defer reg.Close()
	step("PKI created: root CA, issuing CA, broker certificate; registry %s", filepath.Join(data, "registry.db"))
	est, err := server.New(server.Config{CA: c, Registry: reg, Validity: 2 * time.Minute})
	if err != nil {
		return err
	}
	estTLS, err := est.TLSConfig()
	if err != nil {
		return err
	}
	estLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: est.Handler(), TLSConfig: estTLS, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(tls.NewListener(estLn, estTLS))
	defer hs.Close()
	estURL := "https://" + estLn.Addr().String()
	srvCert, err := c.ServerCertificate()
	if err != nil {
		return err
	}
	pol, _ := policy.Parse([]byte(policy.Example))
	b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: srvCert, Root: c.Root, Policy: pol,
		Registry: reg, RevocationPoll: 200 * time.Millisecond, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	if err := b.Start(); err != nil {
		return err
	}
	defer b.Close()
	brokerURL := "mqtts://" + b.Addr().String()
	step("EST on %s, MQTT over mutual TLS on %s (device certificates valid 2 minutes)", estURL, brokerURL)

	// enroll: devices in memory, one in the TPM simulator, and a backend
	mem := keystore.NewMemory()
	type member struct {
		id     *device.Identity
		store  keystore.Store
		client *device.Client
	}
	var fleet []*member
	enroll := func(id, group string, store keystore.Store, identityDir string) (*member, error) {
		tok, err := reg.CreateToken(ctx, id, group, time.Hour)
		if err != nil {
			return nil, err
		}
		ident, err := device.Enroll(ctx, device.EnrollConfig{Dir: identityDir, DeviceID: id, Token: tok, EST: estURL, Root: c.Root, Store: store, Keystore: "demo"})
		if err != nil {
			return nil, fmt.Errorf("enroll %s: %w", id, err)
		}
		return &member{id: ident, store: store}, nil
	}
	t0 := time.Now()
	tpmName := "mem"
	for i := range cfg.Devices {
		name := fmt.Sprintf("demo-%02d", i+1)
		store := keystore.Store(mem)
		idDir := filepath.Join(dir, "devices", name)
		if i == 0 && cfg.OpenTPMSim != nil {
			s, closer, err := cfg.OpenTPMSim(ctx, idDir)
			if err != nil {
				return fmt.Errorf("TPM simulator: %w", err)
			}
			defer closer.Close()
			store, tpmName = s, "TPM simulator"
		}
		m, err := enroll(name, "", store, idDir)
		if err != nil {
			return err
		}
		fleet = append(fleet, m)
	}
	backend, err := enroll("backend", "backend", mem, filepath.Join(dir, "devices", "backend"))
	if err != nil {
		return err
	}
	step("enrolled %d devices + 1 backend over EST in %v (demo-01's key in the %s; the others in memory)", cfg.Devices, time.Since(t0).Round(time.Millisecond), tpmName)

	// connect
	newClient := func(m *member, tweak func(*device.Config)) (*device.Client, error) {
		dc := device.Config{Broker: brokerURL, Identity: m.id, Store: m.store, ServerName: "127.0.0.1",
			MinBackoff: 200 * time.Millisecond, MaxBackoff: 2 * time.Second, DisableRenewal: true}
		if tweak != nil {
			tweak(&dc)
		}
		cl, err := device.New(dc)
		if err != nil {
			return nil, err
		}
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		if err := cl.Connect(cctx); err != nil {
			cl.Close()
			return nil, fmt.Errorf("connect %s: %w", m.id.Leaf().Subject.CommonName, err)
		}
		return cl, nil
	}
	renewed := make(chan *x509.Certificate, 4)
	for i, m := range fleet {
		var tweak func(*device.Config)
		if i == 1 { // demo-02 renews early: at 10% of its lifetime
			tweak = func(dc *device.Config) {
				dc.DisableRenewal, dc.RenewAt, dc.RenewJitter = false, 0.1, 0.01
				dc.OnRenewed = func(leaf *x509.Certificate) {
					select { // it renews again every ~1.3 s: never block the client
					case renewed <- leaf:
					default:
					}
				}
			}
		}
		if m.client, err = newClient(m, tweak); err != nil {
			return err
		}
		defer m.client.Close()
	}
	if backend.client, err = newClient(backend, nil); err != nil {
		return err
	}
	defer backend.client.Close()
	step("%d devices and the backend connected (mutual TLS, client ID = certificate CN)", b.Sessions()-1)

	// traffic: every device publishes telemetry, the backend receives it
	var tel atomic.Int64
	if err := backend.client.Subscribe(ctx, "devices/+/telemetry", 1, func(string, []byte) { tel.Add(1) }); err != nil {
		return err
	}
	commands := make(chan string, 1)
	tpmDev := fleet[0]
	if err := tpmDev.client.Subscribe(ctx, "devices/demo-01/commands/#", 1, func(topic string, p []byte) { commands <- topic + " " + string(p) }); err != nil {
		return err
	}
	const rounds = 5
	var wg sync.WaitGroup
	var pubErr atomic.Value
	for _, m := range fleet {
		wg.Go(func() {
			for i := range rounds {
				topic := "devices/" + m.id.Leaf().Subject.CommonName + "/telemetry"
				if err := m.client.Publish(ctx, topic, fmt.Appendf(nil, `{"seq":%d}`, i), 1, false); err != nil {
					pubErr.Store(err)
				}
			}
		})
	}
	wg.Wait()
	if e, _ := pubErr.Load().(error); e != nil {
		return fmt.Errorf("telemetry: %w", e)
	}
	want := int64(rounds * len(fleet))
	if !waitFor(ctx, 10*time.Second, func() bool { return tel.Load() == want }) {
		return fmt.Errorf("telemetry: backend received %d of %d messages", tel.Load(), want)
	}
	step("telemetry: %d QoS 1 messages from %d devices, all %d received by the backend", want, len(fleet), tel.Load())

	if err := backend.client.Publish(ctx, "devices/demo-01/commands/reboot", []byte("at 03:00"), 1, false); err != nil {
		return err
	}
	select {
	case cmd := <-commands:
		step("command: backend -> demo-01 (key in the %s): %q", tpmName, cmd)
	case <-time.After(10 * time.Second):
		return errors.New("command not delivered to demo-01")
	}

	// a refused cross-device publish
	evilCmds := make(chan string, 1)
	if err := fleet[3].client.Subscribe(ctx, "devices/demo-04/commands/#", 1, func(t string, _ []byte) { evilCmds <- t }); err != nil {
		return err
	}
	// MQTT 3.1.1 has no refusal code for a publish: the broker closes the
	// connection; the SDK resends after each reconnect until the caller's
	// context ends, then withdraws the message.
	pctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	err = fleet[2].client.Publish(pctx, "devices/demo-04/commands/unlock", []byte("evil"), 1, false)
	cancel()
	if !errors.Is(err, device.ErrLostInFlight) {
		return fmt.Errorf("cross-device publish: got %v, want the broker to close the connection on it", err)
	}
	select {
	case t := <-evilCmds:
		return fmt.Errorf("cross-device publish was delivered on %s", t)
	case <-time.After(300 * time.Millisecond):
	}
	step("refused: demo-03 publishing to devices/demo-04/commands/unlock: the broker closed the connection instead of a PUBACK (MQTT 3.1.1's refusal), withdrawn after 1.5 s; demo-04 received nothing")

	// revocation closes a live session
	victim := fleet[4]
	lost := make(chan time.Time, 1)
	go func() {
		for victim.client.State() == device.StateConnected {
			time.Sleep(5 * time.Millisecond)
		}
		lost <- time.Now()
	}()
	t1 := time.Now()
	if _, err := reg.Revoke(ctx, "demo-05", "demo: device reported stolen"); err != nil {
		return err
	}
	select {
	case at := <-lost:
		step("revoked demo-05: its live session was closed %v after the revocation", at.Sub(t1).Round(time.Millisecond))
	case <-time.After(2 * time.Second):
		return errors.New("revoked device still connected after 2s")
	}
	if !waitFor(ctx, 5*time.Second, func() bool { return victim.client.State() == device.StateRefused }) {
		return fmt.Errorf("revoked device state %v, want refused", victim.client.State())
	}
	step("demo-05 tried to reconnect and was refused: state %q", victim.client.State())

	// renewal
	old := fleet[1].id.Leaf()
	select {
	case leaf := <-renewed:
		before := tel.Load()
		if err := fleet[1].client.Publish(ctx, "devices/demo-02/telemetry", []byte(`{"after":"renewal"}`), 1, false); err != nil {
			return fmt.Errorf("publish after renewal: %w", err)
		}
		if !waitFor(ctx, 10*time.Second, func() bool {
			return fleet[1].client.State() == device.StateConnected && tel.Load() > before &&
				!fleet[1].client.Identity().Leaf().Equal(old)
		}) {
			return errors.New("demo-02 did not reconnect and deliver after renewal")
		}
		step("renewed demo-02 over EST re-enroll: serial %s… -> %s…, reconnected with the new certificate", old.SerialNumber.Text(16)[:8], leaf.SerialNumber.Text(16)[:8])
	case <-time.After(30 * time.Second):
		return errors.New("demo-02 did not renew")
	}

	devs, err := reg.Devices(ctx)
	if err != nil {
		return err
	}
	revoked := 0
	for _, d := range devs {
		if d.Status == "revoked" {
			revoked++
		}
	}
	events, _, _ := reg.Events(ctx, 0, 100000)
	fmt.Fprintf(out, "\nsummary: %d devices in the registry (%d revoked), %d audit events, %d sessions live, all checks passed in %.1fs\n",
		len(devs), revoked, len(events), b.Sessions(), time.Since(start).Seconds())
	return nil
}

func waitFor(ctx context.Context, within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}
