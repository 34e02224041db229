package keystore

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/mqtls/mqtls/internal/atomicfile"
	"github.com/mqtls/mqtls/internal/keyfiles"
)

// KeyFileExt is the file name extension of a [FileStore] key.
const KeyFileExt = ".key"

// FileStore keeps each key as an unencrypted PKCS#8 PEM file NAME.key in one
// directory. Create it with [NewFile]; Close releases the directory handle.
type FileStore struct {
	dir  string
	root *os.Root
}

var _ Store = (*FileStore)(nil)

// NewFile opens (creating it with mode 0700 if needed) the key directory
// dir. A directory that group or others can access is refused with
// [ErrInsecurePermissions].
func NewFile(dir string) (*FileStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("keystore: create key directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("keystore: %s is not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: key directory %s has mode %04o, group and others must have no access: run chmod 700 %s",
			ErrInsecurePermissions, dir, perm, dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	return &FileStore{dir: dir, root: root}, nil
}

// Dir returns the key directory.
func (s *FileStore) Dir() string { return s.dir }

// Path returns the file that holds (or would hold) key name.
func (s *FileStore) Path(name string) string { return filepath.Join(s.dir, name+KeyFileExt) }

// Close releases the directory handle.
func (s *FileStore) Close() error { return s.root.Close() }

// Generate implements [Store].
func (s *FileStore) Generate(ctx context.Context, name string, alg KeyAlg) (crypto.Signer, error) {
	alg, err := keyfiles.Prepare(ctx, name, alg, func() error { return keyfiles.Absent(s.root, s.dir, name, KeyFileExt) })
	if err != nil {
		return nil, err
	}
	file := name + KeyFileExt
	key, err := generateSoft(alg)
	if err != nil {
		return nil, fmt.Errorf("keystore: generate %s: %w", alg, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("keystore: encode %s: %w", alg, err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	clear(der)
	err = atomicfile.WriteExclusive(s.root, file, data, 0o600)
	clear(data)
	if errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %s", ErrExists, s.Path(name))
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	return softSigner{key}, nil
}

// Signer implements [Store]. It refuses a key file that group or others can
// access and reports an unparsable one as [ErrCorrupt].
func (s *FileStore) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	path := s.Path(name)
	f, err := s.root.Open(name + KeyFileExt)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, path)
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrCorrupt, path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("%w: key file %s has mode %04o and is readable by group or others: run chmod 600 %s (and consider the key compromised)",
			ErrInsecurePermissions, path, perm, path)
	}
	data := make([]byte, fi.Size())
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, fmt.Errorf("keystore: read %s: %w", path, err)
	}
	defer clear(data)
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%w: %s: no PEM block of type PRIVATE KEY", ErrCorrupt, path)
	}
	defer clear(block.Bytes)
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, path, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%w: %s holds a %T", ErrUnsupported, path, key)
	}
	if _, err := AlgOf(signer.Public()); err != nil {
		return nil, fmt.Errorf("keystore: %s: %w", path, err)
	}
	return softSigner{signer}, nil
}

// List implements [Store].
func (s *FileStore) List(ctx context.Context) ([]string, error) {
	return keyfiles.List(s.root, s.dir, KeyFileExt)
}

// Delete implements [Store].
func (s *FileStore) Delete(ctx context.Context, name string) error {
	return keyfiles.Delete(s.root, s.dir, name, KeyFileExt)
}

// Rename implements [Renamer] with an atomic rename of the key file.
func (s *FileStore) Rename(ctx context.Context, oldName, newName string) error {
	return keyfiles.Rename(s.root, s.dir, oldName, newName, KeyFileExt)
}
