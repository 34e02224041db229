package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// cmdServerCert re-issues the broker's server certificate with new host
// names from the data directory's issuing CA (a key file, or a key in a
// hardware store reopened from the URI init recorded). The server key is
// kept and only the certificate file is replaced, atomically: a running
// serve picks it up without restart. The re-issue is audited in the
// registry.
func cmdServerCert(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker server-cert", stderr)
	data := dataFlag(fs)
	var hosts listFlag
	fs.Var(&hosts, "host", "DNS name or IP address the broker is reached by (repeatable, required): the new certificate names these and no others, so repeat the names it keeps")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if len(hosts) == 0 {
		return cli.Usagef("--host NAME is required (repeatable): every DNS name and IP address devices reach the broker by")
	}
	if err := haveCA(*data); err != nil {
		return err
	}
	loc, err := regFlags.location(*data)
	if err != nil {
		return err
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	c, release, err := loadCA(ctx, *data)
	if err != nil {
		return err
	}
	defer release()
	if err := reg.Check(ctx, ca.Fingerprint(c.Root)); err != nil {
		return loc.explain(err)
	}
	var was string
	if cur, err := c.ServerCertificate(); err == nil && cur.Leaf != nil {
		was = strings.Join(certNames(cur.Leaf.DNSNames, cur.Leaf.IPAddresses), ", ")
	}
	leaf, err := c.ReissueServer(hosts)
	if err != nil {
		return err
	}
	serial := leaf.SerialNumber.Text(16)
	names := strings.Join(hosts, ",")
	if err := reg.Audit(ctx, registry.Event{Event: "server_cert", Serial: serial, Reason: "hosts " + names}); err != nil {
		return fmt.Errorf("the server certificate was replaced (serial %s) but the audit record was not written: %w", serial, err)
	}
	fmt.Fprintf(stdout, "re-issued the server certificate %s\n  names:  %s (were: %s)\n  serial: %s, valid until %s, same key\n  a running broker serve loads it within a few seconds\n",
		ca.ServerCertFile, strings.Join(hosts, ", "), was, serial, leaf.NotAfter.UTC().Format("2006-01-02T15:04:05Z"))
	return nil
}

// certNames lists a certificate's DNS names, then its IP addresses.
func certNames(dns []string, ips []net.IP) []string {
	names := append([]string(nil), dns...)
	for _, ip := range ips {
		names = append(names, ip.String())
	}
	return names
}

// certReloader serves the data directory's server certificate and
// reloads it when tls/server.crt or tls/server.key changes (polled, and
// on SIGHUP), so a certificate re-issued by server-cert is used without
// restart. A certificate that does not load, or does not chain to the
// root with serverAuth, is refused (logged) and the current one stays.
// get is safe for concurrent use.
type certReloader struct {
	c    *ca.CA
	dir  string // the data directory
	log  *slog.Logger
	cur  atomic.Pointer[tls.Certificate]
	last string // stamp of the files last loaded (watch goroutine only)
}

// newCertReloader loads the current server certificate.
func newCertReloader(c *ca.CA, dir string, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{c: c, dir: dir, log: log}
	r.last = r.stamp()
	cert, err := r.load()
	if err != nil {
		return nil, fmt.Errorf("server certificate: %w\n  re-issue it from the data directory's CA: %s", err, serverCertCommand(dir, nil))
	}
	r.cur.Store(cert)
	return r, nil
}

// get is a tls.Config.GetCertificate.
func (r *certReloader) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cur.Load(), nil
}

// stamp identifies the files' current versions (a rename makes a new
// file: its modification time and size change).
func (r *certReloader) stamp() string {
	var b strings.Builder
	for _, name := range []string{ca.ServerCertFile, ca.ServerKeyFile} {
		fi, err := os.Stat(filepath.Join(r.dir, name))
		if err != nil {
			b.WriteString("missing;")
			continue
		}
		fmt.Fprintf(&b, "%d/%d;", fi.ModTime().UnixNano(), fi.Size())
	}
	return b.String()
}

// load reads the certificate and checks it against the CA.
func (r *certReloader) load() (*tls.Certificate, error) {
	cert, err := r.c.ServerCertificate()
	if err != nil {
		return nil, err
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if ic, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(ic)
		}
	}
	if _, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: r.c.Pool(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, fmt.Errorf("%s: %w", ca.ServerCertFile, err)
	}
	return &cert, nil
}

// watch reloads the certificate when its files change (polled every
// interval) or on SIGHUP, until ctx ends.
func (r *certReloader) watch(ctx context.Context, interval time.Duration) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		case <-tick.C:
			if r.stamp() == r.last {
				continue
			}
		}
		// The stamp is taken before reading: a change while reading is
		// seen at the next tick.
		r.last = r.stamp()
		cert, err := r.load()
		if err != nil {
			r.log.Error("server certificate refused; the current one stays", "file", ca.ServerCertFile, "err", err)
			continue
		}
		if prev := r.cur.Load(); prev != nil && prev.Leaf.Equal(cert.Leaf) {
			continue
		}
		r.cur.Store(cert)
		r.log.Info("server certificate reloaded", "serial", cert.Leaf.SerialNumber.Text(16),
			"names", strings.Join(certNames(cert.Leaf.DNSNames, cert.Leaf.IPAddresses), ","),
			"not_after", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	}
}
