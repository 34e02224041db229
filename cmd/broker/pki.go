package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// RegistryFile is the registry's name inside the data directory.
const RegistryFile = "registry.db"

func dataFlag(fs *flag.FlagSet) *string {
	return fs.String("data", "", "data directory (CA, server certificate, registry)")
}

func needData(dir string) error {
	if dir == "" {
		return cli.Usagef("--data DIR is required")
	}
	return nil
}

func cmdInit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker init", stderr)
	data := dataFlag(fs)
	var hosts listFlag
	fs.Var(&hosts, "host", "broker DNS name or IP for the server certificate (repeatable; default localhost, 127.0.0.1, ::1)")
	var cfg ca.InitConfig
	fs.StringVar(&cfg.RootCert, "root-cert", "", "adopt this root CA certificate (PEM) instead of creating one")
	fs.StringVar(&cfg.RootKey, "root-key", "", "key of --root-cert (needed to create the issuing CA)")
	fs.StringVar(&cfg.IssuingCert, "issuing-cert", "", "adopt this issuing CA certificate (PEM), signed by --root-cert")
	fs.StringVar(&cfg.IssuingKey, "issuing-key", "", "key of --issuing-cert")
	issuingKeyURI := fs.String("issuing-key-uri", "", "keep the issuing CA key in this hardware keystore: pkcs11:...?module-path=...&pin-source=file:PATH|env:NAME, tpm, tpm:/dev/PATH, swtpm:HOST:PORT, tpmsim:DIR; the key is made there (ECDSA P-256) or adopted if it exists, never written to disk")
	regFlags := addRegistryFlags(fs)
	registryOnly := fs.Bool("registry-only", false, "create only the registry, for the data directory's existing PKI (after losing the registry: every revocation is lost with it)")
	bindRegistry := fs.Bool("bind-registry", false, "bind an existing registry made before registries were bound to their CA to the data directory's root CA")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	loc, err := regFlags.location(*data)
	if err != nil {
		return err
	}
	if *bindRegistry {
		return bindExisting(ctx, loc, *data, stdout)
	}
	cfg.Hosts = hosts
	var c *ca.CA
	var keyNote string
	if !*registryOnly {
		key, err := initIssuingKey(ctx, *data, *issuingKeyURI, &cfg)
		if err != nil {
			return err
		}
		if key != nil {
			defer key.store.Close()
			keyNote = fmt.Sprintf("  issuing key: %s (adopted from the store; no key file)\n", key.uri)
			if key.created {
				keyNote = fmt.Sprintf("  issuing key: %s (made in the store; no key file)\n", key.uri)
			}
		}
		if err := ca.Init(*data, cfg); err != nil {
			if key != nil {
				err = errors.Join(err, key.discard(ctx))
			}
			if errors.Is(err, ca.ErrExists) {
				err = fmt.Errorf("%w\n  init already ran here and changes nothing; to give the server certificate other host names: %s", err, serverCertCommand(*data, hosts))
			}
			if errors.Is(err, ca.ErrExists) && loc.missing() {
				return fmt.Errorf("%w\n  the registry is missing: restore it from a backup, or create an empty one (every revocation is lost): broker init --data %s --registry-only", err, *data)
			}
			return err
		}
		var opts []ca.Option
		if key != nil {
			opts = append(opts, ca.WithIssuingSigner(key.signer))
		}
		if c, err = ca.Load(*data, opts...); err != nil {
			return err
		}
	} else {
		root, err := ca.LoadRoot(*data)
		if err != nil {
			return err
		}
		c = &ca.CA{Root: root}
	}
	reg, err := loc.create(ctx, ca.Fingerprint(c.Root))
	if err != nil {
		return err
	}
	if err := reg.Close(); err != nil {
		return err
	}
	what := "PKI and registry"
	if *registryOnly {
		what = "registry"
	}
	fmt.Fprintf(stdout, "created %s in %s\n  root CA:    %s (SPKI sha256 %s)\n  issuing CA: %s\n%s  server:     %s\n  registry:   %s (bound to root sha256 %s)\n",
		what, *data, filepath.Join(*data, ca.RootCertFile), ca.SPKIFingerprint(c.Root), filepath.Join(*data, ca.IssuingCertFile), keyNote,
		filepath.Join(*data, ca.ServerCertFile), loc, ca.Fingerprint(c.Root))
	return nil
}

// serverCertCommand is the server-cert command line for hosts (a
// placeholder when none were given).
func serverCertCommand(data string, hosts []string) string {
	if len(hosts) == 0 {
		return "broker server-cert --data " + data + " --host NAME [--host NAME ...]"
	}
	return "broker server-cert --data " + data + " --host " + strings.Join(hosts, " --host ")
}

