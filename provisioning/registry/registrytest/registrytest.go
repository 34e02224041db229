// Package registrytest is the conformance suite every registry backend
// passes: token single use under 20-way concurrency, revocation burning
// tokens and visible to other handles at once, re-enrollment racing a
// revocation, idempotent enrollment replay, audit aggregation and
// retention, the CA binding, token attestation policies, the one EK ↔
// one device binding and attestation challenges (single use across
// handles under 20-way concurrency, expiry, a bound per device).
package registrytest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mqtls/mqtls/provisioning/registry"
)

// Backend makes registries for the suite.
type Backend struct {
	// Create returns a new, empty registry bound to rootSHA256, and a
	// function opening another handle on the same registry (as another
	// process would). Both are closed when t ends.
	Create func(t *testing.T, rootSHA256 string) (reg registry.Registry, reopen func(t *testing.T) registry.Registry)
}

// Root is the fingerprint the suite binds registries to.
const Root = "5d41402abc4b2a76b9719d911017c592aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

// Run runs the suite.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name string
		fn   func(*testing.T, Backend)
	}{
		{"Tokens", testTokens},
		{"TokenSingleUseUnder20Concurrent", testTokenSingleUse},
		{"RevokeBurnsTokensAndNeedsReinstate", testRevokeBurnsTokens},
		{"RevokeVisibleToOtherHandles", testRevokeVisible},
		{"ReenrollRacingRevoke", testReenrollRace},
		{"Replay", testReplay},
		{"AuditAggregationAndRetention", testAudit},
		{"CABinding", testBinding},
		{"ChangesSignalRevocation", testChanges},
		{"GatewayChildren", testChildren},
		{"TokenAttestPolicy", testTokenAttest},
		{"EKBinding", testEKBinding},
		{"AttestChallenges", testChallenges},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, b) })
	}
}

var serials sync.Map

func cert(id, spki string) registry.Cert {
	n := time.Now().UnixNano()
	s := fmt.Sprintf("%x", n)
	for {
		if _, dup := serials.LoadOrStore(s, true); !dup {
			break
		}
		n++
		s = fmt.Sprintf("%x", n)
	}
	return registry.Cert{Serial: s, DeviceID: id, SPKISHA256: spki, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), DER: []byte("DER of " + s)}
}

