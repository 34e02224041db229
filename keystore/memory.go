package keystore

import (
	"context"
	"crypto"
	"fmt"
	"slices"
	"sync"

	"github.com/mqtls/mqtls/internal/keyfiles"
)

// MemoryStore keeps keys in process memory; they are gone when the process
// exits. It suits simulators that need thousands of identities. The zero
// value is not usable: call [NewMemory].
type MemoryStore struct {
	mu   sync.Mutex
	keys map[string]crypto.Signer
}

var _ Store = (*MemoryStore)(nil)

// NewMemory returns an empty in-memory store.
func NewMemory() *MemoryStore {
	return &MemoryStore{keys: make(map[string]crypto.Signer)}
}

// Generate implements [Store].
func (m *MemoryStore) Generate(ctx context.Context, name string, alg KeyAlg) (crypto.Signer, error) {
	alg, err := keyfiles.Prepare(ctx, name, alg, func() error {
		m.mu.Lock()
		defer m.mu.Unlock()
		if _, taken := m.keys[name]; taken {
			return fmt.Errorf("%w: %q", ErrExists, name)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	key, err := generateSoft(alg)
	if err != nil {
		return nil, fmt.Errorf("keystore: generate %s: %w", alg, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, taken := m.keys[name]; taken {
		return nil, fmt.Errorf("%w: %q", ErrExists, name)
	}
	m.keys[name] = key
	return softSigner{key}, nil
}

// Signer implements [Store].
func (m *MemoryStore) Signer(ctx context.Context, name string) (crypto.Signer, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	key, ok := m.keys[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return softSigner{key}, nil
}

// List implements [Store].
func (m *MemoryStore) List(ctx context.Context) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, 0, len(m.keys))
	for n := range m.keys {
		names = append(names, n)
	}
	slices.Sort(names)
	return names, nil
}

// Delete implements [Store].
func (m *MemoryStore) Delete(ctx context.Context, name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.keys[name]; !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	delete(m.keys, name)
	return nil
}

// Rename implements [Renamer].
func (m *MemoryStore) Rename(ctx context.Context, oldName, newName string) error {
	if err := CheckName(oldName); err != nil {
		return err
	}
	if err := CheckName(newName); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[oldName]
	if !ok {
		return fmt.Errorf("%w: %q", ErrNotFound, oldName)
	}
	delete(m.keys, oldName)
	m.keys[newName] = k
	return nil
}
