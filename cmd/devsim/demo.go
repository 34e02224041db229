package main

import (
	"context"
	"io"
	"path/filepath"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/cmd/internal/keystores"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/sim/demo"
)

func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim demo", stderr)
	devices := fs.Int("devices", 20, "devices to enroll (one with a TPM-simulator key)")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	return demo.Run(ctx, demo.Config{Out: stdout, Devices: *devices, OpenTPMSim: openTPMSim})
}

// openTPMSim opens the in-process TPM simulator (its seed next to the key).
func openTPMSim(ctx context.Context, dir string) (keystore.Store, io.Closer, error) {
	s, err := keystores.Open(ctx, keystore.URI{Kind: keystore.KindTPMSim, Path: filepath.Join(dir, "tpmsim")}, dir)
	if err != nil {
		return nil, nil, err
	}
	return s, s, nil
}
