package broker_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/internal/testing/brokertest"
	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// mosq runs mosquitto_pub or mosquitto_sub as device d against env and
// returns stdout+stderr and the exit code.
func mosq(t *testing.T, env *brokertest.Env, d *brokertest.Device, tool string, args ...string) (string, int) {
	t.Helper()
	return mosqCtx(t, t.Context(), env, d, tool, args...)
}

func mosqArgs(t *testing.T, env *brokertest.Env, d *brokertest.Device) []string {
	cert, key, root := env.WriteFiles(t, d)
	host, port, _ := strings.Cut(env.Addr, ":")
	return []string{"-h", host, "-p", port, "--cafile", root, "--cert", cert, "--key", key, "-i", d.ID}
}

func mosqCtx(t *testing.T, ctx context.Context, env *brokertest.Env, d *brokertest.Device, tool string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testtool.Require(t, tool), append(mosqArgs(t, env, d), args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	return out.String(), code
}

func TestMosquittoClients(t *testing.T) {
	env := backendEnv(t, nil)
	a := env.Device(t, "dev-a", 0)
	b := env.Device(t, "dev-b", 0)
	be := env.Device(t, "backend-1", 0, "backend")
	for _, v := range []string{"mqttv311", "5"} {
		t.Run(v, func(t *testing.T) {
			// telemetry from dev-a reaches the backend; a command from the
			// backend reaches dev-a (one connection per identity: the
			// client ID is the CN)
			for _, rt := range []struct {
				sub, pub      *brokertest.Device
				filter, topic string
			}{
				{be, a, "devices/+/telemetry", "devices/dev-a/telemetry"},
				{a, be, "devices/dev-a/#", "devices/dev-a/commands/reboot"},
			} {
				done := make(chan string, 1)
				go func() {
					out, _ := mosq(t, env, rt.sub, "mosquitto_sub", "-V", v, "-q", "1", "-t", rt.filter, "-C", "1", "-W", "10", "-v")
					done <- out
				}()
				time.Sleep(500 * time.Millisecond)
				if out, code := mosq(t, env, rt.pub, "mosquitto_pub", "-V", v, "-q", "1", "-t", rt.topic, "-m", "42"); code != 0 {
					t.Fatalf("publish %s: %d %s", rt.topic, code, out)
				}
				if out := <-done; !strings.Contains(out, rt.topic+" 42") {
					t.Fatalf("round trip %s: %q", rt.topic, out)
				}
			}

			if v == "5" {
				// mosquitto_pub accepts the PUBACK to a publish with properties
				// (the reason code itself is checked in TestV5PubackWithProperties)
				out, code := mosq(t, env, a, "mosquitto_pub", "-V", v, "-q", "1", "-t", "devices/dev-a/props", "-m", "p", "-D", "publish", "user-property", "k", "v")
				if code != 0 || strings.Contains(out, "failed") {
					t.Fatalf("v5 publish with properties: exit %d %q", code, out)
				}
			}

			// a publish into dev-b's namespace is refused and never delivered
			got := make(chan string, 1)
			go func() {
				out, _ := mosq(t, env, b, "mosquitto_sub", "-V", v, "-q", "1", "-t", "devices/dev-b/#", "-C", "1", "-W", "3", "-v")
				got <- out
			}()
			time.Sleep(500 * time.Millisecond)
			out, code := mosq(t, env, a, "mosquitto_pub", "-V", v, "-q", "1", "-t", "devices/dev-b/commands", "-m", "evil")
			t.Logf("cross publish (%s): exit %d %q", v, code, out)
			if v == "5" && !strings.Contains(out, "Publish 1 failed: Not authorized") {
				t.Errorf("v5 cross publish: want PUBACK 0x87 'Not authorized', got %q (exit %d)", out, code)
			}
			if v == "mqttv311" && code == 0 {
				t.Errorf("3.1.1 cross publish at QoS 1: exit 0, want the broker to disconnect it")
			}
			if out := <-got; strings.Contains(out, "evil") {
				t.Fatalf("cross publish delivered: %q", out)
			}

			// refused subscriptions
			for _, f := range []string{"#", "devices/#", "devices/+/telemetry", "$SYS/#", "devices/dev-b/#"} {
				out, code := mosq(t, env, a, "mosquitto_sub", "-V", v, "-t", f, "-C", "1", "-W", "3")
				if !strings.Contains(out, "All subscription requests were denied") {
					t.Errorf("subscribe %q: exit %d %q, want denied", f, code, out)
				}
			}

			// client ID that is not the CN; Will into another namespace
			for name, extra := range map[string][]string{
				"client ID": {"-i", "dev-b"},
				"Will":      {"--will-topic", "devices/dev-b/status", "--will-payload", "x"},
			} {
				args := append([]string{"-V", v, "-t", "devices/dev-a/x", "-m", "1"}, extra...)
				out, code := mosq(t, env, a, "mosquitto_pub", args...)
				if code == 0 || !strings.Contains(strings.ToLower(out), "not authori") {
					t.Errorf("%s: exit %d %q, want not authorised", name, code, out)
				}
			}
		})
	}
}

func TestMosquittoHandshakeAndRevocation(t *testing.T) {
	env := brokertest.Start(t, nil)
	a := env.Device(t, "dev-a", 0)
	old := env.Device(t, "dev-old", time.Nanosecond)
	host, port, _ := strings.Cut(env.Addr, ":")
	_, _, root := env.WriteFiles(t, a)

	// no client certificate
	cmd := exec.Command(testtool.Require(t, "mosquitto_pub"), "-h", host, "-p", port, "--cafile", root, "-i", "dev-a", "-t", "devices/dev-a/x", "-m", "1")
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Errorf("no client certificate: connected: %s", out)
	}
	// expired certificate
	if out, code := mosq(t, env, old, "mosquitto_pub", "-t", "devices/dev-old/x", "-m", "1"); code == 0 {
		t.Errorf("expired certificate: connected: %s", out)
	}

	// revocation closes a live mosquitto_sub within 2 s
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	exited := make(chan time.Time, 1)
	go func() {
		mosqCtx(t, ctx, env, a, "mosquitto_sub", "-V", "5", "-t", "devices/dev-a/#")
		exited <- time.Now()
	}()
	deadline := time.Now().Add(10 * time.Second)
	for env.Broker.Sessions() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	start := time.Now()
	if _, err := env.Registry.Revoke(t.Context(), "dev-a", "lost"); err != nil {
		t.Fatal(err)
	}
	for env.Broker.Sessions() > 0 && time.Since(start) < 5*time.Second {
		time.Sleep(10 * time.Millisecond)
	}
	closed := time.Since(start)
	if closed > 2*time.Second {
		t.Fatalf("revoked mosquitto_sub session still open after %v", closed)
	}
	t.Logf("session closed %v after the revocation was committed", closed)
	select {
	case at := <-exited:
		t.Logf("mosquitto_sub exited %v after the revocation (its reconnect was refused)", at.Sub(start))
	case <-time.After(5 * time.Second):
		t.Log("mosquitto_sub keeps retrying; every reconnect is refused")
	}
}

