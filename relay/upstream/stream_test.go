package upstream

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// hashSink is a real go-smtp upstream that keeps of each message only its
// size, its SHA-256 and the SIZE= its MAIL declared, so that a test can
// pass 25 MB through it without holding them.
type hashSink struct {
	addr string
	mu   sync.Mutex
	got  []sunkMessage
	done chan struct{} // receives one value per message
}

type sunkMessage struct {
	size, declared int64
	sum            [sha256.Size]byte
}

func startHashSink(t *testing.T) *hashSink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &hashSink{addr: ln.Addr().String(), done: make(chan struct{}, 16)}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) {
		return &hashSession{sink: hs}, nil
	}))
	srv.Domain = "sink.test"
	srv.MaxMessageBytes = 64 << 20
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return hs
}

func (hs *hashSink) messages() []sunkMessage {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return append([]sunkMessage(nil), hs.got...)
}

type hashSession struct {
	sink     *hashSink
	declared int64
}

func (s *hashSession) Mail(_ string, opts *smtp.MailOptions) error {
	s.declared = 0
	if opts != nil {
		s.declared = opts.Size
	}
	return nil
}
func (s *hashSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *hashSession) Reset()                               {}
func (s *hashSession) Logout() error                        { return nil }
func (s *hashSession) Data(r io.Reader) error {
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return err
	}
	m := sunkMessage{size: n, declared: s.declared}
	h.Sum(m.sum[:0])
	s.sink.mu.Lock()
	s.sink.got = append(s.sink.got, m)
	s.sink.mu.Unlock()
	s.sink.done <- struct{}{}
	return nil
}

const streamHead = "From: App <app@example.com>\r\nTo: x@example.net\r\nSubject: large\r\n\r\n"

// writeSpool writes about n bytes of numbered lines to a new spool of st,
// in 32 KiB pieces from one buffer, and returns it with the SHA-256 of
// streamHead followed by those bytes.
func writeSpool(t *testing.T, st *queue.Store, n int) (*queue.Spool, [sha256.Size]byte) {
	t.Helper()
	sp, err := st.NewSpool()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	h.Write([]byte(streamHead))
	buf := make([]byte, 0, 32<<10)
	for line, written := 0, 0; written < n; {
		buf = buf[:0]
		for len(buf) < 32<<10-100 {
			buf = fmt.Appendf(buf, "line %08d %s\r\n", line, strings.Repeat("y", 60))
			line++
		}
		if _, err := sp.Write(buf); err != nil {
			t.Fatal(err)
		}
		h.Write(buf)
		written += len(buf)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sp, sum
}

// runScheduler runs a scheduler over st with deliver until the test ends,
// and returns the channel OnDone sends finished messages to.
func runScheduler(t *testing.T, st *queue.Store, deliver queue.DeliverFunc) chan queue.Message {
	t.Helper()
	done := make(chan queue.Message, 4)
	s := queue.NewScheduler(st, deliver)
	s.RetryMin = time.Hour // an attempt left pending is not retried here
	s.OnDone = func(m queue.Message) { done <- m }
	s.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	errc := make(chan error, 1)
	go func() { errc <- s.Run() }()
	t.Cleanup(func() {
		s.Close()
		if err := <-errc; !errors.Is(err, queue.ErrSchedulerClosed) {
			t.Errorf("Run: %v", err)
		}
	})
	return done
}

func openQueue(t *testing.T) (*queue.Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "queue.db")
	st, err := queue.Open(path, queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, path
}

func wait[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(60 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// TestDeliverSpooledStreams delivers a 25 MB spooled message through the
// scheduler and the Deliverer to a real upstream: the upstream gets the
// stored bytes exactly, with their size declared in MAIL SIZE=, and the
// whole attempt allocates a small fraction of the message, since the
// spool file is streamed rather than read into memory.
func TestDeliverSpooledStreams(t *testing.T) {
	const size = 25 << 20
	st, _ := openQueue(t)
	sink := startHashSink(t)
	env := newDeliverer(t, Upstream{Name: "sink", Address: sink.addr, TLS: mailproto.TLSNone})
	// 25 MB under the race detector on a busy machine may take longer
	// than the other tests' data timeout; this test is not about it.
	cfg := env.d.Config()
	cfg.DataTimeout = 2 * time.Minute
	env.d.SetConfig(cfg)
	done := runScheduler(t, st, env.d.Deliver)

	sp, sum := writeSpool(t, st, size)
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}}}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if err := st.PutSpooled(context.Background(), m, []byte(streamHead), sp); err != nil {
		t.Fatal(err)
	}
	left := wait(t, done, "the delivery")
	runtime.ReadMemStats(&after)

	if left.Recipients[0].State != queue.Delivered {
		t.Fatalf("recipient %+v, want delivered", left.Recipients[0])
	}
	got := sink.messages()
	if len(got) != 1 {
		t.Fatalf("%d messages at the upstream, want 1", len(got))
	}
	want := m.Size
	if got[0].size != want || got[0].sum != sum {
		t.Errorf("upstream got %d bytes (sha256 %x), want the %d stored (%x)", got[0].size, got[0].sum[:8], want, sum[:8])
	}
	if got[0].declared != want {
		t.Errorf("MAIL SIZE=%d, want %d", got[0].declared, want)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("storing and delivering a %d MB spooled message allocated %d KiB", size>>20, alloc>>10)
	if alloc > 4<<20 {
		t.Errorf("allocated %d KiB for one delivery, want at most 4096: the message is read into memory", alloc>>10)
	}
}

// TestDeliverSpooledFailover: when the first upstream refuses a spooled
// message after reading it whole, the second reads it again from the
// start, and both get exactly the stored bytes.
func TestDeliverSpooledFailover(t *testing.T) {
	st, path := openQueue(t)
	firstGot := make(chan []byte, 1)
	first := smtptest.Start(t, smtptest.Options{DataReply: func(_ string, _ []string, data []byte) *smtp.SMTPError {
		firstGot <- data
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try elsewhere"}
	}})
	second := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("first", first), plainUpstream("second", second))
	done := runScheduler(t, st, env.d.Deliver)

	sp, _ := writeSpool(t, st, 3<<20)
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}}}
	if err := st.PutSpooled(context.Background(), m, []byte(streamHead), sp); err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(filepath.Join(path+".spool", m.ID))
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte(streamHead), file...)

	left := wait(t, done, "the delivery")
	if r := left.Recipients[0]; r.State != queue.Delivered || r.Upstream != "second" {
		t.Fatalf("recipient %+v, want delivered through second", r)
	}
	if got := wait(t, firstGot, "the first upstream's DATA"); !bytes.Equal(got, want) {
		t.Errorf("first upstream got %d bytes, want the %d stored, identical", len(got), len(want))
	}
	if got := second.Messages(); len(got) != 1 || !bytes.Equal(got[0].Data, want) {
		t.Errorf("second upstream got %d messages; want one of the %d bytes stored, identical", len(got), len(want))
	}
}

