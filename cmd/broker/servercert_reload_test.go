package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
)

// A certificate re-issued with a new name is served by a running serve,
// MQTT and EST, without restart; the connection made before stays.
func TestServeReloadsServerCert(t *testing.T) {
	data := initData(t)
	estAddr, mqttAddr, logs, _, stop := startServe(t, data)
	defer stop()
	tok, _, _ := brokerCLI(t, "token", "--data", data, "--device", "dev-2")
	before, lost := enrollAndConnect(t, data, "dev-2", tok, estAddr, mqttAddr)

	root, _ := ca.LoadRoot(data)
	roots := x509.NewCertPool()
	roots.AddCert(root)
	idDir := filepath.Join(t.TempDir(), "id")
	store, err := keystore.NewFile(idDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	tok, _, _ = brokerCLI(t, "token", "--data", data, "--device", "dev-1")
	ident, err := device.Enroll(t.Context(), device.EnrollConfig{Dir: idDir, DeviceID: "dev-1", Token: strings.TrimSpace(tok), EST: "https://" + estAddr, Root: root, Store: store, Keystore: "file"})
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := ident.TLSCertificate()
	const name = "broker.mqtls.test"
	mqttVia := func(serverName string) error {
		cl := paho.NewClient(paho.NewClientOptions().AddBroker("ssl://" + mqttAddr).SetClientID("dev-1").
			SetTLSConfig(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}, ServerName: serverName}).
			SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false))
		tk := cl.Connect()
		if !tk.WaitTimeout(10 * time.Second) {
			return os.ErrDeadlineExceeded
		}
		if tk.Error() == nil {
			cl.Disconnect(0)
		}
		return tk.Error()
	}
	estVia := func(serverName string) error {
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, ServerName: serverName}}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get("https://" + estAddr + "/.well-known/est/cacerts")
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		return resp.Body.Close()
	}
	if err := mqttVia(name); err == nil || !strings.Contains(err.Error(), "not "+name) {
		t.Fatalf("MQTT by %s before re-issue: %v, want a hostname error", name, err)
	}
	if err := estVia(name); err == nil {
		t.Fatalf("EST by %s before re-issue succeeded", name)
	}

	if _, errs, code := brokerCLI(t, "server-cert", "--data", data, "--host", "localhost", "--host", "127.0.0.1", "--host", name); code != 0 {
		t.Fatalf("server-cert: exit %d\n%s", code, errs)
	}
	testtool.Eventually(t, 10*time.Second, "MQTT by the new name", func() bool { return mqttVia(name) == nil })
	testtool.Eventually(t, 10*time.Second, "EST by the new name", func() bool { return estVia(name) == nil })
	if err := mqttVia("localhost"); err != nil {
		t.Errorf("MQTT by a name kept: %v", err)
	}
	if !strings.Contains(logs.String(), "server certificate reloaded") {
		t.Errorf("no reload in the log:\n%s", logs.String())
	}
	if tk := before.Publish("devices/dev-2/t", 1, false, "x"); !tk.WaitTimeout(5*time.Second) || tk.Error() != nil {
		t.Errorf("the connection made before the re-issue: %v", tk.Error())
	}
	select {
	case err := <-lost:
		t.Errorf("the connection made before the re-issue was lost: %v", err)
	default:
	}
}

// A server certificate replaced by one that does not chain to the data
// directory's root is refused by the running serve, which keeps serving
// the current one and says so.
func TestServeRefusesForeignServerCert(t *testing.T) {
	data := initData(t)
	_, mqttAddr, logs, _, stop := startServe(t, data)
	defer stop()
	cur := serverCert(t, data)
	other := testpki.New(t)
	var chain []byte
	for _, der := range other.Server(t, cur.PublicKey, "127.0.0.1") {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	if err := os.WriteFile(filepath.Join(data, ca.ServerCertFile), chain, 0o600); err != nil {
		t.Fatal(err)
	}
	testtool.Eventually(t, 10*time.Second, "foreign certificate refused", func() bool {
		return strings.Contains(logs.String(), "server certificate refused")
	})
	root, _ := ca.LoadRoot(data)
	roots := x509.NewCertPool()
	roots.AddCert(root)
	conn, err := tls.Dial("tcp", mqttAddr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatalf("after a refused certificate: %v", err)
	}
	defer conn.Close()
	if got := conn.ConnectionState().PeerCertificates[0]; !got.Equal(cur) {
		t.Errorf("serving serial %x, want the current %x", got.SerialNumber, cur.SerialNumber)
	}
}

// serve does not start with a server certificate that does not chain to
// the root; the error names the command that re-issues it.
func TestServeRefusesForeignServerCertAtStart(t *testing.T) {
	data := initData(t)
	cur := serverCert(t, data)
	other := testpki.New(t)
	var chain []byte
	for _, der := range other.Server(t, cur.PublicKey, "127.0.0.1") {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	if err := os.WriteFile(filepath.Join(data, ca.ServerCertFile), chain, 0o600); err != nil {
		t.Fatal(err)
	}
	_, errs, code := brokerCLI(t, serveArgs(t, data)...)
	if want := "broker server-cert --data " + data + " --host"; code != 1 || !strings.Contains(errs, want) || !strings.Contains(errs, ca.ServerCertFile) {
		t.Errorf("serve with a foreign server certificate: exit %d, stderr %q; want 1, the file and %q", code, errs, want)
	}
}
