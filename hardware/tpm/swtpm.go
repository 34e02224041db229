package tpm

import (
	"context"
	"net"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/tcp"
)

func dialSWTPM(ctx context.Context, cmdAddr, ctrlAddr string) (transport.TPM, error) {
	return tcp.Open(tcp.Config{CommandAddress: cmdAddr, PlatformAddress: ctrlAddr})
}

var _ = net.Dial
