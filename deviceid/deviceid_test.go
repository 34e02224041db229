package deviceid_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/deviceid"
)

func TestCheck(t *testing.T) {
	for _, id := range []string{"a", "dev-1", "A.b_c-9", strings.Repeat("x", 64)} {
		if err := deviceid.Check(id); err != nil {
			t.Errorf("Check(%q) = %v", id, err)
		}
		if !deviceid.Valid(id) {
			t.Errorf("Valid(%q) = false", id)
		}
	}
	for _, id := range []string{"", "a+b", "a#b", "a/b", "$x", "a\x00b", "a b", "é", strings.Repeat("x", 65), "+", "#"} {
		if err := deviceid.Check(id); !errors.Is(err, deviceid.ErrInvalid) {
			t.Errorf("Check(%q) = %v, want ErrInvalid", id, err)
		}
		if deviceid.Valid(id) {
			t.Errorf("Valid(%q) = true", id)
		}
	}
}

// No accepted device ID can carry MQTT wildcards, a level separator, $ or
// NUL into a topic template; Check and Valid agree.
func FuzzCheck(f *testing.F) {
	f.Add("dev-1")
	f.Add("a/+/#")
	f.Fuzz(func(t *testing.T, id string) {
		err := deviceid.Check(id)
		if (err == nil) != deviceid.Valid(id) {
			t.Fatalf("Check(%q) = %v but Valid = %v", id, err, deviceid.Valid(id))
		}
		if err != nil {
			return
		}
		if id == "" || len(id) > 64 || strings.ContainsAny(id, "+#/$\x00 ") {
			t.Fatalf("accepted %q", id)
		}
	})
}
