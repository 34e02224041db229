// Package atomicfile writes files so that a crash leaves either the old
// content or the new one, never a torn file.
package atomicfile

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces name inside root with data: it writes a temporary file in
// the same directory, fsyncs it, renames it over name and fsyncs the
// directory.
func Write(root *os.Root, name string, data []byte, perm fs.FileMode) error {
	tmp, err := writeTemp(root, name, data, perm)
	if err != nil {
		return err
	}
	if err := root.Rename(tmp, name); err != nil {
		_ = root.Remove(tmp) // best effort: the rename error is the one to report
		return fmt.Errorf("rename %s: %w", name, err)
	}
	return syncDir(root, name)
}

// WriteExclusive creates name inside root with data and fails with an error
// matching fs.ErrExist if name already exists. The file appears complete or
// not at all: the temporary file is hard-linked to name, which never
// overwrites.
func WriteExclusive(root *os.Root, name string, data []byte, perm fs.FileMode) error {
	tmp, err := writeTemp(root, name, data, perm)
	if err != nil {
		return err
	}
	linkErr := root.Link(tmp, name)
	rmErr := root.Remove(tmp)
	if linkErr != nil {
		return fmt.Errorf("create %s: %w", name, linkErr)
	}
	if rmErr != nil {
		return fmt.Errorf("remove temporary file for %s: %w", name, rmErr)
	}
	return syncDir(root, name)
}

func writeTemp(root *os.Root, name string, data []byte, perm fs.FileMode) (string, error) {
	var rnd [8]byte
	_, _ = rand.Read(rnd[:]) // crypto/rand.Read never fails
	tmp := filepath.Join(filepath.Dir(name), "."+filepath.Base(name)+"."+hex.EncodeToString(rnd[:])+".tmp")
	f, err := root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return "", fmt.Errorf("create temporary file for %s: %w", name, err)
	}
	// The umask may have narrowed perm; it may not widen it, but be explicit.
	err = f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = root.Remove(tmp)
		return "", fmt.Errorf("write %s: %w", name, err)
	}
	return tmp, nil
}

func syncDir(root *os.Root, name string) error {
	d, err := root.Open(filepath.Dir(name))
	if err != nil {
		return fmt.Errorf("sync directory of %s: %w", name, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil && !errors.Is(err, fs.ErrInvalid) {
		return fmt.Errorf("sync directory of %s: %w", name, err)
	}
	return nil
}
