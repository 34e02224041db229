package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/spki"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func cmdEnroll(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim enroll", stderr)
	est := fs.String("est", "", "EST server, https://HOST:PORT")
	caFile := fs.String("ca", "", "root CA certificate to pin (PEM)")
	id := fs.String("device", "", "device ID (the certificate CN)")
	token := fs.String("token", "", "one-time enrollment token (visible in ps: prefer --token-file)")
	tokenFile := fs.String("token-file", "", "read the token from this file (- for stdin)")
	ksURI := fs.String("keystore", "file", "where the key is created: "+keystore.URIForms)
	alg := fs.String("alg", string(keystore.ECDSAP256), "key algorithm: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072")
	out := fs.String("out", "", "identity directory to create")
	attestFlag := fs.Bool("attest", false, "TPM key attestation: prove to the CA that the key lives in the TPM of a manufacturer-certified EK (TPM keystores only)")
	wait := 10 * time.Second
	durationFlag(fs, &wait, "wait", "", "how long to wait for an EST server that refuses connections (still starting) (default 10s)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *est == "" || *caFile == "" || *id == "" || *out == "" {
		return cli.Usagef("--est, --ca, --device and --out are required")
	}
	tok, err := readToken(*token, *tokenFile)
	if err != nil {
		return err
	}
	u, err := keystore.ParseURI(*ksURI)
	if err != nil {
		return err
	}
	if u.Kind == keystore.KindMem {
		return cli.Usagef("--keystore mem keeps the key in this process's memory: it would vanish when enroll exits, with the token spent. Use file, tpm, swtpm:HOST:PORT or tpmsim:DIR (mem is for devsim run and demo)")
	}
	if *attestFlag && u.Kind != keystore.KindTPM && u.Kind != keystore.KindSWTPM && u.Kind != keystore.KindTPMSim {
		return cli.Usagef("--attest needs a TPM keystore (tpm, swtpm:HOST:PORT, tpmsim:DIR), not %s", u.Kind)
	}
	roots, err := device.ReadCertFile(*caFile)
	if err != nil {
		return err
	}
	store, err := keystores.Open(ctx, u, *out)
	if err != nil {
		return err
	}
	defer store.Close()
	var identity *device.Identity
	err = waitFor(ctx, stderr, "the EST server at "+*est, wait, func() error {
		var err error
		identity, err = device.Enroll(ctx, device.EnrollConfig{
			Dir: *out, DeviceID: *id, Token: tok, EST: *est, Root: roots[0],
			Store: store, Keystore: u.String(), Alg: keystore.KeyAlg(*alg), Attest: *attestFlag,
		})
		return err
	})
	if errors.Is(err, device.ErrKeyMismatch) {
		return fmt.Errorf("%w (--alg %s)", err, *alg)
	}
	if err != nil {
		return err
	}
	printIdentity(stdout, "enrolled", identity)
	return nil
}

func cmdRenew(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim renew", stderr)
	est := fs.String("est", "", "EST server (default: the one recorded at enrollment)")
	dir := fs.String("identity", "", "identity directory")
	rekey := fs.Bool("rekey", false, "generate a new key for the new certificate")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return cli.Usagef("--identity DIR is required")
	}
	cfg, err := device.ReadConfig(*dir)
	if err != nil {
		return err
	}
	u, err := keystore.ParseURI(cfg.Keystore)
	if err != nil {
		return fmt.Errorf("%s: %w", device.ConfigFile, err)
	}
	store, err := keystores.Open(ctx, u, *dir)
	if err != nil {
		return err
	}
	defer store.Close()
	id, err := device.Load(ctx, *dir, store)
	if err != nil {
		return err
	}
	renewed, err := device.Renew(ctx, id, store, device.RenewConfig{EST: *est, Rekey: *rekey})
	if err != nil {
		return err
	}
	printIdentity(stdout, "renewed", renewed)
	return nil
}

func readToken(flagValue, file string) (string, error) {
	switch {
	case flagValue != "" && file != "":
		return "", cli.Usagef("give --token or --token-file, not both")
	case flagValue != "":
		return flagValue, nil
	case file == "":
		return "", cli.Usagef("--token or --token-file is required")
	}
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, 4096))
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	return strings.TrimSpace(string(data)), nil
}

func printIdentity(w io.Writer, verb string, id *device.Identity) {
	leaf := id.Leaf()
	fmt.Fprintf(w, "%s %s in %s\n  serial:      %s\n  SPKI sha256: %s\n  valid until: %s\n  keystore:    %s\n",
		verb, leaf.Subject.CommonName, id.Dir, leaf.SerialNumber.Text(16), spki.Fingerprint(leaf),
		leaf.NotAfter.UTC().Format(time.RFC3339), id.Config.Keystore)
	if ca.Attested(leaf) {
		fmt.Fprintln(w, "  attested:    TPM (certificate policies 2.23.133.11.1.1, 2.23.133.11.1.2)")
	}
}
