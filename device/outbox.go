package device

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
)

// OutboxFile is the persistent offline queue inside the identity directory.
const OutboxFile = "outbox"

// message is a queued QoS 1 publish.
type message struct {
	Topic   string
	Payload []byte
	Retain  bool
}

// outbox is the bounded offline queue. With a file, every push is appended
// and fsynced before it returns, and the file is rewritten atomically as
// messages are acknowledged (every 16 acknowledgements and when empty, so
// a crash may resend up to 15 acknowledged messages: at least once); a
// torn last record (crash mid-append) is ignored on load.
type outbox struct {
	mu    sync.Mutex
	max   int
	msgs  []message
	path  string // "" for memory only
	f     *os.File
	dirty int // acknowledged messages still in the file
	// fsyncDir makes a rename in dir durable (a test seam).
	fsyncDir func(dir string) error
}

func newOutbox(max int, persistent bool, dir string) (*outbox, error) {
	o := &outbox{max: max, fsyncDir: fsyncDir}
	if !persistent {
		return o, nil
	}
	o.path = filepath.Join(dir, OutboxFile)
	msgs, err := readOutbox(o.path)
	if err != nil {
		return nil, err
	}
	o.msgs = msgs
	if err := o.rewrite(); err != nil {
		return nil, err
	}
	return o, nil
}

func readOutbox(path string) ([]message, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("device: outbox: %w", err)
	}
	defer f.Close()
	r := bufio.NewReader(f)
	var out []message
	for {
		m, err := readRecord(r)
		if err != nil {
			return out, nil // EOF or a torn tail from a crash
		}
		out = append(out, m)
	}
}

func readRecord(r io.Reader) (message, error) {
	var hdr [7]byte // topic length u16, payload length u32, retain u8
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return message{}, err
	}
	tl, pl := binary.BigEndian.Uint16(hdr[0:]), binary.BigEndian.Uint32(hdr[2:])
	if int(tl)+int(pl) > MaxMessage {
		return message{}, errors.New("corrupt record")
	}
	buf := make([]byte, int(tl)+int(pl))
	if _, err := io.ReadFull(r, buf); err != nil {
		return message{}, err
	}
	return message{Topic: string(buf[:tl]), Payload: buf[tl:], Retain: hdr[6] == 1}, nil
}

func appendRecord(b []byte, m message) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.Topic)))
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.Payload)))
	if m.Retain {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = append(b, m.Topic...)
	return append(b, m.Payload...)
}

// check refuses a message the outbox could not store and read back.
func (o *outbox) check(m message) error {
	if len(m.Topic)+len(m.Payload) > MaxMessage {
		return fmt.Errorf("%w: %d bytes of topic and payload (at most %d)", ErrTooLarge, len(m.Topic)+len(m.Payload), MaxMessage)
	}
	return nil
}

func (o *outbox) push(m message) error {
	if err := o.check(m); err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.msgs) >= o.max {
		return fmt.Errorf("%w (%d messages)", ErrQueueFull, o.max)
	}
	if o.f != nil {
		if _, err := o.f.Write(appendRecord(nil, m)); err != nil {
			return fmt.Errorf("device: outbox: %w", err)
		}
		if err := o.f.Sync(); err != nil {
			return fmt.Errorf("device: outbox: %w", err)
		}
	}
	o.msgs = append(o.msgs, m)
	return nil
}

func (o *outbox) peek() (message, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.msgs) == 0 {
		return message{}, false
	}
	return o.msgs[0], true
}

func (o *outbox) len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.msgs)
}

// pop removes the head after it was acknowledged.
func (o *outbox) pop() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.msgs = o.msgs[1:]
	if o.f == nil {
		return nil
	}
	o.dirty++
	if len(o.msgs) == 0 || o.dirty >= 16 {
		return o.rewrite()
	}
	return nil
}

// rewrite replaces the file with the pending messages (temp file, fsync,
// rename) and reopens it for appending. Caller holds mu (or owns o).
func (o *outbox) rewrite() error {
	var data []byte
	for _, m := range o.msgs {
		data = appendRecord(data, m)
	}
	tmp := o.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("device: outbox: %w", err)
	}
	if _, err = f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, o.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("device: outbox: %w", err)
	}
	// The rename (and the file's creation) is durable only once the
	// directory is: without this a crash could bring back the old file.
	if err := o.fsyncDir(filepath.Dir(o.path)); err != nil {
		return fmt.Errorf("device: outbox: %w", err)
	}
	if o.f != nil {
		o.f.Close()
	}
	if o.f, err = os.OpenFile(o.path, os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return fmt.Errorf("device: outbox: %w", err)
	}
	o.dirty = 0
	return nil
}

func (o *outbox) close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.f == nil {
		return nil
	}
	err := o.f.Close()
	o.f = nil
	return err
}

func fsyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
