package server_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/server"
)

func client(t *testing.T, env *esttest.Env) *provisioning.Client {
	t.Helper()
	c, err := provisioning.NewClient(env.URL, env.CA.Root)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newKey(t *testing.T) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// lastEvent returns the newest audit event.
func lastEvent(t *testing.T, env *esttest.Env) registry.Event {
	t.Helper()
	ev := env.Events(t)
	if len(ev) == 0 {
		t.Fatal("audit trail is empty")
	}
	return ev[len(ev)-1]
}

func TestEnroll(t *testing.T) {
	env := esttest.Start(t, nil)
	key := newKey(t)
	tok := env.Token(t, "dev-1", "sensors", time.Hour)
	chain, err := client(t, env).Enroll(t.Context(), key, "dev-1", tok)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || !chain[1].Equal(env.CA.Issuing) {
		t.Fatalf("chain = %d certificates, want leaf + issuing CA", len(chain))
	}
	leaf := chain[0]
	checks := []struct {
		what string
		ok   bool
	}{
		{"CN is the device ID", leaf.Subject.CommonName == "dev-1"},
		{"OU is the token's group", slices.Equal(leaf.Subject.OrganizationalUnit, []string{"sensors"})},
		{"not a CA", !leaf.IsCA && leaf.BasicConstraintsValid},
		{"EKU clientAuth only", slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})},
		{"KU digitalSignature only", leaf.KeyUsage == x509.KeyUsageDigitalSignature},
		{"serial is random 128-bit", leaf.SerialNumber.BitLen() > 64 && leaf.SerialNumber.BitLen() <= 129},
		{"SKI set", len(leaf.SubjectKeyId) > 0},
		{"AKI is the issuing CA's SKI", bytes.Equal(leaf.AuthorityKeyId, env.CA.Issuing.SubjectKeyId)},
		{"valid 30 days", leaf.NotAfter.Sub(time.Now()) > 29*24*time.Hour && leaf.NotAfter.Sub(time.Now()) <= 30*24*time.Hour},
		{"no SANs", len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.URIs)+len(leaf.EmailAddresses) == 0},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("issued certificate: %s: failed", c.what)
		}
	}
	dev, err := env.Registry.Device(t.Context(), "dev-1")
	if err != nil || dev.Status != "enrolled" || dev.Certificates != 1 || dev.Group != "sensors" {
		t.Errorf("registry device = %+v, %v", dev, err)
	}
	if e := lastEvent(t, env); e.Event != "enroll" || e.DeviceID != "dev-1" || e.Serial != leaf.SerialNumber.Text(16) {
		t.Errorf("audit = %+v, want enroll of dev-1", e)
	}
}

func TestCACertsAndCSRAttrs(t *testing.T) {
	env := esttest.Start(t, nil)
	certs, err := client(t, env).CACerts(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || !slices.ContainsFunc(certs, env.CA.Issuing.Equal) || !slices.ContainsFunc(certs, env.CA.Root.Equal) {
		t.Fatalf("cacerts = %d certificates, want issuing + root", len(certs))
	}
	// Issue 10 item 6: a SET OF in DER is sorted by the elements' encodings.
	if bytes.Compare(certs[0].Raw, certs[1].Raw) > 0 {
		t.Fatal("cacerts: the certificates SET is not in DER order")
	}
	resp := raw(t, env, http.MethodGet, provisioning.PathCSRAttrs, "", "", nil, nil)
	if resp.status != 200 || resp.header.Get("Content-Type") != provisioning.TypeCSRAttrs {
		t.Fatalf("csrattrs: %d %s", resp.status, resp.header.Get("Content-Type"))
	}
	if _, err := provisioning.DecodeBase64(resp.body); err != nil {
		t.Fatalf("csrattrs body: %v", err)
	}
}

type response struct {
	status int
	header http.Header
	body   []byte
}

// raw sends an EST request without the client's own checks, so malformed
// input reaches the server.
func raw(t *testing.T, env *esttest.Env, method, path, id, token string, body []byte, cert *tls.Certificate) response {
	t.Helper()
	cfg := &tls.Config{RootCAs: env.CA.Pool()}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 30 * time.Second}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(t.Context(), method, env.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if id != "" || token != "" {
		req.SetBasicAuth(id, token)
	}
	req.Header.Set("Content-Type", provisioning.TypePKCS10)
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, b}
}

