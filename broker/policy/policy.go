// Package policy maps a verified client identity (certificate CN, OUs,
// SANs) to the MQTT topics it may publish to and subscribe to. It is pure
// Go with no broker dependency: it imports only the standard library and
// the device-ID rule (package deviceid), never Mochi.
//
// A [Policy] is a list of rules; a rule applies to identities its match
// selects (CN glob, OU, SAN glob) and grants publish and subscribe topic
// filters, or denies filters; deny wins (a deny filter covers $-topics too: deny "#" quarantines everything). Topic templates take {cn} and {ou}.
// Without a policy file, [Default] applies: CN X may publish and subscribe
// devices/X/# and nothing else.
//
// [Policy.Compile] turns a policy and an identity into [Perms] once, at
// CONNECT; each check is then a scan of that client's few filters, cheap
// and independent of the fleet's size.
//
// A SUBSCRIBE filter is granted only if every topic it can match is allowed:
// it must be contained in one granted subscribe filter (devices/a/# admits
// devices/a/+/x, never devices/+/x, # or +/#) and overlap no deny filter.
package policy

import (
	"fmt"
	"path"
	"slices"
	"strings"

	"github.com/mqtls/mqtls/deviceid"
)

// Access is what a client wants to do with a topic.
type Access int

// Access kinds.
const (
	Publish Access = iota
	Subscribe
)

func (a Access) String() string {
	if a == Publish {
		return "publish"
	}
	return "subscribe"
}

// Identity is what the broker verified about a client.
type Identity struct {
	CN   string   // device ID
	OUs  []string // policy groups
	SANs []string // DNS names, URIs, e-mail addresses, IP addresses
	// Children are the device IDs the registry lists under this identity
	// when it is a gateway; templates with {child} expand once per child.
	Children []string
	// Attested: the CA verified by TPM attestation that the certificate's
	// key lives in a TPM (the certificate's attested marker).
	Attested bool
}

// Match selects identities. Empty fields match anything; all set fields
// must match.
type Match struct {
	CN  string `yaml:"cn"`  // glob (path.Match syntax), e.g. "lab-*"
	OU  string `yaml:"ou"`  // one of the identity's OUs, exactly
	SAN string `yaml:"san"` // glob matched against each SAN
	// Attested, if set, selects identities whose certificate carries (true)
	// or lacks (false) the attested marker.
	Attested *bool `yaml:"attested"`
}

// Rule grants or denies topic filters to the identities it matches.
type Rule struct {
	Name      string   `yaml:"name"`
	Match     Match    `yaml:"match"`
	Publish   []string `yaml:"publish"`
	Subscribe []string `yaml:"subscribe"`
	Deny      []string `yaml:"deny"` // both publish and subscribe
	// ClientIDs are the MQTT client IDs the identity may use: globs with
	// {cn}/{ou} templates; default ["{cn}"]. The literal AssignedID lets a
	// client connect with an empty ID (the broker assigns {cn}-<random>).
	ClientIDs []string `yaml:"client_ids"`
	// MaxSessions bounds the concurrent sessions of one certificate
	// (0: no bound beyond the client IDs allowed).
	MaxSessions int `yaml:"max_sessions"`
	// Overlap says what happens to a subscription inside this rule's
	// grants that overlaps a deny: OverlapRefuse (default) refuses it,
	// OverlapFilter grants it and withholds every denied delivery.
	Overlap string `yaml:"overlap"`
}

// Client-ID and overlap keywords.
const (
	AssignedID    = "assigned"
	OverlapRefuse = "refuse"
	OverlapFilter = "filter"
)

// Policy is an ordered list of rules.
type Policy struct {
	Rules []Rule
}

// UsesChildren reports whether some rule matching id has a {child}
// template: the broker then needs the gateway's children from the
// registry.
func (p *Policy) UsesChildren(id Identity) bool {
	for _, r := range p.Rules {
		if !r.Match.matches(id) {
			continue
		}
		for _, list := range [][]string{r.Publish, r.Subscribe, r.Deny} {
			for _, t := range list {
				if strings.Contains(t, "{child}") {
					return true
				}
			}
		}
	}
	return false
}

