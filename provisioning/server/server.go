// Package server is the EST (RFC 7030, RFC 8951) enrollment server: it
// authenticates a device by its one-time token (simpleenroll) or its
// current certificate (simplereenroll), applies the issuance policy, signs
// with the issuing CA and records everything in the registry.
//
// # Security
//
// Tokens are compared in constant time against stored hashes and burned in
// the same transaction that records the certificate. Failed token attempts
// are rate limited per client address and per device ID. Request bodies
// are size limited. Every refusal is logged and written to the audit trail
// with the device ID, serial, remote address and reason — never the token,
// the request or a whole certificate.
package server

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// Config configures a Server. Zero values take the defaults shown.
type Config struct {
	CA       *ca.CA             // required
	Registry *registry.Registry // required
	// Validity of issued device certificates (default 30 days).
	Validity time.Duration
	// MaxBodyBytes bounds a request body (default 32 KiB).
	MaxBodyBytes int64
	// FailureLimit failed token attempts from one address or for one
	// device ID within FailureWindow get 429 until the window passes
	// (defaults 5 and 15 minutes).
	FailureLimit  int
	FailureWindow time.Duration
	Logger        *slog.Logger // default: discard
}

// Server serves EST. Use Handler with an http.Server whose TLS config is
// TLSConfig.
type Server struct {
	cfg     Config
	log     *slog.Logger
	roots   *x509.CertPool
	inter   *x509.CertPool
	cacerts []byte
	limit   *limiter
}

// New validates cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.CA == nil || cfg.Registry == nil {
		return nil, errors.New("server: Config.CA and Config.Registry are required")
	}
	if cfg.Validity == 0 {
		cfg.Validity = ca.DefaultDeviceValidity
	}
	if cfg.Validity < time.Minute {
		return nil, fmt.Errorf("server: certificate validity %v is below one minute", cfg.Validity)
	}
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 32 << 10
	}
	if cfg.FailureLimit == 0 {
		cfg.FailureLimit = 5
	}
	if cfg.FailureWindow == 0 {
		cfg.FailureWindow = 15 * time.Minute
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cacerts, err := provisioning.EncodeCertsOnly([]*x509.Certificate{cfg.CA.Issuing, cfg.CA.Root})
	if err != nil {
		return nil, err
	}
	inter := x509.NewCertPool()
	inter.AddCert(cfg.CA.Issuing)
	return &Server{
		cfg: cfg, log: log, roots: cfg.CA.Pool(), inter: inter, cacerts: cacerts,
		limit: &limiter{max: cfg.FailureLimit, window: cfg.FailureWindow, seen: make(map[string][]time.Time)},
	}, nil
}

// TLSConfig returns the EST listener's TLS configuration: the broker's
// server certificate, TLS 1.2+, and a client certificate requested (for
// simplereenroll) but verified by the handler, so that an expired or
// foreign certificate gets a clear 401 and an audit line instead of a
// failed handshake.
func (s *Server) TLSConfig() (*tls.Config, error) {
	cert, err := s.cfg.CA.ServerCertificate()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequestClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// Handler returns the EST routes under /.well-known/est/.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+provisioning.PathCACerts, s.caCerts)
	mux.HandleFunc("GET "+provisioning.PathCSRAttrs, s.csrAttrs)
	mux.HandleFunc("POST "+provisioning.PathSimpleEnroll, s.enroll)
	mux.HandleFunc("POST "+provisioning.PathSimpleReenrol, s.reenroll)
	return mux
}

func (s *Server) caCerts(w http.ResponseWriter, r *http.Request) {
	writeCerts(w, s.cacerts)
}

// csrAttrs tells clients what to put in a request (RFC 7030 section 4.5):
// ECDSA P-256 signed with SHA-256.
func (s *Server) csrAttrs(w http.ResponseWriter, r *http.Request) {
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	der, err := asn1.Marshal([]any{
		asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}, // ecdsa-with-SHA256
		attribute{
			Type:   asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1},        // id-ecPublicKey
			Values: []asn1.ObjectIdentifier{{1, 2, 840, 10045, 3, 1, 7}}, // secp256r1
		},
	})
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", provisioning.TypeCSRAttrs)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	_, _ = w.Write(provisioning.EncodeBase64(der)) // a failed write is the client's problem
}

// refusal is one denied request.
type refusal struct {
	status int
	reason string
}