// enroll mints a token for id and enrolls a certificate with key spki.
func enroll(t *testing.T, r registry.Registry, id, spki string) (registry.Cert, string) {
	t.Helper()
	tok, err := r.CreateToken(t.Context(), id, "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	g, err := r.CheckToken(t.Context(), id, tok)
	if err != nil {
		t.Fatal(err)
	}
	c := cert(id, spki)
	if err := r.Enrolled(t.Context(), g, c, "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	return c, tok
}

func testTokens(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	tok, err := r.CreateToken(ctx, "dev", "g", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.CheckToken(ctx, "dev", tok+"x"); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("wrong token: %v", err)
	}
	if _, err := r.CheckToken(ctx, "other", tok); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("token of another device: %v", err)
	}
	g, err := r.CheckToken(ctx, "dev", tok)
	if err != nil || g.Group != "g" {
		t.Fatalf("CheckToken = %+v, %v", g, err)
	}
	c := cert("dev", "00")
	if err := r.Enrolled(ctx, g, c, "127.0.0.1:1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Enrolled(ctx, g, cert("dev", "00"), ""); !errors.Is(err, registry.ErrTokenUsed) {
		t.Fatalf("second Enrolled with one grant = %v, want ErrTokenUsed", err)
	}
	if _, err := r.CheckToken(ctx, "dev", tok); !errors.Is(err, registry.ErrTokenUsed) {
		t.Errorf("used token: %v", err)
	}
	got, err := r.Certificate(ctx, c.Serial)
	if err != nil || got.Status != registry.StatusValid || got.DeviceID != "dev" || string(got.DER) != string(c.DER) {
		t.Fatalf("Certificate = %+v, %v", got, err)
	}
	if _, err := r.Certificate(ctx, "ffff"); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("Certificate(unknown) = %v", err)
	}
	d, err := r.Device(ctx, "dev")
	if err != nil || d.Status != "enrolled" || d.Group != "g" || d.Certificates != 1 || d.ValidUntil.IsZero() {
		t.Fatalf("Device = %+v, %v", d, err)
	}
	short, _ := r.CreateToken(ctx, "dev2", "", 30*time.Millisecond)
	eventually(t, "token expired", func() bool {
		_, err := r.CheckToken(ctx, "dev2", short)
		return errors.Is(err, registry.ErrTokenExpired)
	})
	if _, err := r.CreateToken(ctx, "dev3", "", 0); err == nil {
		t.Error("token with zero lifetime accepted")
	}
	if _, err := r.CreateToken(ctx, "a/b", "", time.Hour); err == nil {
		t.Error("token for device ID a/b accepted")
	}
	devs, err := r.Devices(ctx)
	if err != nil || len(devs) != 2 || devs[0].ID != "dev" || devs[1].ID != "dev2" {
		t.Fatalf("Devices = %+v, %v", devs, err)
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 5s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// One token, 20 concurrent enrollments: exactly one certificate.
func testTokenSingleUse(t *testing.T, b Backend) {
	r, reopen := b.Create(t, Root)
	other := reopen(t)
	tok, _ := r.CreateToken(t.Context(), "dev", "", time.Hour)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, used := 0, 0
	for i := range 20 {
		wg.Go(func() {
			reg := r
			if i%2 == 1 {
				reg = other
			}
			g, err := reg.CheckToken(t.Context(), "dev", tok)
			if err == nil {
				err = reg.Enrolled(t.Context(), g, cert("dev", fmt.Sprint(i)), "")
			}
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, registry.ErrTokenUsed):
				used++
			default:
				t.Errorf("enrollment %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	certs, err := r.Certificates(t.Context(), "dev")
	if ok != 1 || used != 19 || err != nil || len(certs) != 1 {
		t.Fatalf("20 concurrent enrollments with one token: %d succeeded, %d ErrTokenUsed, %d certificates (%v); want 1, 19, 1", ok, used, len(certs), err)
	}
}

// Issue 10 item 1: revoking burns the device's unused tokens (even one
// already checked by an enrollment in flight), and a revoked device gets
// no token until it is reinstated, which is audited.
func testRevokeBurnsTokens(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	enroll(t, r, "dev", "k1")
	pending, _ := r.CreateToken(ctx, "dev", "", time.Hour)
	inFlight, _ := r.CreateToken(ctx, "dev", "", time.Hour)
	g, err := r.CheckToken(ctx, "dev", inFlight)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := r.Revoke(ctx, "dev", "stolen"); err != nil || n != 1 {
		t.Fatalf("Revoke = %d, %v", n, err)
	}
	if _, err := r.CheckToken(ctx, "dev", pending); !errors.Is(err, registry.ErrTokenRevoked) {
		t.Errorf("token minted before the revocation: CheckToken = %v, want ErrTokenRevoked", err)
	}
	if err := r.Enrolled(ctx, g, cert("dev", "k2"), ""); !errors.Is(err, registry.ErrRevoked) {
		t.Errorf("enrollment in flight across the revocation: %v, want ErrRevoked", err)
	}
	if d, _ := r.Device(ctx, "dev"); d.Status != "revoked" {
		t.Errorf("device status after revoke and a stale token = %q, want revoked", d.Status)
	}
	if _, err := r.CreateToken(ctx, "dev", "", time.Hour); !errors.Is(err, registry.ErrRevoked) {
		t.Errorf("CreateToken(revoked device) = %v, want ErrRevoked", err)
	}
	if ids, err := r.RevokedDevices(ctx); err != nil || !slices.Equal(ids, []string{"dev"}) {
		t.Errorf("RevokedDevices = %v, %v", ids, err)
	}
	if err := r.Reinstate(ctx, "dev", "returned by customer"); err != nil {
		t.Fatal(err)
	}
	if err := r.Reinstate(ctx, "ghost", ""); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("Reinstate(unknown) = %v", err)
	}
	if ids, err := r.RevokedDevices(ctx); err != nil || len(ids) != 0 {
		t.Errorf("RevokedDevices after reinstate = %v, %v", ids, err)
	}
	c, _ := enroll(t, r, "dev", "k3")
	if got, _ := r.Certificate(ctx, c.Serial); got.Status != registry.StatusValid {
		t.Errorf("certificate after reinstate: %+v", got)
	}
	events, _, _ := r.Events(ctx, 0, 1000)
	found := false
	for _, e := range events {
		if e.Event == "reinstate" && e.DeviceID == "dev" && e.Reason == "returned by customer" {
			found = true
		}
	}
	if !found {
		t.Errorf("no reinstate audit record in %+v", events)
	}
}

func testRevokeVisible(t *testing.T, b Backend) {
	a, reopen := b.Create(t, Root)
	other := reopen(t)
	ctx := t.Context()
	c, _ := enroll(t, a, "dev", "k")
	since := time.Now().Add(-time.Second)
	if n, err := other.Revoke(ctx, "dev", "stolen"); err != nil || n != 1 {
		t.Fatalf("Revoke = %d, %v", n, err)
	}
	got, err := a.Certificate(ctx, c.Serial)
	if err != nil || got.Status != registry.StatusRevoked || got.RevocationReason != "stolen" || got.RevokedAt.IsZero() {
		t.Fatalf("certificate after revoke = %+v, %v", got, err)
	}
	revoked, err := a.RevokedSince(ctx, since)
	if err != nil || len(revoked) != 1 || revoked[0].Serial != c.Serial {
		t.Fatalf("RevokedSince = %+v, %v", revoked, err)
	}
	if ids, err := a.RevokedDevices(ctx); err != nil || !slices.Equal(ids, []string{"dev"}) {
		t.Fatalf("RevokedDevices = %v, %v", ids, err)
	}
	if _, err := other.Revoke(ctx, "ghost", ""); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Revoke(unknown) = %v", err)
	}
}

// Issue 10 item 2: a revocation landing between the server's check of the
// presented certificate and the record of the new one leaves no valid
// certificate; and 20 concurrent re-enrollments racing one revocation
// leave none either.
func testReenrollRace(t *testing.T, b Backend) {
	r, reopen := b.Create(t, Root)
	other := reopen(t)
	ctx := t.Context()
	prev, _ := enroll(t, r, "dev", "k")
	// the server's check passes ...
	if c, err := r.Certificate(ctx, prev.Serial); err != nil || c.Status != registry.StatusValid {
		t.Fatal(c, err)
	}
	// ... the revocation lands (the injected pause) ...
	if _, err := other.Revoke(ctx, "dev", "stolen"); err != nil {
		t.Fatal(err)
	}
	// ... and the record must be refused.
	if err := r.Reenrolled(ctx, prev.Serial, cert("dev", "k2"), ""); !errors.Is(err, registry.ErrRevoked) {
		t.Fatalf("Reenrolled after a revocation = %v, want ErrRevoked", err)
	}
	if err := r.Reenrolled(ctx, "ffff", cert("dev", "k2"), ""); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Reenrolled(unknown previous) = %v, want ErrNotFound", err)
	}
	assertNoValid(t, r, "dev")

	prev, _ = enroll(t, r, "dev2", "k")
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range 20 {
		wg.Go(func() {
			<-start
			reg := r
			if i%2 == 1 {
				reg = other
			}
			err := reg.Reenrolled(ctx, prev.Serial, cert("dev2", fmt.Sprint(i)), "")
			if err != nil && !errors.Is(err, registry.ErrRevoked) {
				t.Errorf("re-enrollment %d: %v", i, err)
			}
		})
	}
	wg.Go(func() {
		<-start
		if _, err := other.Revoke(ctx, "dev2", "stolen"); err != nil {
			t.Error(err)
		}
	})
	close(start)
	wg.Wait()
	assertNoValid(t, r, "dev2")
}

func assertNoValid(t *testing.T, r registry.Registry, id string) {
	t.Helper()
	certs, err := r.Certificates(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range certs {
		if c.Status != registry.StatusRevoked {
			t.Errorf("certificate %s of revoked device %s is %s", c.Serial, id, c.Status)
		}
	}
}

// Issue 10 item 4: a retry with the same token and key gets the
// certificate already issued; another key is refused.
func testReplay(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	c, tok := enroll(t, r, "dev", "key-a")
	got, err := r.Replay(ctx, "dev", tok, "key-a", "127.0.0.1:2")
	if err != nil || got.Serial != c.Serial || string(got.DER) != string(c.DER) {
		t.Fatalf("Replay(same key) = %+v, %v", got, err)
	}
	if _, err := r.Replay(ctx, "dev", tok, "key-b", ""); !errors.Is(err, registry.ErrKeyMismatch) {
		t.Errorf("Replay(other key) = %v, want ErrKeyMismatch", err)
	}
	if _, err := r.Replay(ctx, "dev", tok+"x", "key-a", ""); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("Replay(wrong token) = %v, want ErrTokenInvalid", err)
	}
	unused, _ := r.CreateToken(ctx, "dev9", "", time.Hour)
	if _, err := r.Replay(ctx, "dev9", unused, "key-a", ""); !errors.Is(err, registry.ErrTokenInvalid) {
		t.Errorf("Replay(unused token) = %v, want ErrTokenInvalid", err)
	}
	certs, _ := r.Certificates(ctx, "dev")
	if len(certs) != 1 {
		t.Errorf("%d certificates after replays, want 1", len(certs))
	}
	events, _, _ := r.Events(ctx, 0, 100)
	if n := count(events, "enroll_replay"); n != 1 {
		t.Errorf("%d enroll_replay records, want 1: %+v", n, events)
	}
	// revoked meanwhile: no replay
	if _, err := r.Revoke(ctx, "dev", "stolen"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Replay(ctx, "dev", tok, "key-a", ""); !errors.Is(err, registry.ErrRevoked) {
		t.Errorf("Replay after revoke = %v, want ErrRevoked", err)
	}
	// past the token's lifetime: no replay
	short, _ := r.CreateToken(ctx, "dev2", "", 500*time.Millisecond) // long enough to check and enroll under load
	g, err := r.CheckToken(ctx, "dev2", short)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Enrolled(ctx, g, cert("dev2", "k"), ""); err != nil {
		t.Fatal(err)
	}
	eventually(t, "replay refused after the token's lifetime", func() bool {
		_, err := r.Replay(ctx, "dev2", short, "k", "")
		return errors.Is(err, registry.ErrTokenExpired)
	})
}

func count(events []registry.Event, kind string) int {
	n := 0
	for _, e := range events {
		if e.Event == kind {
			n++
		}
	}
	return n
}

// Issue 10 item 5: repeated refusals fold into one record; retention
// bounds rows and age.
func testAudit(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	for range 100 {
		if err := r.Audit(ctx, registry.Event{Event: "enroll_refused", DeviceID: "dev", Remote: "10.0.0.1", Reason: "token refused", Aggregate: true}); err != nil {
			t.Fatal(err)
		}
	}
	r.Audit(ctx, registry.Event{Event: "enroll_refused", DeviceID: "dev", Remote: "10.0.0.2", Reason: "token refused", Aggregate: true})
	events, last, err := r.Events(ctx, 0, 1000)
	if err != nil || len(events) != 2 || events[0].Count != 100 || events[1].Count != 1 || events[0].LastAt.Before(events[0].At) {
		t.Fatalf("100 identical refusals + 1 from elsewhere: %+v, %v; want 2 records, counts 100 and 1", events, err)
	}
	// not aggregated: each is a record
	for i := range 50 {
		r.Audit(ctx, registry.Event{Event: "enroll", DeviceID: fmt.Sprint("d", i)})
	}
	old := time.Now().Add(-48 * time.Hour)
	for range 5 {
		r.Audit(ctx, registry.Event{At: old, Event: "token", DeviceID: "old"})
	}
	n, err := r.PruneAudit(ctx, 0, 24*time.Hour)
	if err != nil || n != 5 {
		t.Fatalf("PruneAudit(age 24h) = %d, %v; want 5", n, err)
	}
	n, err = r.PruneAudit(ctx, 10, 0)
	if err != nil || n != 42 {
		t.Fatalf("PruneAudit(10 rows) = %d, %v; want 42", n, err)
	}
	events, _, _ = r.Events(ctx, 0, 1000)
	if len(events) != 10 || events[9].DeviceID != "d49" {
		t.Fatalf("after retention: %d records, want the newest 10", len(events))
	}
	_ = last
}

func testBinding(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	if err := r.Check(t.Context(), Root); err != nil {
		t.Fatalf("Check(own root) = %v", err)
	}
	other := "ff" + Root[2:]
	if err := r.Check(t.Context(), other); !errors.Is(err, registry.ErrForeign) {
		t.Fatalf("Check(another root) = %v, want ErrForeign", err)
	}
	if err := r.Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// A backend that signals changes (optional capability) does so within a
// second of a revocation by another handle.
func testChanges(t *testing.T, b Backend) {
	r, reopen := b.Create(t, Root)
	n, ok := r.(interface {
		Changes(ctx context.Context) <-chan struct{}
	})
	if !ok {
		t.Log("backend does not signal changes (optional: the broker polls it)")
		return
	}
	other := reopen(t)
	if _, err := r.CreateToken(t.Context(), "dev", "", time.Hour); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	ch := n.Changes(ctx)
	select { // the first signal: watching
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("Changes: no first signal within 10s")
	}
	drain := time.After(300 * time.Millisecond) // let a signal from the CreateToken commit pass
	for done := false; !done; {
		select {
		case <-ch:
		case <-drain:
			done = true
		}
	}
	start := time.Now()
	if _, err := other.Revoke(t.Context(), "dev", "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
		t.Logf("change signalled %v after the revocation committed", time.Since(start))
	case <-time.After(time.Second):
		t.Fatal("no change signalled within 1s of a revocation")
	}
	cancel()
	for range ch { // closed when ctx ends
	}
}

func testChildren(t *testing.T, b Backend) {
	r, reopen := b.Create(t, Root)
	ctx := t.Context()
	if err := r.SetChildren(ctx, "gw-1", []string{"c-1"}); !errors.Is(err, registry.ErrNotFound) {
		t.Errorf("children of an unknown gateway: %v, want ErrNotFound", err)
	}
	enroll(t, r, "gw-1", "01")
	before := time.Now().Add(-time.Second)
	children := make([]string, 50)
	for i := range children {
		children[i] = fmt.Sprintf("child-%02d", 49-i)
	}
	if err := r.SetChildren(ctx, "gw-1", append(children, "child-00")); err != nil {
		t.Fatal(err)
	}
	other := reopen(t)
	got, err := other.Children(ctx, "gw-1")
	if err != nil || len(got) != 50 || !slices.IsSorted(got) || got[0] != "child-00" {
		t.Fatalf("Children = %v, %v (want 50, sorted, deduplicated)", got, err)
	}
	changed, err := other.GatewaysChangedSince(ctx, before)
	if err != nil || len(changed["gw-1"]) != 50 {
		t.Fatalf("GatewaysChangedSince = %v, %v", changed, err)
	}
	if changed, _ := other.GatewaysChangedSince(ctx, time.Now().Add(time.Hour)); len(changed) != 0 {
		t.Errorf("changes in the future: %v", changed)
	}
	for _, bad := range [][]string{{"a/b"}, {"+"}, {""}, {"gw-1"}} {
		if err := r.SetChildren(ctx, "gw-1", bad); err == nil {
			t.Errorf("children %q accepted", bad)
		}
	}
	if got, _ := r.Children(ctx, "gw-1"); len(got) != 50 {
		t.Errorf("a refused change altered the children: %d", len(got))
	}
	if err := r.SetChildren(ctx, "gw-1", nil); err != nil {
		t.Fatal(err)
	}
	if got, _ := other.Children(ctx, "gw-1"); len(got) != 0 {
		t.Errorf("children after clearing: %v", got)
	}
	if got, _ := r.Children(ctx, "nobody"); len(got) != 0 {
		t.Errorf("children of a device that is no gateway: %v", got)
	}
}

func testTokenAttest(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	for _, a := range []string{registry.AttestDefault, registry.AttestRequired, registry.AttestOptional} {
		toks, err := r.CreateTokensWith(ctx, []string{"dev-" + a}, registry.TokenOptions{TTL: time.Hour, Attest: a})
		if err != nil {
			t.Fatal(err)
		}
		g, err := r.CheckToken(ctx, "dev-"+a, toks[0])
		if err != nil || g.Attest != a {
			t.Fatalf("grant attest = %q, %v; want %q", g.Attest, err, a)
		}
	}
	if _, err := r.CreateTokensWith(ctx, []string{"dev"}, registry.TokenOptions{TTL: time.Hour, Attest: "sometimes"}); err == nil {
		t.Fatal("attestation policy \"sometimes\" accepted")
	}
}

// enrollEK enrolls id with a certificate attested by ek.
func enrollEK(t *testing.T, r registry.Registry, id string, ek registry.EK) error {
	t.Helper()
	tok, err := r.CreateToken(t.Context(), id, "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	g, err := r.CheckToken(t.Context(), id, tok)
	if err != nil {
		t.Fatal(err)
	}
	c := cert(id, "spki-"+id)
	c.EK = ek
	return r.Enrolled(t.Context(), g, c, "127.0.0.1:1")
}

func testEKBinding(t *testing.T, b Backend) {
	r, _ := b.Create(t, Root)
	ctx := t.Context()
	ek1 := registry.EK{SHA256: "e1", Issuer: "CN=mfr", Serial: "1"}
	ek2 := registry.EK{SHA256: "e2", Issuer: "CN=mfr", Serial: "2"}
	if err := enrollEK(t, r, "a", ek1); err != nil {
		t.Fatal(err)
	}
	if d, err := r.Device(ctx, "a"); err != nil || d.EK != "e1" {
		t.Fatalf("device a EK = %q, %v", d.EK, err)
	}
	if ev, _, _ := r.Events(ctx, 0, 1000); !slices.ContainsFunc(ev, func(e registry.Event) bool {
		return e.Event == "enroll" && e.DeviceID == "a" && strings.Contains(e.Reason, "TPM-attested: EK e1")
	}) {
		t.Fatal("the attested enrollment's audit record does not name the EK")
	}
	if err := enrollEK(t, r, "a", ek1); err != nil {
		t.Fatalf("same device, same EK again: %v", err)
	}
	if err := enrollEK(t, r, "b", ek1); !errors.Is(err, registry.ErrEKBound) {
		t.Fatalf("second device from the same TPM: %v, want ErrEKBound", err)
	}
	if err := enrollEK(t, r, "a", ek2); !errors.Is(err, registry.ErrEKBound) {
		t.Fatalf("same device from another TPM: %v, want ErrEKBound", err)
	}
	if err := enrollEK(t, r, "a", registry.EK{}); !errors.Is(err, registry.ErrEKBound) {
		t.Fatalf("bound device without attestation: %v, want ErrEKBound", err)
	}
	if _, err := r.Device(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	// nothing half-written by the refusals: b has no certificate, no EK
	if d, _ := r.Device(ctx, "b"); d.EK != "" || d.Certificates != 0 {
		t.Fatalf("refused device b = %+v", d)
	}
	if err := r.ReleaseEK(ctx, "b", "none"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("ReleaseEK(unbound) = %v, want ErrNotFound", err)
	}
	if err := r.ReleaseEK(ctx, "a", "board replaced (ticket 7)"); err != nil {
		t.Fatal(err)
	}
	if err := enrollEK(t, r, "a", ek2); err != nil {
		t.Fatalf("after release, another TPM: %v", err)
	}
	if err := enrollEK(t, r, "b", ek1); err != nil {
		t.Fatalf("after release, the old TPM for another device: %v", err)
	}
	certs, err := r.Certificates(ctx, "a")
	if err != nil || len(certs) != 3 || certs[0].EK.SHA256 != "e2" {
		t.Fatalf("certificates of a = %+v, %v", certs, err)
	}
	ev, _, _ := r.Events(ctx, 0, 1000)
	if !slices.ContainsFunc(ev, func(e registry.Event) bool {
		return e.Event == "ek_release" && e.DeviceID == "a" && e.Reason == "EK e1 released: board replaced (ticket 7)"
	}) {
		t.Fatalf("no ek_release audit record in %+v", ev)
	}
}

// Attestation challenges: stored on one handle and taken on another (two
// servers on one registry), once only even by 20 concurrent takers,
// expired ones purged, at most perDevice pending per device.
func testChallenges(t *testing.T, b Backend) {
	r, reopen := b.Create(t, Root)
	other := reopen(t)
	ctx := t.Context()
	future := time.Now().Add(time.Minute)
	if err := r.PutChallenge(ctx, registry.Challenge{ID: "x", DeviceID: "nobody", Expires: future, Data: []byte("d")}, 2); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("challenge for an unknown device: %v, want ErrNotFound", err)
	}
	if _, err := r.CreateToken(ctx, "dev", "", time.Hour); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"c1", "c2"} {
		if err := r.PutChallenge(ctx, registry.Challenge{ID: id, DeviceID: "dev", Expires: future, Data: []byte("data " + id)}, 2); err != nil {
			t.Fatal(err)
		}
	}
	if err := other.PutChallenge(ctx, registry.Challenge{ID: "c3", DeviceID: "dev", Expires: future, Data: []byte("d")}, 2); !errors.Is(err, registry.ErrChallengeLimit) {
		t.Fatalf("third pending challenge with a bound of 2: %v, want ErrChallengeLimit", err)
	}
	c, err := other.TakeChallenge(ctx, "c1")
	if err != nil || c.DeviceID != "dev" || string(c.Data) != "data c1" || !c.Expires.Equal(future.Truncate(time.Millisecond)) {
		t.Fatalf("TakeChallenge on another handle = %+v, %v", c, err)
	}
	if _, err := r.TakeChallenge(ctx, "c1"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("second take: %v, want ErrNotFound", err)
	}

	var wg sync.WaitGroup
	var got atomic.Int32
	for i := range 20 {
		wg.Go(func() {
			reg := r
			if i%2 == 1 {
				reg = other
			}
			_, err := reg.TakeChallenge(ctx, "c2")
			switch {
			case err == nil:
				got.Add(1)
			case !errors.Is(err, registry.ErrNotFound):
				t.Errorf("take %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if got.Load() != 1 {
		t.Fatalf("20 concurrent takes of one challenge: %d succeeded, want 1", got.Load())
	}

	// An expired challenge is returned to its taker (who reports the
	// expiry) until the next PutChallenge purges it.
	past := time.Now().Add(-time.Second)
	for _, id := range []string{"old1", "old2"} {
		if err := r.PutChallenge(ctx, registry.Challenge{ID: id, DeviceID: "dev", Expires: past, Data: []byte("d")}, 1); err != nil {
			t.Fatalf("put %s (the expired one before it does not count): %v", id, err)
		}
	}
	if c, err := r.TakeChallenge(ctx, "old2"); err != nil || !c.Expires.Before(time.Now()) {
		t.Fatalf("take of an expired challenge = %+v, %v; want it, with its expiry", c, err)
	}
	if _, err := r.TakeChallenge(ctx, "old1"); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("expired challenge after a later put: %v, want ErrNotFound (purged)", err)
	}
}
