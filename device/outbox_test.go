package device

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// The persistent offline queue survives a restart, ignores a record torn by
// a crash mid-append, and stays bounded.
func TestOutbox(t *testing.T) {
	dir := t.TempDir()
	o, err := newOutbox(3, true, dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a", "b", "c"} {
		if err := o.push(message{Topic: "t/" + p, Payload: []byte(p)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := o.push(message{Topic: "t/d"}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("push beyond the bound = %v, want ErrQueueFull", err)
	}
	if err := o.pop(); err != nil { // "a" acknowledged
		t.Fatal(err)
	}
	o.close()
	// a crash while appending: half a record at the end
	f, _ := os.OpenFile(filepath.Join(dir, OutboxFile), os.O_WRONLY|os.O_APPEND, 0o600)
	rec := appendRecord(nil, message{Topic: "t/torn", Payload: []byte("xxxxxxxx")})
	f.Write(rec[:len(rec)-3])
	f.Close()

	o, err = newOutbox(3, true, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	var got []string
	for {
		m, ok := o.peek()
		if !ok {
			break
		}
		got = append(got, string(m.Payload))
		o.pop()
	}
	// at least once: b and c in order, the torn record dropped; "a" may
	// come again (acknowledgements reach the file in batches)
	if n := len(got); n < 2 || got[n-2] != "b" || got[n-1] != "c" || n > 3 {
		t.Fatalf("after restart: %v, want [a] b c", got)
	}
	fi, _ := os.Stat(filepath.Join(dir, OutboxFile))
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("outbox mode %04o", fi.Mode().Perm())
	}
}

// Every rewrite (creation included) is followed by an fsync of the
// directory, or a crash could undo the rename.
func TestOutboxSyncsDirectory(t *testing.T) {
	dir := t.TempDir()
	o, err := newOutbox(100, true, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	var synced []string
	o.fsyncDir = func(d string) error { synced = append(synced, d); return fsyncDir(d) }
	for range 16 {
		if err := o.push(message{Topic: "t", Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
	}
	for range 16 { // the 16th acknowledgement rewrites the file
		if err := o.pop(); err != nil {
			t.Fatal(err)
		}
	}
	if len(synced) == 0 || synced[0] != dir {
		t.Fatalf("directory fsyncs after the rewrite: %v, want %s", synced, dir)
	}
	// a new outbox is created by a rename too
	o2, err := newOutbox(1, true, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	o2.close()
}

// A message the outbox could not read back is refused when it is queued,
// with a named error (it used to be written, then dropped as corrupt on
// load).
func TestOutboxRefusesOversize(t *testing.T) {
	dir := t.TempDir()
	o, err := newOutbox(10, true, dir)
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, MaxMessage) // + the topic: one byte too many
	if err := o.push(message{Topic: "t", Payload: big}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("push of %d bytes = %v, want ErrTooLarge", len(big)+1, err)
	}
	if err := o.push(message{Topic: "t", Payload: []byte("ok")}); err != nil {
		t.Fatal(err)
	}
	o.close()
	o, err = newOutbox(10, true, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer o.close()
	if m, ok := o.peek(); !ok || string(m.Payload) != "ok" || o.len() != 1 {
		t.Fatalf("after reload: %d messages, head %q", o.len(), m.Payload)
	}
}