// The broker's edges seen from mosquitto's clients: a persistent session's
// queue, messages without expiry, $SYS publishes, revoked device IDs and
// deep chains.
func TestMosquittoEdges(t *testing.T) {
	testtool.Require(t, "mosquitto_sub")
	short := backendEnv(t, func(c *broker.Config) { c.MaxMessageExpiry = time.Second })
	env := backendEnv(t, nil)
	a := env.Device(t, "dev-a", 0)
	be := env.Device(t, "backend-1", 0, "backend")

	t.Run("offline persistent session gets its QoS 1 commands", func(t *testing.T) {
		sub := []string{"-V", "5", "-c", "-x", "3600", "-q", "1", "-t", "devices/dev-a/commands/#"}
		if out, code := mosq(t, env, a, "mosquitto_sub", append(sub, "-E")...); code != 0 {
			t.Fatalf("subscribe and leave: exit %d %q", code, out)
		}
		for _, m := range []string{"reboot", "update"} {
			if out, code := mosq(t, env, be, "mosquitto_pub", "-q", "1", "-t", "devices/dev-a/commands/"+m, "-m", m); code != 0 {
				t.Fatalf("backend publish: exit %d %q", code, out)
			}
		}
		out, code := mosq(t, env, a, "mosquitto_sub", append(sub, "-C", "2", "-W", "10", "-v")...)
		if code != 0 || !strings.Contains(out, "devices/dev-a/commands/reboot reboot") || !strings.Contains(out, "devices/dev-a/commands/update update") {
			t.Fatalf("after reconnect: exit %d %q, want both commands", code, out)
		}
	})

	t.Run("retained state does not expire by default", func(t *testing.T) {
		for _, e := range []*brokertest.Env{short, env} {
			d := e.Device(t, "dev-b", 0)
			if out, code := mosq(t, e, d, "mosquitto_pub", "-q", "1", "-r", "-t", "devices/dev-b/state", "-m", "on"); code != 0 {
				t.Fatalf("retain: exit %d %q", code, out)
			}
		}
		testtool.Eventually(t, 10*time.Second, "retained message expired with MaxMessageExpiry 1s", func() bool {
			return broker.RetainedCount(short.Broker) == 0
		})
		out, code := mosq(t, env, env.Device(t, "dev-b", 0), "mosquitto_sub", "-t", "devices/dev-b/state", "-C", "1", "-W", "5")
		if code != 0 || strings.TrimSpace(out) != "on" {
			t.Fatalf("default broker: exit %d %q, want the retained state", code, out)
		}
	})

	t.Run("$SYS publish answered", func(t *testing.T) {
		out, code := mosq(t, env, a, "mosquitto_pub", "-V", "5", "-q", "1", "-t", "$SYS/x", "-m", "x")
		if !strings.Contains(out, "Not authorized") {
			t.Errorf("v5 QoS 1 to $SYS/x: exit %d %q, want PUBACK 'Not authorized'", code, out)
		}
		if out, code := mosq(t, env, a, "mosquitto_pub", "-V", "mqttv311", "-q", "1", "-t", "$SYS/x", "-m", "x"); code == 0 {
			t.Errorf("3.1.1 QoS 1 to $SYS/x: exit 0 %q, want the connection closed", out)
		}
	})

	t.Run("revoked device ID, certificate outside the registry", func(t *testing.T) {
		env.Device(t, "dev-c", 0)
		key := testpki.NewKey(t)
		other := &brokertest.Device{ID: "dev-c", Key: key, Chain: chainCert(t, env, "dev-c", key, 0).Certificate}
		if out, code := mosq(t, env, other, "mosquitto_pub", "-q", "1", "-t", "devices/dev-c/x", "-m", "1"); code != 0 {
			t.Fatalf("before revocation: exit %d %q", code, out)
		}
		if _, err := env.Registry.Revoke(t.Context(), "dev-c", "stolen"); err != nil {
			t.Fatal(err)
		}
		testtool.Eventually(t, 5*time.Second, "revoked device ID refused", func() bool {
			out, code := mosq(t, env, other, "mosquitto_pub", "-q", "1", "-t", "devices/dev-c/x", "-m", "1")
			return code != 0 && strings.Contains(strings.ToLower(out), "not authori")
		})
	})

	t.Run("deep chain refused", func(t *testing.T) {
		rootKey := testpki.NewKey(t)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "adopted root"},
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, rootKey.Public(), rootKey)
		if err != nil {
			t.Fatal(err)
		}
		adopted, _ := x509.ParseCertificate(der)
		deep := brokertest.Start(t, func(c *broker.Config) { c.Root = adopted })
		key := testpki.NewKey(t)
		d := &brokertest.Device{ID: "dev-d", Key: key, Chain: chainUnder(t, adopted, rootKey, "dev-d", key, 8).Certificate}
		out, code := mosq(t, deep, d, "mosquitto_pub", "-q", "1", "-t", "devices/dev-d/x", "-m", "1")
		if code == 0 || !strings.Contains(strings.ToLower(out), "not authori") {
			t.Fatalf("8 intermediates: exit %d %q, want not authorised", code, out)
		}
		if got := metricLabel(t, deep, "mqtls_connects_refused_total", "reason", "chain_too_deep"); got != 1 {
			t.Errorf("chain_too_deep refusals = %v, want 1", got)
		}
	})
}

