package provisioning_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/provisioning"
)

func TestCheckDeviceID(t *testing.T) {
	for _, id := range []string{"a", "dev-1", "A.b_c-9", strings.Repeat("x", 64)} {
		if err := provisioning.CheckDeviceID(id); err != nil {
			t.Errorf("CheckDeviceID(%q) = %v", id, err)
		}
	}
	for _, id := range []string{"", "a+b", "a#b", "a/b", "$x", "a\x00b", "a b", "é", strings.Repeat("x", 65), "+", "#"} {
		if err := provisioning.CheckDeviceID(id); !errors.Is(err, provisioning.ErrBadDeviceID) {
			t.Errorf("CheckDeviceID(%q) = %v, want ErrBadDeviceID", id, err)
		}
	}
}

// No accepted device ID can carry MQTT wildcards, a level separator, $ or
// NUL into a topic template.
func FuzzCheckDeviceID(f *testing.F) {
	f.Add("dev-1")
	f.Add("a/+/#")
	f.Fuzz(func(t *testing.T, id string) {
		if provisioning.CheckDeviceID(id) != nil {
			return
		}
		if id == "" || len(id) > 64 || strings.ContainsAny(id, "+#/$\x00 ") {
			t.Fatalf("accepted %q", id)
		}
	})
}
