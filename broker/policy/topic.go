package policy

import (
	"errors"
	"strings"
	"unicode/utf8"
)

// Topic names and filters follow MQTT 3.1.1 section 4.7 / MQTT 5 section
// 4.7: levels separated by '/', '+' matches one level, '#' (last level
// only) matches the parent level and any number of levels below it, and a
// filter starting with a wildcard does not match topics starting with '$'.

// ErrBadFilter reports an invalid topic filter or topic name.
var ErrBadFilter = errors.New("policy: invalid topic filter")

// checkFilter validates a topic filter (wildcards allowed).
func checkFilter(f string) error {
	if f == "" || len(f) > 65535 || !utf8.ValidString(f) || strings.ContainsRune(f, 0) {
		return ErrBadFilter
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#" && i != len(levels)-1:
			return ErrBadFilter
		case l != "#" && l != "+" && strings.ContainsAny(l, "+#"):
			return ErrBadFilter
		}
	}
	return nil
}

// ValidTopic reports whether t is a valid topic name (no wildcards).
func ValidTopic(t string) bool {
	return t != "" && len(t) <= 65535 && utf8.ValidString(t) && !strings.ContainsAny(t, "+#\x00")
}

// ValidFilter reports whether f is a valid topic filter.
func ValidFilter(f string) bool { return checkFilter(f) == nil }

// Matches reports whether filter f matches topic t.
func Matches(f, t string) bool {
	return match(strings.Split(f, "/"), strings.Split(t, "/"))
}

// matchTopic is match for an unsplit topic, without allocating: the hot
// path of every publish and delivery.
func matchTopic(f []string, topic string) bool {
	if len(f) > 0 && (f[0] == "+" || f[0] == "#") && strings.HasPrefix(topic, "$") {
		return false
	}
	return matchLevels(f, topic)
}

// matchLevels is matchTopic without MQTT's '$' rule: deny filters use it,
// so a deny of '#' covers $-topics too.
func matchLevels(f []string, topic string) bool {
	rest, more := topic, true
	for _, l := range f {
		if l == "#" {
			return true
		}
		if !more {
			return false
		}
		var level string
		level, rest, more = strings.Cut(rest, "/")
		if l != "+" && l != level {
			return false
		}
	}
	return !more
}

func match(f, t []string) bool {
	if len(t) > 0 && strings.HasPrefix(t[0], "$") && len(f) > 0 && (f[0] == "+" || f[0] == "#") {
		return false
	}
	for i, l := range f {
		if l == "#" {
			return true // parent level included: a/# matches a
		}
		if i >= len(t) {
			return false
		}
		if l != "+" && l != t[i] {
			return false
		}
	}
	return len(f) == len(t)
}

// Contains reports whether every topic filter f can match is matched by g.
func Contains(g, f string) bool {
	return contains(strings.Split(g, "/"), strings.Split(f, "/"))
}

func contains(g, f []string) bool {
	g, f = normalize(g), normalize(f)
	dollar := strings.HasPrefix(f[0], "$")
	for i := range g {
		if g[i] == "#" {
			return !(i == 0 && dollar)
		}
		if i >= len(f) {
			return false
		}
		switch {
		case f[i] == "#":
			return false // f also matches its parent level, which g lacks
		case g[i] == "+":
			if i == 0 && dollar {
				return false
			}
		case f[i] == "+":
			return false
		case f[i] != g[i]:
			return false
		}
	}
	return len(f) == len(g)
}

// Overlaps reports whether some topic matches both filters.
func Overlaps(a, b string) bool {
	return overlaps(strings.Split(a, "/"), strings.Split(b, "/"))
}

func overlaps(a, b []string) bool { return overlapRule(a, b, true) }

// overlapRule is overlaps with (dollar) or without MQTT's rule that a
// leading wildcard matches no $-topic; deny filters are compared without it.
func overlapRule(a, b []string, dollar bool) bool {
	a, b = normalize(a), normalize(b)
	for i := 0; ; i++ {
		aEnd, bEnd := i >= len(a), i >= len(b)
		aHash, bHash := !aEnd && a[i] == "#", !bEnd && b[i] == "#"
		if aHash || bHash {
			if i == 0 && dollar {
				// '#' at the start matches no $-topic: the other side must
				// be able to produce a topic that does not start with '$'.
				if aHash && !bEnd && isDollarLiteral(b[0]) || bHash && !aEnd && isDollarLiteral(a[0]) {
					return false
				}
			}
			return true
		}
		if aEnd || bEnd {
			return aEnd && bEnd
		}
		if a[i] == "+" || b[i] == "+" {
			if i == 0 && dollar && (a[i] == "+" && isDollarLiteral(b[i]) || b[i] == "+" && isDollarLiteral(a[i])) {
				return false
			}
			continue
		}
		if a[i] != b[i] {
			return false
		}
	}
}

// normalize rewrites a '#' whose parent level would be the empty topic
// (which is not a valid topic name) as "+/#": "#" and "+/#", "/#" and
// "/+/#" match the same valid topics. After it, every topic a '#' includes
// through the parent-level rule is a valid one.
func normalize(f []string) []string {
	switch {
	case len(f) == 1 && f[0] == "#":
		return []string{"+", "#"}
	case len(f) == 2 && f[0] == "" && f[1] == "#":
		return []string{"", "+", "#"}
	}
	return f
}

func isDollarLiteral(l string) bool { return strings.HasPrefix(l, "$") }