// initIssuingKey opens the hardware store of the issuing key for init:
// the --issuing-key-uri one (the key is made there unless the data
// directory already holds an issuing CA, or adopted when the store has
// it), or the one an interrupted init recorded. It returns nil for a key
// file. The caller closes the key's store.
func initIssuingKey(ctx context.Context, data, uri string, cfg *ca.InitConfig) (*issuingKey, error) {
	_, issErr := os.Stat(filepath.Join(data, ca.IssuingCertFile))
	_, srvErr := os.Stat(filepath.Join(data, ca.ServerCertFile))
	haveCA := issErr == nil
	if uri == "" {
		if !haveCA || srvErr == nil {
			return nil, nil // a new CA with a key file, or ca.Init refuses
		}
		recorded, err := ca.IssuingKeyURI(data)
		if err != nil || recorded == "" {
			return nil, err // resumed with its key file
		}
		uri = recorded
	} else if cfg.IssuingKey != "" {
		return nil, cli.Usagef("give --issuing-key (a key file) or --issuing-key-uri (a hardware store), not both")
	}
	u, err := parseIssuingKeyURI(uri)
	if err != nil {
		return nil, err
	}
	if haveCA && srvErr == nil {
		return nil, nil // ca.Init refuses: leave the store alone
	}
	key, err := openIssuingKey(ctx, data, u, !haveCA, true)
	if err != nil {
		return nil, err
	}
	cfg.IssuingSigner, cfg.IssuingKeyURI = key.signer, u.String()
	return key, nil
}

func cmdToken(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker token", stderr)
	data := dataFlag(fs)
	id := fs.String("device", "", "device ID (1-64 of [A-Za-z0-9._-]): print its token")
	count := fs.Int("count", 0, "mint N device IDs PREFIX-000001... and print ID TOKEN lines")
	prefix := fs.String("prefix", "dev", "device ID prefix for --count")
	ttl := fs.Duration("ttl", 24*time.Hour, "token lifetime")
	group := fs.String("group", "", "policy group: the devices' certificates carry OU=GROUP")
	reinstate := fs.Bool("reinstate", false, "mint a token for a revoked device, letting it enroll again (audited)")
	reason := fs.String("reason", "reinstated by operator", "with --reinstate: the reason recorded in the audit trail")
	attestPolicy := fs.String("attest", "", "TPM key attestation for these tokens: required or optional (default: the server's --attest)")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if (*id == "") == (*count == 0) {
		return cli.Usagef("give either --device ID or --count N")
	}
	if *attestPolicy != registry.AttestDefault && *attestPolicy != registry.AttestRequired && *attestPolicy != registry.AttestOptional {
		return cli.Usagef("--attest %q: want required or optional", *attestPolicy)
	}
	if *count < 0 || *count > 1_000_000 {
		return cli.Usagef("--count must be 1..1000000")
	}
	ids := []string{*id}
	if *count > 0 {
		width := max(6, len(fmt.Sprint(*count)))
		ids = make([]string, *count)
		for i := range ids {
			ids[i] = fmt.Sprintf("%s-%0*d", *prefix, width, i+1)
		}
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	if *reinstate {
		for _, id := range ids {
			if err := reg.Reinstate(ctx, id, *reason); err != nil && !errors.Is(err, registry.ErrNotFound) {
				return err
			}
		}
	}
	tokens, err := reg.CreateTokensWith(ctx, ids, registry.TokenOptions{Group: *group, TTL: *ttl, Attest: *attestPolicy})
	if errors.Is(err, registry.ErrRevoked) {
		return fmt.Errorf("%w\n  to let it enroll again: broker token --data %s --device ID --reinstate --reason WHY", err, *data)
	}
	if err != nil {
		return err
	}
	if *count == 0 {
		fmt.Fprintln(stdout, tokens[0])
		return nil
	}
	for i, t := range tokens {
		fmt.Fprintf(stdout, "%s %s\n", ids[i], t)
	}
	return nil
}

func cmdRevoke(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker revoke", stderr)
	data := dataFlag(fs)
	id := fs.String("device", "", "device ID")
	reason := fs.String("reason", "unspecified", "revocation reason (recorded and shown to the device)")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if *id == "" {
		return cli.Usagef("--device ID is required")
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	n, err := reg.Revoke(ctx, *id, *reason)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "revoked %d certificate(s) of %s\n", n, *id)
	return nil
}

func cmdDevices(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker devices", stderr)
	data := dataFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	devs, err := reg.Devices(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		if devs == nil {
			devs = []registry.Device{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(devs)
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DEVICE\tGROUP\tSTATUS\tCERTS\tVALID UNTIL")
	for _, d := range devs {
		until := "-"
		if !d.ValidUntil.IsZero() {
			until = d.ValidUntil.UTC().Format(time.RFC3339)
		}
		group := d.Group
		if group == "" {
			group = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", d.ID, group, d.Status, d.Certificates, until)
	}
	return tw.Flush()
}

// bindExisting binds an unbound registry to the data directory's root CA.
func bindExisting(ctx context.Context, loc registryLocation, data string, stdout io.Writer) error {
	root, err := ca.LoadRoot(data)
	if err != nil {
		return err
	}
	c := &ca.CA{Root: root}
	reg, err := loc.open(ctx)
	if err != nil {
		return err
	}
	defer reg.Close()
	b, ok := reg.(interface {
		Bind(ctx context.Context, rootSHA256 string) error
	})
	if !ok {
		return fmt.Errorf("registry %s cannot be bound", loc)
	}
	if err := b.Bind(ctx, ca.Fingerprint(c.Root)); err != nil {
		return loc.explain(err)
	}
	fmt.Fprintf(stdout, "registry %s bound to root CA sha256 %s\n", loc, ca.Fingerprint(c.Root))
	return nil
}
