// Package testpg runs throwaway PostgreSQL servers for tests: a cluster
// made with initdb in a temporary directory, listening on a Unix socket
// only, started and stopped by the test by its PID. It uses the server
// programs of Debian's postgresql package (make test-deps installs it).
//
// initdb and postgres refuse to run as root, so as root the cluster
// belongs to, and runs as, the user "nobody".
package testpg

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Options tune a server.
type Options struct {
	// Durable keeps fsync on, as a production server runs: benchmarks
	// want it; tests, which kill processes but never cut the power, run
	// faster without (a commit is still written to the kernel before it
	// returns).
	Durable bool
	// Settings are more `-c name=value` server settings.
	Settings map[string]string
}

// Server is one PostgreSQL cluster and, while it runs, its postmaster.
type Server struct {
	dir     string // the cluster's data directory's parent
	data    string
	sockDir string
	opts    Options
	cred    *syscall.Credential // nil unless the tests run as root

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
	dbs  int
}

// Start makes a cluster that is removed, its server stopped, when t ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

var (
	sharedOnce sync.Once
	shared     *Server
	sharedErr  error
)

// Shared returns the cluster that every test of the process shares,
// started on first use; Main stops it. Each test takes a database of
// its own from it (NewDatabase).
func Shared(t testing.TB) *Server {
	t.Helper()
	sharedOnce.Do(func() { shared, sharedErr = New(Options{}) })
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	return shared
}

// Main runs the tests of a package that uses Shared and then stops the
// shared cluster, which would otherwise outlive the test process:
//
//	func TestMain(m *testing.M) { testpg.Main(m) }
func Main(m *testing.M) {
	code := m.Run()
	CloseShared()
	os.Exit(code)
}

// CloseShared stops the shared cluster, if it was started: for a
// TestMain that does more than Main.
func CloseShared() {
	if shared != nil {
		shared.Close()
	}
}

// New makes and starts a cluster; Close stops and removes it.
func New(opts Options) (*Server, error) {
	dir, err := os.MkdirTemp("", "smarthost-pg-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, data: filepath.Join(dir, "data"), sockDir: filepath.Join(dir, "sock"), opts: opts}
	if s.cred, err = Init(dir); err == nil {
		err = s.Restart()
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

// Init makes a cluster with initdb in dir/data, and dir/sock for its
// Unix socket, owned by the user its server must run as: nobody when
// running as root (the credential to run it with), else this user (nil).
// dir must exist.
func Init(dir string) (*syscall.Credential, error) {
	initdb, err := Program("initdb")
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, "sock")
	if err := os.MkdirAll(sock, 0o755); err != nil {
		return nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			return nil, fmt.Errorf("running as root, and no user nobody to run PostgreSQL as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		for _, p := range []string{dir, sock} {
			if err := os.Chown(p, uid, gid); err != nil {
				return nil, err
			}
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			return nil, err
		}
	}
	cmd := exec.Command(initdb, "-D", filepath.Join(dir, "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %v\n%s", err, out)
	}
	return cred, nil
}

// Program finds a PostgreSQL server program: on PATH, else in Debian's
// /usr/lib/postgresql/VERSION/bin, the newest version first.
func Program(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	found, _ := filepath.Glob(filepath.Join("/usr/lib/postgresql", "*", "bin", name))
	slices.SortFunc(found, func(a, b string) int { return version(b) - version(a) })
	if len(found) == 0 {
		return "", fmt.Errorf("%s not found on PATH or in /usr/lib/postgresql/*/bin: install PostgreSQL (make test-deps does, from Debian's postgresql package)", name)
	}
	return found[0], nil
}

func version(path string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return v
}

// Restart starts the server again after Stop or Kill, on the same data
// and socket, and waits until it accepts connections. After a Kill, the
// killed backends may still hold the shared memory for a moment: the
// start is tried again until they are gone.
func (s *Server) Restart() error {
	var err error
	for range 40 {
		if err = s.start(); err == nil || !strings.Contains(err.Error(), "pre-existing shared memory block") {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
	return err
}

func (s *Server) start() error {
	postgres, err := Program("postgres")
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		return errors.New("testpg: the server is running")
	}
	settings := map[string]string{
		"listen_addresses":        "",
		"unix_socket_directories": s.sockDir,
		"max_connections":         "300",
		"shared_buffers":          "32MB",
		"log_min_messages":        "fatal",
	}
	if !s.opts.Durable {
		settings["fsync"] = "off"
		settings["full_page_writes"] = "off"
	}
	for k, v := range s.opts.Settings {
		settings[k] = v
	}
	args := []string{"-D", s.data}
	for _, k := range slices.Sorted(maps.Keys(settings)) {
		args = append(args, "-c", k+"="+settings[k])
	}
	logFile, err := os.OpenFile(filepath.Join(s.dir, "server.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command(postgres, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so that a signal to the tests' group does not
	// reach it first; Pdeathsig stops it if the test process dies
	// without Close.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true, Pdeathsig: syscall.SIGQUIT}
	// Pdeathsig fires when the thread that started the process ends, not
	// the process: the thread stays locked until the server exits.
	started := make(chan error)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			cmd.Wait()
		}
		close(done)
	}()
	if err := <-started; err != nil {
		return err
	}
	s.cmd, s.done = cmd, done

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, s.DSN("postgres"))
		if err == nil {
			conn.Close(ctx)
			return nil
		}
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
			s.cmd = nil
			return fmt.Errorf("postgres exited at start: %s", log)
		case <-ctx.Done():
			return fmt.Errorf("postgres did not accept connections within 30s: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// SocketDir is the directory of the server's Unix socket.
func (s *Server) SocketDir() string { return s.sockDir }

// DSN is the connection string of database db, as user postgres.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("host=%s user=postgres dbname=%s sslmode=disable", s.sockDir, db)
}

// NewDatabase creates an empty database for t, dropped when t ends, and
// returns its connection string.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.dbs++
	name := fmt.Sprintf("test_%d", s.dbs)
	s.mu.Unlock()
	if err := s.exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The server may be stopped by the test itself.
		s.mu.Lock()
		running := s.cmd != nil
		s.mu.Unlock()
		if running {
			s.exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)")
		}
	})
	return s.DSN(name)
}

func (s *Server) exec(sql string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, s.DSN("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql)
	return err
}

// PID is the postmaster's process ID, 0 while it is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Stop shuts the server down fast (SIGINT: open transactions are rolled
// back, connections closed) and waits for it.
func (s *Server) Stop() error { return s.signal(syscall.SIGINT) }

// Kill stops the server at once (SIGKILL to the postmaster and its
// backends), as when its machine fails.
func (s *Server) Kill() error { return s.signal(syscall.SIGKILL) }

func (s *Server) signal(sig syscall.Signal) error {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if sig == syscall.SIGKILL {
		// The backends are in the postmaster's process group.
		syscall.Kill(-cmd.Process.Pid, sig)
	} else {
		cmd.Process.Signal(sig)
	}
	select {
	case <-done:
		return nil
	case <-time.After(60 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return errors.New("testpg: postgres did not stop within 60s")
	}
}

// Close stops the server and removes the cluster.
func (s *Server) Close() {
	s.Stop()
	os.RemoveAll(s.dir)
}

// Log returns what the server logged, for a failing test to show.
func (s *Server) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.dir, "server.log"))
	return strings.TrimSpace(string(b))
}
