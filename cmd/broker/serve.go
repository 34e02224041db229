package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"gopkg.in/yaml.v3"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/cluster"
	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/provisioning/attest"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/server"
)

// serveConfig is `broker serve`'s configuration: the --config YAML file,
// with flags overriding it. Empty addresses disable that listener.
type serveConfig struct {
	Data             string        `yaml:"data"`
	Registry         string        `yaml:"registry"`               // sqlite:PATH or postgres://...
	RegistryPassword string        `yaml:"registry_password_file"` // file holding the PostgreSQL password
	MQTTAddr         string        `yaml:"mqtt_addr"`
	ESTAddr          string        `yaml:"est_addr"`
	MetricsAddr      string        `yaml:"metrics_addr"`
	PprofAddr        string        `yaml:"pprof"` // debug profiles; loopback only, off by default
	Policy           string        `yaml:"policy"`
	CRL              string        `yaml:"crl"`
	Validity         time.Duration `yaml:"validity"`
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	MaxWritesPending int32         `yaml:"max_writes_pending"`
	MaxPacketSize    uint32        `yaml:"max_packet_size"`
	MinTLS           string        `yaml:"min_tls"` // "1.2" or "1.3"
	LogLevel         string        `yaml:"log_level"`
	LogFormat        string        `yaml:"log_format"`      // "text" or "json"
	LogConnections   bool          `yaml:"log_connections"` // a line per connection made and ended
	AuditMaxRows     int           `yaml:"audit_max_rows"`  // audit retention (negative: unbounded)
	AuditMaxAge      time.Duration `yaml:"audit_max_age"`
	// TPM key attestation: the manufacturer CAs EK certificates chain to
	// (file or directory) and the policy of tokens that set none.
	TPMCA  string `yaml:"tpm_ca"`
	Attest string `yaml:"attest"` // required or optional
	// trust data and sessions (see broker.Config)
	AdmitWhenRegistryDown bool          `yaml:"admit_when_registry_down"`
	MaxIntermediates      int           `yaml:"max_intermediates"`
	MaxQueuedMessages     int           `yaml:"max_queued_messages"`
	MaxMessageExpiry      time.Duration `yaml:"max_message_expiry"`
	MaxSessionExpiry      time.Duration `yaml:"max_session_expiry"`
	// cluster (experimental): nodes over embedded NATS
	NodeName      string   `yaml:"node_name"`
	ClusterListen string   `yaml:"cluster_listen"`
	ClusterPeers  []string `yaml:"cluster_peers"`
	ClusterStore  string   `yaml:"cluster_store"`
	// or over an external NATS cluster
	NATS         []string `yaml:"nats"`
	NATSCreds    string   `yaml:"nats_creds"`
	NATSTLSCert  string   `yaml:"nats_tls_cert"`
	NATSTLSKey   string   `yaml:"nats_tls_key"`
	NATSCA       string   `yaml:"nats_ca"`
	NATSReplicas int      `yaml:"nats_replicas"`
}

func defaultServeConfig() serveConfig {
	return serveConfig{
		MQTTAddr: "127.0.0.1:8883", ESTAddr: "127.0.0.1:8443", MetricsAddr: "127.0.0.1:9464",
		Validity: ca.DefaultDeviceValidity, HandshakeTimeout: 10 * time.Second, MinTLS: "1.2", LogLevel: "info", LogFormat: "text",
		AuditMaxRows: 1_000_000, AuditMaxAge: 90 * 24 * time.Hour,
	}
}

// loadServeConfig reads a YAML config file over cfg. Errors name the file
// and the line: an unknown key by its name (with the known ones), a
// syntax error by the line it is on.
func loadServeConfig(path string, cfg *serveConfig) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		// yaml.v3 numbers a parser error's line one early (its context
		// mark is 0-based): find the line ourselves.
		n, text := yamlErrorLine(data)
		if n == 0 {
			return fmt.Errorf("config %s: %w", path, err)
		}
		return fmt.Errorf("config %s: line %d: not valid YAML: %q", path, n, text)
	}
	if len(doc.Content) == 0 { // empty, or comments only
		return nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("config %s: line %d: want a mapping of settings (key: value)", path, root.Line)
	}
	known := serveConfigKeys()
	for i := 0; i+1 < len(root.Content); i += 2 {
		if k := root.Content[i]; !slices.Contains(known, k.Value) {
			return fmt.Errorf("config %s: line %d: unknown key %q (known keys: %s)", path, k.Line, k.Value, strings.Join(known, ", "))
		}
	}
	if err := root.Decode(cfg); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// serveConfigKeys lists the config file's keys, sorted.
