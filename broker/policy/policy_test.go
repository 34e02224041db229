package policy_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/broker/policy"
)

func TestMatches(t *testing.T) {
	cases := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/+", "a/b", true},
		{"a/+", "a/b/c", false},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"#", "a/b", true},
		{"#", "$SYS/x", false},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/x", true},
		{"a/+/c", "a//c", true},
		{"+", "", false},
		{"a/b", "a/b/", false},
	}
	for _, c := range cases {
		if got := policy.Matches(c.filter, c.topic); got != c.want && policy.ValidTopic(c.topic) {
			t.Errorf("Matches(%q, %q) = %v, want %v", c.filter, c.topic, got, c.want)
		}
	}
}

func TestContains(t *testing.T) {
	cases := []struct {
		grant, filter string
		want          bool
	}{
		{"devices/a/#", "devices/a/#", true},
		{"devices/a/#", "devices/a/+/x", true},
		{"devices/a/#", "devices/a", true},
		{"devices/a/#", "devices/+/x", false},
		{"devices/a/#", "#", false},
		{"devices/a/#", "+/#", false},
		{"devices/a/#", "devices/#", false},
		{"devices/+/telemetry", "devices/a/telemetry", true},
		{"devices/+/telemetry", "devices/+/telemetry", true},
		{"devices/+/telemetry", "devices/#", false},
		{"#", "$SYS/#", false},
		{"#", "+/x", true},
		{"+/x", "$SYS/x", false},
		{"$SYS/#", "$SYS/+/x", true},
		{"a/b", "a/b/#", false},
		{"a/+", "a/#", false},
	}
	for _, c := range cases {
		if got := policy.Contains(c.grant, c.filter); got != c.want {
			t.Errorf("Contains(%q, %q) = %v, want %v", c.grant, c.filter, got, c.want)
		}
	}
}

func TestDefaultPolicy(t *testing.T) {
	p := policy.Default().Compile(policy.Identity{CN: "dev-1"})
	for _, c := range []struct {
		topic string
		a     policy.Access
		want  bool
	}{
		{"devices/dev-1/telemetry", policy.Publish, true},
		{"devices/dev-1/a/b", policy.Subscribe, true},
		{"devices/dev-2/telemetry", policy.Publish, false},
		{"devices/dev-1x/telemetry", policy.Publish, false},
		{"devices", policy.Publish, false},
		{"$SYS/broker/uptime", policy.Subscribe, false},
		{"devices/dev-1/+", policy.Publish, false}, // wildcard in a topic name
	} {
		if got := p.Allow(c.topic, c.a); got != c.want {
			t.Errorf("Allow(%q, %v) = %v, want %v", c.topic, c.a, got, c.want)
		}
	}
	for _, c := range []struct {
		filter string
		want   bool
	}{
		{"devices/dev-1/#", true},
		{"devices/dev-1/+/x", true},
		{"devices/dev-1", true},
		{"#", false},
		{"devices/#", false},
		{"devices/+/telemetry", false},
		{"$SYS/#", false},
		{"devices/dev-2/#", false},
		{"+/#", false},
		{"devices/dev-1/#/x", false}, // invalid filter
	} {
		if got := p.AllowFilter(c.filter); got != c.want {
			t.Errorf("AllowFilter(%q) = %v, want %v", c.filter, got, c.want)
		}
	}
}

// A CN carrying MQTT syntax never reaches a template.
func TestUnsafeIdentityValues(t *testing.T) {
	for _, cn := range []string{"+", "#", "a/b", "$SYS", "a\x00", "", strings.Repeat("x", 65)} {
		p := policy.Default().Compile(policy.Identity{CN: cn})
		for _, topic := range []string{"devices/x/y", "devices/" + cn + "/y"} {
			if policy.ValidTopic(topic) && p.Allow(topic, policy.Publish) {
				t.Errorf("CN %q may publish to %q", cn, topic)
			}
		}
		if p.AllowFilter("devices/#") || p.AllowFilter("#") {
			t.Errorf("CN %q may subscribe broadly", cn)
		}
	}
	pol, _ := policy.Parse([]byte("rules:\n  - name: g\n    match: {cn: \"*\"}\n    subscribe: [\"groups/{ou}/#\"]\n"))
	p := pol.Compile(policy.Identity{CN: "d", OUs: []string{"#", "ok"}})
	if p.AllowFilter("groups/#") || !p.AllowFilter("groups/ok/#") {
		t.Error("an OU with '#' widened the grant, or a safe OU was dropped")
	}
}

func TestExamplePolicy(t *testing.T) {
	pol, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		t.Fatal(err)
	}
	backend := pol.Compile(policy.Identity{CN: "svc", OUs: []string{"backend"}})
	if !backend.Allow("devices/dev-1/commands/reboot", policy.Publish) || !backend.AllowFilter("devices/+/telemetry") || !backend.AllowFilter("$SYS/#") {
		t.Error("backend lacks its grants")
	}
	if backend.AllowFilter("devices/#") || backend.Allow("devices/dev-1/telemetry", policy.Publish) {
		t.Error("backend has more than its grants")
	}
	lab := pol.Compile(policy.Identity{CN: "lab-7"})
	if lab.Allow("devices/lab-7/telemetry", policy.Publish) || lab.AllowFilter("devices/lab-7/#") {
		t.Error("deny did not win over the own-namespace grant")
	}
	if got := lab.Rules(); len(got) != 2 || got[1] != "quarantine" {
		t.Errorf("matched rules = %v", got)
	}
	sans := pol.Compile(policy.Identity{CN: "x", SANs: []string{"a.example"}})
	_ = sans
}

