package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// The README's EST recipe (openssl req + curl, then mosquitto_pub with the
// certificate) runs as it stands against a real broker serve, set up as the
// by-hand block does (bin/broker, data/, default ports), in a network
// namespace of its own so those ports are free.
func TestReadmeESTByHand(t *testing.T) {
	for _, tool := range []string{"openssl", "curl", "mosquitto_pub"} {
		testtool.Require(t, tool)
	}
	block := testtool.ReadmeBlock(t, "../../README.md", "### EST by hand: openssl and curl")
	dir := t.TempDir()
	if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "bin", "broker"), ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	os.WriteFile(filepath.Join(dir, "recipe.sh"), []byte(block), 0o600)
	// the by-hand block's set-up, then the recipe (stopping at its first
	// failure), then the broker stopped
	os.WriteFile(filepath.Join(dir, "harness.sh"), []byte(`set -e
bin/broker init --data data >/dev/null
bin/broker serve --data data 2>serve.log & BROKER=$!
trap 'kill $BROKER; wait $BROKER' EXIT
until curl -s -o /dev/null http://127.0.0.1:9464/healthz; do   # serve listening
	kill -0 $BROKER; sleep 0.05
done
bash -e recipe.sh
`), 0o600)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	out, err := testtool.RunInNetns(t, ctx, dir, "harness.sh")
	serveLog, _ := os.ReadFile(filepath.Join(dir, "serve.log"))
	t.Logf("broker serve log:\n%s", serveLog)
	if err != nil {
		t.Fatalf("the README block failed: %v", err)
	}
	for _, want := range []string{"sensor-2.crt: OK", "published"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("the README block's output lacks %q", want)
		}
	}
	// what the block's comment says of the answer: CRLF line breaks, which
	// base64 -di reads and base64 -d refuses
	p7, _ := os.ReadFile(filepath.Join(dir, "sensor-2.p7"))
	b64, _ := os.ReadFile(filepath.Join(dir, "sensor-2.p7.b64"))
	if !strings.Contains(string(b64), "\r\n") {
		t.Error("the EST answer has no CRLF line breaks; fix the README's comment")
	}
	if got, err := exec.Command("base64", "-di", filepath.Join(dir, "sensor-2.p7.b64")).Output(); err != nil || string(got) != string(p7) || len(p7) == 0 {
		t.Errorf("base64 -di does not decode the answer as openssl base64 -d does: %v", err)
	}
	if err := exec.Command("base64", "-d", filepath.Join(dir, "sensor-2.p7.b64")).Run(); err == nil {
		t.Error("base64 -d decodes the answer; fix the README's comment")
	}
	if !strings.Contains(string(serveLog), "msg=enrolled cn=sensor-2") {
		t.Errorf("broker serve did not log the enrollment of sensor-2")
	}
	if tok, err := os.ReadFile(filepath.Join(dir, "sensor-2.tok")); err != nil || len(strings.TrimSpace(string(tok))) == 0 {
		t.Errorf("no token file: %v", err)
	} else if strings.Contains(string(serveLog), strings.TrimSpace(string(tok))) {
		t.Error("the serve log holds the token")
	}
}