func csrB64(t *testing.T, tmpl *x509.CertificateRequest, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(base64.StdEncoding.EncodeToString(der))
}

// The negative matrix: each bad request gets its status, a reason naming
// the cause, and an audit entry with that reason.
func TestEnrollRefusals(t *testing.T) {
	env := esttest.Start(t, func(c *server.Config) { c.FailureLimit = 1000 })
	ctx := t.Context()
	key := newKey(t)
	good := func(cn string) []byte {
		return csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	}

	used := env.Token(t, "used", "", time.Hour)
	if _, err := client(t, env).Enroll(ctx, newKey(t), "used", used); err != nil {
		t.Fatal(err)
	}
	expired := env.Token(t, "late", "", time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	other := env.Token(t, "owner", "", time.Hour)

	badSig, _ := base64.StdEncoding.DecodeString(string(good("sig")))
	badSig[len(badSig)-3] ^= 0xff
	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)

	cases := []struct {
		name      string
		id, token string
		body      []byte
		status    int
		reason    string
	}{
		{"reused token", "used", used, good("used"), 401, "token already used"},
		{"expired token", "late", expired, good("late"), 401, "token expired"},
		{"token of another device", "thief", other, good("thief"), 401, "unknown device or wrong token"},
		{"wrong token", "owner", "guess", good("owner"), 401, "unknown device or wrong token"},
		{"no credentials", "", "", good("x"), 401, "missing HTTP Basic credentials"},
		{"id with +", "a+b", other, good("a+b"), 401, "invalid device ID"},
		{"id with #", "a#b", other, good("a#b"), 401, "invalid device ID"},
		{"id with /", "a/b", other, good("a/b"), 401, "invalid device ID"},
		{"id with $", "$x", other, good("$x"), 401, "invalid device ID"},
		{"id of 65 chars", strings.Repeat("a", 65), other, good("a"), 401, "invalid device ID"},
		{"malformed base64", "owner", other, []byte("!!not base64!!"), 400, "malformed base64"},
		{"not a CSR", "owner", other, []byte(base64.StdEncoding.EncodeToString([]byte("hello"))), 400, "malformed CSR"},
		{"invalid CSR signature", "owner", other, []byte(base64.StdEncoding.EncodeToString(badSig)), 400, "invalid CSR signature"},
		{"CN is not the token's device", "owner", other, good("someone-else"), 403, "does not match device ID"},
		{"RSA-1024", "owner", other, csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "owner"}}, weak), 403, "key too weak: RSA-1024"},
		{"P-224", "owner", other, csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "owner"}}, p224), 403, "curve P-224 not allowed"},
		{"oversized body", "owner", other, bytes.Repeat([]byte("A"), 64<<10), 413, "request body larger than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := len(env.Events(t))
			resp := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, c.id, c.token, c.body, nil)
			if resp.status != c.status || !strings.Contains(string(resp.body), c.reason) {
				t.Fatalf("got %d %q, want %d with %q", resp.status, resp.body, c.status, c.reason)
			}
			ev := env.Events(t)
			if len(ev) != before+1 || ev[len(ev)-1].Event != "enroll_refused" || !strings.Contains(ev[len(ev)-1].Reason, c.reason) {
				t.Fatalf("audit after refusal: %+v", ev[before:])
			}
			if strings.Contains(ev[len(ev)-1].Reason, other) || strings.Contains(ev[len(ev)-1].Reason, used) {
				t.Fatal("audit line contains the token")
			}
		})
	}
	// The refusals used nothing up: the owner's token still enrolls.
	if _, err := client(t, env).Enroll(ctx, key, "owner", other); err != nil {
		t.Fatalf("valid token after refusals: %v", err)
	}
	// Bad IDs are refused at minting already.
	for _, id := range []string{"a+b", "a#b", "a/b", "$x", strings.Repeat("a", 65), "", "a\x00b"} {
		if _, err := env.Registry.CreateToken(ctx, id, "", time.Hour); !errors.Is(err, deviceid.ErrInvalid) {
			t.Errorf("CreateToken(%q) = %v, want ErrBadDeviceID", id, err)
		}
	}
}

