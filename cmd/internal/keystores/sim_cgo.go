//go:build cgo

package keystores

import (
	"context"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/hardware/tpm/tpmsim"
)

func openSim(ctx context.Context, simDir, keyDir string) (Store, error) {
	t, err := tpmsim.Open(simDir)
	if err != nil {
		return nil, err
	}
	return tpm.New(ctx, t, keyDir)
}
