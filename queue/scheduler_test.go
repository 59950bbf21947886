package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"smarthost/internal/testwait"
)

// newScheduler returns a scheduler with short retry delays and a fixed
// jitter (factor 1.0), so tests can compute every delay.
func newScheduler(t *testing.T, st *Store, deliver DeliverFunc) *Scheduler {
	s := NewScheduler(st, deliver)
	s.RetryMin, s.RetryMax = 10*time.Millisecond, 80*time.Millisecond
	s.Jitter = func() float64 { return 0.5 }
	s.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	return s
}

// content reads the whole of b as a delivery streams it; a read error
// fails the test.
func content(t *testing.T, b Body) []byte {
	data, err := io.ReadAll(b.Reader())
	if err != nil {
		t.Errorf("reading the body: %v", err)
	}
	if int64(len(data)) != b.Size() {
		t.Errorf("read %d bytes of a body of Size %d", len(data), b.Size())
	}
	return data
}

// start runs s until the test ends; the cleanup stops it before the store
// closes (cleanups run last-in first-out).
func start(t *testing.T, s *Scheduler) {
	errc := make(chan error, 1)
	go func() { errc <- s.Run() }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-errc; !errors.Is(err, ErrSchedulerClosed) {
			t.Errorf("Run: %v, want ErrSchedulerClosed", err)
		}
	})
}

// doneChan collects the messages handed to OnDone.
func doneChan(s *Scheduler, n int) chan Message {
	ch := make(chan Message, n)
	s.OnDone = func(m Message) { ch <- m }
	return ch
}

func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func results(m Message, state RcptState, reply string) []Result {
	var out []Result
	for _, r := range m.Pending() {
		out = append(out, Result{Rcpt: r, State: state, Reply: reply, Upstream: "test"})
	}
	return out
}

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		attempt int
		jitter  float64
		want    time.Duration
	}{
		{1, 0.5, time.Minute},
		{2, 0.5, 2 * time.Minute},
		{3, 0.5, 4 * time.Minute},
		{6, 0.5, 32 * time.Minute},
		{7, 0.5, time.Hour}, // 64m capped
		{1000, 0.5, time.Hour},
		{math.MaxInt, 0.5, time.Hour},
		{0, 0.5, time.Minute},
		{1, 0, 45 * time.Second}, // -25%
		{7, 0, 45 * time.Minute}, // jitter applies after the cap
		{7, 0.999, 74*time.Minute + 58*time.Second + 200*time.Millisecond},
		{2, 1, 150 * time.Second}, // out of range: clamped to +25%
		{2, -1, 90 * time.Second}, // out of range: clamped to -25%
	} {
		if got := Backoff(tc.attempt, time.Minute, time.Hour, tc.jitter); got != tc.want {
			t.Errorf("Backoff(%d, 1m, 1h, %v) = %v, want %v", tc.attempt, tc.jitter, got, tc.want)
		}
	}
	if got := Backoff(3, 0, time.Hour, 0.5); got != 0 {
		t.Errorf("Backoff with zero min = %v, want 0", got)
	}
}

func TestBackoffJitterBounds(t *testing.T) {
	s := NewScheduler(nil, nil) // the default jitter source
	for attempt := 1; attempt <= 12; attempt++ {
		base := Backoff(attempt, time.Minute, time.Hour, 0.5)
		for range 200 {
			j := s.Jitter()
			if j < 0 || j >= 1 {
				t.Fatalf("Jitter() = %v, want [0,1)", j)
			}
			d := Backoff(attempt, time.Minute, time.Hour, j)
			if d < base*3/4 || d >= base*5/4 {
				t.Fatalf("attempt %d jitter %v: %v outside [%v, %v)", attempt, j, d, base*3/4, base*5/4)
			}
		}
	}
}

func TestDeliverAtOnceAfterPut(t *testing.T) {
	st, _ := openStore(t)
	got := make(chan Message, 1)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if got := content(t, body); string(got) != "body\r\n" {
			t.Errorf("body %q", got)
		}
		got <- m
		return results(m, Delivered, "250 2.0.0 OK")
	})
	done := doneChan(s, 1)
	start(t, s)
	// With an empty queue the scheduler has no timer: only Put's signal
	// can make it deliver.
	testwait.For(t, 10*time.Second, "the scheduler's first pass", func() bool { return s.steps.Load() > 0 })

	m := newMessage("a@example.net")
	put(t, st, m, "body\r\n")
	d := receive(t, got, "delivery")
	if d.ID != m.ID || d.Attempts != 1 {
		t.Errorf("delivered %+v", d)
	}
	final := receive(t, done, "OnDone")
	if final.Recipients[0].State != Delivered || final.Recipients[0].Reply != "250 2.0.0 OK" ||
		final.Recipients[0].Upstream != "test" || final.LastReply != "250 2.0.0 OK" {
		t.Errorf("OnDone got %+v", final)
	}
	if _, err := st.Get(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after delivery: %v, want ErrNotFound", err)
	}
	if _, err := st.Body(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Body after delivery: %v, want ErrNotFound", err)
	}
}

