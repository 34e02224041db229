package broker_test

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker"
	"github.com/mqtls/mqtls/keystore"
	"github.com/mqtls/mqtls/provisioning/ca"
	"github.com/mqtls/mqtls/sim/bench"
)

// TestHelperConnectServer is not a test: BenchmarkConnectCPU runs it in a
// child process (so the server's CPU time can be read apart from the
// clients') as the mqtls broker or as a bare crypto/tls server that does
// the same protocol exchange.
func TestHelperConnectServer(t *testing.T) {
	mode, dir := os.Getenv("MQTLS_CONNECT_SERVER"), os.Getenv("MQTLS_CONNECT_DATA")
	if mode == "" {
		t.Skip("SKIP: helper process for BenchmarkConnectCPU")
	}
	c, err := ca.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := c.ServerCertificate()
	if err != nil {
		t.Fatal(err)
	}
	var addr string
	switch mode {
	case "broker":
		b, err := broker.New(broker.Config{Addr: "127.0.0.1:0", Certificate: cert, Root: c.Root})
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Start(); err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		addr = b.Addr().String()
	case "raw":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = ln.Addr().String()
		go bench.ServeRawTLS(t.Context(), dir, ln)
	}
	fmt.Printf("ADDR %s\n", addr)
	io.Copy(io.Discard, os.Stdin) // run until the parent closes stdin
}

func readPacket(r *bufio.Reader) ([]byte, error) {
	if _, err := r.ReadByte(); err != nil {
		return nil, err
	}
	n, shift := 0, 0
	for {
		b, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		n |= int(b&0x7f) << shift
		if b&0x80 == 0 {
			break
		}
		shift += 7
	}
	buf := make([]byte, n)
	_, err := io.ReadFull(r, buf)
	return buf, err
}

func connectPacket(clientID string) []byte {
	var vh []byte
	vh = append(vh, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60) // 3.1.1, clean session, keepalive 60
	vh = append(vh, byte(len(clientID)>>8), byte(len(clientID)))
	vh = append(vh, clientID...)
	return append([]byte{0x10, byte(len(vh))}, vh...)
}

// serverCPU returns the child's user+system CPU time.
func serverCPU(t testing.TB, pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return time.Duration(utime+stime) * 10 * time.Millisecond // USER_HZ = 100
}

// BenchmarkConnectCPU measures the server's CPU per mutual-TLS connect
// (full TLS 1.3 handshake with X25519 on both sides, CONNECT, CONNACK,
// DISCONNECT) for the mqtls broker and for a bare crypto/tls server doing
// the same exchange, each in its own process. Run with -benchtime=2000x or
// more: CPU time has 10 ms resolution.
func BenchmarkConnectCPU(b *testing.B) {
	dir := filepath.Join(b.TempDir(), "data")
	if err := ca.Init(dir, ca.InitConfig{}); err != nil {
		b.Fatal(err)
	}
	c, err := ca.Load(dir)
	if err != nil {
		b.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf, err := c.IssueDevice(key.Public(), "bench-dev", nil, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	cert, _ := keystore.TLSCertificate([][]byte{leaf.Raw, c.Issuing.Raw}, key)
	clientTLS := &tls.Config{
		RootCAs: c.Pool(), ServerName: "127.0.0.1", Certificates: []tls.Certificate{cert},
		CurvePreferences:   []tls.CurveID{tls.X25519}, // the same key exchange for both servers
		ClientSessionCache: noCache{},                 // ask for tickets (as devices do) but never resume: full handshakes
	}
	results := map[string]float64{}
	for _, mode := range []string{"raw", "broker"} {
		b.Run(mode, func(b *testing.B) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestHelperConnectServer$", "-test.v")
			cmd.Env = append(os.Environ(), "MQTLS_CONNECT_SERVER="+mode, "MQTLS_CONNECT_DATA="+dir, "GOMAXPROCS=1")
			stdin, _ := cmd.StdinPipe()
			stdout, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				b.Fatal(err)
			}
			defer func() { stdin.Close(); cmd.Wait() }()
			var addr string
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
					addr = a
					break
				}
			}
			go io.Copy(io.Discard, stdout)
			if addr == "" {
				b.Fatal("helper did not start")
			}
			connect := func() error {
				conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, clientTLS)
				if err != nil {
					return err
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := conn.Write(connectPacket("bench-dev")); err != nil {
					return err
				}
				ack := make([]byte, 4)
				if _, err := io.ReadFull(conn, ack); err != nil {
					return err
				}
				if ack[0] != 0x20 || ack[3] != 0 {
					return fmt.Errorf("CONNACK %x", ack)
				}
				_, err = conn.Write([]byte{0xe0, 0x00})
				return err
			}
			for range 20 { // warm up
				if err := connect(); err != nil {
					b.Fatal(err)
				}
			}
			before := serverCPU(b, cmd.Process.Pid)
			b.ResetTimer()
			var wg sync.WaitGroup
			work := make(chan struct{})
			var mu sync.Mutex
			var firstErr error
			for range 2 {
				wg.Go(func() {
					for range work {
						if err := connect(); err != nil {
							mu.Lock()
							firstErr = err
							mu.Unlock()
						}
					}
				})
			}
			for range b.N {
				work <- struct{}{}
			}
			close(work)
			wg.Wait()
			b.StopTimer()
			if firstErr != nil {
				b.Fatal(firstErr)
			}
			time.Sleep(100 * time.Millisecond) // let the server finish closing
			cpu := serverCPU(b, cmd.Process.Pid) - before
			perConnect := float64(cpu.Microseconds()) / float64(b.N)
			results[mode] = perConnect
			b.ReportMetric(perConnect, "server-cpu-µs/connect")
		})
	}
	if results["raw"] > 0 && results["broker"] > 0 {
		b.Logf("broker/raw server CPU per connect: %.3f (%.0f µs vs %.0f µs)", results["broker"]/results["raw"], results["broker"], results["raw"])
	}
}

// noCache takes session tickets and never offers them back.
type noCache struct{}

func (noCache) Get(string) (*tls.ClientSessionState, bool) { return nil, false }
func (noCache) Put(string, *tls.ClientSessionState)        {}