func serveConfigKeys() []string {
	var keys []string
	t := reflect.TypeFor[serveConfig]()
	for i := range t.NumField() {
		if k, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); k != "" && k != "-" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// yamlErrorLine returns the number and text of the line a YAML syntax
// error is on: the line after the longest run of whole lines that parses
// (0 for a file too long to search).
func yamlErrorLine(data []byte) (int, string) {
	lines := bytes.SplitAfter(data, []byte("\n"))
	if len(lines) > 10_000 {
		return 0, ""
	}
	for n := len(lines) - 1; n > 0; n-- {
		var node yaml.Node
		if yaml.Unmarshal(bytes.Join(lines[:n], nil), &node) == nil {
			return n + 1, strings.TrimRight(string(lines[n]), "\r\n")
		}
	}
	return 1, strings.TrimRight(string(lines[0]), "\r\n")
}

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	// The config file is read first and becomes the flags' defaults, so a
	// flag given on the command line wins and every flag is a config key
	// (TestServeFlagsAreConfigKeys): no hand-written merge to forget one.
	cfg := defaultServeConfig()
	if path, err := configArg(args); err != nil {
		return err
	} else if path != "" {
		if err := loadServeConfig(path, &cfg); err != nil {
			return err
		}
	}
	fs := cli.NewFlags("broker serve", stderr)
	regFlags, peers := serveFlags(fs, &cfg)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	cfg.ClusterPeers = nil
	if *peers != "" {
		cfg.ClusterPeers = strings.Split(*peers, ",")
	}
	if err := needData(cfg.Data); err != nil {
		return err
	}
	loc, err := regFlags.location(cfg.Data)
	if err != nil {
		return err
	}
	return serve(ctx, cfg, loc, stderr)
}

// haveCA names the command that creates a data directory when dir or its
// CA is missing.
func haveCA(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("data directory %s does not exist: run \"broker init --data %s\" to create it", dir, dir)
	}
	if _, err := os.Stat(filepath.Join(dir, ca.RootCertFile)); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("data directory %s holds no CA (no %s): run \"broker init --data %s\" to create it", dir, ca.RootCertFile, dir)
	}
	return nil
}