func TestPerRecipientResults(t *testing.T) {
	st, _ := openStore(t)
	calls := make(chan []string, 2)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		calls <- m.Pending()
		switch m.Attempts {
		case 1:
			// d@ gets no result at all: it stays pending too.
			return []Result{
				{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok a"},
				{Rcpt: "b@example.net", State: Failed, Reply: "550 5.1.1 no such user"},
				{Rcpt: "c@example.net", State: Pending, Reply: "451 4.3.0 later"},
				{Rcpt: "stranger@example.net", State: Delivered, Reply: "250 ignored"},
			}
		default:
			stored, err := st.Get(m.ID)
			if err != nil || stored.LastReply != "451 4.3.0 later" {
				t.Errorf("before attempt 2: %+v, %v; want LastReply of the deferred recipient", stored, err)
			}
			return results(m, Delivered, "250 ok")
		}
	})
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net", "b@example.net", "c@example.net", "d@example.net"), "x")

	if got := receive(t, calls, "attempt 1"); !slices.Equal(got, []string{"a@example.net", "b@example.net", "c@example.net", "d@example.net"}) {
		t.Errorf("attempt 1 recipients %q", got)
	}
	if got := receive(t, calls, "attempt 2"); !slices.Equal(got, []string{"c@example.net", "d@example.net"}) {
		t.Errorf("attempt 2 recipients %q, want only the pending ones", got)
	}
	m := receive(t, done, "OnDone")
	want := []Recipient{
		{Addr: "a@example.net", State: Delivered, Reply: "250 ok a"},
		{Addr: "b@example.net", State: Failed, Reply: "550 5.1.1 no such user"},
		{Addr: "c@example.net", State: Delivered, Reply: "250 ok", Upstream: "test"},
		{Addr: "d@example.net", State: Delivered, Reply: "250 ok", Upstream: "test"},
	}
	if !slices.Equal(m.Recipients, want) || m.Attempts != 2 {
		t.Errorf("final message %+v, want recipients %+v after 2 attempts", m, want)
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d after the last recipient", n)
	}
}

func TestRetryBackoff(t *testing.T) {
	st, _ := openStore(t)
	type call struct {
		at time.Time
		m  Message
	}
	calls := make(chan call, 10)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		calls <- call{time.Now(), m}
		if stored, err := st.Get(m.ID); err != nil || stored.Attempts != m.Attempts {
			t.Errorf("stored during attempt %d: %+v, %v; the claim must be saved before delivery", m.Attempts, stored, err)
		}
		if m.Attempts < 5 {
			return results(m, Pending, fmt.Sprintf("451 try %d", m.Attempts))
		}
		return results(m, Delivered, "250 ok")
	})
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net"), "x")

	var prev Message
	for n := 1; n <= 5; n++ {
		c := receive(t, calls, fmt.Sprintf("attempt %d", n))
		if c.m.Attempts != n {
			t.Fatalf("attempt %d: Attempts = %d", n, c.m.Attempts)
		}
		// 10ms doubling, capped at 80ms.
		wantDelay := []time.Duration{10, 20, 40, 80, 80}[n-1] * time.Millisecond
		if got := c.m.NextAttempt.Sub(c.m.LastAttempt); got != wantDelay {
			t.Errorf("attempt %d: NextAttempt - LastAttempt = %v, want %v", n, got, wantDelay)
		}
		if n > 1 {
			if c.at.Before(prev.NextAttempt) {
				t.Errorf("attempt %d at %v, before NextAttempt %v", n, c.at, prev.NextAttempt)
			}
			if c.m.LastReply != fmt.Sprintf("451 try %d", n-1) {
				t.Errorf("attempt %d: LastReply %q", n, c.m.LastReply)
			}
		}
		prev = c.m
	}
	if m := receive(t, done, "OnDone"); m.Attempts != 5 {
		t.Errorf("done after %d attempts, want 5", m.Attempts)
	}
}

