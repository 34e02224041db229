package broker

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/mqtls/mqtls/provisioning/registry"
)

// Registry is what the broker reads from the device registry
// (provisioning/registry's backends implement it).
type Registry interface {
	// RevokedSince returns the certificates revoked at or after t.
	RevokedSince(ctx context.Context, t time.Time) ([]registry.Cert, error)
	// RevokedDevices returns the device IDs revoked now.
	RevokedDevices(ctx context.Context) ([]string, error)
}

// changeNotifier is a Registry that signals changes (PostgreSQL
// LISTEN/NOTIFY, SQLite's data_version): the broker polls at once instead
// of waiting for the next tick, which stays as the fallback. The channel
// is closed when ctx ends.
type changeNotifier interface {
	Changes(ctx context.Context) <-chan struct{}
}

// revocations tracks revoked certificates from the registry (serials of
// our issuing CA), revoked device IDs (whatever certificate carries them)
// and a CRL file (issuer + serial), and closes sessions when one appears.
type revocations struct {
	b       *Broker
	reg     Registry
	crlFile string
	issuers []*x509.Certificate

	mu       sync.RWMutex
	serials  map[string]string // serial -> reason (registry)
	devices  map[string]bool   // revoked device IDs (registry)
	crl      map[string]string // issuer DER + serial -> reason
	since    time.Time
	crlStamp time.Time
	crlSize  int64
	failing  bool      // the last registry poll failed
	gwSince  time.Time // gateways polled up to (watch goroutine only)
}

func newRevocations(b *Broker, reg Registry, crlFile string, issuers []*x509.Certificate) *revocations {
	return &revocations{b: b, reg: reg, crlFile: crlFile, issuers: issuers, serials: map[string]string{}, devices: map[string]bool{}, crl: map[string]string{}}
}

// load reads the full revocation state before the broker accepts clients.
func (r *revocations) load() error {
	if err := r.pollRegistry(); err != nil {
		return err
	}
	if r.crlFile != "" {
		if err := r.loadCRL(); err != nil {
			return err
		}
	}
	return nil
}

// check returns why a certificate (or the device ID it carries) is
// revoked, or "".
func (r *revocations) check(serial string, issuer []byte, deviceID string) string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if why, ok := r.serials[serial]; ok {
		return why
	}
	if r.devices[deviceID] {
		return fmt.Sprintf("device %q revoked", deviceID)
	}
	return r.crl[string(issuer)+serial]
}

// unavailable reports whether the registry could not be read at the last
// poll.
func (r *revocations) unavailable() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.failing
}

// setFailing records the registry's state; it logs and sets the metric on
// every change.
func (r *revocations) setFailing(err error) {
	r.mu.Lock()
	was := r.failing
	r.failing = err != nil
	r.mu.Unlock()
	switch {
	case err != nil && !was:
		r.b.metrics.registryUp.Set(0)
		policy := "refused"
		if r.b.cfg.AdmitWhenRegistryDown {
			policy = "admitted (AdmitWhenRegistryDown)"
		}
		r.b.log.Error("registry unreadable: keeping the last revocation data; new connections "+policy, "err", err)
	case err == nil && was:
		r.b.metrics.registryUp.Set(1)
		r.b.log.Info("registry readable again")
	}
}

func (r *revocations) watch(stop <-chan struct{}, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	var changes <-chan struct{}
	if n, ok := r.reg.(changeNotifier); ok {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		changes = n.Changes(ctx)
	}
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		case _, ok := <-changes:
			if !ok {
				changes = nil // the poll goes on
				continue
			}
		}
		if r.reg != nil {
			err := r.pollRegistry()
			if err == nil {
				r.gwSince, err = r.b.pollGateways(r.gwSince)
			}
			r.setFailing(err)
		}
		if r.crlFile != "" {
			if err := r.loadCRL(); err != nil {
				r.b.log.Error("CRL not reloaded; keeping the previous one", "file", r.crlFile, "err", err)
			}
		}
	}
}

