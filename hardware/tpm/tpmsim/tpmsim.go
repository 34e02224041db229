// Package tpmsim runs the Microsoft TPM 2.0 reference simulator (through
// go-tpm-tools) inside the process, for tests and device simulations.
//
// # Security
//
// The simulator is not a TPM: its "hardware" is this process's memory.
// [Open] seeds the simulator's hierarchy seeds from a seed file kept next to
// the keys (so key blobs made in one run load in the next), which makes every
// key it creates recoverable by anyone who can read that directory. Use it
// for simulations and tests only, never for a real device.
//
// # Concurrency
//
// The simulator is a process-wide singleton: every [Open] in a process shares
// one simulator, which must be started with a single seed. The returned
// transports are safe for concurrent use (commands are serialised), but a
// TPM store already serialises its own commands.
//
// This package needs cgo (the simulator is C code linked with OpenSSL's
// libcrypto).
package tpmsim

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/mqtls/mqtls/internal/atomicfile"
)

// SeedFile is the name of the seed file inside a simulator directory.
const SeedFile = "tpmsim.seed"

var (
	mu    sync.Mutex
	sim   *simulator.Simulator
	seed  int64
	users int
)

// Open returns a transport to the process's simulator, starting it if
// needed with the seed kept in dir/tpmsim.seed (created, 0600, on first
// use). If the simulator already runs with another seed, Open fails. Close
// the transport when done; the simulator stops with its last user.
func Open(dir string) (transport.TPMCloser, error) {
	s, err := loadSeed(dir)
	if err != nil {
		return nil, err
	}
	return OpenSeed(s)
}

// OpenSeed is [Open] with an explicit seed.
func OpenSeed(s int64) (transport.TPMCloser, error) {
	mu.Lock()
	defer mu.Unlock()
	if sim == nil {
		x, err := simulator.GetWithFixedSeedInsecure(s)
		if err != nil {
			return nil, fmt.Errorf("tpmsim: start simulator: %w", err)
		}
		sim, seed = x, s
	} else if s != seed {
		return nil, errors.New("tpmsim: the simulator already runs in this process with another seed (one simulator directory per process)")
	}
	users++
	return &conn{}, nil
}

func loadSeed(dir string) (int64, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return 0, fmt.Errorf("tpmsim: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, fmt.Errorf("tpmsim: %w", err)
	}
	defer root.Close()
	data, err := root.ReadFile(SeedFile)
	if errors.Is(err, fs.ErrNotExist) {
		var b [8]byte
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
		err = atomicfile.WriteExclusive(root, SeedFile, b[:], 0o600)
		if errors.Is(err, fs.ErrExist) { // another process won the race
			data, err = root.ReadFile(SeedFile)
		} else {
			data = b[:]
		}
	}
	if err != nil {
		return 0, fmt.Errorf("tpmsim: seed: %w", err)
	}
	if len(data) != 8 {
		return 0, fmt.Errorf("tpmsim: seed file %s is %d bytes, want 8", filepath.Join(dir, SeedFile), len(data))
	}
	return int64(binary.BigEndian.Uint64(data)), nil
}

// conn is one user's handle on the shared simulator.
type conn struct{ closed bool }

var errClosed = errors.New("tpmsim: transport closed")

func (c *conn) Send(cmd []byte) ([]byte, error) {
	mu.Lock()
	defer mu.Unlock()
	if c.closed {
		return nil, errClosed
	}
	if _, err := sim.Write(cmd); err != nil {
		return nil, err
	}
	// The simulator buffers the whole response; read it in one go.
	buf := make([]byte, 4096)
	var out []byte
	for {
		n, err := sim.Read(buf)
		out = append(out, buf[:n]...)
		if err != nil || n < len(buf) {
			break
		}
	}
	return out, nil
}

func (c *conn) Close() error {
	mu.Lock()
	defer mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	users--
	if users == 0 {
		err := sim.Close()
		sim = nil
		return err
	}
	return nil
}
