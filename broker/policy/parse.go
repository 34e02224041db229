package policy

import (
	"errors"
	"fmt"

	"gopkg.in/yaml.v3"
)

// ErrSyntax wraps every error Parse returns; the message carries the line.
var ErrSyntax = errors.New("policy: invalid policy file")

// Parse reads a YAML policy:
//
//	rules:
//	  - name: own-namespace
//	    match: {cn: "*"}
//	    publish: ["devices/{cn}/#"]
//	    subscribe: ["devices/{cn}/#"]
//
// Errors name the line: unknown keys, wrong types, bad globs, invalid
// topic templates, rules without a match or without any grant or deny.
func Parse(data []byte) (*Policy, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSyntax, err)
	}
	if len(root.Content) == 0 {
		return nil, fmt.Errorf("%w: empty file (want a rules: list)", ErrSyntax)
	}
	doc := root.Content[0]
	top, err := mapping(doc, "rules")
	if err != nil {
		return nil, err
	}
	rules, ok := top["rules"]
	if !ok || rules.Kind != yaml.SequenceNode {
		return nil, lineErr(doc, "want a rules: list")
	}
	p := &Policy{}
	names := map[string]int{}
	for _, n := range rules.Content {
		r, err := parseRule(n)
		if err != nil {
			return nil, err
		}
		if first, dup := names[r.Name]; dup {
			return nil, lineErr(n, fmt.Sprintf("rule %q already defined on line %d", r.Name, first))
		}
		names[r.Name] = n.Line
		p.Rules = append(p.Rules, r)
	}
	return p, nil
}

func lineErr(n *yaml.Node, msg string) error {
	return fmt.Errorf("%w: line %d: %s", ErrSyntax, n.Line, msg)
}

// mapping returns the keys of a mapping node, refusing keys not in allowed.
func mapping(n *yaml.Node, allowed ...string) (map[string]*yaml.Node, error) {
	if n.Kind != yaml.MappingNode {
		return nil, lineErr(n, "want a mapping")
	}
	out := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		known := false
		for _, a := range allowed {
			known = known || k.Value == a
		}
		if !known {
			return nil, lineErr(k, fmt.Sprintf("unknown key %q (known: %v)", k.Value, allowed))
		}
		if _, dup := out[k.Value]; dup {
			return nil, lineErr(k, fmt.Sprintf("duplicate key %q", k.Value))
		}
		out[k.Value] = v
	}
	return out, nil
}

func scalar(n *yaml.Node, what string) (string, error) {
	if n.Kind != yaml.ScalarNode {
		return "", lineErr(n, what+": want a string")
	}
	return n.Value, nil
}

func parseRule(n *yaml.Node) (Rule, error) {
	var r Rule
	m, err := mapping(n, "name", "match", "publish", "subscribe", "deny", "client_ids", "max_sessions", "overlap")
	if err != nil {
		return r, err
	}
	nameNode, ok := m["name"]
	if !ok {
		return r, lineErr(n, "rule without a name")
	}
	if r.Name, err = scalar(nameNode, "name"); err != nil {
		return r, err
	}
	matchNode, ok := m["match"]
	if !ok {
		return r, lineErr(n, fmt.Sprintf("rule %q has no match (use match: {cn: \"*\"} for everyone)", r.Name))
	}
	mm, err := mapping(matchNode, "cn", "ou", "san", "attested")
	if err != nil {
		return r, err
	}
	if len(mm) == 0 {
		return r, lineErr(matchNode, fmt.Sprintf("rule %q: empty match", r.Name))
	}
	if v, ok := mm["attested"]; ok {
		var b bool
		if v.Kind != yaml.ScalarNode || v.Decode(&b) != nil {
			return r, lineErr(v, fmt.Sprintf("rule %q: match.attested: want true or false", r.Name))
		}
		r.Match.Attested = &b
	}
	for key, dst := range map[string]*string{"cn": &r.Match.CN, "ou": &r.Match.OU, "san": &r.Match.SAN} {
		if v, ok := mm[key]; ok {
			if *dst, err = scalar(v, "match."+key); err != nil {
				return r, err
			}
			if *dst == "" {
				return r, lineErr(v, fmt.Sprintf("rule %q: empty match.%s", r.Name, key))
			}
		}
	}
	for key, dst := range map[string]*[]string{"publish": &r.Publish, "subscribe": &r.Subscribe, "deny": &r.Deny} {
		v, ok := m[key]
		if !ok {
			continue
		}
		if v.Kind != yaml.SequenceNode {
			return r, lineErr(v, fmt.Sprintf("rule %q: %s: want a list of topic filters", r.Name, key))
		}
		for _, item := range v.Content {
			s, err := scalar(item, key)
			if err != nil {
				return r, err
			}
			if err := checkTemplate(s); err != nil {
				return r, lineErr(item, fmt.Sprintf("rule %q: %s: %v", r.Name, key, err))
			}
			*dst = append(*dst, s)
		}
	}
	if v, ok := m["client_ids"]; ok {
		if v.Kind != yaml.SequenceNode || len(v.Content) == 0 {
			return r, lineErr(v, fmt.Sprintf("rule %q: client_ids: want a non-empty list of client ID patterns", r.Name))
		}
		for _, item := range v.Content {
			s, err := scalar(item, "client_ids")
			if err != nil {
				return r, err
			}
			r.ClientIDs = append(r.ClientIDs, s)
		}
	}
	if v, ok := m["max_sessions"]; ok {
		if err := v.Decode(&r.MaxSessions); err != nil || r.MaxSessions < 0 {
			return r, lineErr(v, fmt.Sprintf("rule %q: max_sessions: want a number >= 0", r.Name))
		}
	}
	if v, ok := m["overlap"]; ok {
		if r.Overlap, err = scalar(v, "overlap"); err != nil {
			return r, err
		}
	}
	if len(r.Publish)+len(r.Subscribe)+len(r.Deny) == 0 && len(r.ClientIDs) == 0 && r.MaxSessions == 0 {
		return r, lineErr(n, fmt.Sprintf("rule %q grants and denies nothing", r.Name))
	}
	if err := r.validate(); err != nil {
		return r, lineErr(n, fmt.Sprintf("rule %q: %v", r.Name, err))
	}
	return r, nil
}