func (r *revocations) pollRegistry() error {
	if r.reg == nil {
		return nil
	}
	// Overlap the window: a revocation committed with an older timestamp
	// than the last poll (clock granularity) is still seen.
	since := r.since.Add(-5 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	certs, err := r.reg.RevokedSince(ctx, since)
	if err != nil {
		return err
	}
	ids, err := r.reg.RevokedDevices(ctx)
	if err != nil {
		return err
	}
	devices := make(map[string]bool, len(ids))
	var freshIDs []string
	var fresh []registry.Cert
	r.mu.Lock()
	for _, id := range ids {
		devices[id] = true
		if !r.devices[id] {
			freshIDs = append(freshIDs, id)
		}
	}
	r.devices = devices
	for _, c := range certs {
		if _, known := r.serials[c.Serial]; !known {
			r.serials[c.Serial] = fmt.Sprintf("certificate revoked at %s (%s)", c.RevokedAt.UTC().Format(time.RFC3339), c.RevocationReason)
			fresh = append(fresh, c)
		}
		if c.RevokedAt.After(r.since) {
			r.since = c.RevokedAt
		}
	}
	r.mu.Unlock()
	for _, c := range fresh {
		for _, s := range r.b.sessionsOf(c.Serial, nil) {
			r.b.revoke(s, r.check(c.Serial, nil, ""))
		}
	}
	for _, id := range freshIDs {
		for _, s := range r.b.sessionsOfDevice(id) {
			r.b.revoke(s, r.check("", nil, id))
		}
	}
	return nil
}

// loadCRL (re)reads the CRL file when its modification time or size
// changed. A CRL that does not parse or is not signed by a known CA is
// refused and the previous one stays.
func (r *revocations) loadCRL() error {
	fi, err := os.Stat(r.crlFile)
	if err != nil {
		return err
	}
	if fi.ModTime().Equal(r.crlStamp) && fi.Size() == r.crlSize {
		return nil
	}
	data, err := os.ReadFile(r.crlFile)
	if err != nil {
		return err
	}
	if block, _ := pem.Decode(data); block != nil {
		data = block.Bytes
	}
	crl, err := x509.ParseRevocationList(data)
	if err != nil {
		return fmt.Errorf("CRL %s: %w", r.crlFile, err)
	}
	var signer *x509.Certificate
	for _, c := range r.issuers {
		if bytes.Equal(c.RawSubject, crl.RawIssuer) && crl.CheckSignatureFrom(c) == nil {
			signer = c
		}
	}
	if signer == nil {
		return fmt.Errorf("CRL %s: not signed by a trusted CA (issuer %s)", r.crlFile, crl.Issuer)
	}
	entries := make(map[string]string, len(crl.RevokedCertificateEntries))
	var fresh []string
	r.mu.RLock()
	for _, e := range crl.RevokedCertificateEntries {
		k := string(crl.RawIssuer) + e.SerialNumber.Text(16)
		entries[k] = fmt.Sprintf("certificate revoked at %s (CRL %s)", e.RevocationTime.UTC().Format(time.RFC3339), r.crlFile)
		if _, known := r.crl[k]; !known {
			fresh = append(fresh, e.SerialNumber.Text(16))
		}
	}
	r.mu.RUnlock()
	r.mu.Lock()
	r.crl, r.crlStamp, r.crlSize = entries, fi.ModTime(), fi.Size()
	r.mu.Unlock()
	r.b.log.Info("CRL loaded", "file", r.crlFile, "issuer", crl.Issuer.String(), "entries", len(entries))
	for _, serial := range fresh {
		for _, s := range r.b.sessionsOf(serial, crl.RawIssuer) {
			r.b.revoke(s, r.check(serial, crl.RawIssuer, ""))
		}
	}
	return nil
}