// What a CSR asks for beyond its key and CN is ignored.
func TestCSRExtrasIgnored(t *testing.T) {
	env := esttest.Start(t, nil)
	key := newKey(t)
	u, _ := url.Parse("spiffe://evil/x")
	body := csrB64(t, &x509.CertificateRequest{
		Subject:        pkix.Name{CommonName: "dev", Organization: []string{"Evil"}, OrganizationalUnit: []string{"admins"}},
		DNSNames:       []string{"broker.example"},
		IPAddresses:    []net.IP{net.ParseIP("10.0.0.1")},
		URIs:           []*url.URL{u},
		EmailAddresses: []string{"a@b.c"},
		ExtraExtensions: []pkix.Extension{
			{Id: []int{2, 5, 29, 19}, Critical: true, Value: []byte{0x30, 0x03, 0x01, 0x01, 0xff}},                           // CA:TRUE
			{Id: []int{2, 5, 29, 37}, Value: []byte{0x30, 0x0a, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01}}, // serverAuth
		},
	}, key)
	resp := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "dev", env.Token(t, "dev", "", time.Hour), body, nil)
	if resp.status != 200 {
		t.Fatalf("enroll: %d %s", resp.status, resp.body)
	}
	certs, err := provisioning.ParseCertsOnly(resp.body)
	if err != nil {
		t.Fatal(err)
	}
	leaf := certs[0]
	if leaf.IsCA || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.URIs)+len(leaf.EmailAddresses) != 0 ||
		!slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) ||
		len(leaf.Subject.Organization) != 0 || len(leaf.Subject.OrganizationalUnit) != 0 {
		t.Fatalf("issued certificate carries what the CSR asked for: CA=%v SANs=%v %v %v %v EKU=%v O=%v OU=%v",
			leaf.IsCA, leaf.DNSNames, leaf.IPAddresses, leaf.URIs, leaf.EmailAddresses, leaf.ExtKeyUsage, leaf.Subject.Organization, leaf.Subject.OrganizationalUnit)
	}
}

// Issue 10 item 3: only failures are limited, per source; a correct token
// always enrolls, even from a source over the limit, even for a device ID
// somebody hammered with wrong tokens.
func TestRateLimit(t *testing.T) {
	env := esttest.Start(t, nil) // default: 10 failures per minute and source
	key := newKey(t)
	tok := env.Token(t, "victim", "", time.Hour)
	body := csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "victim"}}, key)
	var statuses []int
	for range 12 {
		statuses = append(statuses, raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "victim", "wrong", body, nil).status)
	}
	want := []int{401, 401, 401, 401, 401, 401, 401, 401, 401, 429, 429, 429}
	if !slices.Equal(statuses, want) {
		t.Fatalf("twelve wrong tokens: statuses %v, want %v", statuses, want)
	}
	limited := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "other", "wrong", body, nil)
	if limited.status != 429 || limited.header.Get("Retry-After") == "" || !strings.Contains(string(limited.body), "retry in") {
		t.Fatalf("wrong token from a limited source: %d (Retry-After %q) %s", limited.status, limited.header.Get("Retry-After"), limited.body)
	}
	if e := lastEvent(t, env); e.Event != "enroll_refused" || !strings.Contains(e.Reason, "too many failed token attempts") {
		t.Fatalf("audit = %+v", e)
	}
	_, err := client(t, env).Enroll(t.Context(), newKey(t), "victim", "wrong")
	if !errors.Is(err, provisioning.ErrRateLimited) || !strings.Contains(err.Error(), "retry in") {
		t.Fatalf("client error = %v, want ErrRateLimited naming the wait", err)
	}
	if _, err := client(t, env).Enroll(t.Context(), key, "victim", tok); err != nil {
		t.Fatalf("right token from a source over the limit: %v", err)
	}
}

