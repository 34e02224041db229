//go:build !cgo

package keystores

import (
	"context"
	"fmt"

	"github.com/mqtls/mqtls/hardware/pkcs11"
	"github.com/mqtls/mqtls/keystore"
)

func openPKCS11(ctx context.Context, u keystore.PKCS11) (Store, error) {
	return nil, fmt.Errorf("%w: this binary was built with CGO_ENABLED=0 and PKCS#11 needs cgo (the module is a C library loaded with dlopen); rebuild with cgo or use file, mem, tpm or swtpm:HOST:PORT", pkcs11.ErrUnavailable)
}