func serve(ctx context.Context, cfg serveConfig, loc registryLocation, stderr io.Writer) error {
	log, err := cli.NewLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		return err
	}
	minTLS := map[string]uint16{"1.2": tls.VersionTLS12, "1.3": tls.VersionTLS13}[cfg.MinTLS]
	if minTLS == 0 {
		return cli.Usagef("min TLS %q: want 1.2 or 1.3", cfg.MinTLS)
	}
	if cfg.PprofAddr != "" && !loopback(cfg.PprofAddr) {
		return cli.Usagef("--pprof %q: want a loopback HOST:PORT (127.0.0.1:6060)", cfg.PprofAddr)
	}
	if err := haveCA(cfg.Data); err != nil {
		return err
	}
	c, release, err := loadCA(ctx, cfg.Data)
	if err != nil {
		return err
	}
	defer release()
	certs, err := newCertReloader(c, cfg.Data, log)
	if err != nil {
		return err
	}
	srvCert := *certs.cur.Load() // the cluster link keeps the certificate it started with
	unlock, err := lockDataDir(cfg.Data)
	if err != nil {
		return err
	}
	defer unlock()
	// Trust data fails closed: a missing, empty, damaged or foreign
	// registry stops the server.
	reg, err := loc.open(ctx)
	if err != nil {
		return err
	}
	defer reg.Close()
	if err := reg.Check(ctx, ca.Fingerprint(c.Root)); err != nil {
		return loc.explain(err)
	}
	pol := policy.Default()
	if cfg.Policy != "" {
		if pol, err = readPolicy(cfg.Policy); err != nil {
			return err
		}
	}
	// Attestation settings are checked before any listener starts.
	verifier, err := attestVerifier(cfg, reg, log)
	if err != nil {
		return err
	}
	metrics := prometheus.NewRegistry()
	metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go certs.watch(ctx, certPoll)
	errc := make(chan error, 3)
	var closers []func(context.Context) error
	closeAll := func(ctx context.Context) (err error) {
		for i := len(closers) - 1; i >= 0; i-- {
			if cerr := closers[i](ctx); cerr != nil && !errors.Is(cerr, http.ErrServerClosed) {
				err = errors.Join(err, cerr)
			}
		}
		closers = nil
		return err
	}
	// A setup error after a listener started: stop it before the registry
	// closes (its revocation poll would go on logging).
	defer closeAll(context.Background())

	if cfg.MQTTAddr != "" {
		var node broker.Cluster
		if cfg.ClusterListen != "" || len(cfg.NATS) > 0 {
			if node, err = newClusterNode(cfg, srvCert, c.Root, log); err != nil {
				return err
			}
		}
		b, err := broker.New(broker.Config{
			Cluster: node,
			Addr:    cfg.MQTTAddr, GetCertificate: certs.get, Root: c.Root, Issuers: []*x509.Certificate{c.Issuing},
			MinTLSVersion: minTLS, Policy: pol, Registry: reg, CRLFile: cfg.CRL,
			HandshakeTimeout: cfg.HandshakeTimeout, MaxWritesPending: cfg.MaxWritesPending, MaxPacketSize: cfg.MaxPacketSize,
			AdmitWhenRegistryDown: cfg.AdmitWhenRegistryDown, MaxIntermediates: cfg.MaxIntermediates,
			MaxQueuedMessages: cfg.MaxQueuedMessages, MaxMessageExpiry: cfg.MaxMessageExpiry, MaxSessionExpiry: cfg.MaxSessionExpiry,
			Logger: log, LogConnections: cfg.LogConnections, Metrics: metrics,
		})
		if err != nil {
			return err
		}
		if err := b.Start(); err != nil {
			return err
		}
		closers = append(closers, func(context.Context) error { return b.Close() })
		if cfg.Policy != "" {
			go watchPolicy(ctx, cfg.Policy, b, log)
		}
	}
	if cfg.ESTAddr != "" {
		est, err := server.New(server.Config{CA: c, Registry: reg, Validity: cfg.Validity, Logger: log, Metrics: metrics,
			AuditMaxRows: cfg.AuditMaxRows, AuditMaxAge: cfg.AuditMaxAge, Attestation: verifier, Attest: cfg.Attest})
		if err != nil {
			return err
		}
		tlsCfg, err := est.TLSConfig()
		if err != nil {
			return err
		}
		tlsCfg.Certificates, tlsCfg.GetCertificate = nil, certs.get // the MQTT listener's, reloaded
		hs, err := listenHTTP(cfg.ESTAddr, est.Handler(), tlsCfg, log, errc)
		if err != nil {
			return fmt.Errorf("EST listener: %w", err)
		}
		closers = append(closers, hs.Shutdown)
		log.Info("EST listening", "addr", hs.Addr, "root_spki_sha256", ca.SPKIFingerprint(c.Root))
	}
	if cfg.MetricsAddr != "" {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(metrics, promhttp.HandlerOpts{}))
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
		mux.HandleFunc("GET /readyz", readyz(c, reg))
		hs, err := listenHTTP(cfg.MetricsAddr, mux, nil, log, errc)
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		closers = append(closers, hs.Shutdown)
		log.Info("metrics listening", "addr", hs.Addr)
	}
	if cfg.PprofAddr != "" {
		hs, err := listenPprof(cfg.PprofAddr, log, errc)
		if err != nil {
			return err
		}
		closers = append(closers, hs.Shutdown)
	}

	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer scancel()
	return errors.Join(err, closeAll(sctx))
}

// readyz answers 200 when the registry answers and the issuing CA is
// loaded and valid, 503 with the reason otherwise.
func readyz(c *ca.CA, reg registry.Registry) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		var problems []string
		if err := reg.Ping(ctx); err != nil {
			problems = append(problems, "registry unreachable: "+err.Error())
		}
		if c == nil || c.Issuing == nil || time.Now().After(c.Issuing.NotAfter) {
			problems = append(problems, "issuing CA not loaded or expired")
		}
		if len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, strings.Join(problems, "\n")+"\n")
			return
		}
		io.WriteString(w, "ready\n")
	}
}