// Issue 10 item 4: an enrollment whose answer was lost is retried with the
// same token and key and gets the same certificate; another key is refused.
func TestEnrollReplay(t *testing.T) {
	env := esttest.Start(t, nil)
	key := newKey(t)
	tok := env.Token(t, "dev", "", time.Hour)
	body := csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, key)
	first := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "dev", tok, body, nil)
	if first.status != 200 {
		t.Fatalf("enroll: %d %s", first.status, first.body)
	}
	// the answer is "lost"; the device retries
	chain, err := client(t, env).Enroll(t.Context(), key, "dev", tok)
	if err != nil {
		t.Fatalf("retry with the same token and key: %v", err)
	}
	issued, _ := provisioning.ParseCertsOnly(first.body)
	if !slices.ContainsFunc(issued, chain[0].Equal) {
		t.Fatal("the retry got another certificate than the one issued")
	}
	if e := lastEvent(t, env); e.Event != "enroll_replay" || e.Serial != chain[0].SerialNumber.Text(16) {
		t.Fatalf("audit = %+v, want enroll_replay", e)
	}
	other := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "dev", tok, csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, newKey(t)), nil)
	if other.status != 401 || !strings.Contains(string(other.body), "another key") {
		t.Fatalf("same token, another key: %d %s", other.status, other.body)
	}
	if certs, _ := env.Registry.Certificates(t.Context(), "dev"); len(certs) != 1 {
		t.Fatalf("registry holds %d certificates, want 1", len(certs))
	}
}

// Issue 10 item 1: a token minted before a revocation does not enroll the
// revoked device, and the device stays revoked.
func TestTokenOfRevokedDevice(t *testing.T) {
	env := esttest.Start(t, nil)
	enrolled(t, env, "dev")
	tok := env.Token(t, "dev", "", time.Hour)
	if _, err := env.Registry.Revoke(t.Context(), "dev", "stolen"); err != nil {
		t.Fatal(err)
	}
	_, err := client(t, env).Enroll(t.Context(), newKey(t), "dev", tok)
	if !errors.Is(err, provisioning.ErrUnauthorized) || !strings.Contains(err.Error(), "revocation") {
		t.Fatalf("enroll with a token minted before the revocation: %v", err)
	}
	if d, _ := env.Registry.Device(t.Context(), "dev"); d.Status != "revoked" {
		t.Fatalf("device status %q, want revoked", d.Status)
	}
}

// Issue 10 item 6: a body that is not application/pkcs10 gets 415.
func TestContentType(t *testing.T) {
	env := esttest.Start(t, nil)
	tok := env.Token(t, "dev", "", time.Hour)
	body := csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, newKey(t))
	for _, ct := range []string{"", "text/plain", "application/json", "application/pkcs10x"} {
		resp := rawType(t, env, provisioning.PathSimpleEnroll, "dev", tok, body, ct)
		if resp.status != http.StatusUnsupportedMediaType || !strings.Contains(string(resp.body), provisioning.TypePKCS10) {
			t.Errorf("Content-Type %q: %d %s, want 415", ct, resp.status, resp.body)
		}
	}
	if resp := rawType(t, env, provisioning.PathSimpleEnroll, "dev", tok, body, "application/pkcs10; charset=us-ascii"); resp.status != 200 {
		t.Errorf("application/pkcs10 with a parameter: %d %s", resp.status, resp.body)
	}
}