// Example is the policy of the README and deploy/policy.yaml: devices own
// their namespace, identities with OU "backend" command devices and read
// their telemetry, and CNs "lab-*" are quarantined.
const Example = `rules:
  - name: own-namespace
    match: {cn: "*"}
    publish: ["devices/{cn}/#"]
    subscribe: ["devices/{cn}/#"]
  - name: backend
    match: {ou: "backend"}
    publish: ["devices/+/commands/#"]
    subscribe: ["devices/+/telemetry", "$SYS/#"]
  - name: quarantine
    match: {cn: "lab-*"}
    deny: ["#"]
`

// Default is the policy without a file: each device owns devices/{cn}/#.
func Default() *Policy {
	return &Policy{Rules: []Rule{{
		Name:      "own-namespace",
		Match:     Match{CN: "*"},
		Publish:   []string{"devices/{cn}/#"},
		Subscribe: []string{"devices/{cn}/#"},
	}}}
}

func (m Match) matches(id Identity) bool {
	if m.CN != "" {
		if ok, _ := path.Match(m.CN, id.CN); !ok {
			return false
		}
	}
	if m.OU != "" && !slices.Contains(id.OUs, m.OU) {
		return false
	}
	if m.SAN != "" && !slices.ContainsFunc(id.SANs, func(s string) bool { ok, _ := path.Match(m.SAN, s); return ok }) {
		return false
	}
	if m.Attested != nil && *m.Attested != id.Attested {
		return false
	}
	return true
}

// safeValue reports whether v may be substituted into a topic template: no
// wildcard, separator, '$' or NUL can reach a filter through it. CNs,
// children and OUs take the device-ID rule.
func safeValue(v string) bool { return deviceid.Valid(v) }

// expand substitutes {cn}, {ou} (once per OU) and {child} (once per
// child) into templates. A template whose values are unsafe or missing
// yields nothing.
func expand(templates []string, id Identity) [][]string {
	var out [][]string
	for _, t := range templates {
		if strings.Contains(t, "{child}") {
			for _, c := range id.Children {
				if safeValue(c) {
					out = append(out, expand([]string{strings.ReplaceAll(t, "{child}", c)}, id)...)
				}
			}
			continue
		}
		if strings.Contains(t, "{cn}") {
			if !safeValue(id.CN) {
				continue
			}
			t = strings.ReplaceAll(t, "{cn}", id.CN)
		}
		if !strings.Contains(t, "{ou}") {
			out = append(out, strings.Split(t, "/"))
			continue
		}
		for _, ou := range id.OUs {
			if safeValue(ou) {
				out = append(out, strings.Split(strings.ReplaceAll(t, "{ou}", ou), "/"))
			}
		}
	}
	return out
}

// Perms is one client's compiled permissions. It is immutable and safe for
// concurrent use.
type Perms struct {
	pub, sub, deny [][]string // filters split into levels
	rules          []string   // names of the rules that matched
	// per filter: the rule it came from; per subscribe grant: overlap mode
	pubRule, subRule, denyRule []string
	subFilter                  []bool
	filtering                  bool // some grant is OverlapFilter
	ids                        []idPattern
	assigned                   string // rule allowing assigned IDs, or ""
	maxSessions                int
}

type idPattern struct{ glob, rule string }

// Compile returns the permissions of id under p.
func (p *Policy) Compile(id Identity) *Perms {
	perms := &Perms{}
	for _, r := range p.Rules {
		if !r.Match.matches(id) {
			continue
		}
		perms.rules = append(perms.rules, r.Name)
		for _, f := range expand(r.Publish, id) {
			perms.pub, perms.pubRule = append(perms.pub, f), append(perms.pubRule, r.Name)
		}
		for _, f := range expand(r.Subscribe, id) {
			perms.sub, perms.subRule = append(perms.sub, f), append(perms.subRule, r.Name)
			perms.subFilter = append(perms.subFilter, r.Overlap == OverlapFilter)
			perms.filtering = perms.filtering || r.Overlap == OverlapFilter
		}
		for _, f := range expand(r.Deny, id) {
			perms.deny, perms.denyRule = append(perms.deny, f), append(perms.denyRule, r.Name)
		}
		ids := r.ClientIDs
		if len(ids) == 0 {
			ids = []string{"{cn}"}
		}
		for _, g := range ids {
			if g == AssignedID {
				perms.assigned = r.Name
				continue
			}
			for _, e := range expandID(g, id) {
				perms.ids = append(perms.ids, idPattern{e, r.Name})
			}
		}
		perms.maxSessions = max(perms.maxSessions, r.MaxSessions)
	}
	return perms
}