// listenHTTP serves h on addr (TLS if tlsCfg is set) and reports a failure
// on errc.
func listenHTTP(addr string, h http.Handler, tlsCfg *tls.Config, log *slog.Logger, errc chan<- error) (*http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	hs := &http.Server{
		Addr: ln.Addr().String(), Handler: h, TLSConfig: tlsCfg,
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
	}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	return hs, nil
}

// loopback checks that addr is a loopback HOST:PORT.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	ip := net.ParseIP(host)
	return err == nil && (host == "localhost" || ip != nil && ip.IsLoopback())
}

// listenPprof serves net/http/pprof on addr (a loopback address: profiles
// expose the program's internals). A profile or trace lasts under 30 s
// (the write timeout).
func listenPprof(addr string, log *slog.Logger, errc chan<- error) (*http.Server, error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	hs, err := listenHTTP(addr, mux, nil, log, errc)
	if err != nil {
		return nil, fmt.Errorf("pprof listener: %w", err)
	}
	log.Warn("pprof listening (debugging)", "addr", hs.Addr)
	return hs, nil
}

// certPoll is how often serve looks for a changed server certificate.
const certPoll = time.Second

func readPolicy(path string) (*policy.Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	p, err := policy.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// watchPolicy reloads the policy on SIGHUP and when the file changes. A
// file that does not parse is refused (logged with its line) and the
// current policy stays.
func watchPolicy(ctx context.Context, path string, b *broker.Broker, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	stamp := func() string {
		fi, err := os.Stat(path)
		if err != nil {
			return ""
		}
		return fmt.Sprint(fi.ModTime().UnixNano(), fi.Size())
	}
	last := stamp()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			log.Info("SIGHUP: reloading policy", "file", path)
		case <-tick.C:
			if s := stamp(); s == last {
				continue
			}
			log.Info("policy file changed: reloading", "file", path)
		}
		last = stamp()
		p, err := readPolicy(path)
		if err == nil {
			err = b.SetPolicy(p)
		}
		if err != nil {
			log.Error("policy refused; the previous policy stays", "file", path, "err", err)
		}
	}
}

// newClusterNode joins this node to its peers (experimental).
func newClusterNode(cfg serveConfig, cert tls.Certificate, root *x509.Certificate, log *slog.Logger) (broker.Cluster, error) {
	name := cfg.NodeName
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("cluster: no --node-name and no host name: %w", err)
		}
		name = strings.ReplaceAll(h, ".", "-")
	}
	store := cfg.ClusterStore
	if store == "" {
		store = filepath.Join(cfg.Data, "cluster")
	}
	if err := os.MkdirAll(store, 0o700); err != nil {
		return nil, fmt.Errorf("cluster store: %w", err)
	}
	var peers []string
	for _, p := range cfg.ClusterPeers {
		if p = strings.TrimSpace(p); p != "" {
			peers = append(peers, p)
		}
	}
	natsTLS, err := natsClientTLS(cfg)
	if err != nil {
		return nil, err
	}
	n, err := cluster.New(cluster.Config{Name: name, RouteAddr: cfg.ClusterListen, Peers: peers, StoreDir: store,
		NATS: cfg.NATS, NATSCreds: cfg.NATSCreds, NATSTLS: natsTLS, Replicas: cfg.NATSReplicas,
		Certificate: cert, Root: root, MaxQueued: cfg.MaxQueuedMessages, Logger: log.With("component", "cluster")})
	if err != nil {
		return nil, cli.Usagef("%v", err)
	}
	return n, nil
}

