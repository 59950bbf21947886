package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// memoryConfig is a relay with the default limits but a message_memory
// scaled down with the traffic of the test, a plain-text listener for
// loopback clients and a plain-text upstream at upstream.
func memoryConfig(t *testing.T, dir, upstream string) string {
	t.Helper()
	cfg := fmt.Sprintf(`hostname = "relay.e2e"
log_format = "json"

[queue]
path = %q

[[listen]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[limits]
max_message_size = "30MB"
message_memory = "8MB"
max_connections_per_ip = 0            # every session comes from 127.0.0.1

[[upstream]]
name = "sink"
address = %q
tls = "none"
max_connections = 16

[[route]]
from_domain = "*"
upstreams = ["sink"]

[http]
address = "127.0.0.1:0"
admin_token_env = %q
`, filepath.Join(dir, "queue.db"), upstream, adminEnv)
	path := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// discardSink is an upstream that reads each message to its end and
// counts it, keeping nothing.
type discardSink struct {
	addr string
	srv  *smtp.Server
	mu   sync.Mutex
	n    int
	more chan struct{} // closed and replaced at each message
}

func startDiscardSink(t *testing.T, addr string) *discardSink {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &discardSink{addr: ln.Addr().String(), more: make(chan struct{})}
	s.srv = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &discardSession{s}, nil }))
	s.srv.Domain = "sink.e2e"
	s.srv.MaxMessageBytes = 64 << 20
	go s.srv.Serve(ln)
	t.Cleanup(func() { s.srv.Close() })
	return s
}

// wait waits until n messages have arrived.
func (s *discardSink) wait(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.After(timeout)
	for {
		s.mu.Lock()
		got, more := s.n, s.more
		s.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("%d of %d messages reached the upstream within %s", got, n, timeout)
		}
	}
}

type discardSession struct{ s *discardSink }

func (d *discardSession) Mail(string, *smtp.MailOptions) error { return nil }
func (d *discardSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (d *discardSession) Reset()                               {}
func (d *discardSession) Logout() error                        { return nil }
func (d *discardSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	d.s.mu.Lock()
	d.s.n++
	close(d.s.more)
	d.s.more = make(chan struct{})
	d.s.mu.Unlock()
	return nil
}

// peakRSS returns VmHWM, the highest resident set size of process pid.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc status: %v", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmHWM in /proc/%d/status", pid)
	return 0
}

// bodyOf is a message of about size bytes.
func bodyOf(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: <app@example.com>\r\nTo: <rcpt@example.net>\r\nSubject: memory\r\n\r\n")
	line := strings.Repeat("x", 76) + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.Bytes()
}

// sendAll sends msg once over each of n sessions. With together, every
// session first reaches DATA, then all send their message at the same
// moment. msg has no line that starts with a dot and ends with CRLF, so
// it is written as it is, without the cost of dot-stuffing it in this
// process (which make test runs with -race).
func sendAll(t *testing.T, addr string, n int, msg []byte, together bool) {
	t.Helper()
	var (
		wg, ready sync.WaitGroup
		mu        sync.Mutex
		errs      []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	start := make(chan struct{})
	ready.Add(n)
	for range n {
		wg.Go(func() {
			conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				ready.Done()
				fail(err)
				return
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(2 * time.Minute))
			tp := textproto.NewConn(conn)
			step := func(want int, cmd string) error {
				if cmd != "" {
					if err := tp.PrintfLine("%s", cmd); err != nil {
						return err
					}
				}
				_, _, err := tp.ReadResponse(want)
				return err
			}
			for _, s := range []struct {
				want int
				cmd  string
			}{{220, ""}, {250, "EHLO client.e2e"}, {250, "MAIL FROM:<app@example.com>"}, {250, "RCPT TO:<rcpt@example.net>"}, {354, "DATA"}} {
				if err = step(s.want, s.cmd); err != nil {
					break
				}
			}
			ready.Done()
			if err != nil {
				fail(err)
				return
			}
			if together {
				<-start
			}
			if _, err := conn.Write(msg); err != nil {
				fail(err)
				return
			}
			if err := step(250, "."); err != nil {
				fail(err)
				return
			}
			step(221, "QUIT")
		})
	}
	ready.Wait()
	close(start)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d sessions failed, the first: %v", len(errs), n, errs[0])
	}
}

// TestMemoryBoundedByConfiguration runs the relay as built for production
// and reads its peak RSS: what it holds depends on the configuration
// (message_memory, the workers), not on how much mail arrives or waits.
// Each half is a scaled-down bench/run -memory. It runs in parallel
// with other tests: the bounds are on the peak of its own relay, which a
// busy machine slows but does not raise.
func TestMemoryBoundedByConfiguration(t *testing.T) {
	t.Parallel()
	// 100 sessions in DATA at once, 900 KB each: 88 MiB arriving. Held
	// whole, they take several times that; within the budget, most are
	// spooled as they arrive.
	t.Run("sessions", func(t *testing.T) {
		const (
			sessions = 100
			size     = 900 << 10
			bound    = 128 << 20
		)
		sink := startDiscardSink(t, "127.0.0.1:0")
		dir := t.TempDir()
		r := startRelay(t, memoryConfig(t, dir, sink.addr))
		sendAll(t, r.addr, sessions, bodyOf(size), true)
		sink.wait(t, sessions, time.Minute)
		peak := peakRSS(t, r.cmd.Process.Pid)
		t.Logf("%d sessions × %d KB at once: peak RSS %d MiB", sessions, size>>10, peak>>20)
		if peak > bound {
			t.Errorf("peak RSS %d MiB, want at most %d", peak>>20, bound>>20)
		}
	})

	// 16 queued messages of 8 MB, delivered at once by the 16 workers:
	// 128 MiB to send. Read whole, each worker holds its message; streamed
	// from the spool files, a copy buffer.
	t.Run("backlog", func(t *testing.T) {
		const (
			messages = 16
			size     = 8 << 20
			bound    = 64 << 20
		)
		dir := t.TempDir()
		upstream, freeUpstream := reserveAddr(t) // down while the backlog is queued
		cfg := memoryConfig(t, dir, upstream)
		queued := startRelay(t, cfg)
		sendAll(t, queued.addr, messages, bodyOf(size), false)
		queued.stop()

		freeUpstream()
		sink := startDiscardSink(t, upstream)
		r := startRelay(t, cfg)
		// Deferred at their first attempt, they are due again within
		// retry_min (1m): make them due now.
		api(t, r, "POST", "/api/queue/flush", nil)
		sink.wait(t, messages, time.Minute)
		peak := peakRSS(t, r.cmd.Process.Pid)
		t.Logf("%d queued messages × %d MB delivered by 16 workers: peak RSS %d MiB", messages, size>>20, peak>>20)
		if peak > bound {
			t.Errorf("peak RSS %d MiB, want at most %d", peak>>20, bound>>20)
		}
	})
}