// Identities beyond one connection with mosquitto's clients: client-ID
// patterns (-i) and a shared subscription split between two replicas of
// one certificate. (mosquitto's clients cannot send an empty client ID:
// "Invalid id"; TestEmptyClientID covers it with raw packets.)
func TestMosquittoIdentities(t *testing.T) {
	testtool.Require(t, "mosquitto_sub")
	env := identitiesEnv(t)
	svc := env.Device(t, "svc", 0, "backend")
	for id, ok := range map[string]bool{"svc-1": true, "svc-replica-9": true, "myclientid": false, "svc1": false} {
		out, code := mosq(t, env, svc, "mosquitto_pub", "-i", id, "-q", "1", "-t", "devices/dev-a/commands/x", "-m", "1")
		if ok != (code == 0) {
			t.Errorf("-i %s: exit %d %q, want allowed=%v", id, code, out, ok)
		}
	}
	const filter = "$share/workers/devices/+/telemetry"
	outs := make([]chan string, 2)
	for i, id := range []string{"svc-a", "svc-b"} {
		outs[i] = make(chan string, 1)
		go func() {
			out, _ := mosq(t, env, svc, "mosquitto_sub", "-V", "5", "-i", id, "-q", "1", "-t", filter, "-W", "8")
			outs[i] <- out
		}()
		testtool.Eventually(t, 5*time.Second, id+" subscribed", func() bool { return broker.Subscribed(env.Broker, id, filter) })
	}
	dev := env.Device(t, "dev-a", 0)
	for i := range 20 {
		if out, code := mosq(t, env, dev, "mosquitto_pub", "-q", "1", "-t", "devices/dev-a/telemetry", "-m", fmt.Sprintf("m%02d", i)); code != 0 {
			t.Fatalf("publish: exit %d %q", code, out)
		}
	}
	seen := map[string]int{}
	for _, ch := range outs {
		for _, line := range strings.Fields(<-ch) {
			if strings.HasPrefix(line, "m") { // not "Timed out" (-W)
				seen[line]++
			}
		}
	}
	if len(seen) != 20 {
		t.Fatalf("shared subscription delivered %d distinct messages, want 20: %v", len(seen), seen)
	}
	for m, n := range seen {
		if n != 1 {
			t.Errorf("%s delivered %d times", m, n)
		}
	}
}
