package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestNewLogger(t *testing.T) {
	for _, tc := range []struct{ format, want string }{
		{"", `level=INFO msg=audit event="connect refused" cn=dev-1 serial=0a remote=127.0.0.1:1 reason=revoked`},
		{"text", `level=INFO msg=audit event="connect refused" cn=dev-1 serial=0a remote=127.0.0.1:1 reason=revoked`},
		{"json", `"level":"INFO","msg":"audit","event":"connect refused","cn":"dev-1","serial":"0a","remote":"127.0.0.1:1","reason":"revoked"}`},
	} {
		var b bytes.Buffer
		log, err := NewLogger(&b, tc.format, "info")
		if err != nil {
			t.Fatal(err)
		}
		log.Debug("hidden")
		log.Info("audit", "event", "connect refused", "cn", "dev-1", "serial", "0a", "remote", "127.0.0.1:1", "reason", "revoked")
		if !strings.HasSuffix(strings.TrimSpace(b.String()), tc.want) || strings.Contains(b.String(), "hidden") {
			t.Errorf("format %q: %q, want one line ending %q", tc.format, b.String(), tc.want)
		}
		if tc.format == "json" && !json.Valid(b.Bytes()) {
			t.Errorf("not JSON: %s", b.String())
		}
	}
	for _, bad := range [][2]string{{"xml", "info"}, {"json", "loud"}} {
		if _, err := NewLogger(&bytes.Buffer{}, bad[0], bad[1]); !errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), `"`) {
			t.Errorf("NewLogger(%q, %q) = %v, want a usage error naming the value", bad[0], bad[1], err)
		}
	}
}
