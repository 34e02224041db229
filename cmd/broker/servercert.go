package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"

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
	fs := newFlags("server-cert", stderr)
	data := dataFlag(fs)
	var hosts listFlag
	fs.Var(&hosts, "host", "DNS name or IP address the broker is reached by (repeatable, required): the new certificate names these and no others, so repeat the names it keeps")
	regFlags := addRegistryFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if len(hosts) == 0 {
		return usageErr("--host NAME is required (repeatable): every DNS name and IP address devices reach the broker by")
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