func rawType(t *testing.T, env *esttest.Env, path, id, token string, body []byte, contentType string) response {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: env.CA.Pool()}}}
	req, _ := http.NewRequest(http.MethodPost, env.URL+path, bytes.NewReader(body))
	req.SetBasicAuth(id, token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{resp.StatusCode, resp.Header, b}
}

// Issue 10 item 5: repeated refusals fold into one audit record, and the
// server enforces the retention.
func TestAuditBounded(t *testing.T) {
	env := esttest.Start(t, func(c *server.Config) { c.FailureLimit = 1000; c.AuditMaxRows = 5 })
	body := csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, newKey(t))
	for range 20 {
		env.Token(t, "dev", "", time.Hour) // 20 "token" records
	}
	for range 200 {
		if resp := raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "dev", "wrong", body, nil); resp.status != 401 {
			t.Fatalf("wrong token: %d", resp.status)
		}
	}
	ev := env.Events(t)
	if len(ev) > 5 {
		t.Fatalf("%d audit records, want at most 5 (AuditMaxRows)", len(ev))
	}
	last := ev[len(ev)-1]
	if last.Event != "enroll_refused" || last.Count != 200 {
		t.Fatalf("200 identical refusals: last record %+v, want one with count 200", last)
	}
}

// Issue 10 item 2, with an injected pause: a revocation that lands between
// the server's check of the presented certificate and the record of the
// new one must not leave a valid certificate.
func TestReenrollRacingRevoke(t *testing.T) {
	var env *esttest.Env
	env = esttest.Start(t, func(c *server.Config) {
		c.Registry = revokeBeforeRecord{Registry: c.Registry, revoke: func() {
			if _, err := env.Registry.Revoke(context.Background(), "dev", "stolen"); err != nil {
				t.Error(err)
			}
		}}
	})
	cert, key := enrolled(t, env, "dev")
	_, err := client(t, env).Reenroll(t.Context(), cert, key)
	if !errors.Is(err, provisioning.ErrUnauthorized) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("re-enroll racing a revocation: %v, want 401 revoked", err)
	}
	assertNoValid(t, env, "dev")
}

// 20 concurrent re-enrollments racing one revocation: afterwards no
// certificate of the device is valid.
func TestReenrollConcurrentRevoke(t *testing.T) {
	env := esttest.Start(t, nil)
	cert, key := enrolled(t, env, "dev")
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 20 {
		wg.Go(func() {
			<-start
			_, err := client(t, env).Reenroll(t.Context(), cert, key)
			if err != nil && !errors.Is(err, provisioning.ErrUnauthorized) {
				t.Error(err)
			}
		})
	}
	wg.Go(func() {
		<-start
		if _, err := env.Registry.Revoke(t.Context(), "dev", "stolen"); err != nil {
			t.Error(err)
		}
	})
	close(start)
	wg.Wait()
	assertNoValid(t, env, "dev")
}

type revokeBeforeRecord struct {
	registry.Registry
	revoke func()
}

func (r revokeBeforeRecord) Reenrolled(ctx context.Context, prev string, c registry.Cert, remote string) error {
	r.revoke()
	return r.Registry.Reenrolled(ctx, prev, c, remote)
}

