// Package keystoretest is the conformance suite every [keystore.Store]
// backend passes: the software backends, the TPM simulator, swtpm and real
// TPMs run the same tests.
package keystoretest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mqtls/mqtls/internal/testing/testpki"
	"github.com/mqtls/mqtls/keystore"
)

// Config tunes the suite for a backend.
type Config struct {
	// Unsupported lists algorithms the backend must refuse with
	// keystore.ErrUnsupported (for example RSA-3072 on a TPM without it).
	Unsupported []keystore.KeyAlg
	// Reopen, if set, closes s and returns a new store over the same
	// storage; the suite then checks that keys survive.
	Reopen func(t *testing.T, s keystore.Store) keystore.Store
	// Goroutines and Signs size the concurrency test (default 8 × 100).
	Goroutines, Signs int
}

// Run runs the conformance suite. newStore returns an empty store; it is
// called once per subtest and the store is the subtest's alone.
func Run(t *testing.T, newStore func(t *testing.T) keystore.Store, cfg Config) {
	if cfg.Goroutines == 0 {
		cfg.Goroutines = 8
	}
	if cfg.Signs == 0 {
		cfg.Signs = 100
	}
	supported := func(a keystore.KeyAlg) bool { return !slices.Contains(cfg.Unsupported, a) }

	t.Run("GenerateSign", func(t *testing.T) {
		s := newStore(t)
		for _, alg := range keystore.Algs() {
			t.Run(string(alg), func(t *testing.T) {
				name := "k-" + string(alg)
				signer, err := s.Generate(t.Context(), name, alg)
				if !supported(alg) {
					if !errors.Is(err, keystore.ErrUnsupported) {
						t.Fatalf("Generate(%s) = %v, want ErrUnsupported", alg, err)
					}
					return
				}
				if err != nil {
					t.Fatalf("Generate(%s): %v", alg, err)
				}
				if got, err := keystore.AlgOf(signer.Public()); err != nil || got != alg {
					t.Fatalf("AlgOf(public) = %v, %v; want %s", got, err, alg)
				}
				again, err := s.Signer(t.Context(), name)
				if err != nil {
					t.Fatalf("Signer: %v", err)
				}
				if !equalPub(again.Public(), signer.Public()) {
					t.Fatal("Signer returned a different public key than Generate")
				}
				CheckSigns(t, again)
			})
		}
	})

	t.Run("DefaultIsP256", func(t *testing.T) {
		s := newStore(t)
		signer, err := s.Generate(t.Context(), "dflt", "")
		if err != nil {
			t.Fatal(err)
		}
		if alg, _ := keystore.AlgOf(signer.Public()); alg != keystore.ECDSAP256 {
			t.Fatalf("default algorithm = %s, want %s", alg, keystore.ECDSAP256)
		}
	})

	t.Run("UnknownAlg", func(t *testing.T) {
		s := newStore(t)
		for _, alg := range []keystore.KeyAlg{"dsa-1024", "rsa-1024", "ecdsa-p521", "ed25519"} {
			if _, err := s.Generate(t.Context(), "x", alg); !errors.Is(err, keystore.ErrUnsupported) {
				t.Errorf("Generate(%q) = %v, want ErrUnsupported", alg, err)
			}
		}
		if names, _ := s.List(t.Context()); len(names) != 0 {
			t.Errorf("refused Generate left keys behind: %v", names)
		}
	})

	t.Run("Duplicate", func(t *testing.T) {
		s := newStore(t)
		first, err := s.Generate(t.Context(), "dup", "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Generate(t.Context(), "dup", ""); !errors.Is(err, keystore.ErrExists) {
			t.Fatalf("second Generate = %v, want ErrExists", err)
		}
		kept, err := s.Signer(t.Context(), "dup")
		if err != nil {
			t.Fatal(err)
		}
		if !equalPub(kept.Public(), first.Public()) {
			t.Fatal("duplicate Generate replaced the existing key")
		}
	})

	t.Run("Missing", func(t *testing.T) {
		s := newStore(t)
		if _, err := s.Signer(t.Context(), "nope"); !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Signer(missing) = %v, want ErrNotFound", err)
		}
		if err := s.Delete(t.Context(), "nope"); !errors.Is(err, keystore.ErrNotFound) {
			t.Errorf("Delete(missing) = %v, want ErrNotFound", err)
		}
	})

	t.Run("InvalidNames", func(t *testing.T) {
		s := newStore(t)
		for _, name := range []string{"", ".hidden", "../escape", "a/b", "a\\b", "a b", "a\x00b", string(make([]byte, 65))} {
			if _, err := s.Generate(t.Context(), name, ""); !errors.Is(err, keystore.ErrInvalidName) {
				t.Errorf("Generate(%q) = %v, want ErrInvalidName", name, err)
			}
			if _, err := s.Signer(t.Context(), name); !errors.Is(err, keystore.ErrInvalidName) {
				t.Errorf("Signer(%q) = %v, want ErrInvalidName", name, err)
			}
			if err := s.Delete(t.Context(), name); !errors.Is(err, keystore.ErrInvalidName) {
				t.Errorf("Delete(%q) = %v, want ErrInvalidName", name, err)
			}
		}
	})

	t.Run("ListDelete", func(t *testing.T) {
		s := newStore(t)
		for _, n := range []string{"b", "a", "c.d_e-f"} {
			if _, err := s.Generate(t.Context(), n, ""); err != nil {
				t.Fatal(err)
			}
		}
		if got, err := s.List(t.Context()); err != nil || !slices.Equal(got, []string{"a", "b", "c.d_e-f"}) {
			t.Fatalf("List = %v, %v", got, err)
		}
		if err := s.Delete(t.Context(), "b"); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Signer(t.Context(), "b"); !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("Signer after Delete = %v, want ErrNotFound", err)
		}
		if got, _ := s.List(t.Context()); !slices.Equal(got, []string{"a", "c.d_e-f"}) {
			t.Fatalf("List after Delete = %v", got)
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		s := newStore(t)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		if _, err := s.Generate(ctx, "late", ""); !errors.Is(err, context.Canceled) {
			t.Fatalf("Generate(canceled) = %v, want context.Canceled", err)
		}
	})

	t.Run("Concurrent", func(t *testing.T) {
		s := newStore(t)
		signer, err := s.Generate(t.Context(), "busy", "")
		if err != nil {
			t.Fatal(err)
		}
		pub := signer.Public().(*ecdsa.PublicKey)
		var wg sync.WaitGroup
		errs := make(chan error, cfg.Goroutines)
		for g := range cfg.Goroutines {
			wg.Go(func() {
				for i := range cfg.Signs {
					d := sha256.Sum256(fmt.Appendf(nil, "%d/%d", g, i))
					sig, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
					if err != nil {
						errs <- err
						return
					}
					if !ecdsa.VerifyASN1(pub, d[:], sig) {
						errs <- fmt.Errorf("goroutine %d signature %d does not verify", g, i)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("MutualTLS", func(t *testing.T) {
		s := newStore(t)
		for _, alg := range []keystore.KeyAlg{keystore.ECDSAP256, keystore.RSA2048} {
			if !supported(alg) {
				continue
			}
			signer, err := s.Generate(t.Context(), "tls-"+string(alg), alg)
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
				t.Run(fmt.Sprintf("%s/%s", alg, tls.VersionName(v)), func(t *testing.T) {
					Handshake(t, signer, v)
				})
			}
		}
	})

	t.Run("Rename", func(t *testing.T) {
		s := newStore(t)
		r, ok := s.(keystore.Renamer)
		if !ok {
			t.Skip("SKIP: backend does not implement keystore.Renamer")
		}
		a, err := s.Generate(t.Context(), "a", "")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Generate(t.Context(), "b", ""); err != nil {
			t.Fatal(err)
		}
		if err := r.Rename(t.Context(), "a", "b"); err != nil {
			t.Fatal(err)
		}
		b, err := s.Signer(t.Context(), "b")
		if err != nil {
			t.Fatal(err)
		}
		if !equalPub(b.Public(), a.Public()) {
			t.Fatal("Rename did not replace the target with the source key")
		}
		if _, err := s.Signer(t.Context(), "a"); !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("Signer(renamed away) = %v, want ErrNotFound", err)
		}
		if err := r.Rename(t.Context(), "a", "c"); !errors.Is(err, keystore.ErrNotFound) {
			t.Fatalf("Rename(missing) = %v, want ErrNotFound", err)
		}
		if err := r.Rename(t.Context(), "b", "../x"); !errors.Is(err, keystore.ErrInvalidName) {
			t.Fatalf("Rename to a bad name = %v, want ErrInvalidName", err)
		}
	})

	if cfg.Reopen != nil {
		t.Run("Persist", func(t *testing.T) {
			s := newStore(t)
			signer, err := s.Generate(t.Context(), "kept", "")
			if err != nil {
				t.Fatal(err)
			}
			s = cfg.Reopen(t, s)
			again, err := s.Signer(t.Context(), "kept")
			if err != nil {
				t.Fatalf("Signer after reopen: %v", err)
			}
			if !equalPub(again.Public(), signer.Public()) {
				t.Fatal("key changed across reopen")
			}
			CheckSigns(t, again)
		})
	}
}

// CheckSigns signs a digest with every scheme the key's algorithm is used
// with in TLS and verifies each signature with the public key.
func CheckSigns(t testing.TB, s crypto.Signer) {
	t.Helper()
	msg := []byte("mqtls conformance")
	switch pub := s.Public().(type) {
	case *ecdsa.PublicKey:
		var d []byte
		var h crypto.Hash
		if pub.Curve.Params().BitSize == 384 {
			sum := sha512.Sum384(msg)
			d, h = sum[:], crypto.SHA384
		} else {
			sum := sha256.Sum256(msg)
			d, h = sum[:], crypto.SHA256
		}
		sig, err := s.Sign(rand.Reader, d, h)
		if err != nil {
			t.Fatalf("ECDSA sign: %v", err)
		}
		if !ecdsa.VerifyASN1(pub, d, sig) {
			t.Fatal("ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		sum := sha256.Sum256(msg)
		sig, err := s.Sign(rand.Reader, sum[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("RSA PKCS#1 v1.5 sign: %v", err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig); err != nil {
			t.Fatalf("RSA PKCS#1 v1.5 signature: %v", err)
		}
		pss := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
		sig, err = s.Sign(rand.Reader, sum[:], pss)
		if err != nil {
			t.Fatalf("RSA-PSS sign: %v", err)
		}
		if err := rsa.VerifyPSS(pub, crypto.SHA256, sum[:], sig, pss); err != nil {
			t.Fatalf("RSA-PSS signature (salt = hash length): %v", err)
		}
	default:
		t.Fatalf("unexpected public key type %T", pub)
	}
}

// Handshake runs a mutual-TLS handshake of version v over loopback TCP with
// the client key in signer and checks that the server verified the client
// chain against the root.
func Handshake(t testing.TB, signer crypto.Signer, v uint16) {
	t.Helper()
	ca := testpki.New(t)
	serverKey := testpki.NewKey(t)
	serverCert, err := keystore.TLSCertificate(ca.Server(t, serverKey.Public(), "127.0.0.1"), serverKey)
	if err != nil {
		t.Fatal(err)
	}
	clientCert, err := keystore.TLSCertificate(ca.Client(t, "dev-1", signer.Public()), signer)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
		MinVersion:   v,
		MaxVersion:   v,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		cn  string
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		_ = tc.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			done <- result{err: err}
			return
		}
		st := tc.ConnectionState()
		if len(st.VerifiedChains) == 0 {
			done <- result{err: errors.New("server has no verified client chain")}
			return
		}
		if _, err := tc.Write([]byte("ok")); err != nil {
			done <- result{err: err}
			return
		}
		done <- result{cn: st.VerifiedChains[0][0].Subject.CommonName}
	}()
	d := net.Dialer{Timeout: 30 * time.Second}
	conn, err := tls.DialWithDialer(&d, "tcp", ln.Addr().String(), &tls.Config{
		Certificates: []tls.Certificate{clientCert},
		RootCAs:      ca.Pool(),
		ServerName:   "127.0.0.1",
		MinVersion:   v,
		MaxVersion:   v,
	})
	if err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	defer conn.Close()
	buf := make([]byte, 2)
	if _, err := io.ReadFull(conn, buf); err != nil {
		if r := <-done; r.err != nil {
			t.Fatalf("server: %v", r.err)
		}
		t.Fatalf("read after handshake: %v", err)
	}
	if got := conn.ConnectionState().Version; got != v {
		t.Fatalf("negotiated %s, want %s", tls.VersionName(got), tls.VersionName(v))
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("server: %v", r.err)
	}
	if r.cn != "dev-1" {
		t.Fatalf("server saw CN %q, want dev-1", r.cn)
	}
}

func equalPub(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// BenchmarkSign measures one signature of a SHA-256 (P-256, RSA) or SHA-384
// (P-384) digest with s, the way a TLS handshake asks for it.
func BenchmarkSign(b *testing.B, s crypto.Signer) {
	var opts crypto.SignerOpts = crypto.SHA256
	d := sha256.Sum256([]byte("bench"))
	digest := d[:]
	switch pub := s.Public().(type) {
	case *ecdsa.PublicKey:
		if pub.Curve.Params().BitSize == 384 {
			d := sha512.Sum384([]byte("bench"))
			digest, opts = d[:], crypto.SHA384
		}
	case *rsa.PublicKey:
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Sign(rand.Reader, digest, opts); err != nil {
			b.Fatal(err)
		}
	}
}
