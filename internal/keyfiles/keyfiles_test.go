package keyfiles_test

import (
	"context"
	"errors"
	"testing"

	"github.com/mqtls/mqtls/internal/keyfiles"
)

type alg string

func (a alg) Resolve() (alg, error) {
	switch a {
	case "":
		return "default", nil
	case "bad":
		return "", errBadAlg
	}
	return a, nil
}

var errBadAlg = errors.New("bad alg")

func TestPrepare(t *testing.T) {
	taken := func() error { return keyfiles.ErrExists }
	done, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		name   string
		ctx    context.Context
		key    string
		alg    alg
		absent func() error
		want   alg
		err    error
	}{
		{"ok", t.Context(), "k", "x", nil, "x", nil},
		{"default alg", t.Context(), "k", "", nil, "default", nil},
		{"ctx first", done, "../bad", "bad", taken, "", context.Canceled},
		{"name before alg", t.Context(), "../bad", "bad", taken, "", keyfiles.ErrInvalidName},
		{"alg before existence", t.Context(), "k", "bad", taken, "", errBadAlg},
		{"exists", t.Context(), "k", "x", taken, "", keyfiles.ErrExists},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := keyfiles.Prepare(tt.ctx, tt.key, tt.alg, tt.absent)
			if !errors.Is(err, tt.err) || (tt.err == nil) != (err == nil) {
				t.Fatalf("Prepare = %v, want %v", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("Prepare = %q, want %q", got, tt.want)
			}
		})
	}
}