func assertNoValid(t *testing.T, env *esttest.Env, id string) {
	t.Helper()
	certs, err := env.Registry.Certificates(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range certs {
		if c.Status != registry.StatusRevoked {
			t.Errorf("certificate %s of revoked device %s is %s", c.Serial, id, c.Status)
		}
	}
}

// Two devices racing with one token: exactly one certificate is issued.
func TestTokenSingleUseUnderRace(t *testing.T) {
	env := esttest.Start(t, nil)
	tok := env.Token(t, "race", "", time.Hour)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok, refused int
	for range 8 {
		wg.Go(func() {
			_, err := client(t, env).Enroll(t.Context(), newKey(t), "race", tok)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, provisioning.ErrUnauthorized), errors.Is(err, provisioning.ErrRateLimited):
				refused++ // used token, or rate limited after five of those
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if ok != 1 || refused != 7 {
		t.Fatalf("%d enrollments succeeded and %d were refused, want 1 and 7", ok, refused)
	}
	certs, _ := env.Registry.Certificates(t.Context(), "race")
	if len(certs) != 1 {
		t.Fatalf("registry holds %d certificates, want 1", len(certs))
	}
}

func enrolled(t *testing.T, env *esttest.Env, id string) (tls.Certificate, crypto.Signer) {
	t.Helper()
	key := newKey(t)
	chain, err := client(t, env).Enroll(t.Context(), key, id, env.Token(t, id, "", time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := keystore.TLSCertificate([][]byte{chain[0].Raw, chain[1].Raw}, key)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func TestReenroll(t *testing.T) {
	env := esttest.Start(t, nil)
	cert, key := enrolled(t, env, "dev")
	c := client(t, env)
	same, err := c.Reenroll(t.Context(), cert, key)
	if err != nil {
		t.Fatalf("re-enroll with the same key: %v", err)
	}
	if !same[0].PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) || same[0].SerialNumber.Cmp(cert.Leaf.SerialNumber) == 0 {
		t.Fatal("re-enroll did not issue a new certificate for the same key")
	}
	next := newKey(t)
	rekeyed, err := c.Reenroll(t.Context(), cert, next)
	if err != nil {
		t.Fatalf("re-enroll with a new key: %v", err)
	}
	if !rekeyed[0].PublicKey.(*ecdsa.PublicKey).Equal(next.Public()) {
		t.Fatal("re-enroll did not certify the new key")
	}
	certs, _ := env.Registry.Certificates(t.Context(), "dev")
	if len(certs) != 3 {
		t.Fatalf("registry holds %d certificates, want 3", len(certs))
	}
	if e := lastEvent(t, env); e.Event != "reenroll" {
		t.Fatalf("audit = %+v", e)
	}
}

func TestReenrollRefusals(t *testing.T) {
	env := esttest.Start(t, nil)
	ctx := t.Context()
	c := client(t, env)

	revoked, rkey := enrolled(t, env, "revoked")
	if _, err := env.Registry.Revoke(ctx, "revoked", "key compromise"); err != nil {
		t.Fatal(err)
	}

	// An expired certificate from our CA, known to the registry.
	ekey := newKey(t)
	leaf, err := env.CA.IssueDevice(ekey.Public(), "expired", nil, time.Nanosecond)
	if err != nil {
		t.Fatal(err)
	}
	expired, _ := keystore.TLSCertificate([][]byte{leaf.Raw, env.CA.Issuing.Raw}, ekey)

	// A certificate from another CA with the same CN.
	foreignCA := testpki.New(t)
	fkey := newKey(t)
	foreign, _ := keystore.TLSCertificate(foreignCA.Client(t, "dev", fkey.Public()), fkey)

	// Ours, but never recorded (issued behind the registry's back).
	ukey := newKey(t)
	ul, _ := env.CA.IssueDevice(ukey.Public(), "ghost", nil, time.Hour)
	unknown, _ := keystore.TLSCertificate([][]byte{ul.Raw, env.CA.Issuing.Raw}, ukey)

	valid, vkey := enrolled(t, env, "valid")

	cases := []struct {
		name   string
		cert   *tls.Certificate
		key    crypto.Signer
		csrCN  string
		want   error
		reason string
	}{
		{"revoked", &revoked, rkey, "revoked", provisioning.ErrUnauthorized, "revoked"},
		{"expired", &expired, ekey, "expired", provisioning.ErrUnauthorized, "expired"},
		{"foreign CA", &foreign, fkey, "dev", provisioning.ErrUnauthorized, "not issued by this CA"},
		{"unknown to registry", &unknown, ukey, "ghost", provisioning.ErrForbidden, "unknown to the registry"},
		{"no client certificate", nil, vkey, "valid", provisioning.ErrUnauthorized, "needs the current device certificate"},
		{"CN change", &valid, vkey, "someone-else", provisioning.ErrForbidden, "does not match device ID"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(env.Events(t))
			body := csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: tc.csrCN}}, tc.key)
			resp := raw(t, env, http.MethodPost, provisioning.PathSimpleReenrol, "", "", body, tc.cert)
			err := (&provisioning.ServerError{StatusCode: resp.status, Reason: string(resp.body)})
			if !errors.Is(err, tc.want) || !strings.Contains(string(resp.body), tc.reason) {
				t.Fatalf("got %d %q, want %v with %q", resp.status, resp.body, tc.want, tc.reason)
			}
			ev := env.Events(t)
			if len(ev) != before+1 || ev[len(ev)-1].Event != "reenroll_refused" || !strings.Contains(ev[len(ev)-1].Reason, tc.reason) {
				t.Fatalf("audit after refusal: %+v", ev[before:])
			}
		})
	}
	// Through the client too: the sentinel reaches the caller.
	if _, err := c.Reenroll(ctx, revoked, rkey); !errors.Is(err, provisioning.ErrUnauthorized) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("client re-enroll with a revoked certificate = %v", err)
	}
}

