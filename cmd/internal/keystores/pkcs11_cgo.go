//go:build cgo

package keystores

import (
	"context"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/keystore"
)

func openPKCS11(ctx context.Context, u keystore.PKCS11) (Store, error) {
	return pkcs11.Open(ctx, u)
}