// expandID substitutes {cn} and {ou} (once per OU) into a client-ID glob;
// unsafe values yield nothing.
func expandID(g string, id Identity) []string {
	if strings.Contains(g, "{cn}") {
		if !safeValue(id.CN) {
			return nil
		}
		g = strings.ReplaceAll(g, "{cn}", id.CN)
	}
	if !strings.Contains(g, "{ou}") {
		return []string{g}
	}
	var out []string
	for _, ou := range id.OUs {
		if safeValue(ou) {
			out = append(out, strings.ReplaceAll(g, "{ou}", ou))
		}
	}
	return out
}

// AllowClientID reports whether the identity may connect with clientID,
// and the rule whose pattern allowed it.
func (p *Perms) AllowClientID(clientID string) (bool, string) {
	for _, g := range p.ids {
		if ok, _ := path.Match(g.glob, clientID); ok {
			return true, g.rule
		}
	}
	return false, ""
}

// AssignedIDs reports whether the identity may connect with an empty client
// ID, and the rule that allows it.
func (p *Perms) AssignedIDs() (bool, string) { return p.assigned != "", p.assigned }

// MaxSessions is the bound on concurrent sessions of one certificate (0:
// none).
func (p *Perms) MaxSessions() int { return p.maxSessions }

// Filtering reports whether some subscribe grant withholds denied
// deliveries instead of refusing overlapping subscriptions.
func (p *Perms) Filtering() bool { return p.filtering }

// Rules returns the names of the rules that matched, in order.
func (p *Perms) Rules() []string { return slices.Clone(p.rules) }

// Allow reports whether a concrete topic may be published (Publish) or
// received (Subscribe: a delivery, or a Will).
func (p *Perms) Allow(topic string, a Access) bool {
	if !ValidTopic(topic) {
		return false
	}
	for _, d := range p.deny {
		if matchLevels(d, topic) { // deny wins, $-topics included
			return false
		}
	}
	grants := p.pub
	if a == Subscribe {
		grants = p.sub
	}
	for _, g := range grants {
		if matchTopic(g, topic) {
			return true
		}
	}
	return false
}

// AllowFilter reports whether a SUBSCRIBE filter may be granted: every
// topic it can match must be allowed, so it must lie inside one granted
// filter and overlap no denied one. Under a grant whose rule says
// OverlapFilter, overlapping a deny is allowed (the denied deliveries are
// withheld one by one); lying wholly inside a deny is not. A shared
// subscription $share/GROUP/FILTER is judged by its FILTER.
func (p *Perms) AllowFilter(filter string) bool {
	d := p.DecideFilter(filter)
	return d.Allowed
}

// Decision is the answer to a policy question and the rule that gave it.
type Decision struct {
	Allowed bool
	Rule    string // the deciding rule ("" when nothing matched)
	Filter  string // the deciding grant or deny filter
	Reason  string
}