func TestMaxAgeExpires(t *testing.T) {
	st, _ := openStore(t)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		return []Result{
			{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok"},
			{Rcpt: "b@example.net", State: Pending, Reply: "451 4.7.1 greylisted"},
		}
	})
	s.MaxAge = time.Hour
	s.Now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net", "b@example.net"), "x")

	m := receive(t, done, "OnDone")
	if m.Recipients[0].State != Delivered {
		t.Errorf("a: %+v, want Delivered", m.Recipients[0])
	}
	b := m.Recipients[1]
	if want := "expired after 1h0m0s in queue; last reply: 451 4.7.1 greylisted"; b.State != Failed || b.Reply != want {
		t.Errorf("b: %+v, want Failed with %q", b, want)
	}
	if _, err := st.Get(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("expired message still queued: %v", err)
	}
}

func TestWorkersBound(t *testing.T) {
	st, _ := openStore(t)
	const workers, messages = 3, 10
	var active, peak atomic.Int32
	started := make(chan struct{}, messages)
	release := make(chan struct{})
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		n := active.Add(1)
		defer active.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		started <- struct{}{}
		<-release
		return results(m, Delivered, "250 ok")
	})
	s.Workers = workers
	done := doneChan(s, messages)
	for range messages {
		put(t, st, newMessage("a@example.net"), "x")
	}
	start(t, s)

	for i := range workers {
		receive(t, started, fmt.Sprintf("delivery %d", i+1))
	}
	// Claims are saved before delivery starts: exactly Workers messages
	// may have been claimed while the workers are busy.
	list, _, err := st.List()
	if err != nil {
		t.Fatal(err)
	}
	claimed := 0
	for _, m := range list {
		if m.Attempts > 0 {
			claimed++
		}
	}
	if claimed != workers {
		t.Errorf("%d messages claimed with %d workers busy", claimed, workers)
	}
	close(release)
	for i := range messages {
		receive(t, done, fmt.Sprintf("message %d done", i+1))
	}
	if p := peak.Load(); p != workers {
		t.Errorf("peak concurrent deliveries %d, want %d", p, workers)
	}
}

func TestRestartResumes(t *testing.T) {
	st, path := openStore(t)
	want := map[string]bool{}
	for i := range 5 {
		m := newMessage(fmt.Sprintf("r%d@example.net", i))
		put(t, st, m, m.Recipients[0].Addr)
		want[m.ID] = true
	}
	st = reopen(t, st, path)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if got := content(t, body); string(got) != m.Recipients[0].Addr {
			t.Errorf("%s: body %q", m.ID, got)
		}
		return results(m, Delivered, "250 ok")
	})
	done := doneChan(s, 5)
	start(t, s)
	for range 5 {
		m := receive(t, done, "delivery after restart")
		if !want[m.ID] {
			t.Errorf("unexpected or repeated message %s", m.ID)
		}
		delete(want, m.ID)
	}
	if n, err := st.Len(); err != nil || n != 0 {
		t.Errorf("Len = %d, %v; want 0", n, err)
	}
}

func TestRecoveredRetriedWhenDue(t *testing.T) {
	st, path := openStore(t)
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	now := time.Now()
	next := now.Add(150 * time.Millisecond)
	if _, err := st.Claim(context.Background(), Start{Now: now, Retry: func(int) time.Time { return next }}, 1, nil); err != nil {
		t.Fatal(err)
	}
	st = reopen(t, st, path) // as if the process died mid-delivery
	if st.Recovered() != 1 {
		t.Errorf("Recovered = %d, want 1", st.Recovered())
	}
	type call struct {
		at time.Time
		m  Message
	}
	calls := make(chan call, 1)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		calls <- call{time.Now(), m}
		return results(m, Delivered, "250 ok")
	})
	start(t, s)
	c := receive(t, calls, "retry of the recovered message")
	if c.m.ID != m.ID || c.m.Attempts != 2 {
		t.Errorf("retried %+v, want attempt 2 of %s", c.m, m.ID)
	}
	if c.at.Before(next) {
		t.Errorf("retried at %v, before its NextAttempt %v", c.at, next)
	}
}

func TestDeliverPanic(t *testing.T) {
	st, _ := openStore(t)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if m.Attempts == 1 {
			panic("deliverer bug")
		}
		return results(m, Delivered, "250 ok")
	})
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net"), "x")
	if m := receive(t, done, "delivery after a panic"); m.Attempts != 2 || m.Recipients[0].State != Delivered {
		t.Errorf("final %+v, want delivered on attempt 2", m)
	}
}