// TestDeliverSpooledHeaderFromRewrite: header_from_rewrite changes the
// header section, which the head holds; the body streamed from the spool
// file after it is untouched.
func TestDeliverSpooledHeaderFromRewrite(t *testing.T) {
	st, path := openQueue(t)
	s := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("up", s)
	up.EnvelopeFrom, up.HeaderFromRewrite = "relay@example.ru", true
	env := newDeliverer(t, up)
	done := runScheduler(t, st, env.d.Deliver)

	sp, _ := writeSpool(t, st, 2<<20)
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}}}
	if err := st.PutSpooled(context.Background(), m, []byte(streamHead), sp); err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(filepath.Join(path+".spool", m.ID))
	if err != nil {
		t.Fatal(err)
	}
	wait(t, done, "the delivery")
	want := append(rewriteHeaderFrom([]byte(streamHead), up.EnvelopeFrom), file...)
	got := s.Messages()
	if len(got) != 1 || !bytes.Equal(got[0].Data, want) {
		t.Fatalf("upstream got %d messages; want one with the header rewritten and the body intact", len(got))
	}
	if !bytes.HasPrefix(got[0].Data, []byte("From: \"App\" <relay@example.ru>\r\nReply-To: App <app@example.com>\r\n")) {
		t.Errorf("header not rewritten: %q", got[0].Data[:100])
	}
}

// TestDeliverSpooledFileShrinks: a spool file that ends short of its size
// while it is sent (a disk gone bad) never becomes a truncated message at
// the upstream: the connection is dropped before the final dot, the
// recipient stays queued for a retry, and the upstream is not blamed.
func TestDeliverSpooledFileShrinks(t *testing.T) {
	st, path := openQueue(t)
	s := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("up", s))
	results := make(chan []queue.Result, 1)
	runScheduler(t, st, func(ctx context.Context, m queue.Message, body queue.Body) []queue.Result {
		// The worker has the file open; it now loses its second half.
		if err := os.Truncate(filepath.Join(path+".spool", m.ID), 1<<20); err != nil {
			t.Error(err)
		}
		res := env.d.Deliver(ctx, m, body)
		results <- res
		return res
	})

	sp, _ := writeSpool(t, st, 2<<20)
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}}}
	if err := st.PutSpooled(context.Background(), m, []byte(streamHead), sp); err != nil {
		t.Fatal(err)
	}
	res := wait(t, results, "the attempt")
	checkResult(t, res[0], "x@example.net", queue.Pending, errContentUnreadable, "up")
	if got := s.Messages(); len(got) != 0 {
		t.Errorf("upstream took %d messages, %d bytes: a truncated message went out", len(got), len(got[0].Data))
	}
	for _, u := range env.d.UpstreamStates() {
		if !u.Up || u.ConsecutiveFailures != 0 {
			t.Errorf("upstream %s counted a failure for a local read failure: %+v", u.Name, u)
		}
	}
	// The next message through the same upstream goes out whole.
	if res := deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody); res[0].State != queue.Delivered {
		t.Errorf("next delivery: %+v", res[0])
	}
}
