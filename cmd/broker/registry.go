package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/provisioning/registry"
	"github.com/mqtls/mqtls/provisioning/registry/postgres"
)

// registryFlags are --registry and --registry-password-file, on every
// command that opens the registry.
type registryFlags struct {
	url          string
	passwordFile string
}

func addRegistryFlags(fs *flag.FlagSet) *registryFlags {
	f := &registryFlags{}
	fs.StringVar(&f.url, "registry", "", "registry: sqlite:PATH (default sqlite:DATA/registry.db) or postgres://USER@HOST:PORT/DB?sslmode=... (password from --registry-password-file, PGPASSFILE or the URL)")
	fs.StringVar(&f.passwordFile, "registry-password-file", "", "file holding the PostgreSQL password (mode 0600)")
	return f
}

// registryLocation is a parsed --registry.
type registryLocation struct {
	data     string
	sqlite   string // path, or "" for PostgreSQL
	postgres string // URL
	password *string
}

func (f *registryFlags) location(data string) (registryLocation, error) {
	loc := registryLocation{data: data}
	switch u := f.url; {
	case u == "":
		loc.sqlite = filepath.Join(data, RegistryFile)
	case strings.HasPrefix(u, "sqlite:"):
		loc.sqlite = strings.TrimPrefix(strings.TrimPrefix(u, "sqlite:"), "//")
		if loc.sqlite == "" {
			return loc, cli.Usagef("--registry sqlite:PATH needs a path")
		}
	case strings.HasPrefix(u, "postgres://"), strings.HasPrefix(u, "postgresql://"):
		loc.postgres = u
	default:
		return loc, cli.Usagef("--registry %q: want sqlite:PATH or postgres://USER@HOST:PORT/DB", redactURL(u))
	}
	if f.passwordFile != "" {
		if loc.postgres == "" {
			return loc, cli.Usagef("--registry-password-file is for a postgres:// registry")
		}
		fi, err := os.Stat(f.passwordFile)
		if err != nil {
			return loc, fmt.Errorf("registry password file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return loc, fmt.Errorf("registry password file %s has mode %04o: other users can read it; fix: chmod 600 %s", f.passwordFile, fi.Mode().Perm(), f.passwordFile)
		}
		b, err := os.ReadFile(f.passwordFile)
		if err != nil {
			return loc, fmt.Errorf("registry password file: %w", err)
		}
		pw := strings.TrimRight(string(b), "\r\n")
		clear(b)
		loc.password = &pw
	}
	return loc, nil
}

// String names the registry without its password.
func (l registryLocation) String() string {
	if l.sqlite != "" {
		return l.sqlite
	}
	return redactURL(l.postgres)
}

func (l registryLocation) missing() bool {
	if l.sqlite == "" {
		return false
	}
	_, err := os.Stat(l.sqlite)
	return errors.Is(err, os.ErrNotExist)
}

func (l registryLocation) pgOptions() []postgres.Option {
	if l.password == nil {
		return nil
	}
	return []postgres.Option{postgres.WithPassword(*l.password)}
}

// create makes a new registry bound to the root CA (broker init only).
func (l registryLocation) create(ctx context.Context, rootSHA256 string) (registry.Registry, error) {
	if l.sqlite != "" {
		r, err := registry.CreateSQLite(ctx, l.sqlite, rootSHA256)
		if errors.Is(err, registry.ErrExists) {
			return nil, fmt.Errorf("%w (refusing to overwrite it)", err)
		}
		if err != nil {
			return nil, err
		}
		return r, nil
	}
	r, err := postgres.Create(ctx, l.postgres, rootSHA256, l.pgOptions()...)
	if err != nil {
		return nil, l.explain(err)
	}
	return r, nil
}

// open opens an existing registry; it never creates one.
func (l registryLocation) open(ctx context.Context) (registry.Registry, error) {
	if l.sqlite != "" {
		r, err := registry.OpenSQLite(ctx, l.sqlite)
		if err != nil {
			return nil, l.explain(err)
		}
		return r, nil
	}
	r, err := postgres.Open(ctx, l.postgres, l.pgOptions()...)
	if err != nil {
		return nil, l.explain(err)
	}
	return r, nil
}

func (f *registryFlags) open(ctx context.Context, data string) (registry.Registry, error) {
	loc, err := f.location(data)
	if err != nil {
		return nil, err
	}
	r, err := loc.open(ctx)
	if err != nil && loc.sqlite != "" && data != "" {
		// no data directory at all: not a lost registry but a fresh machine
		if _, serr := os.Stat(data); errors.Is(serr, fs.ErrNotExist) {
			return nil, haveCA(data)
		}
	}
	return r, err
}

// explain adds the command that fixes a registry that cannot be trusted.
func (l registryLocation) explain(err error) error {
	regArg := ""
	if l.postgres != "" {
		regArg = " --registry " + redactURL(l.postgres)
	}
	recreate := fmt.Sprintf("broker init --data %s%s --registry-only", l.data, regArg)
	var fix string
	switch {
	case errors.Is(err, registry.ErrMissing):
		fix = "restore it from a backup; only if none exists, create an empty one (every revocation is lost): " + recreate
	case errors.Is(err, registry.ErrEmpty):
		fix = fmt.Sprintf("restore it from a backup; only if none exists (every revocation is lost): rm %s && %s", l.sqlite, recreate)
	case errors.Is(err, registry.ErrCorrupt):
		fix = "restore it from a backup (the broker will not serve from a damaged registry)"
		if l.sqlite != "" {
			fix += fmt.Sprintf("; sqlite3 %s .recover may salvage rows", l.sqlite)
		}
	case errors.Is(err, registry.ErrForeign):
		fix = fmt.Sprintf("this registry was made by another `broker init`: give the registry of the CA in %s (--registry), or the data directory that goes with this registry (--data)", l.data)
	case errors.Is(err, registry.ErrUnbound):
		fix = fmt.Sprintf("if this registry belongs to the CA in %s, bind it: broker init --data %s%s --bind-registry", l.data, l.data, regArg)
	case errors.Is(err, registry.ErrNotInitialised):
		fix = "create it: " + recreate
	case errors.Is(err, registry.ErrNewerSchema):
		fix = "run a newer broker"
	default:
		return err
	}
	return fmt.Errorf("%w\n  fix: %s", err, fix)
}

// redactURL hides a password in a URL.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// cmdEK manages endorsement key bindings: `broker ek release --device ID
// --reason WHY` lets a device enroll from another TPM (a replaced board)
// or its TPM enroll another device ID (a moved TPM).
func cmdEK(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "release" {
		return cli.Usagef("usage: broker ek release --data DIR --device ID --reason WHY")
	}
	fs := cli.NewFlags("broker ek release", stderr)
	data := dataFlag(fs)
	id := fs.String("device", "", "device ID whose endorsement key binding is released")
	reason := fs.String("reason", "", "why (recorded in the audit trail), e.g. the ticket of the board replacement")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args[1:]); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if *id == "" || *reason == "" {
		return cli.Usagef("--device ID and --reason WHY are required")
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	if err := reg.ReleaseEK(ctx, *id, *reason); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "released the endorsement key of %s: it enrolls from any trusted TPM with its next token\n", *id)
	return nil
}
