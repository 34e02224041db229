// Package keyfiles is what keystore backends share and the module does not
// export: the key-name rule, the checks every Generate makes first
// ([Prepare]), and the directory of one file NAME+ext per key opened as an
// [os.Root] (the file backend in keystore and the TPM backend's blobs).
//
// The sentinel errors are keystore's: package keystore re-exports them
// (keystore.ErrNotFound is [ErrNotFound]), as os does with io/fs, so
// callers compare with the keystore names. This package imports only the
// standard library and internal packages; keystore imports it, never the
// reverse.
package keyfiles

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Sentinel errors, re-exported by package keystore.
var (
	ErrNotFound    = errors.New("keystore: key not found")
	ErrExists      = errors.New("keystore: key already exists")
	ErrInvalidName = errors.New("keystore: invalid key name")
)

// CheckName reports whether name is a valid key name: 1–64 characters of
// [A-Za-z0-9._-], not starting with a dot. A key name is a file name, not a
// device ID. The error wraps [ErrInvalidName].
func CheckName(name string) error {
	if len(name) == 0 || len(name) > 64 || name[0] == '.' {
		return fmt.Errorf("%w %q: want 1-64 characters of [A-Za-z0-9._-], not starting with '.'", ErrInvalidName, name)
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w %q: character %q not in [A-Za-z0-9._-]", ErrInvalidName, name, c)
		}
	}
	return nil
}

// Prepare makes the checks every backend's Generate makes before it creates
// a key, in this order: ctx not done, a valid name, a known algorithm
// (returned resolved: "" is the default), and absent (nil: skipped), which
// reports [ErrExists] (or a lookup error) when the name is taken.
//
// alg is keystore.KeyAlg; the type parameter only spares this package an
// import of keystore (which imports it).
func Prepare[A interface{ Resolve() (A, error) }](ctx context.Context, name string, alg A, absent func() error) (A, error) {
	var zero A
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	if err := CheckName(name); err != nil {
		return zero, err
	}
	alg, err := alg.Resolve()
	if err != nil {
		return zero, err
	}
	if absent != nil {
		if err := absent(); err != nil {
			return zero, err
		}
	}
	return alg, nil
}

// Absent returns [ErrExists] if the key file NAME+ext exists in root (the
// directory dir, named in the error).
func Absent(root *os.Root, dir, name, ext string) error {
	if _, err := root.Lstat(name + ext); err == nil {
		return fmt.Errorf("%w: %s", ErrExists, filepath.Join(dir, name+ext))
	}
	return nil
}

// List lists the keys of a backend that keeps one file NAME+ext per key in
// the directory dir (opened as root), sorted.
func List(root *os.Root, dir, ext string) ([]string, error) {
	d, err := root.Open(".")
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	defer d.Close()
	entries, err := d.ReadDir(-1)
	if err != nil {
		return nil, fmt.Errorf("keystore: list %s: %w", dir, err)
	}
	var names []string
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ext)
		if ok && e.Type().IsRegular() && CheckName(name) == nil {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// Delete removes the key file NAME+ext, or returns [ErrNotFound].
func Delete(root *os.Root, dir, name, ext string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	err := root.Remove(name + ext)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrNotFound, filepath.Join(dir, name+ext))
	}
	if err != nil {
		return fmt.Errorf("keystore: delete: %w", err)
	}
	return nil
}

// Rename renames the key file oldName+ext to newName+ext inside root (the
// directory dir), replacing the target atomically, and syncs the directory:
// the keystore.Renamer of every backend that keeps one file per key.
func Rename(root *os.Root, dir, oldName, newName, ext string) error {
	if err := CheckName(oldName); err != nil {
		return err
	}
	if err := CheckName(newName); err != nil {
		return err
	}
	err := root.Rename(oldName+ext, newName+ext)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrNotFound, filepath.Join(dir, oldName+ext))
	}
	if err != nil {
		return fmt.Errorf("keystore: rename: %w", err)
	}
	if d, err := root.Open("."); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil {
			return fmt.Errorf("keystore: rename: %w", err)
		}
	}
	return nil
}