func TestDenyOverlap(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: r
    match: {cn: "*"}
    subscribe: ["a/#"]
    deny: ["a/secret/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	p := pol.Compile(policy.Identity{CN: "c"})
	if p.AllowFilter("a/#") || p.AllowFilter("a/+/x") {
		t.Error("a filter overlapping a deny was granted")
	}
	if !p.AllowFilter("a/public/#") || p.Allow("a/secret/x", policy.Subscribe) || !p.Allow("a/public/x", policy.Subscribe) {
		t.Error("deny applied wrongly")
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		yaml, want string
	}{
		{"", "empty file"},
		{"rules: 3", "line 1: want a rules: list"},
		{"rulez: []", "line 1: unknown key \"rulez\""},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n    publish: [\"a/#/b\"]\n", "line 4: rule \"a\": publish: topic template \"a/#/b\""},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n    publish: [\"a/{id}\"]\n", "line 4: rule \"a\": publish: topic template \"a/{id}\": unknown placeholder"},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n    publish: [\"a/x{cn}\"]\n", "a placeholder must fill a whole level"},
		{"rules:\n  - name: a\n    publish: [\"a\"]\n", "line 2: rule \"a\" has no match"},
		{"rules:\n  - name: a\n    match: {cn: \"[\"}\n    publish: [\"a\"]\n", "bad glob"},
		{"rules:\n  - name: a\n    match: {cn: \"*\", colour: red}\n    publish: [\"a\"]\n", "line 3: unknown key \"colour\""},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n", "grants and denies nothing"},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n    deny: [x]\n  - name: a\n    match: {cn: \"*\"}\n    deny: [y]\n", "line 5: rule \"a\" already defined on line 2"},
		{"rules:\n  - name: a\n    match: {cn: \"*\"}\n    publish: a/b\n", "line 4: rule \"a\": publish: want a list"},
		{"rules: [\n", "yaml:"},
		{"rules:\n  - name: a\n    match: {attested: maybe}\n    publish: [\"a\"]\n", "line 3: rule \"a\": match.attested: want true or false"},
	}
	for _, c := range cases {
		_, err := policy.Parse([]byte(c.yaml))
		if !errors.Is(err, policy.ErrSyntax) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%q) = %v, want ErrSyntax with %q", c.yaml, err, c.want)
		}
	}
}

// "Deny wins" covers $-topics: a deny of '#' quarantines everything,
// although '#' as a grant or subscription matches no $-topic (MQTT 4.7.2).
func TestDenyCoversDollarTopics(t *testing.T) {
	p, err := policy.Parse([]byte(policy.Example))
	if err != nil {
		t.Fatal(err)
	}
	lab := p.Compile(policy.Identity{CN: "lab-1", OUs: []string{"backend"}})
	for _, f := range []string{"$SYS/#", "$SYS/broker/uptime", "devices/+/telemetry", "#"} {
		if lab.AllowFilter(f) {
			t.Errorf("quarantined identity may subscribe %q", f)
		}
	}
	for _, topic := range []string{"$SYS/broker/uptime", "devices/x/telemetry", "devices/lab-1/x"} {
		if lab.Allow(topic, policy.Subscribe) || lab.Allow(topic, policy.Publish) {
			t.Errorf("quarantined identity may use %q", topic)
		}
	}
	// without the quarantine, the backend keeps its $SYS grant
	be := p.Compile(policy.Identity{CN: "ops", OUs: []string{"backend"}})
	if !be.AllowFilter("$SYS/#") || !be.Allow("$SYS/broker/uptime", policy.Subscribe) {
		t.Error("backend lost its $SYS grant")
	}
	// a deny of "+/x" covers "$SYS/x" too
	q, _ := policy.Parse([]byte("rules:\n  - name: r\n    match: {cn: \"*\"}\n    subscribe: [\"$SYS/#\"]\n    deny: [\"+/x\"]\n"))
	if perms := q.Compile(policy.Identity{CN: "a"}); perms.Allow("$SYS/x", policy.Subscribe) || perms.AllowFilter("$SYS/+") || !perms.AllowFilter("$SYS/y") {
		t.Error("deny +/x does not cover $SYS/x exactly")
	}
}

func TestMatchAttested(t *testing.T) {
	pol, err := policy.Parse([]byte(`rules:
  - name: firmware-ack
    match: {attested: true}
    publish: ["devices/{cn}/firmware-ack"]
  - name: software
    match: {attested: false, cn: "*"}
    publish: ["devices/{cn}/soft"]
`))
	if err != nil {
		t.Fatal(err)
	}
	att := pol.Compile(policy.Identity{CN: "a", Attested: true})
	plain := pol.Compile(policy.Identity{CN: "a"})
	if !att.Allow("devices/a/firmware-ack", policy.Publish) || att.Allow("devices/a/soft", policy.Publish) {
		t.Errorf("attested identity: rules %v", att.Rules())
	}
	if plain.Allow("devices/a/firmware-ack", policy.Publish) || !plain.Allow("devices/a/soft", policy.Publish) {
		t.Errorf("plain identity: rules %v", plain.Rules())
	}
}
