package cluster

import (
	"errors"
	"fmt"
	"strings"
)

// MQTT topic levels may hold any UTF-8 but '/', '+', '#' and NUL; NATS
// subject tokens may not hold '.', '*', '>' or white space and may not be
// empty. A level is encoded byte by byte: [A-Za-z0-9-] as is, every other
// byte as '_' and two upper-case hex digits; an empty level is a lone "_".
// The encoding is reversible and its output is also a valid JetStream KV
// key.

const hexDigits = "0123456789ABCDEF"

func plain(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-'
}

func encodeLevel(b *strings.Builder, l string) {
	if l == "" {
		b.WriteByte('_')
		return
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if plain(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('_')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
}

// EncodeTopic maps an MQTT topic name to NATS subject tokens.
func EncodeTopic(topic string) string {
	var b strings.Builder
	for i, l := range strings.Split(topic, "/") {
		if i > 0 {
			b.WriteByte('.')
		}
		encodeLevel(&b, l)
	}
	return b.String()
}

var errSubject = errors.New("cluster: not an encoded topic")

// DecodeTopic reverses EncodeTopic.
func DecodeTopic(subject string) (string, error) {
	var b strings.Builder
	for i, tok := range strings.Split(subject, ".") {
		if i > 0 {
			b.WriteByte('/')
		}
		if tok == "_" {
			continue
		}
		for j := 0; j < len(tok); j++ {
			c := tok[j]
			if plain(c) {
				b.WriteByte(c)
				continue
			}
			if c != '_' || j+2 >= len(tok) {
				return "", fmt.Errorf("%w: %q", errSubject, subject)
			}
			hi, lo := strings.IndexByte(hexDigits, tok[j+1]), strings.IndexByte(hexDigits, tok[j+2])
			if hi < 0 || lo < 0 {
				return "", fmt.Errorf("%w: %q", errSubject, subject)
			}
			b.WriteByte(byte(hi<<4 | lo))
			j += 2
		}
	}
	return b.String(), nil
}

// FilterSubjects maps an MQTT topic filter to the NATS subjects that
// together receive every topic it matches: '+' is '*', and "a/#" is both
// "a" (MQTT's '#' includes the parent level) and "a.>". NATS wildcards also
// match $-topics and levels MQTT would not; the receiving broker filters
// again with MQTT's rules, so this only widens what travels.
func FilterSubjects(filter string) []string {
	levels := strings.Split(filter, "/")
	var b strings.Builder
	for i, l := range levels {
		if l == "#" {
			if i == 0 {
				return []string{">"}
			}
			parent := b.String()
			return []string{strings.TrimSuffix(parent, "."), parent + ">"}
		}
		if l == "+" {
			b.WriteByte('*')
		} else {
			encodeLevel(&b, l)
		}
		if i < len(levels)-1 {
			b.WriteByte('.')
		}
	}
	return []string{b.String()}
}
