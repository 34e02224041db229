// Package keystores opens the keystore a URI names: the one place the
// commands choose a backend.
package keystores

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/keystore"
)

// Store is an open keystore; Close releases its directory and device.
type Store interface {
	keystore.Store
	Close() error
}

// Open opens the keystore u names. Key files (and TPM key blobs) live in
// identityDir unless u names a directory itself (file:DIR); for tpmsim:DIR,
// DIR holds the simulator's seed; pkcs11: keys live in the token alone.
func Open(ctx context.Context, u keystore.URI, identityDir string) (Store, error) {
	switch u.Kind {
	case keystore.KindFile:
		dir := u.Path
		if dir == "" {
			dir = identityDir
		}
		return keystore.NewFile(dir)
	case keystore.KindMem:
		return memStore{keystore.NewMemory()}, nil
	case keystore.KindTPM:
		return tpm.Open(ctx, u.Path, identityDir)
	case keystore.KindSWTPM:
		return tpm.OpenSWTPM(ctx, u.Addr, identityDir)
	case keystore.KindTPMSim:
		return openSim(ctx, filepath.Clean(u.Path), identityDir)
	case keystore.KindPKCS11:
		return openPKCS11(ctx, u.PKCS11)
	}
	return nil, fmt.Errorf("%w: kind %q; accepted forms: %s", keystore.ErrBadURI, u.Kind, keystore.URIForms)
}

type memStore struct{ *keystore.MemoryStore }

func (memStore) Close() error { return nil }
