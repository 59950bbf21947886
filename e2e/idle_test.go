package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// readReply reads one reply line from c, which must arrive within
// timeout; the relay sends nothing unasked, so nothing after it is lost.
func readReply(c net.Conn, timeout time.Duration) (string, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	var buf [512]byte
	n := 0
	for {
		m, err := c.Read(buf[n:])
		n += m
		if i := bytes.Index(buf[:n], []byte("\r\n")); i >= 0 {
			return string(buf[:i]), nil
		}
		if err != nil {
			return string(buf[:n]), err
		}
		if n == len(buf) {
			return string(buf[:n]), errors.New("reply line too long")
		}
	}
}

// dialGreeted opens a connection and reads its first line: the banner,
// or the refusal.
func dialGreeted(addr string) (net.Conn, string, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, "", err
	}
	line, err := readReply(c, 30*time.Second)
	if err != nil {
		c.Close()
		return nil, line, fmt.Errorf("first line %q: %w", line, err)
	}
	return c, line, nil
}

// processFiles returns the soft limit on open files of process pid.
func processFiles(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Skipf("no /proc limits: %v", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				if f[0] == "unlimited" {
					return 1 << 30
				}
				if n, err := strconv.Atoi(f[0]); err == nil {
					return n
				}
			}
		}
	}
	t.Fatalf("no open-files limit in /proc/%d/limits", pid)
	return 0
}

// rss returns the resident set size of process pid in bytes.
func rss(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// TestIdleTenThousandConnections holds max_connections = 10000 idle
// connections open: the next one is told 421 4.7.0 and closed at once,
// the idle ones are still served, and closing 100 of them lets exactly
// 100 new ones in. It reports the relay's memory per idle connection.
// It runs alone, not in parallel: it holds 10,000 of this process's
// descriptors.
func TestIdleTenThousandConnections(t *testing.T) {
	const (
		limit   = 10000
		closed  = 100
		dialers = 8
		// The relay as built here, without -race, takes about 11 KiB a
		// connection; the bound leaves room for a build with -race,
		// which multiplies the memory of every goroutine.
		maxPerConn = 256 << 10
	)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < limit+300 {
		t.Skipf("the test process may open %d files; %d connections need more", lim.Cur, limit)
	}

	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), LimitsExtra: fmt.Sprintf("max_connections = %d\nmax_connections_per_ip = 0", limit)})
	r := startRelay(t, cfg)
	pid := r.cmd.Process.Pid
	if n := processFiles(t, pid); n < limit+100 {
		t.Skipf("the relay may open %d files; %d connections need more", n, limit)
	}
	before := rss(t, pid)

	conns := make([]net.Conn, limit)
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, dialers)
	for d := range dialers {
		wg.Go(func() {
			for i := d; i < limit; i += dialers {
				c, line, err := dialGreeted(r.addr)
				if err == nil && !strings.HasPrefix(line, "220 ") {
					c.Close()
					err = fmt.Errorf("banner %q", line)
				}
				if err != nil {
					errs <- fmt.Errorf("connection %d: %w", i, err)
					return
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	opened := time.Since(start)
	with := rss(t, pid)
	perConn := (with - before) / limit
	t.Logf("%d idle connections opened in %s; relay RSS %d KiB before, %d KiB with them: %d bytes (%.1f KiB) per connection",
		limit, opened.Round(time.Millisecond), before>>10, with>>10, perConn, float64(perConn)/1024)
	if perConn > maxPerConn {
		t.Errorf("%d bytes per idle connection, want at most %d", perConn, maxPerConn)
	}

	// One more: refused with 421 4.7.0 and closed at once (RFC 5321
	// section 3.1: a server may answer 421 instead of the 220 greeting).
	wantRefused := func(what string) {
		t.Helper()
		c, line, err := dialGreeted(r.addr)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		defer c.Close()
		if !strings.HasPrefix(line, "421 4.7.0 ") {
			t.Fatalf("%s: %q, want 421 4.7.0", what, line)
		}
		if rest, err := readReply(c, 10*time.Second); !errors.Is(err, io.EOF) {
			t.Fatalf("%s: after the 421, %q %v, want the connection closed", what, rest, err)
		}
	}
	wantRefused(fmt.Sprintf("connection %d", limit+1))

	// The idle ones are still served.
	for _, i := range []int{0, limit / 4, limit / 2, 3 * limit / 4, limit - 1} {
		if _, err := io.WriteString(conns[i], "NOOP\r\n"); err != nil {
			t.Fatalf("NOOP on connection %d: %v", i, err)
		}
		if line, err := readReply(conns[i], 10*time.Second); err != nil || !strings.HasPrefix(line, "250 ") {
			t.Fatalf("NOOP on connection %d: %q %v", i, line, err)
		}
	}

	// Closing 100 frees exactly 100 places. The relay notices each close
	// when its read returns, so a new client may be refused until then.
	for i := limit - closed; i < limit; i++ {
		conns[i].Close()
		conns[i] = nil
	}
	refusedMeanwhile := 0
	deadline := time.Now().Add(30 * time.Second)
	for i := limit - closed; i < limit; {
		c, line, err := dialGreeted(r.addr)
		if err != nil {
			t.Fatalf("reconnecting: %v", err)
		}
		switch {
		case strings.HasPrefix(line, "220 "):
			conns[i] = c
			i++
		case strings.HasPrefix(line, "421 4.7.0 ") && time.Now().Before(deadline):
			c.Close()
			refusedMeanwhile++
			time.Sleep(20 * time.Millisecond)
		default:
			c.Close()
			t.Fatalf("new connection %d after closing %d: %q", i-(limit-closed)+1, closed, line)
		}
	}
	t.Logf("after closing %d, %d new connections served (%d refused while the closes were noticed)", closed, closed, refusedMeanwhile)
	wantRefused("connection after the 100 new ones")

	select {
	case <-r.exited:
		t.Fatalf("relay exited: %s", r.cmd.ProcessState)
	default:
	}
}
