package policy_test

import (
	"errors"
	"testing"

	"github.com/mqtls/mqtls/broker/policy"
)

const identities = `rules:
  - name: own-namespace
    match: {cn: "*"}
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
  - name: backend
    match: {ou: "backend"}
    client_ids: ["{cn}", "{cn}-*", "{ou}-worker", assigned]
    max_sessions: 8
    publish: ["devices/+/commands/#"]
    subscribe: ["devices/+/telemetry"]
  - name: all-but-secret
    match: {ou: "auditor"}
    overlap: filter
    subscribe: ["#"]
    deny: ["secret/#"]
`

func TestClientIDPatterns(t *testing.T) {
	p, err := policy.Parse([]byte(identities))
	if err != nil {
		t.Fatal(err)
	}
	dev := p.Compile(policy.Identity{CN: "dev-a"})
	be := p.Compile(policy.Identity{CN: "svc", OUs: []string{"backend"}})
	for _, tc := range []struct {
		perms *policy.Perms
		id    string
		want  bool
	}{
		{dev, "dev-a", true}, {dev, "dev-a-1", false}, {dev, "dev-b", false}, {dev, "", false},
		{be, "svc", true}, {be, "svc-1", true}, {be, "svc-replica-7", true}, {be, "backend-worker", true},
		{be, "svc1", false}, {be, "other-1", false}, {be, "myclientid", false},
	} {
		if got, _ := tc.perms.AllowClientID(tc.id); got != tc.want {
			t.Errorf("client ID %q: %v, want %v", tc.id, got, tc.want)
		}
	}
	if ok, _ := dev.AssignedIDs(); ok {
		t.Error("a device may use assigned IDs by default")
	}
	if ok, rule := be.AssignedIDs(); !ok || rule != "backend" {
		t.Errorf("backend assigned IDs: %v %q", ok, rule)
	}
	if dev.MaxSessions() != 0 || be.MaxSessions() != 8 {
		t.Errorf("max sessions %d %d", dev.MaxSessions(), be.MaxSessions())
	}
	// an unsafe CN is never substituted into a client-ID pattern
	evil := p.Compile(policy.Identity{CN: "*", OUs: []string{"backend"}})
	if ok, _ := evil.AllowClientID("anything"); ok {
		t.Error("CN \"*\" became a wildcard client-ID pattern")
	}
}

func TestSharedSubscriptions(t *testing.T) {
	p, _ := policy.Parse([]byte(identities))
	be := p.Compile(policy.Identity{CN: "svc", OUs: []string{"backend"}})
	for f, want := range map[string]bool{
		"$share/workers/devices/+/telemetry": true,
		"$share/w/devices/a/telemetry":       true,
		"$share/workers/devices/#":           false, // not inside a grant
		"$share//devices/+/telemetry":        false,
		"$share/w+/devices/+/telemetry":      false,
		"$share/workers":                     false,
		"devices/+/telemetry":                true,
	} {
		if got := be.AllowFilter(f); got != want {
			t.Errorf("%q: %v, want %v", f, got, want)
		}
	}
}

func TestOverlapFilter(t *testing.T) {
	p, _ := policy.Parse([]byte(identities))
	aud := p.Compile(policy.Identity{CN: "aud", OUs: []string{"auditor"}})
	for f, want := range map[string]bool{"#": true, "+/+": true, "public/#": true, "secret/#": false, "secret/x": false} {
		if got := aud.AllowFilter(f); got != want {
			t.Errorf("filter %q: %v, want %v", f, got, want)
		}
	}
	if aud.Allow("secret/x", policy.Subscribe) || !aud.Allow("public/x", policy.Subscribe) {
		t.Error("deliveries: secret must be withheld, public delivered")
	}
	if !aud.OverlapsDeny("#") || aud.OverlapsDeny("public/#") || !aud.Filtering() {
		t.Error("overlap reporting")
	}
	// the default stays refuse
	strict, _ := policy.Parse([]byte("rules:\n  - name: r\n    match: {cn: \"*\"}\n    subscribe: [\"#\"]\n    deny: [\"secret/#\"]\n"))
	if strict.Compile(policy.Identity{CN: "a"}).AllowFilter("#") {
		t.Error("default overlap mode granted # over a deny")
	}
}

