package server_test

import (
	"bytes"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/ca"
)

func tool(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(testtool.Require(t, name), args...)
	cmd.Dir = dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// Any EST client works: openssl makes the key and CSR, curl enrolls,
// openssl reads the PKCS#7 answer and verifies the chain against the root
// alone.
func TestInteropOpenSSLCurl(t *testing.T) {
	env := esttest.Start(t, nil)
	dir := t.TempDir()
	root := filepath.Join(env.Dir, ca.RootCertFile)
	tok := env.Token(t, "dev-ossl", "", time.Hour)

	tool(t, dir, "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", "key.pem", "-subj", "/CN=dev-ossl", "-outform", "DER", "-out", "csr.der")
	der, err := os.ReadFile(filepath.Join(dir, "csr.der"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "csr.b64"), provisioning.EncodeBase64(der), 0o600); err != nil {
		t.Fatal(err)
	}
	tool(t, dir, "curl", "--silent", "--show-error", "--fail-with-body", "--cacert", root,
		"--user", "dev-ossl:"+tok, "-H", "Content-Type: application/pkcs10",
		"--data-binary", "@csr.b64", "-o", "resp.b64", env.URL+provisioning.PathSimpleEnroll)
	tool(t, dir, "openssl", "base64", "-d", "-in", "resp.b64", "-out", "resp.der")
	tool(t, dir, "openssl", "pkcs7", "-inform", "DER", "-in", "resp.der", "-print_certs", "-out", "chain.pem")

	chain, _ := os.ReadFile(filepath.Join(dir, "chain.pem"))
	var blocks []*pem.Block
	for b, rest := pem.Decode(chain); b != nil; b, rest = pem.Decode(rest) {
		blocks = append(blocks, b)
	}
	if len(blocks) != 2 {
		t.Fatalf("openssl pkcs7 -print_certs found %d certificates, want 2", len(blocks))
	}
	os.WriteFile(filepath.Join(dir, "leaf.pem"), pem.EncodeToMemory(blocks[0]), 0o600)
	os.WriteFile(filepath.Join(dir, "issuing.pem"), pem.EncodeToMemory(blocks[1]), 0o600)
	out := tool(t, dir, "openssl", "verify", "-purpose", "sslclient", "-CAfile", root, "-untrusted", "issuing.pem", "leaf.pem")
	if !strings.Contains(out, "leaf.pem: OK") {
		t.Fatalf("openssl verify: %s", out)
	}
	subject := tool(t, dir, "openssl", "x509", "-in", "leaf.pem", "-noout", "-subject")
	if !strings.Contains(subject, "CN = dev-ossl") {
		t.Fatalf("subject: %s", subject)
	}

	// cacerts through curl as well
	tool(t, dir, "curl", "--silent", "--show-error", "--fail-with-body", "--cacert", root, "-o", "cacerts.b64", env.URL+provisioning.PathCACerts)
	tool(t, dir, "openssl", "base64", "-d", "-in", "cacerts.b64", "-out", "cacerts.der")
	out = tool(t, dir, "openssl", "pkcs7", "-inform", "DER", "-in", "cacerts.der", "-print_certs", "-noout")
	if !strings.Contains(out, "mqtls root CA") || !strings.Contains(out, "mqtls issuing CA") {
		t.Fatalf("cacerts: %s", out)
	}

	// A wrong token through curl: 401 with the reason in the body.
	cmd := exec.Command("curl", "--silent", "--cacert", root, "--user", "dev-ossl:wrong",
		"-H", "Content-Type: application/pkcs10", "--data-binary", "@csr.b64", "-w", "%{http_code}", env.URL+provisioning.PathSimpleEnroll)
	cmd.Dir = dir
	body, _ := cmd.Output()
	if !strings.HasSuffix(string(body), "401") || !strings.Contains(string(body), "token refused") {
		t.Fatalf("wrong token via curl: %q", body)
	}
}
