// Package pgtest runs a real PostgreSQL server for tests: Debian's
// postgresql binaries, in a temporary directory, on a free loopback port,
// as the unprivileged user postgres when the tests run as root (PostgreSQL
// refuses to run as root), stopped when the test ends. Under CI=true a
// missing PostgreSQL fails the test; elsewhere the test is skipped.
package pgtest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/mqtls/mqtls/internal/testing/testtool"
)

// Server is a running PostgreSQL.
type Server struct {
	Addr     string // 127.0.0.1:PORT
	User     string // superuser, "postgres"
	Password string // the superuser's password (scram-sha-256 on TCP)
	dbs      atomic.Int64
	stop     func() error
	stopped  atomic.Bool
}

// binDir finds the newest /usr/lib/postgresql/N/bin with initdb.
func binDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(dirs[i]))))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(dirs[j]))))
		return vi > vj
	})
	if len(dirs) == 0 {
		return ""
	}
	return filepath.Dir(dirs[0])
}

// Start initialises and starts a PostgreSQL server that stops (and is
// removed) when t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	bin := binDir()
	if bin == "" {
		testtool.Missing(t, "PostgreSQL server (/usr/lib/postgresql/*/bin/initdb)", "postgresql")
	}
	asRoot := os.Geteuid() == 0
	var runuser string
	var uid, gid int
	if asRoot {
		runuser = testtool.Require(t, "runuser")
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("pgtest: running as root needs the user postgres (made by the postgresql package): %v", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	// Not t.TempDir: its parents are 0700 root directories the postgres
	// user cannot enter.
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if asRoot {
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	run := func(name string, args ...string) *exec.Cmd {
		if asRoot {
			return exec.Command(runuser, append([]string{"-u", "postgres", "--", filepath.Join(bin, name)}, args...)...)
		}
		return exec.Command(filepath.Join(bin, name), args...)
	}
	s := &Server{User: "postgres", Password: testtool.RandomHex(16)}
	pwfile := filepath.Join(dir, "pw")
	if err := os.WriteFile(pwfile, []byte(s.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if asRoot {
		os.Chown(pwfile, uid, gid)
	}
	data := filepath.Join(dir, "data")
	if out, err := run("initdb", "-D", data, "-U", s.User, "--pwfile", pwfile, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("pgtest: initdb: %v\n%s", err, out)
	}
	os.Remove(pwfile)
	port := freePort(t)
	s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	logFile := filepath.Join(dir, "postgres.log")
	opts := fmt.Sprintf("-h 127.0.0.1 -p %d -k %s -c max_connections=200 -c fsync=on -c synchronous_commit=on", port, dir)
	if out, err := run("pg_ctl", "start", "-D", data, "-l", logFile, "-o", opts).CombinedOutput(); err != nil {
		log, _ := os.ReadFile(logFile)
		t.Fatalf("pgtest: pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	s.stop = func() error {
		if s.stopped.Swap(true) {
			return nil
		}
		if out, err := run("pg_ctl", "stop", "-D", data, "-m", "fast", "-w").CombinedOutput(); err != nil {
			return fmt.Errorf("pgtest: pg_ctl stop: %v\n%s", err, out)
		}
		return nil
	}
	t.Cleanup(func() {
		if err := s.stop(); err != nil {
			t.Error(err)
		}
	})
	// ready when a connection succeeds
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := pgx.Connect(ctx, s.URL("postgres"))
		cancel()
		if err == nil {
			conn.Close(context.Background())
			break
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logFile)
			t.Fatalf("pgtest: server not ready within 30s: %v\n%s", err, log)
		}
		time.Sleep(50 * time.Millisecond) // polling a server that is starting
	}
	return s
}

// Stop stops the server before the test ends (to test an unreachable
// database).
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
}

// URL is the libpq URL of database db with the superuser's password.
func (s *Server) URL(db string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(s.User, s.Password), Host: s.Addr, Path: "/" + db, RawQuery: "sslmode=disable"}
	return u.String()
}

// URLNoPassword is URL without the password.
func (s *Server) URLNoPassword(db string) string {
	u := url.URL{Scheme: "postgres", User: url.User(s.User), Host: s.Addr, Path: "/" + db, RawQuery: "sslmode=disable"}
	return u.String()
}

// NewDatabase creates an empty database and returns its name; it is
// dropped with the server.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("test_%d", s.dbs.Add(1))
	conn, err := pgx.Connect(t.Context(), s.URL("postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.WithoutCancel(t.Context()))
	if _, err := conn.Exec(t.Context(), "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	return name
}

func freePort(t testing.TB) int {
	t.Helper()
	_, p, err := net.SplitHostPort(testtool.FreeAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return n
}