// natsClientTLS is the TLS config for an external NATS: a client
// certificate (mutual TLS) and the CA of the NATS servers (default: the
// system's roots), or nil when none is given.
func natsClientTLS(cfg serveConfig) (*tls.Config, error) {
	if cfg.NATSTLSCert == "" && cfg.NATSTLSKey == "" && cfg.NATSCA == "" {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.NATSTLSCert != "" || cfg.NATSTLSKey != "" {
		cert, err := tls.LoadX509KeyPair(cfg.NATSTLSCert, cfg.NATSTLSKey)
		if err != nil {
			return nil, fmt.Errorf("--nats-tls-cert/--nats-tls-key: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	if cfg.NATSCA != "" {
		pem, err := os.ReadFile(cfg.NATSCA)
		if err != nil {
			return nil, fmt.Errorf("--nats-ca: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--nats-ca %s: no PEM certificate", cfg.NATSCA)
		}
	}
	return c, nil
}

// serveFlags defines serve's flags over cfg, with cfg's values as their
// defaults. Every flag but --config is a key of serveConfig ("-" as "_").
// attestVerifier loads --tpm-ca (nil without it) and checks --attest.
func attestVerifier(cfg serveConfig, reg registry.Registry, log *slog.Logger) (*attest.Verifier, error) {
	switch cfg.Attest {
	case "", registry.AttestOptional:
	case registry.AttestRequired:
		if cfg.TPMCA == "" {
			return nil, errors.New("--attest required needs --tpm-ca (the TPM manufacturer CAs EK certificates chain to)")
		}
	default:
		return nil, cli.Usagef("--attest %q: want %s or %s", cfg.Attest, registry.AttestRequired, registry.AttestOptional)
	}
	if cfg.TPMCA == "" {
		return nil, nil
	}
	roots, n, err := attest.LoadRoots(cfg.TPMCA)
	if err != nil {
		return nil, err
	}
	v, err := attest.New(attest.Config{Roots: roots, Store: reg})
	if err != nil {
		return nil, err
	}
	log.Info("TPM key attestation", "tpm_ca", cfg.TPMCA, "certificates", n, "default", cmp.Or(cfg.Attest, registry.AttestOptional))
	return v, nil
}

func serveFlags(fs *flag.FlagSet, cfg *serveConfig) (*registryFlags, *string) {
	fs.String("config", "", "YAML config file with the same settings (flags override it)")
	fs.StringVar(&cfg.Data, "data", cfg.Data, "data directory (CA, server certificate, registry)")
	regFlags := addRegistryFlags(fs)
	regFlags.url, regFlags.passwordFile = cfg.Registry, cfg.RegistryPassword
	fs.StringVar(&cfg.MQTTAddr, "mqtt-addr", cfg.MQTTAddr, "MQTT over mutual TLS listen address")
	fs.StringVar(&cfg.ESTAddr, "est-addr", cfg.ESTAddr, "EST (HTTPS) listen address; empty disables EST")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "Prometheus /metrics listen address; empty disables it")
	fs.StringVar(&cfg.PprofAddr, "pprof", cfg.PprofAddr, "serve Go profiles (/debug/pprof/) on this loopback address (debugging; default off)")
	fs.StringVar(&cfg.Policy, "policy", cfg.Policy, "topic policy file (YAML); default: each device owns devices/{cn}/#")
	fs.StringVar(&cfg.CRL, "crl", cfg.CRL, "CRL file (PEM or DER) for certificates issued elsewhere; reloaded on change")
	fs.DurationVar(&cfg.Validity, "validity", cfg.Validity, "lifetime of issued device certificates")
	fs.DurationVar(&cfg.HandshakeTimeout, "handshake-timeout", cfg.HandshakeTimeout, "deadline for TLS handshake + MQTT CONNECT")
	fs.Func("max-writes-pending", fmt.Sprintf("per-client outbound queue (default %d)", 64), func(v string) error {
		n, err := strconv.ParseInt(v, 10, 32)
		cfg.MaxWritesPending = int32(n)
		return err
	})
	fs.Func("max-packet-size", "largest MQTT packet in bytes (default 262144)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		cfg.MaxPacketSize = uint32(n)
		return err
	})
	fs.StringVar(&cfg.MinTLS, "min-tls", cfg.MinTLS, "lowest TLS version for MQTT clients: 1.2 (constrained devices) or 1.3")
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "debug, info, warn or error")
	fs.StringVar(&cfg.LogFormat, "log-format", cfg.LogFormat, "text (key=value) or json (one object a line, the same keys)")
	fs.BoolVar(&cfg.LogConnections, "log-connections", cfg.LogConnections, "log every connection made and ended at info (default: only audit events: refusals, revocations, denials, enrollments)")
	fs.IntVar(&cfg.AuditMaxRows, "audit-max-rows", cfg.AuditMaxRows, "keep at most this many audit records (negative: no bound)")
	fs.DurationVar(&cfg.AuditMaxAge, "audit-max-age", cfg.AuditMaxAge, "delete audit records older than this (negative: no bound)")
	fs.StringVar(&cfg.TPMCA, "tpm-ca", cfg.TPMCA, "TPM manufacturer CA certificates (PEM/DER file or directory) that EK certificates must chain to; enables TPM key attestation at enrollment")
	fs.StringVar(&cfg.Attest, "attest", cfg.Attest, "TPM key attestation for tokens minted without --attest: required or optional (default optional; required needs --tpm-ca)")
	fs.BoolVar(&cfg.AdmitWhenRegistryDown, "admit-when-registry-down", cfg.AdmitWhenRegistryDown, "admit new connections (against the last revocation data) while the registry cannot be read; default: refuse them")
	fs.IntVar(&cfg.MaxIntermediates, "max-intermediates", cfg.MaxIntermediates, "intermediate CAs allowed in a client chain (0: the default, 2)")
	fs.IntVar(&cfg.MaxQueuedMessages, "max-queued-messages", cfg.MaxQueuedMessages, "QoS 1/2 messages kept per session, offline ones included (0: the default, 1024)")
	fs.DurationVar(&cfg.MaxMessageExpiry, "max-message-expiry", cfg.MaxMessageExpiry, "expire retained and queued messages older than this (0: only a publisher's own v5 expiry)")
	fs.DurationVar(&cfg.MaxSessionExpiry, "max-session-expiry", cfg.MaxSessionExpiry, "keep a disconnected persistent session at most this long (0: the default, 24h)")
	fs.StringVar(&cfg.ClusterListen, "cluster-listen", cfg.ClusterListen, "join a cluster of nodes: this node's NATS route address HOST:PORT (experimental; the registry must be shared: PostgreSQL)")
	peers := fs.String("cluster-peers", strings.Join(cfg.ClusterPeers, ","), "the other nodes' --cluster-listen addresses, comma-separated")
	fs.StringVar(&cfg.NodeName, "node-name", cfg.NodeName, "this node's name in the cluster (default: the host name)")
	fs.StringVar(&cfg.ClusterStore, "cluster-store", cfg.ClusterStore, "JetStream data of this node (default DATA/cluster)")
	fs.Func("nats", "instead of --cluster-listen: join the nodes over an external NATS cluster with JetStream, URLs comma-separated (nats:// or tls://)", func(v string) error {
		cfg.NATS = nil
		for _, u := range strings.Split(v, ",") {
			if u = strings.TrimSpace(u); u != "" {
				cfg.NATS = append(cfg.NATS, u)
			}
		}
		return nil
	})
	fs.StringVar(&cfg.NATSCreds, "nats-creds", cfg.NATSCreds, "NATS credentials file (user JWT and seed) for --nats")
	fs.StringVar(&cfg.NATSTLSCert, "nats-tls-cert", cfg.NATSTLSCert, "client certificate (PEM) for mutual TLS to --nats")
	fs.StringVar(&cfg.NATSTLSKey, "nats-tls-key", cfg.NATSTLSKey, "its private key (PEM)")
	fs.StringVar(&cfg.NATSCA, "nats-ca", cfg.NATSCA, "CA certificate (PEM) of the --nats servers (default: the system's roots)")
	fs.IntVar(&cfg.NATSReplicas, "nats-replicas", cfg.NATSReplicas, "replicas of the JetStream buckets (default 3 embedded, or fewer nodes; 1 with --nats)")
	return regFlags, peers
}

// configArg finds --config's value in args before the flags are parsed
// (the file supplies the other flags' defaults).
func configArg(args []string) (string, error) {
	for i, a := range args {
		if a == "--" {
			break
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "config" {
			continue
		}
		if hasValue {
			return value, nil
		}
		if i+1 >= len(args) {
			return "", cli.Usagef("flag needs an argument: -config")
		}
		return args[i+1], nil
	}
	return "", nil
}
