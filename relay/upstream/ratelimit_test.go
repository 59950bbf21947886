package upstream

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testwait"
	"smarthost/queue"
)

func TestRateLog(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	r := &rateLog{rate: Rate{N: 3, Per: 10 * time.Second}}
	take := func(now float64, wantWait time.Duration, wantExact bool) {
		t.Helper()
		wait, exact := r.take(at(now))
		if wait != wantWait || exact != wantExact {
			t.Fatalf("take at %vs: wait %v exact %v, want %v %v", now, wait, exact, wantWait, wantExact)
		}
	}
	take(0, 0, true)
	take(0, 0, true)
	take(0, 0, true)
	// Three in flight: nothing frees before one ends, and then not for Per.
	take(1, 10*time.Second, false)
	r.release(at(2), true)
	r.release(at(3), false) // never sent: frees its slot at once
	take(3, 0, true)
	take(4, 8*time.Second, true) // 2s + 10s - 4s
	r.release(at(5), true)
	r.release(at(6), true)
	// Ended at 2, 5, 6: the next slot at 12, then 15.
	take(11.5, 500*time.Millisecond, true)
	take(12, 0, true)
	take(12, 3*time.Second, true) // 5, 6 and one in flight: 5 leaves first
	r.release(at(13), true)
	take(14, time.Second, true)
	take(16, 0, true)
}

func TestRateLimitPacing(t *testing.T) {
	var (
		mu       sync.Mutex
		arrivals []time.Time
	)
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		mu.Lock()
		defer mu.Unlock()
		arrivals = append(arrivals, time.Now())
		return nil
	}})
	up := plainUpstream("a", s)
	up.RateLimit = Rate{N: 10, Per: time.Second}
	env := newDeliverer(t, up)

	const n = 30
	start := time.Now()
	var wg sync.WaitGroup
	results := make([][]queue.Result, n)
	for i := range n {
		wg.Go(func() {
			m := testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i))
			results[i] = env.d.Deliver(context.Background(), m, queue.NewBody([]byte(deliverBody)))
		})
	}
	wg.Wait()
	took := time.Since(start)
	for i, res := range results {
		if len(res) != 1 || res[0].State != queue.Delivered {
			t.Errorf("message %d: %+v", i, res)
		}
	}
	mu.Lock()
	got := slices.Clone(arrivals)
	mu.Unlock()
	if len(got) != n {
		t.Fatalf("%d arrivals, want %d", len(got), n)
	}
	slices.SortFunc(got, func(a, b time.Time) int { return a.Compare(b) })
	for i := 0; i+10 < len(got); i++ {
		if d := got[i+10].Sub(got[i]); d < time.Second {
			t.Errorf("arrivals %d to %d within %v: more than 10 in a second", i+1, i+11, d)
		}
	}
	if took < 2*time.Second {
		t.Errorf("30 messages at 10/s took %v", took)
	}
	st := stateOf(t, env.d, "a")
	if st.RateLimitWaits < 10 || st.RateLimitWaits > 20 || st.RateLimitWaited < 10*time.Second || st.RateLimited != 0 {
		t.Errorf("rate limit counters: %+v", st)
	}
}

func TestRateLimitLongWait(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{})
	b := smtptest.Start(t, smtptest.Options{})
	upA := plainUpstream("a", a)
	upA.RateLimit = Rate{N: 1, Per: time.Hour}
	env := newDeliverer(t, upA, plainUpstream("b", b))
	setRoutes(env.d, append([]Route{{FromDomain: "only-a.example", Upstreams: []string{"a"}}}, env.d.Config().Routes...)...)

	res := deliver(t, env.d, testMessage("app@only-a.example", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	sent := time.Now()

	// No other upstream: pending until the slot frees, without waiting.
	res = deliver(t, env.d, testMessage("app@only-a.example", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Pending, "rate limit of a reached", "a")
	if nb := res[0].NotBefore; nb.Before(sent.Add(time.Hour-time.Minute)) || nb.After(time.Now().Add(time.Hour)) {
		t.Errorf("NotBefore %v, want about %v", nb, sent.Add(time.Hour))
	}
	if strings.Contains(res[0].Reply, "down") {
		t.Errorf("reply %q", res[0].Reply)
	}
	if len(a.Messages()) != 1 {
		t.Errorf("a got %d messages", len(a.Messages()))
	}

	// With another upstream in the route, the message goes there.
	res = deliver(t, env.d, testMessage("app@example.com", "z@example.net"), deliverBody)
	checkResult(t, res[0], "z@example.net", queue.Delivered, "250 ", "b")

	st := stateOf(t, env.d, "a")
	if !st.Up || st.RateLimited != 2 || st.RateLimitWaits != 0 || st.Attempts != 1 {
		t.Errorf("state of a: %+v", st)
	}
}

func TestRateLimitWaitCancelled(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("a", a)
	up.RateLimit = Rate{N: 1, Per: time.Hour}
	env := newDeliverer(t, up)
	env.d.MaxRateWait = 2 * time.Hour // wait rather than pass it by

	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []queue.Result)
	go func() {
		done <- env.d.Deliver(ctx, testMessage("app@example.com", "y@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	testwait.For(t, 5*time.Second, "no delivery waiting", func() bool {
		w := env.d.current().endpoints["a"].window.(*localWindow)
		w.mu.Lock()
		defer w.mu.Unlock()
		return w.changed != nil // a waiter asked to be woken
	})
	cancel()
	res = <-done
	if len(res) != 1 || res[0].State != queue.Pending || !strings.HasPrefix(res[0].Reply, "interrupted: ") {
		t.Errorf("cancelled wait: %+v", res)
	}
}

// TestRateLogSetRate: a changed rate keeps the newest end times it has
// room for, so that a reload goes on counting the quota.
func TestRateLogSetRate(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	r := &rateLog{rate: Rate{N: 3, Per: 10 * time.Second}}
	for i := range 3 {
		if wait, _ := r.take(at(float64(i))); wait != 0 {
			t.Fatalf("take %d: wait %v", i, wait)
		}
		r.release(at(float64(i)), true)
	}
	// Ended at 0, 1 and 2; two fit under the new rate: 1 and 2.
	r.setRate(Rate{N: 2, Per: 10 * time.Second})
	if wait, exact := r.take(at(3)); wait != 8*time.Second || !exact {
		t.Errorf("after shrinking: wait %v exact %v, want 8s", wait, exact)
	}
	// Grown again: the two kept, and room for one more at once.
	r.setRate(Rate{N: 3, Per: 10 * time.Second})
	if wait, _ := r.take(at(3)); wait != 0 {
		t.Errorf("after growing: wait %v, want 0", wait)
	}
}
