package server

import (
	"fmt"
	"testing"
	"time"
)

// The limiter's memory is bounded under a distributed attack: at most
// maxKeys addresses, at most max timestamps each.
func TestLimiterBounded(t *testing.T) {
	l := &limiter{max: 3, window: time.Minute, maxKeys: 100, seen: map[string][]time.Time{}}
	now := time.Now()
	for i := range 10_000 {
		at := now.Add(time.Duration(i) * 2 * time.Microsecond)
		l.fail(at, fmt.Sprint("10.0.", i/256, ".", i%256))
		l.fail(at.Add(time.Microsecond), "hammer") // never the stalest, so never forgotten
	}
	now = now.Add(time.Second)
	if n := l.size(); n > 100 {
		t.Fatalf("%d addresses tracked, want at most 100", n)
	}
	if n := len(l.seen["hammer"]); n > 3 {
		t.Fatalf("%d timestamps kept for one address, want at most 3", n)
	}
	if wait := l.fail(now, "hammer"); wait <= 0 || wait > time.Minute {
		t.Fatalf("hammering address: wait %v", wait)
	}
	if wait := l.fail(now.Add(2*time.Minute), "hammer"); wait != 0 {
		t.Fatalf("after the window: wait %v, want 0", wait)
	}
}
