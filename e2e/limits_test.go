package e2e

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// TestAcceptOutOfFiles: a relay out of file descriptors cannot accept
// (EMFILE). It says so at warn, keeps trying with a backoff, and serves
// the clients that waited once descriptors are free again.
func TestAcceptOutOfFiles(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), LimitsExtra: "max_connections_per_ip = 0"})
	r := startRelay(t, cfg)
	pid := r.cmd.Process.Pid

	// Leave the relay room for a few connections only.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	room := uint64(len(fds) + 8)
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: room, Max: room}, nil); err != nil {
		t.Skipf("cannot lower the relay's open-files limit: %v", err)
	}

	var greeted, waiting []net.Conn
	t.Cleanup(func() {
		for _, c := range append(greeted, waiting...) {
			c.Close()
		}
	})
	for range 20 {
		c, err := net.DialTimeout("tcp", r.addr, 5*time.Second)
		if err != nil {
			t.Fatal(err) // the kernel completes the handshake into the backlog
		}
		if line, err := readReply(c, 500*time.Millisecond); err == nil && strings.HasPrefix(line, "220 ") {
			greeted = append(greeted, c)
		} else {
			waiting = append(waiting, c)
		}
	}
	if len(greeted) == 0 || len(waiting) == 0 {
		t.Fatalf("%d greeted, %d waiting: the limit did not bite", len(greeted), len(waiting))
	}
	line := r.waitLog("accept failed", nil, 10*time.Second)
	if line["level"] != "WARN" || !strings.Contains(fmt.Sprint(line["error"]), "too many open files") {
		t.Errorf("accept failure logged as %v", line)
	}

	for _, c := range greeted {
		c.Close()
	}
	greeted = nil
	// The clients in the backlog are served as descriptors free up.
	if line, err := readReply(waiting[0], 10*time.Second); err != nil || !strings.HasPrefix(line, "220 ") {
		t.Fatalf("waiting client after descriptors were freed: %q %v", line, err)
	}
	for _, c := range waiting {
		c.Close()
	}
	waiting = nil
	s := connect(t, r.addr, pki)
	if _, err := s.send("app@example.com", []string{"bob@example.net"}, "From: app@example.com\r\nSubject: after\r\n\r\nok\r\n"); err != nil {
		t.Fatalf("submission after running out of files: %v", err)
	}
	s.close()
}
