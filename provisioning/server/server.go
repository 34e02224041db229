// Package server is the EST (RFC 7030, RFC 8951) enrollment server: it
// authenticates a device by its one-time token (simpleenroll) or its
// current certificate (simplereenroll), applies the issuance policy, signs
// with the issuing CA and records everything in the registry.
//
// # Security
//
// Tokens are compared in constant time against stored hashes and burned in
// the same transaction that records the certificate. A correct token always
// enrolls: only failures are limited, per client address, with bounded
// memory (a source past the limit gets 429 and Retry-After for its failed
// attempts). An enrollment retried with the same token and key gets the
// certificate already issued. Request bodies are size limited. Every
// refusal is logged and written to the audit trail with the device ID,
// serial, remote address and reason — never the token, the request or a
// whole certificate; repeated refusals fold into one record with a count,
// and the trail is pruned to AuditMaxRows and AuditMaxAge.
package server

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/attest"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// Config configures a Server. Zero values take the defaults shown.
type Config struct {
	CA       *ca.CA            // required
	Registry registry.Registry // required
	// Validity of issued device certificates (default 30 days).
	Validity time.Duration
	// MaxBodyBytes bounds a request body (default 32 KiB).
	MaxBodyBytes int64
	// A client address with FailureLimit failed token attempts within
	// FailureWindow gets 429 (with Retry-After) for further failed
	// attempts until the oldest leaves the window (defaults 10 and 1
	// minute). A correct token is never refused by the limit.
	FailureLimit  int
	FailureWindow time.Duration
	// MaxTrackedSources bounds the limiter's memory (default 65536
	// addresses; past it the stalest are forgotten).
	MaxTrackedSources int
	// AuditMaxRows and AuditMaxAge bound the audit trail, enforced by the
	// server at most once a minute (defaults 1,000,000 records and 90
	// days; negative: no bound).
	AuditMaxRows int
	AuditMaxAge  time.Duration
	// Attestation, if set, verifies TPM key attestation (package attest;
	// its manufacturer CAs come from broker serve --tpm-ca). Without it
	// attested enrollments are refused, and so are tokens that require one.
	Attestation *attest.Verifier
	// Attest is the attestation policy of tokens that set none:
	// registry.AttestOptional (default) or registry.AttestRequired.
	Attest string
	// Metrics, if set, gets the mqtls_est_* and mqtls_registry_errors_total
	// metrics.
	Metrics prometheus.Registerer
	Logger  *slog.Logger // default: discard
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
	m       *metrics

	pruneMu   sync.Mutex
	lastPrune atomic.Int64 // unix ms
}

type metrics struct {
	results  *prometheus.CounterVec // kind, result
	refusals *prometheus.CounterVec // reason
	regErrs  prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_est_requests_total",
			Help: "EST enrollments (enroll, replay) and re-enrollments by result (ok, refused, error)."}, []string{"kind", "result"}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_est_refusals_total",
			Help: "EST refusals by reason."}, []string{"reason"}),
		regErrs: prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_registry_errors_total",
			Help: "Registry operations of the EST server that failed (storage, not refusals)."}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.results, m.refusals, m.regErrs} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("server: metrics: %w", err)
			}
		}
	}
	return m, nil
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
	switch cfg.Attest {
	case registry.AttestDefault:
		cfg.Attest = registry.AttestOptional
	case registry.AttestOptional:
	case registry.AttestRequired:
		if cfg.Attestation == nil {
			return nil, errors.New("server: attestation required by default but no TPM manufacturer CA configured (--tpm-ca)")
		}
	default:
		return nil, fmt.Errorf("server: attestation policy %q: want %q or %q", cfg.Attest, registry.AttestRequired, registry.AttestOptional)
	}
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 32 << 10
	}
	if cfg.FailureLimit == 0 {
		cfg.FailureLimit = 10
	}
	if cfg.FailureWindow == 0 {
		cfg.FailureWindow = time.Minute
	}
	if cfg.MaxTrackedSources == 0 {
		cfg.MaxTrackedSources = 1 << 16
	}
	if cfg.AuditMaxRows == 0 {
		cfg.AuditMaxRows = 1_000_000
	}
	if cfg.AuditMaxAge == 0 {
		cfg.AuditMaxAge = 90 * 24 * time.Hour
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cacerts, err := encodeCerts(cfg.CA.Issuing, cfg.CA.Root)
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Metrics)
	if err != nil {
		return nil, err
	}
	inter := x509.NewCertPool()
	inter.AddCert(cfg.CA.Issuing)
	s := &Server{
		cfg: cfg, log: log, roots: cfg.CA.Pool(), inter: inter, cacerts: cacerts, m: m,
		limit: &limiter{max: cfg.FailureLimit, window: cfg.FailureWindow, maxKeys: cfg.MaxTrackedSources, seen: make(map[string][]time.Time)},
	}
	s.lastPrune.Store(time.Now().UnixMilli() - time.Minute.Milliseconds()) // prune on the first write
	return s, nil
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
	mux.HandleFunc("POST "+provisioning.PathAttestChallenge, s.attestChallenge)
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

