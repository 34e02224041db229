package server_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/esttest"
	"github.com/mqtls/mqtls/internal/testing/pgtest"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/provisioning/registry/postgres"
	"github.com/mqtls/mqtls/provisioning/server"
)

// BenchmarkEnroll measures server-side enrollments per second on each
// registry backend: HTTPS with keep-alive from parallel clients, token
// check, CSR check, ECDSA issuance and a durable registry transaction per
// enrollment (SQLite synchronous=FULL; PostgreSQL fsync=on,
// synchronous_commit=on, a real server on loopback). Clients' keys and
// CSRs are made before the timer starts. With cgo, sqlite-softhsm2 is
// sqlite with the issuing CA key in a SoftHSM2 token (benchHardwareCA).
func BenchmarkEnroll(b *testing.B) {
	b.Run("sqlite", func(b *testing.B) { benchEnroll(b, nil) })
	benchHardwareCA(b)
	b.Run("postgres", func(b *testing.B) {
		srv := pgtest.Start(b)
		benchEnroll(b, func(b *testing.B, c *server.Config) {
			r, err := postgres.Create(b.Context(), srv.URL(srv.NewDatabase(b)), ca.Fingerprint(c.CA.Root))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { r.Close() })
			c.Registry = r
		})
	})
}

// benchEnroll measures enrollments against an esttest server; setup may
// put another registry or CA in place.
func benchEnroll(b *testing.B, setup func(b *testing.B, c *server.Config)) {
	env := esttest.Start(b, func(c *server.Config) {
		if setup != nil {
			setup(b, c)
		}
	})
	n := b.N
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("bench-%d", i)
	}
	tokens, err := env.Registry.CreateTokens(b.Context(), ids, "", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	bodies := make([][]byte, n)
	for i := range bodies {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: ids[i]}}, k)
		if err != nil {
			b.Fatal(err)
		}
		bodies[i] = []byte(base64.StdEncoding.EncodeToString(der))
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: env.CA.Pool()}, MaxIdleConnsPerHost: 64}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr}
	var next atomic.Int64
	b.SetParallelism(8) // 8 × GOMAXPROCS client goroutines
	b.ResetTimer()
	cpu0 := processCPU(b)
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := next.Add(1) - 1
			req, _ := http.NewRequest(http.MethodPost, env.URL+provisioning.PathSimpleEnroll, bytes.NewReader(bodies[i]))
			req.SetBasicAuth(ids[i], tokens[i])
			req.Header.Set("Content-Type", provisioning.TypePKCS10)
			resp, err := hc.Do(req)
			if err != nil {
				b.Error(err)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				b.Errorf("enroll %d: %d %s", i, resp.StatusCode, body)
				return
			}
		}
	})
	b.ReportMetric(float64(n)/time.Since(start).Seconds(), "enroll/s")
	// CPU of the whole process (server, clients, an in-process PKCS#11
	// module) per enrollment: steadier than enroll/s on a shared machine.
	b.ReportMetric(float64((processCPU(b)-cpu0).Microseconds())/float64(n), "cpu-µs/enroll")
}

// processCPU is the user + system CPU time this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