// The client refuses a server that does not chain to its pinned root.
func TestClientPinsRoot(t *testing.T) {
	env := esttest.Start(t, nil)
	other := testpki.New(t)
	c, err := provisioning.NewClient(env.URL, other.Root)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.Enroll(t.Context(), newKey(t), "dev", "tok")
	if err == nil || !strings.Contains(err.Error(), "not signed by the pinned root") {
		t.Fatalf("enroll against a server of another CA = %v, want a pinned-root error", err)
	}
	if _, err := provisioning.NewClient("http://127.0.0.1:1", env.CA.Root); err == nil {
		t.Fatal("plain http EST URL accepted")
	}
}

// A server certificate that does not name the host the client dials is
// refused with an error naming the fix on the broker (issue 12 item 5).
func TestClientHostnameMismatchNamesFix(t *testing.T) {
	env := esttest.Start(t, func(cfg *server.Config) {
		if _, err := cfg.CA.ReissueServer([]string{"est.example.test"}); err != nil {
			t.Fatal(err)
		}
	})
	c, err := provisioning.NewClient(env.URL, env.CA.Root) // https://127.0.0.1:PORT
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.CACerts(t.Context())
	for _, want := range []string{"does not name", "broker server-cert", "--host 127.0.0.1"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("cacerts from a server certificate for another name = %v, want %q", err, want)
		}
	}
}

// Enrollments by result, refusals by reason and registry errors are counted.
func TestMetrics(t *testing.T) {
	m := prometheus.NewRegistry()
	env := esttest.Start(t, func(c *server.Config) { c.Metrics = m })
	enrolled(t, env, "dev")
	raw(t, env, http.MethodPost, provisioning.PathSimpleEnroll, "dev2", "wrong", csrB64(t, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev2"}}, newKey(t)), nil)
	rawType(t, env, provisioning.PathSimpleEnroll, "dev2", "wrong", []byte("x"), "text/plain")
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"mqtls_est_requests_total", map[string]string{"kind": "enroll", "result": "ok"}, 1},
		{"mqtls_est_requests_total", map[string]string{"kind": "enroll", "result": "refused"}, 2},
		{"mqtls_est_refusals_total", map[string]string{"reason": "token_invalid"}, 1},
		{"mqtls_est_refusals_total", map[string]string{"reason": "unsupported_media_type"}, 1},
		{"mqtls_registry_errors_total", nil, 0},
	} {
		if got := metricValue(t, m, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

func metricValue(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if labels[l.GetName()] != l.GetValue() {
					continue next
				}
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}