// DecideFilter is AllowFilter with the reason.
func (p *Perms) DecideFilter(filter string) Decision {
	if rest, ok := strings.CutPrefix(filter, "$share/"); ok {
		group, f, ok := strings.Cut(rest, "/")
		if !ok || group == "" || strings.ContainsAny(group, "+#") {
			return Decision{Reason: "invalid shared subscription (want $share/GROUP/FILTER)"}
		}
		filter = f
	}
	if checkFilter(filter) != nil {
		return Decision{Reason: "invalid topic filter"}
	}
	f := strings.Split(filter, "/")
	grant := -1
	for i, g := range p.sub {
		if contains(g, f) {
			grant = i
			break
		}
	}
	for i, d := range p.deny {
		if overlapRule(d, f, false) { // deny wins, $-topics included
			if grant < 0 || !p.subFilter[grant] || contains(d, f) {
				return Decision{Rule: p.denyRule[i], Filter: strings.Join(d, "/"), Reason: "overlaps a deny"}
			}
		}
	}
	if grant < 0 {
		return Decision{Reason: "no rule grants it"}
	}
	return Decision{Allowed: true, Rule: p.subRule[grant], Filter: strings.Join(p.sub[grant], "/")}
}

// OverlapsDeny reports whether a granted filter overlaps a deny (under
// OverlapFilter: some of its deliveries will be withheld).
func (p *Perms) OverlapsDeny(filter string) bool {
	if rest, ok := strings.CutPrefix(filter, "$share/"); ok {
		_, filter, _ = strings.Cut(rest, "/")
	}
	f := strings.Split(filter, "/")
	for _, d := range p.deny {
		if overlapRule(d, f, false) {
			return true
		}
	}
	return false
}

// Decide is Allow with the reason.
func (p *Perms) Decide(topic string, a Access) Decision {
	if !ValidTopic(topic) {
		return Decision{Reason: "invalid topic name"}
	}
	for i, d := range p.deny {
		if matchLevels(d, topic) {
			return Decision{Rule: p.denyRule[i], Filter: strings.Join(d, "/"), Reason: "denied"}
		}
	}
	grants, rules := p.pub, p.pubRule
	if a == Subscribe {
		grants, rules = p.sub, p.subRule
	}
	for i, g := range grants {
		if matchTopic(g, topic) {
			return Decision{Allowed: true, Rule: rules[i], Filter: strings.Join(g, "/")}
		}
	}
	return Decision{Reason: "no rule grants it"}
}

// Validate checks every rule: names, globs and topic templates.
func (p *Policy) Validate() error {
	for i, r := range p.Rules {
		if err := r.validate(); err != nil {
			return fmt.Errorf("policy: rule %d (%s): %w", i+1, r.Name, err)
		}
	}
	return nil
}

func (r Rule) validate() error {
	for _, g := range []string{r.Match.CN, r.Match.SAN} {
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("bad glob %q: %w", g, err)
		}
	}
	for _, g := range r.ClientIDs {
		probe := strings.NewReplacer("{cn}", "x", "{ou}", "x").Replace(g)
		if strings.ContainsAny(probe, "{}") {
			return fmt.Errorf("client ID pattern %q: unknown placeholder (known: {cn}, {ou})", g)
		}
		if _, err := path.Match(probe, ""); err != nil || g == "" {
			return fmt.Errorf("client ID pattern %q: bad glob", g)
		}
	}
	if r.MaxSessions < 0 {
		return fmt.Errorf("max_sessions %d: want 0 (no bound) or more", r.MaxSessions)
	}
	switch r.Overlap {
	case "", OverlapRefuse, OverlapFilter:
	default:
		return fmt.Errorf("overlap %q: want %q or %q", r.Overlap, OverlapRefuse, OverlapFilter)
	}
	for _, list := range [][]string{r.Publish, r.Subscribe, r.Deny} {
		for _, t := range list {
			if err := checkTemplate(t); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkTemplate(t string) error {
	probe := strings.NewReplacer("{cn}", "x", "{ou}", "x", "{child}", "x").Replace(t)
	if strings.ContainsAny(probe, "{}") {
		return fmt.Errorf("topic template %q: unknown placeholder (known: {cn}, {ou}, {child})", t)
	}
	if checkFilter(probe) != nil {
		return fmt.Errorf("topic template %q: not a valid MQTT topic filter ('#' only as the last level, '+' and '#' alone in their level)", t)
	}
	for _, l := range strings.Split(t, "/") {
		if strings.Contains(l, "{") && l != "{cn}" && l != "{ou}" && l != "{child}" {
			return fmt.Errorf("topic template %q: a placeholder must fill a whole level", t)
		}
	}
	return nil
}
