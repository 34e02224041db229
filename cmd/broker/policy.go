package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/mqtls/mqtls/broker/policy"
	"github.com/mqtls/mqtls/cmd/internal/cli"
)

// errDenied makes `broker policy check` exit 1 when an answer is "denied".
var errDenied = errors.New("denied")

// cmdPolicy: broker policy check — answers what a policy allows an
// identity, without connecting a device.
func cmdPolicy(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "check" {
		return cli.Usagef(`want "broker policy check --policy FILE --cn ID [--ou G]... [--client-id C] [--topic T --publish|--subscribe]"`)
	}
	fs := cli.NewFlags("broker policy check", stderr)
	file := fs.String("policy", "", "policy file (YAML); default: the built-in default policy")
	cn := fs.String("cn", "", "certificate CN (device ID)")
	var ous, sans, children listFlag
	fs.Var(&ous, "ou", "certificate OU (repeatable)")
	fs.Var(&children, "child", "a gateway's child device ID, as the registry lists it (repeatable)")
	fs.Var(&sans, "san", "certificate SAN (repeatable)")
	attested := fs.Bool("attested", false, "the certificate carries the attested marker (TPM key attestation at enrollment)")
	clientID := fs.String("client-id", "", "MQTT client ID to check (\"\" with --empty-client-id: an empty ID)")
	emptyID := fs.Bool("empty-client-id", false, "check an empty client ID (assigned by the broker)")
	topic := fs.String("topic", "", "topic (or, with --subscribe, a filter) to check")
	pub := fs.Bool("publish", false, "check publishing to --topic")
	sub := fs.Bool("subscribe", false, "check subscribing to / receiving --topic")
	if err := cli.Parse(fs, args[1:]); err != nil {
		return err
	}
	if *cn == "" {
		return cli.Usagef("--cn is required")
	}
	if *topic != "" && *pub == *sub {
		return cli.Usagef("--topic needs exactly one of --publish or --subscribe")
	}
	pol := policy.Default()
	if *file != "" {
		data, err := os.ReadFile(*file)
		if err != nil {
			return err
		}
		if pol, err = policy.Parse(data); err != nil {
			return fmt.Errorf("%s: %w", *file, err)
		}
	}
	perms := pol.Compile(policy.Identity{CN: *cn, OUs: ous, SANs: sans, Children: children, Attested: *attested})
	fmt.Fprintf(stdout, "rules matched: %s\n", orNone(strings.Join(perms.Rules(), ", ")))
	denied := false
	answer := func(what string, ok bool, rule, detail string) {
		verdict := "allowed"
		if !ok {
			verdict, denied = "denied", true
		}
		fmt.Fprintf(stdout, "%s: %s", what, verdict)
		if rule != "" {
			fmt.Fprintf(stdout, " by rule %q", rule)
		}
		if detail != "" {
			fmt.Fprintf(stdout, " (%s)", detail)
		}
		fmt.Fprintln(stdout)
	}
	switch {
	case *emptyID:
		ok, rule := perms.AssignedIDs()
		answer("empty client ID", ok, rule, map[bool]string{true: "the broker assigns " + *cn + "-<random>", false: "no rule lists client_ids: [assigned]"}[ok])
	case *clientID != "":
		ok, rule := perms.AllowClientID(*clientID)
		answer(fmt.Sprintf("client ID %q", *clientID), ok, rule, map[bool]string{true: "", false: "no client_ids pattern matches; default is the CN"}[ok])
	}
	if *topic != "" {
		var d policy.Decision
		what := fmt.Sprintf("publish %q", *topic)
		switch {
		case *pub:
			d = perms.Decide(*topic, policy.Publish)
		case strings.ContainsAny(*topic, "+#") || strings.HasPrefix(*topic, "$share/"):
			what = fmt.Sprintf("subscribe %q", *topic)
			d = perms.DecideFilter(*topic)
		default:
			what = fmt.Sprintf("subscribe/receive %q", *topic)
			d = perms.Decide(*topic, policy.Subscribe)
		}
		detail := d.Reason
		if d.Filter != "" {
			detail = strings.TrimSpace(detail + " filter " + d.Filter)
		}
		answer(what, d.Allowed, d.Rule, detail)
	}
	if denied {
		return errDenied
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