func TestInFlightNotReclaimed(t *testing.T) {
	st, _ := openStore(t)
	var mu sync.Mutex
	calls := map[string]int{}
	slow := make(chan Message, 1)
	release := make(chan struct{})
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		mu.Lock()
		calls[m.ID]++
		mu.Unlock()
		if m.MessageID == "slow" {
			select {
			case slow <- m:
			default: // claimed again: a failure reported below
			}
			<-release
		}
		return results(m, Delivered, "250 ok")
	})
	s.RetryMin, s.RetryMax = time.Millisecond, time.Millisecond
	done := doneChan(s, 2)
	start(t, s)

	a := newMessage("a@example.net")
	a.MessageID = "slow"
	put(t, st, a, "x")
	inFlight := receive(t, slow, "slow delivery")
	testwait.For(t, 10*time.Second, "the slow message's NextAttempt to pass", func() bool { return time.Now().After(inFlight.NextAttempt) })

	// Another message makes the scheduler look at the due index again,
	// now that the in-flight message is overdue there.
	steps := s.steps.Load()
	b := newMessage("b@example.net")
	put(t, st, b, "x")
	if m := receive(t, done, "second message"); m.ID != b.ID {
		t.Fatalf("done %s, want %s", m.ID, b.ID)
	}
	if n := s.steps.Load() - steps; n > 10 {
		t.Errorf("%d scheduling passes for one message: the loop spins on the in-flight one", n)
	}
	mu.Lock()
	if calls[a.ID] != 1 {
		t.Errorf("in-flight message delivered %d times concurrently", calls[a.ID])
	}
	mu.Unlock()
	close(release)
	if m := receive(t, done, "slow message"); m.ID != a.ID || m.Attempts != 1 {
		t.Errorf("done %+v, want %s after 1 attempt", m, a.ID)
	}
}

func TestShutdownWaitsForDeliveries(t *testing.T) {
	st, _ := openStore(t)
	started := make(chan struct{})
	release := make(chan struct{})
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		close(started)
		<-release
		if ctx.Err() != nil {
			t.Errorf("delivery cancelled during a Shutdown without deadline: %v", ctx.Err())
		}
		return results(m, Delivered, "250 ok")
	})
	var doneCalls atomic.Int32
	s.OnDone = func(Message) { doneCalls.Add(1) }
	errc := make(chan error, 1)
	go func() { errc <- s.Run() }()
	put(t, st, newMessage("a@example.net"), "x")
	<-started

	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	if err := receive(t, errc, "Run to return"); !errors.Is(err, ErrSchedulerClosed) {
		t.Errorf("Run: %v", err)
	}
	close(release)
	if err := receive(t, shut, "Shutdown"); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if doneCalls.Load() != 1 {
		t.Errorf("Shutdown returned before the in-flight message was finished")
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d", n)
	}
}

func TestShutdownDeadlineCancels(t *testing.T) {
	st, path := openStore(t)
	started := make(chan struct{})
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		close(started)
		<-ctx.Done()
		return results(m, Pending, "local error: "+ctx.Err().Error())
	})
	errc := make(chan error, 1)
	go func() { errc <- s.Run() }()
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	<-started

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown: %v, want DeadlineExceeded", err)
	}
	if err := <-errc; !errors.Is(err, ErrSchedulerClosed) {
		t.Errorf("Run: %v", err)
	}
	// The cancelled attempt was recorded: queued for a retry, not in doubt.
	got, err := st.Get(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Attempts != 1 || got.Recipients[0].State != Pending || got.LastReply != "local error: context canceled" {
		t.Errorf("after Shutdown: %+v", got)
	}
	if st = reopen(t, st, path); st.Recovered() != 0 {
		t.Errorf("Recovered = %d, want 0", st.Recovered())
	}
}

func TestRunAfterShutdown(t *testing.T) {
	st, _ := openStore(t)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result { return nil })
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.Run(); !errors.Is(err, ErrSchedulerClosed) {
		t.Errorf("Run after Shutdown: %v", err)
	}
}

// TestBackoffFromEndOfAttempt: an attempt that takes longer than the
// backoff (an upstream silent until its timeout) is not retried at once.
func TestBackoffFromEndOfAttempt(t *testing.T) {
	st, _ := openStore(t)
	const backoff = 300 * time.Millisecond // Backoff(1) with jitter 0.5
	type span struct{ start, end time.Time }
	spans := make(chan span, 4)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		start := time.Now()
		if m.Attempts == 1 {
			time.Sleep(2 * backoff) // the slow upstream, not a wait for an event
		}
		spans <- span{start, time.Now()}
		if m.Attempts == 1 {
			return results(m, Pending, "451 4.4.2 timeout")
		}
		return results(m, Delivered, "250 ok")
	})
	s.RetryMin, s.RetryMax = backoff, 4*backoff
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, &Message{From: "a@example.com", Recipients: []Recipient{{Addr: "b@example.net"}}}, "body")
	first := receive(t, spans, "first attempt")
	second := receive(t, spans, "second attempt")
	receive(t, done, "delivery")
	if gap := second.start.Sub(first.end); gap < backoff*9/10 {
		t.Errorf("second attempt %v after the first ended, want about %v", gap, backoff)
	}
}
