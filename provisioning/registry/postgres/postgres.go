// Package postgres opens the registry in a PostgreSQL database through pgx:
// the registry several broker nodes share. It is apart from package
// registry so that programs using only SQLite (devsim, the demo) do not
// build pgx.
package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/mqtls/mqtls/provisioning/registry"
)

// Option configures Open and Create.
type Option func(*pgx.ConnConfig)

// WithPassword sets the password (from a file the operator named), which
// then never appears in a URL or a log.
func WithPassword(password string) Option {
	return func(c *pgx.ConnConfig) { c.Password = password }
}

// Create migrates the database at url (a libpq URL or DSN; the password
// may also come from PGPASSFILE) to the newest schema and binds it to the
// root CA with fingerprint rootSHA256; a database bound to another CA is
// refused with registry.ErrForeign.
func Create(ctx context.Context, url, rootSHA256 string, opts ...Option) (*registry.Postgres, error) {
	if rootSHA256 == "" {
		return nil, errors.New("registry: create: the root CA fingerprint is required")
	}
	return open(ctx, url, rootSHA256, opts)
}

// Open opens the registry in the database at url, migrating an older
// schema; a database without the registry's schema is refused with
// registry.ErrNotInitialised (it is never created here).
func Open(ctx context.Context, url string, opts ...Option) (*registry.Postgres, error) {
	return open(ctx, url, "", opts)
}

func open(ctx context.Context, url, rootSHA256 string, opts []Option) (*registry.Postgres, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		// pgx's parse errors redact the password.
		return nil, fmt.Errorf("registry: PostgreSQL URL: %w", err)
	}
	for _, o := range opts {
		o(cfg)
	}
	name := fmt.Sprintf("postgres://%s@%s:%d/%s", cfg.User, cfg.Host, cfg.Port, cfg.Database)
	listen := func(ctx context.Context, signal func()) { listen(ctx, cfg.Copy(), signal) }
	return registry.NewPostgres(ctx, stdlib.OpenDB(*cfg), name, rootSHA256, listen)
}

// listen signals every notification on registry.NotifyChannel until its
// connection fails or ctx ends.
func listen(ctx context.Context, cfg *pgx.ConnConfig, signal func()) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{registry.NotifyChannel}.Sanitize()); err != nil {
		return
	}
	signal() // anything missed while not listening
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return
		}
		signal()
	}
}