// refusal is one denied request: its status, a metric label and the
// reason the client, the log and the audit trail get.
type refusal struct {
	status int
	label  string
	reason string
	// audit is the reason recorded when it differs from reason (one that
	// must fold into one record, e.g. without the Retry-After wait).
	audit string
}

func (s *Server) refuse(w http.ResponseWriter, r *http.Request, event, deviceID, serial string, f refusal) {
	remote := remoteHost(r)
	kind := "enroll"
	if event == "reenroll_refused" {
		kind = "reenroll"
	}
	result := "refused"
	if f.status >= 500 {
		result = "error"
	}
	s.m.results.WithLabelValues(kind, result).Inc()
	s.m.refusals.WithLabelValues(f.label).Inc()
	s.log.Info("est refused", "event", event, "cn", deviceID, "serial", serial, "remote", remoteAddr(r), "status", f.status, "reason", f.reason)
	reason := f.reason
	if f.audit != "" {
		reason = f.audit
	}
	s.audit(r.Context(), registry.Event{Event: event, DeviceID: deviceID, Serial: serial, Remote: remote, Reason: reason, Aggregate: true})
	if f.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="mqtls EST"`)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(f.status)
	_, _ = io.WriteString(w, f.reason+"\n")
}

// audit writes e and enforces the retention at most once a minute.
func (s *Server) audit(ctx context.Context, e registry.Event) {
	ctx = context.WithoutCancel(ctx)
	if err := s.cfg.Registry.Audit(ctx, e); err != nil {
		s.m.regErrs.Inc()
		s.log.Error("audit write failed", "err", err)
	}
	s.prune(ctx)
}

func (s *Server) prune(ctx context.Context) {
	now := time.Now().UnixMilli()
	if now-s.lastPrune.Load() < time.Minute.Milliseconds() || !s.pruneMu.TryLock() {
		return
	}
	defer s.pruneMu.Unlock()
	s.lastPrune.Store(now)
	if _, err := s.PruneAudit(ctx); err != nil {
		s.log.Error("audit retention failed", "err", err)
	}
}

// PruneAudit enforces the audit retention now (the server also does it at
// most once a minute as it writes the trail) and returns how many records
// it deleted.
func (s *Server) PruneAudit(ctx context.Context) (int, error) {
	n, err := s.cfg.Registry.PruneAudit(ctx, max(s.cfg.AuditMaxRows, 0), max(s.cfg.AuditMaxAge, 0))
	if err != nil {
		s.m.regErrs.Inc()
		return 0, err
	}
	if n > 0 {
		s.log.Info("audit retention", "deleted", n, "max_rows", s.cfg.AuditMaxRows, "max_age", s.cfg.AuditMaxAge)
	}
	return n, nil
}

func (s *Server) registryFailed(w http.ResponseWriter, r *http.Request, event, id, serial, what string, err error) {
	s.m.regErrs.Inc()
	s.log.Error(what, "cn", id, "err", err)
	s.refuse(w, r, event, id, serial, refusal{http.StatusInternalServerError, "registry_error", "registry unavailable", ""})
}

// checkContentType refuses a body that is not application/pkcs10.
func checkContentType(r *http.Request) *refusal {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != provisioning.TypePKCS10 {
		return &refusal{http.StatusUnsupportedMediaType, "unsupported_media_type",
			fmt.Sprintf("Content-Type %q: send the base64 CSR as %s", r.Header.Get("Content-Type"), provisioning.TypePKCS10), ""}
	}
	return nil
}

func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	const event = "enroll_refused"
	id, token, ok := r.BasicAuth()
	if !ok {
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, "no_credentials", "missing HTTP Basic credentials (device ID and enrollment token)", ""})
		return
	}
	if f := checkContentType(r); f != nil {
		s.refuse(w, r, event, "", "", *f)
		return
	}
	host := remoteHost(r)
	if err := deviceid.Check(id); err != nil {
		s.tokenFailed(w, r, "", host, refusal{http.StatusUnauthorized, "bad_device_id", err.Error(), ""})
		return
	}
	der, f := s.readCSR(w, r)
	if f != nil {
		s.refuse(w, r, event, id, "", *f)
		return
	}
	grant, err := s.cfg.Registry.CheckToken(r.Context(), id, token)
	if errors.Is(err, registry.ErrTokenUsed) {
		s.replay(w, r, id, token, der, err)
		return
	}
	if err != nil {
		if label := tokenLabel(err); label != "" {
			s.tokenFailed(w, r, id, host, refusal{http.StatusUnauthorized, label, "token refused: " + err.Error(), ""})
			return
		}
		s.registryFailed(w, r, event, id, "", "check token", err)
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
	ek, f := s.verifyAttestation(r, id, token, grant, csr)
	if f != nil {
		s.refuse(w, r, event, id, "", *f)
		return
	}
	issue := s.cfg.CA.IssueDevice
	if ek.SHA256 != "" {
		issue = s.cfg.CA.IssueAttestedDevice
	}
	cert, err := issue(csr.PublicKey, id, groups, s.cfg.Validity)
	if err != nil {
		s.refuse(w, r, event, id, "", policyRefusal(err))
		return
	}
	rec := record(cert)
	rec.EK = ek
	err = s.cfg.Registry.Enrolled(r.Context(), grant, rec, remoteAddr(r))
	switch {
	case errors.Is(err, registry.ErrEKBound):
		s.refuse(w, r, event, id, "", refusal{http.StatusForbidden, "ek_bound", "enrollment refused: " + err.Error(), ""})
		return
	case errors.Is(err, registry.ErrTokenUsed):
		// used meanwhile: by this device with this key (a retry racing
		// the first attempt) the answer is the certificate recorded
		s.replay(w, r, id, token, der, err)
		return
	case errors.Is(err, registry.ErrRevoked):
		s.refuse(w, r, event, id, "", refusal{http.StatusUnauthorized, "device_revoked", "token refused: " + err.Error(), ""})
		return
	case err != nil:
		s.registryFailed(w, r, event, id, "", "record enrollment", err)
		return
	}
	s.m.results.WithLabelValues("enroll", "ok").Inc()
	s.log.Info("enrolled", "cn", id, "serial", serialHex(cert), "spki_sha256", ca.SPKIFingerprint(cert), "attested", ek.SHA256 != "", "ek_sha256", ek.SHA256, "remote", remoteAddr(r))
	s.issued(w, cert)
}

// tokenLabel names a token refusal, or "" for a storage failure.
func tokenLabel(err error) string {
	for _, e := range []struct {
		err   error
		label string
	}{
		{registry.ErrTokenInvalid, "token_invalid"}, {registry.ErrTokenUsed, "token_used"},
		{registry.ErrTokenExpired, "token_expired"}, {registry.ErrTokenRevoked, "token_revoked"},
		{registry.ErrKeyMismatch, "key_mismatch"},
	} {
		if errors.Is(err, e.err) {
			return e.label
		}
	}
	return ""
}

// tokenFailed counts a failed token attempt against the client address
// and refuses it: 429 with Retry-After once the address is over the limit.
func (s *Server) tokenFailed(w http.ResponseWriter, r *http.Request, id, host string, f refusal) {
	if wait := s.limit.fail(time.Now(), host); wait > 0 {
		secs := int((wait + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		f = refusal{http.StatusTooManyRequests, "rate_limited",
			fmt.Sprintf("too many failed token attempts from %s: retry in %ds (%s)", host, secs, f.reason),
			"too many failed token attempts (" + f.reason + ")"}
	}
	s.refuse(w, r, "enroll_refused", id, "", f)
}

// replay answers an enrollment whose token is used: with the same key
// within the token's lifetime, the certificate already issued.
func (s *Server) replay(w http.ResponseWriter, r *http.Request, id, token string, der []byte, used error) {
	const event = "enroll_refused"
	csr, f := parseCSR(der, id)
	if f != nil {
		s.tokenFailed(w, r, id, remoteHost(r), refusal{http.StatusUnauthorized, "token_used", "token refused: " + used.Error(), ""})
		return
	}
	spki := ca.SPKIFingerprint(&x509.Certificate{RawSubjectPublicKeyInfo: csr.RawSubjectPublicKeyInfo})
	rec, err := s.cfg.Registry.Replay(r.Context(), id, token, spki, remoteAddr(r))
	switch {
	case errors.Is(err, registry.ErrRevoked):
		s.refuse(w, r, event, id, "", refusal{http.StatusUnauthorized, "device_revoked", "token refused: " + err.Error(), ""})
		return
	case err != nil && tokenLabel(err) != "":
		s.tokenFailed(w, r, id, remoteHost(r), refusal{http.StatusUnauthorized, tokenLabel(err), "token refused: " + err.Error(), ""})
		return
	case err != nil:
		s.registryFailed(w, r, event, id, "", "replay enrollment", err)
		return
	}
	cert, err := x509.ParseCertificate(rec.DER)
	if err != nil {
		s.registryFailed(w, r, event, id, rec.Serial, "replay enrollment", err)
		return
	}
	s.m.results.WithLabelValues("replay", "ok").Inc()
	s.log.Info("enrollment replayed", "cn", id, "serial", rec.Serial, "remote", remoteAddr(r))
	s.issued(w, cert)
}

func (s *Server) reenroll(w http.ResponseWriter, r *http.Request) {
	const event = "reenroll_refused"
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, "no_client_certificate", "re-enrollment needs the current device certificate as TLS client certificate", ""})
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
		f := refusal{http.StatusUnauthorized, "cert_untrusted", "client certificate not issued by this CA: " + err.Error(), ""}
		var invalid x509.CertificateInvalidError
		if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
			f = refusal{http.StatusUnauthorized, "cert_expired", "client certificate expired at " + leaf.NotAfter.UTC().Format(time.RFC3339) + ": enroll again with a new token", ""}
		}
		s.refuse(w, r, event, id, serial, f)
		return
	}
	if leaf.IsCA {
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, "cert_untrusted", "client certificate is a CA certificate", ""})
		return
	}
	if f := checkContentType(r); f != nil {
		s.refuse(w, r, event, id, serial, *f)
		return
	}
	// Early answers with a clear reason; Reenrolled checks again in the
	// transaction that records the new certificate.
	rec, err := s.cfg.Registry.Certificate(r.Context(), serial)
	switch {
	case errors.Is(err, registry.ErrNotFound):
		s.refuse(w, r, event, id, serial, refusal{http.StatusForbidden, "cert_unknown", "client certificate unknown to the registry", ""})
		return
	case err != nil:
		s.registryFailed(w, r, event, id, serial, "certificate lookup", err)
		return
	case rec.Status == registry.StatusRevoked:
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, "cert_revoked", fmt.Sprintf("client certificate revoked at %s (%s)", rec.RevokedAt.UTC().Format(time.RFC3339), rec.RevocationReason), ""})
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
		s.registryFailed(w, r, event, id, serial, "device lookup", err)
		return
	}
	var groups []string
	if dev.Group != "" {
		groups = []string{dev.Group}
	}
	// The attested marker carries over to a renewal of the same key while
	// the device is still bound to the EK that attested it: the key is
	// still the one the TPM certified. A new key was not attested; after
	// an ek release the operator no longer vouches for that TPM.
	issue, ek := s.cfg.CA.IssueDevice, registry.EK{}
	if ca.Attested(leaf) && leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(csr.PublicKey) && rec.EK.SHA256 != "" && dev.EK == rec.EK.SHA256 {
		issue, ek = s.cfg.CA.IssueAttestedDevice, rec.EK
	}
	cert, err := issue(csr.PublicKey, id, groups, s.cfg.Validity)
	if err != nil {
		s.refuse(w, r, event, id, serial, policyRefusal(err))
		return
	}
	newRec := record(cert)
	newRec.EK = ek
	err = s.cfg.Registry.Reenrolled(r.Context(), serial, newRec, remoteAddr(r))
	switch {
	case errors.Is(err, registry.ErrRevoked):
		s.refuse(w, r, event, id, serial, refusal{http.StatusUnauthorized, "cert_revoked", "re-enrollment refused: " + err.Error(), ""})
		return
	case errors.Is(err, registry.ErrNotFound):
		s.refuse(w, r, event, id, serial, refusal{http.StatusForbidden, "cert_unknown", "client certificate unknown to the registry", ""})
		return
	case err != nil:
		s.registryFailed(w, r, event, id, serial, "record re-enrollment", err)
		return
	}
	s.m.results.WithLabelValues("reenroll", "ok").Inc()
	s.log.Info("re-enrolled", "cn", id, "serial", serialHex(cert), "previous_serial", serial, "rekey", !csr.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(leaf.PublicKey), "remote", remoteAddr(r))
	s.issued(w, cert)
}

// readCSR reads the bounded, base64 body.
func (s *Server) readCSR(w http.ResponseWriter, r *http.Request) ([]byte, *refusal) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, &refusal{http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("request body larger than %d bytes", s.cfg.MaxBodyBytes), ""}
	}
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "bad_request", "read request body: " + err.Error(), ""}
	}
	der, err := provisioning.DecodeBase64(body)
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "bad_csr", "CSR: " + err.Error(), ""}
	}
	return der, nil
}

// parseCSR parses and checks a PKCS#10 request for deviceID.
func parseCSR(der []byte, deviceID string) (*x509.CertificateRequest, *refusal) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, &refusal{http.StatusBadRequest, "bad_csr", "malformed CSR: " + err.Error(), ""}
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, &refusal{http.StatusBadRequest, "bad_csr", "invalid CSR signature: " + err.Error(), ""}
	}
	if csr.Subject.CommonName != deviceID {
		return nil, &refusal{http.StatusForbidden, "cn_mismatch", fmt.Sprintf("CSR common name %q does not match device ID %q", csr.Subject.CommonName, deviceID), ""}
	}
	return csr, nil
}

func policyRefusal(err error) refusal {
	if errors.Is(err, ca.ErrPolicy) {
		return refusal{http.StatusForbidden, "key_policy", err.Error(), ""}
	}
	return refusal{http.StatusInternalServerError, "issuance_error", "issuance failed", ""}
}

func (s *Server) issued(w http.ResponseWriter, cert *x509.Certificate) {
	body, err := encodeCerts(cert, s.cfg.CA.Issuing)
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

// encodeCerts is the certs-only body with the certificates in DER order:
// a SET OF is sorted by the encodings of its elements (X.690 11.6).
func encodeCerts(certs ...*x509.Certificate) ([]byte, error) {
	certs = slices.Clone(certs)
	slices.SortFunc(certs, func(a, b *x509.Certificate) int { return compareDER(a.Raw, b.Raw) })
	return provisioning.EncodeCertsOnly(certs)
}

// compareDER orders encodings as X.690 11.6 does: as octet strings, the
// shorter one padded with trailing zero octets.
func compareDER(a, b []byte) int {
	n := min(len(a), len(b))
	if c := bytes.Compare(a[:n], b[:n]); c != 0 {
		return c
	}
	rest, sign := b[n:], -1
	if len(a) > len(b) {
		rest, sign = a[n:], 1
	}
	for _, x := range rest {
		if x != 0 {
			return sign
		}
	}
	return 0
}

func record(c *x509.Certificate) registry.Cert {
	return registry.Cert{
		Serial: serialHex(c), DeviceID: c.Subject.CommonName, SPKISHA256: ca.SPKIFingerprint(c),
		NotBefore: c.NotBefore, NotAfter: c.NotAfter, DER: c.Raw,
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

// limiter counts failed token attempts per client address in a sliding
// window. Memory is bounded: at most max timestamps per address and
// maxKeys addresses (past that, the address whose newest failure is the
// oldest is forgotten).
type limiter struct {
	mu      sync.Mutex
	max     int
	window  time.Duration
	maxKeys int
	seen    map[string][]time.Time
}

// fail records a failure of key and returns how long key stays over the
// limit (0: it is not).
func (l *limiter) fail(now time.Time, key string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	ts := l.prune(now, key)
	if ts == nil && len(l.seen) >= l.maxKeys {
		l.evict(now)
	}
	ts = append(ts, now)
	if len(ts) > l.max {
		ts = ts[len(ts)-l.max:]
	}
	l.seen[key] = ts
	if len(ts) >= l.max {
		return ts[0].Add(l.window).Sub(now)
	}
	return 0
}

// evict drops expired entries, and if none was, the stalest one.
func (l *limiter) evict(now time.Time) {
	var stalest string
	var at time.Time
	for k, ts := range l.seen {
		if now.Sub(ts[len(ts)-1]) >= l.window {
			delete(l.seen, k)
			continue
		}
		if stalest == "" || ts[len(ts)-1].Before(at) {
			stalest, at = k, ts[len(ts)-1]
		}
	}
	if len(l.seen) >= l.maxKeys {
		delete(l.seen, stalest)
	}
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
	return ts
}

// size is the number of tracked addresses (for tests).
func (l *limiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.seen)
}
