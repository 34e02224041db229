package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/server"
)

func cmdServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	data := dataFlag(fs)
	estAddr := fs.String("est-addr", "127.0.0.1:8443", "EST (HTTPS) listen address")
	validity := fs.Duration("validity", ca.DefaultDeviceValidity, "lifetime of issued device certificates")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	c, err := ca.Load(*data)
	if err != nil {
		return err
	}
	reg, err := openRegistry(*data)
	if err != nil {
		return err
	}
	defer reg.Close()
	est, err := server.New(server.Config{CA: c, Registry: reg, Validity: *validity, Logger: log})
	if err != nil {
		return err
	}
	tlsCfg, err := est.TLSConfig()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *estAddr)
	if err != nil {
		return fmt.Errorf("EST listener: %w", err)
	}
	hs := &http.Server{
		Handler:           est.Handler(),
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(tls.NewListener(ln, tlsCfg)) }()
	log.Info("EST listening", "addr", ln.Addr().String(), "root_spki_sha256", ca.SPKIFingerprint(c.Root))
	select {
	case err := <-errc:
		return fmt.Errorf("EST server: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
