package policy_test

import (
	"strings"
	"testing"

	"github.com/mqtls/mqtls/broker/policy"
)

// Small alphabet: filters are built from these levels, topics from the
// literal ones plus "c", which no filter names.
var (
	filterLevels = []string{"a", "b", "$x", "+", "#", ""}
	topicLevels  = []string{"a", "b", "$x", "c", ""}
)

// filterFrom decodes up to 4 levels from data; '#' ends the filter.
func filterFrom(data []byte) string {
	var levels []string
	for _, b := range data {
		if len(levels) == 4 {
			break
		}
		l := filterLevels[int(b)%len(filterLevels)]
		levels = append(levels, l)
		if l == "#" {
			break
		}
	}
	if f := strings.Join(levels, "/"); f != "" { // "" is not a valid filter
		return f
	}
	return "a"
}

// allTopics lists every topic of 1..6 levels over topicLevels.
var allTopics = func() [][]string {
	var out [][]string
	var rec func(prefix []string)
	rec = func(prefix []string) {
		if len(prefix) > 0 {
			out = append(out, append([]string(nil), prefix...))
		}
		if len(prefix) == 6 {
			return
		}
		for _, l := range topicLevels {
			rec(append(prefix, l))
		}
	}
	rec(nil)
	return out
}()

// oracleMatch is an independent, literal reading of MQTT section 4.7.
func oracleMatch(filter string, topic []string) bool {
	f := strings.Split(filter, "/")
	if strings.HasPrefix(topic[0], "$") && (f[0] == "+" || f[0] == "#") {
		return false
	}
	var rec func(fi, ti int) bool
	rec = func(fi, ti int) bool {
		if fi == len(f) {
			return ti == len(topic)
		}
		if f[fi] == "#" {
			return true
		}
		if ti == len(topic) {
			return false
		}
		return (f[fi] == "+" || f[fi] == topic[ti]) && rec(fi+1, ti+1)
	}
	return rec(0, 0)
}

// Containment, overlap and the compiled AllowFilter agree with brute force
// over every topic up to six levels.
func FuzzContainment(f *testing.F) {
	f.Add([]byte{0, 4}, []byte{0, 3, 0})
	f.Add([]byte{4}, []byte{2, 4})
	f.Add([]byte{3, 1}, []byte{2, 1})
	f.Fuzz(func(t *testing.T, gb, fb []byte) {
		g, fl := filterFrom(gb), filterFrom(fb)
		contained, overlap := true, false
		for _, topic := range allTopics {
			if len(topic) == 1 && topic[0] == "" {
				continue // not a valid topic name
			}
			mf, mg := oracleMatch(fl, topic), oracleMatch(g, topic)
			if mf && !mg {
				contained = false
			}
			if mf && mg {
				overlap = true
			}
			if got := policy.Matches(fl, strings.Join(topic, "/")); got != mf && policy.ValidTopic(strings.Join(topic, "/")) {
				t.Fatalf("Matches(%q, %q) = %v, oracle %v", fl, strings.Join(topic, "/"), got, mf)
			}
		}
		if got := policy.Contains(g, fl); got != contained {
			t.Fatalf("Contains(%q, %q) = %v, oracle %v", g, fl, got, contained)
		}
		if got := policy.Overlaps(g, fl); got != overlap {
			t.Fatalf("Overlaps(%q, %q) = %v, oracle %v", g, fl, got, overlap)
		}
		perms := (&policy.Policy{Rules: []policy.Rule{{Match: policy.Match{CN: "*"}, Subscribe: []string{g}}}}).Compile(policy.Identity{CN: "x"})
		if got := perms.AllowFilter(fl); got != contained {
			t.Fatalf("AllowFilter(%q) under grant %q = %v, oracle %v", fl, g, got, contained)
		}
	})
}

// Every pair of filters up to four levels over the small alphabet, checked
// against the oracle on every topic up to six levels (match sets as
// bitsets).
func TestContainmentExhaustive(t *testing.T) {
	var filters []string
	var rec func(prefix []string)
	rec = func(prefix []string) {
		if len(prefix) > 0 {
			if f := strings.Join(prefix, "/"); f != "" {
				filters = append(filters, f)
			}
			if prefix[len(prefix)-1] == "#" || len(prefix) == 4 {
				return
			}
		}
		for _, l := range filterLevels {
			rec(append(prefix, l))
		}
	}
	rec(nil)
	var topics [][]string
	for _, tp := range allTopics {
		if !(len(tp) == 1 && tp[0] == "") {
			topics = append(topics, tp)
		}
	}
	words := (len(topics) + 63) / 64
	sets := make([][]uint64, len(filters))
	for i, f := range filters {
		sets[i] = make([]uint64, words)
		for j, tp := range topics {
			if oracleMatch(f, tp) {
				sets[i][j/64] |= 1 << (j % 64)
			}
		}
	}
	for gi, g := range filters {
		for fi, f := range filters {
			contained, overlap := true, false
			for w := range words {
				if sets[fi][w]&^sets[gi][w] != 0 {
					contained = false
				}
				if sets[fi][w]&sets[gi][w] != 0 {
					overlap = true
				}
			}
			if got := policy.Contains(g, f); got != contained {
				t.Fatalf("Contains(%q, %q) = %v, oracle %v", g, f, got, contained)
			}
			if got := policy.Overlaps(g, f); got != overlap {
				t.Fatalf("Overlaps(%q, %q) = %v, oracle %v", g, f, got, overlap)
			}
		}
	}
	t.Logf("%d filters, %d pairs, %d topics", len(filters), len(filters)*len(filters), len(topics))
}

// Allow (the allocation-free matcher) agrees with the oracle.
func TestAllowMatchesOracle(t *testing.T) {
	for _, f := range []string{"a", "a/#", "+/b", "#", "+", "$x/#", "a/+/#", "/#", "a//b", "+/+"} {
		perms := (&policy.Policy{Rules: []policy.Rule{{Match: policy.Match{CN: "*"}, Publish: []string{f}}}}).Compile(policy.Identity{CN: "x"})
		for _, topic := range allTopics {
			s := strings.Join(topic, "/")
			if !policy.ValidTopic(s) {
				continue
			}
			if got, want := perms.Allow(s, policy.Publish), oracleMatch(f, topic); got != want {
				t.Fatalf("Allow(%q) under %q = %v, oracle %v", s, f, got, want)
			}
		}
	}
}