func (s *Server) refuse(w http.ResponseWriter, r *http.Request, event, deviceID, serial string, f refusal) {
	remote := remoteAddr(r)
	s.log.Info("est refused", "event", event, "cn", deviceID, "serial", serial, "remote", remote, "status", f.status, "reason", f.reason)
	if err := s.cfg.Registry.Audit(context.WithoutCancel(r.Context()), registry.Event{
		Event: event, DeviceID: deviceID, Serial: serial, Remote: remote, Reason: f.reason,
	}); err != nil {
		s.log.Error("audit write failed", "err", err)
	}
	if f.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="mqtls EST"`)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(f.status)
	_, _ = io.WriteString(w, f.reason+"\n")
}

func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	const event = "enroll_refused"
	id, token, ok := r.BasicAuth()
	if !ok {
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, "missing HTTP Basic credentials (device ID and enrollment token)"})
		return
	}
	host := remoteHost(r)
	if wait := s.limit.blocked(time.Now(), "ip:"+host, "id:"+id); wait > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(int(wait.Seconds())+1))
		s.refuse(w, r, event, id, "", refusal{http.StatusTooManyRequests, fmt.Sprintf("too many failed token attempts: retry in %s", wait.Round(time.Second))})
		return
	}
	if err := provisioning.CheckDeviceID(id); err != nil {
		s.limit.fail(time.Now(), "ip:"+host)
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, err.Error()})
		return
	}
	der, f := s.readCSR(w, r)
	if f != nil {
		s.refuse(w, r, event, id, "", *f)
		return
	}
	grant, err := s.cfg.Registry.CheckToken(r.Context(), id, token)
	if err != nil {
		s.limit.fail(time.Now(), "ip:"+host, "id:"+id)
		status := http.StatusUnauthorized
		if !errors.Is(err, registry.ErrTokenInvalid) && !errors.Is(err, registry.ErrTokenUsed) && !errors.Is(err, registry.ErrTokenExpired) {
			status = http.StatusInternalServerError
		}
		s.refuse(w, r, event, id, "", refusal{status, "token refused: " + err.Error()})
		return
	}
	csr, f := parseCSR(der, id)
	if f != nil {
		s.refuse(w, r, event, id, "", *f)
		return
	}
	var groups []string
	if grant.Group != "" {
		groups = []string{grant.Group}
	}
	cert, err := s.cfg.CA.IssueDevice(csr.PublicKey, id, groups, s.cfg.Validity)
	if err != nil {
		s.refuse(w, r, event, id, "", policyRefusal(err))
		return
	}
	err = s.cfg.Registry.Enrolled(r.Context(), grant, record(cert), remoteAddr(r))
	if errors.Is(err, registry.ErrTokenUsed) {
		s.refuse(w, r, event, id, "", refusal{http.StatusUnauthorized, "token refused: " + err.Error()})
		return
	}
	if err != nil {
		s.refuse(w, r, event, id, "", refusal{http.StatusInternalServerError, "registry unavailable"})
		s.log.Error("record enrollment", "cn", id, "err", err)
		return
	}
	s.limit.reset("id:" + id)
	s.log.Info("enrolled", "cn", id, "serial", serialHex(cert), "spki_sha256", ca.SPKIFingerprint(cert), "remote", remoteAddr(r))
	s.issued(w, cert)
}

func (s *Server) reenroll(w http.ResponseWriter, r *http.Request) {
	const event = "reenroll_refused"
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, "re-enrollment needs the current device certificate as TLS client certificate"})
		return
	}
	leaf := r.TLS.PeerCertificates[0]
	id, serial := leaf.Subject.CommonName, serialHex(leaf)
	inter := s.inter.Clone()
	for _, c := range r.TLS.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	now := time.Now()
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CurrentTime: now}); err != nil {
		reason := "client certificate not issued by this CA: " + err.Error()
		var invalid x509.CertificateInvalidError
		if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
			reason = "client certificate expired at " + leaf.NotAfter.UTC().Format(time.RFC3339) + ": enroll again with a new token"
		}
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, reason})
		return
	}
	if leaf.IsCA {
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, "client certificate is a CA certificate"})
		return
	}
	rec, err := s.cfg.Registry.Certificate(r.Context(), serial)
	switch {
	case errors.Is(err, registry.ErrNotFound):
		s.refuse(w, r, event, id, serial, refusal{http.StatusForbidden, "client certificate unknown to the registry"})
		return
	case err != nil:
		s.refuse(w, r, event, id, serial, refusal{http.StatusInternalServerError, "registry unavailable"})
		return
	case rec.Status == registry.StatusRevoked:
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, fmt.Sprintf("client certificate revoked at %s (%s)", rec.RevokedAt.UTC().Format(time.RFC3339), rec.RevocationReason)})
		return
	}
	der, f := s.readCSR(w, r)
	if f != nil {
		s.refuse(w, r, event, id, serial, *f)
		return
	}
	csr, f := parseCSR(der, id)
	if f != nil {
		s.refuse(w, r, event, id, serial, *f)
		return
	}
	dev, err := s.cfg.Registry.Device(r.Context(), id)
	if err != nil {
		s.refuse(w, r, event, id, serial, refusal{http.StatusInternalServerError, "registry unavailable"})
		return
	}
	var groups []string
	if dev.Group != "" {
		groups = []string{dev.Group}
	}
	cert, err := s.cfg.CA.IssueDevice(csr.PublicKey, id, groups, s.cfg.Validity)
	if err != nil {
		s.refuse(w, r, event, id, serial, policyRefusal(err))
		return
	}
	if err := s.cfg.Registry.Reenrolled(r.Context(), record(cert), remoteAddr(r)); err != nil {
		s.refuse(w, r, event, id, serial, refusal{http.StatusInternalServerError, "registry unavailable"})
		s.log.Error("record re-enrollment", "cn", id, "err", err)
		return
	}
	s.log.Info("re-enrolled", "cn", id, "serial", serialHex(cert), "previous_serial", serial, "rekey", !csr.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey), "remote", remoteAddr(r))
	s.issued(w, cert)
}

// readCSR reads the bounded, base64 body.
func (s *Server) readCSR(w http.ResponseWriter, r *http.Request) ([]byte, *refusal) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, &refusal{http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", s.cfg.MaxBodyBytes)}
	}
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "read request body: " + err.Error()}
	}
	der, err := provisioning.DecodeBase64(body)
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "CSR: " + err.Error()}
	}
	return der, nil
}

// parseCSR parses and checks a PKCS#10 request for deviceID.
func parseCSR(der []byte, deviceID string) (*x509.CertificateRequest, *refusal) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "malformed CSR: " + err.Error()}
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, &refusal{http.StatusBadRequest, "invalid CSR signature: " + err.Error()}
	}
	if csr.Subject.CommonName != deviceID {
		return nil, &refusal{http.StatusForbidden, fmt.Sprintf("CSR common name %q does not match device ID %q", csr.Subject.CommonName, deviceID)}
	}
	return csr, nil
}

func policyRefusal(err error) refusal {
	if errors.Is(err, ca.ErrPolicy) {
		return refusal{http.StatusForbidden, err.Error()}
	}
	return refusal{http.StatusInternalServerError, "issuance failed"}
}

func (s *Server) issued(w http.ResponseWriter, cert *x509.Certificate) {
	body, err := provisioning.EncodeCertsOnly([]*x509.Certificate{cert, s.cfg.CA.Issuing})
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	writeCerts(w, body)
}

func writeCerts(w http.ResponseWriter, body []byte) {
	w.Header().Set("Content-Type", provisioning.TypeCertsOnly)
	w.Header().Set("Content-Transfer-Encoding", "base64")
	_, _ = w.Write(body) // a failed write is the client's problem
}

func record(c *x509.Certificate) registry.Cert {
	return registry.Cert{
		Serial: serialHex(c), DeviceID: c.Subject.CommonName, SPKISHA256: ca.SPKIFingerprint(c),
		NotBefore: c.NotBefore, NotAfter: c.NotAfter,
	}
}

func serialHex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

func remoteAddr(r *http.Request) string { return r.RemoteAddr }

func remoteHost(r *http.Request) string {
	h, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return h
}

// limiter counts failed token attempts per key in a sliding window.
type limiter struct {
	mu     sync.Mutex
	max    int
	window time.Duration
	seen   map[string][]time.Time
}

// blocked returns how long the first blocked key stays blocked, or 0.
func (l *limiter) blocked(now time.Time, keys ...string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		ts := l.prune(now, k)
		if len(ts) >= l.max {
			return ts[0].Add(l.window).Sub(now)
		}
	}
	return 0
}

func (l *limiter) fail(now time.Time, keys ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.seen) > 100_000 { // bound memory under a distributed attack
		for k := range l.seen {
			if len(l.prune(now, k)) == 0 {
				delete(l.seen, k)
			}
		}
	}
	for _, k := range keys {
		l.seen[k] = append(l.prune(now, k), now)
	}
}

func (l *limiter) reset(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.seen, key)
}

func (l *limiter) prune(now time.Time, k string) []time.Time {
	ts := l.seen[k]
	i := 0
	for i < len(ts) && now.Sub(ts[i]) >= l.window {
		i++
	}
	ts = ts[i:]
	if len(ts) == 0 {
		delete(l.seen, k)
		return nil
	}
	l.seen[k] = ts
	return ts
}
