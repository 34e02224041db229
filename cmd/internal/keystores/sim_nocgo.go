//go:build !cgo

package keystores

import (
	"context"
	"errors"
)

func openSim(ctx context.Context, simDir, keyDir string) (Store, error) {
	return nil, errors.New("tpmsim: unavailable: this binary was built with CGO_ENABLED=0 and the TPM simulator needs cgo; rebuild with cgo or use file, mem, tpm or swtpm:HOST:PORT")
}