func TestDecide(t *testing.T) {
	p, _ := policy.Parse([]byte(identities))
	be := p.Compile(policy.Identity{CN: "svc", OUs: []string{"backend"}})
	if d := be.Decide("devices/x/commands/reboot", policy.Publish); !d.Allowed || d.Rule != "backend" || d.Filter != "devices/+/commands/#" {
		t.Errorf("publish decision %+v", d)
	}
	aud := p.Compile(policy.Identity{CN: "aud", OUs: []string{"auditor"}})
	if d := aud.Decide("secret/x", policy.Subscribe); d.Allowed || d.Rule != "all-but-secret" || d.Filter != "secret/#" {
		t.Errorf("deny decision %+v", d)
	}
	if d := be.DecideFilter("#"); d.Allowed || d.Reason != "no rule grants it" {
		t.Errorf("filter decision %+v", d)
	}
}

func TestIdentityRuleErrors(t *testing.T) {
	for name, src := range map[string]string{
		"bad overlap":      "rules:\n  - name: r\n    match: {cn: \"*\"}\n    overlap: maybe\n    subscribe: [\"#\"]\n",
		"negative max":     "rules:\n  - name: r\n    match: {cn: \"*\"}\n    max_sessions: -1\n    subscribe: [\"#\"]\n",
		"bad placeholder":  "rules:\n  - name: r\n    match: {cn: \"*\"}\n    client_ids: [\"{serial}\"]\n",
		"bad glob":         "rules:\n  - name: r\n    match: {cn: \"*\"}\n    client_ids: [\"[\"]\n",
		"empty client_ids": "rules:\n  - name: r\n    match: {cn: \"*\"}\n    client_ids: []\n",
	} {
		if _, err := policy.Parse([]byte(src)); !errors.Is(err, policy.ErrSyntax) {
			t.Errorf("%s: %v, want ErrSyntax", name, err)
		}
	}
}

func TestGatewayChildren(t *testing.T) {
	p, err := policy.Parse([]byte(`rules:
  - name: own-namespace
    match: {cn: "*"}
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
  - name: gateways
    match: {ou: "gateway"}
    publish: ["devices/{child}/#"]
    subscribe: ["devices/{child}/commands/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	id := policy.Identity{CN: "gw-1", OUs: []string{"gateway"}, Children: []string{"c-1", "c-2", "bad/child", "+"}}
	if !p.UsesChildren(id) || p.UsesChildren(policy.Identity{CN: "dev-a"}) {
		t.Fatal("UsesChildren")
	}
	gw := p.Compile(id)
	for _, tc := range []struct {
		topic string
		a     policy.Access
		want  bool
	}{
		{"devices/c-1/telemetry", policy.Publish, true},
		{"devices/c-2/status", policy.Publish, true},
		{"devices/c-1/commands/reboot", policy.Subscribe, true},
		{"devices/c-1/telemetry", policy.Subscribe, false}, // only their commands
		{"devices/c-3/telemetry", policy.Publish, false},   // not a child
		{"devices/gw-1/telemetry", policy.Publish, true},   // its own namespace
		{"devices/bad/child/x", policy.Publish, false},     // unsafe child never substituted
	} {
		if got := gw.Allow(tc.topic, tc.a); got != tc.want {
			t.Errorf("%s %s: %v, want %v", tc.a, tc.topic, got, tc.want)
		}
	}
	if gw.AllowFilter("devices/+/commands/#") || !gw.AllowFilter("devices/c-2/commands/#") {
		t.Error("gateway subscribe filters")
	}
}
