package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// openFDs returns the numbers of the descriptors process pid has open.
func openFDs(t *testing.T, pid int) map[int]bool {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	fds := make(map[int]bool, len(entries))
	for _, e := range entries {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			fds[n] = true
		}
	}
	return fds
}

// setFileLimit sets the soft limit on open files of process pid, the
// number that its next descriptor must stay under, and returns the
// previous limit.
func setFileLimit(t *testing.T, pid int, cur uint64) unix.Rlimit {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &old); err != nil {
		t.Skipf("prlimit: %v", err)
	}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: cur, Max: old.Max}, nil); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	return old
}

// waitFDs waits until process pid has at most n descriptors open.
func waitFDs(t *testing.T, pid, n int, timeout time.Duration) {
	t.Helper()
	testwait.For(t, timeout, fmt.Sprintf("at most %d open descriptors", n), func() bool { return len(openFDs(t, pid)) <= n })
}

// TestHTTPListenerBounded: a flood of idle connections to the [http]
// listener holds at most [http] max_connections (default 256) of the
// relay's descriptors, so that the SMTP listener still accepts and the
// relay still delivers with few descriptors to spare; and a failed
// accept on the HTTP listener is logged at warn, then recovers.
func TestHTTPListenerBounded(t *testing.T) {
	t.Parallel()
	const (
		flood   = 1000
		maxHTTP = 256 // the default
		room    = 400 // descriptors the relay may open beyond those at start
	)
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()}))
	pid := r.cmd.Process.Pid
	httpAddr := strings.TrimPrefix(r.http, "http://")

	start := openFDs(t, pid)
	highest := 0
	for fd := range start {
		highest = max(highest, fd)
	}
	old := setFileLimit(t, pid, uint64(highest+1+room))
	t.Cleanup(func() { unix.Prlimit(pid, unix.RLIMIT_NOFILE, &old, nil) })

	conns := make([]net.Conn, 0, flood)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range flood {
		c, err := net.DialTimeout("tcp", httpAddr, 10*time.Second)
		if err != nil {
			t.Fatalf("HTTP connection %d: %v", i, err)
		}
		conns = append(conns, c)
	}
	testwait.For(t, 30*time.Second, "the relay to hold the HTTP connections it may", func() bool {
		return len(openFDs(t, pid)) >= len(start)+maxHTTP
	})

	// The SMTP listener still accepts, and the relay still delivers.
	c, line, err := dialGreeted(r.addr)
	if err != nil {
		t.Fatalf("SMTP while the HTTP listener is flooded: %v", err)
	}
	c.Close()
	if !strings.HasPrefix(line, "220 ") {
		t.Fatalf("SMTP greeting while flooded: %q", line)
	}
	s := connect(t, r.addr, pki)
	if _, err := s.send("app@example.com", []string{"to@example.net"}, testMsg); err != nil {
		t.Fatalf("submission while flooded: %v", err)
	}
	testwait.For(t, 30*time.Second, "the delivery", func() bool { return len(up.Messages()) == 1 })
	if n := len(openFDs(t, pid)) - len(start); n > maxHTTP+20 {
		t.Errorf("%d descriptors beyond those at start while flooded, want about %d", n, maxHTTP)
	}
	for _, msg := range []string{"accept failed", "upstream down"} {
		if line := r.findLog(msg); line != nil {
			t.Errorf("short of descriptors while flooded: %v", line)
		}
	}

	for _, c := range conns {
		c.Close()
	}
	conns = conns[:0]
	s.close()
	waitFDs(t, pid, len(start)+8, 30*time.Second)

	// No descriptor left at all: the next accept fails, is logged at
	// warn, and is retried until descriptors are free again.
	fds := openFDs(t, pid)
	lowest := 0
	for fds[lowest] {
		lowest++
	}
	setFileLimit(t, pid, uint64(lowest))
	hc, err := net.DialTimeout("tcp", httpAddr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	if _, err := io.WriteString(hc, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	r.waitLog("accept failed", map[string]string{"level": "WARN", "listener": "http"}, 30*time.Second)
	setFileLimit(t, pid, old.Cur)
	hc.SetReadDeadline(time.Now().Add(30 * time.Second))
	status, err := bufio.NewReader(hc).ReadString('\n')
	if err != nil || strings.TrimSpace(status) != "HTTP/1.1 200 OK" {
		t.Fatalf("/healthz once descriptors are free: %q %v", status, err)
	}
}
