package atomicfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

func open(t *testing.T) (*os.Root, string) {
	t.Helper()
	dir := t.TempDir()
	r, err := os.OpenRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, dir
}

func TestWriteExclusive(t *testing.T) {
	r, dir := open(t)
	if err := WriteExclusive(r, "f", []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := WriteExclusive(r, "f", []byte("second"), 0o600)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second WriteExclusive = %v, want fs.ErrExist", err)
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "f")); string(got) != "first" {
		t.Fatalf("content = %q, want the first write kept", got)
	}
	fi, _ := os.Stat(filepath.Join(dir, "f"))
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %04o, want 0600", fi.Mode().Perm())
	}
	assertOnly(t, dir, "f")
}

func TestWriteReplaces(t *testing.T) {
	r, dir := open(t)
	for _, content := range []string{"old", "new"} {
		if err := Write(r, "f", []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := os.ReadFile(filepath.Join(dir, "f")); string(got) != "new" {
		t.Fatalf("content = %q, want new", got)
	}
	assertOnly(t, dir, "f")
}

// A write that fails (here: into a missing directory) leaves nothing behind.
func TestWriteFailureLeavesNothing(t *testing.T) {
	r, dir := open(t)
	if err := Write(r, "missing/f", []byte("x"), 0o600); err == nil {
		t.Fatal("Write into a missing directory succeeded")
	}
	if err := Write(r, "../escape", []byte("x"), 0o600); err == nil {
		t.Fatal("Write outside the root succeeded")
	}
	assertOnly(t, dir)
}

func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	if len(entries) != len(names) {
		var got []string
		for _, e := range entries {
			got = append(got, e.Name())
		}
		t.Fatalf("directory holds %v, want %v (temporary files left behind?)", got, names)
	}
}
