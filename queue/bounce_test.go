package queue

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"smarthost/internal/testwait"
)

// bounceCall is one call of a Scheduler's Bounce hook.
type bounceCall struct {
	kind  BounceKind
	id    string
	rcpts []Recipient
	dsnID string
}

// bouncer records the calls of a Bounce hook and builds a DSN addressed
// to the sender. It leaves DSN false, to show that the scheduler marks
// what it stores.
type bouncer struct {
	mu    sync.Mutex
	calls []bounceCall
	none  bool   // return no DSN
	from  string // envelope sender of the DSN, like an upstream's dsn_from
}

func (b *bouncer) bounce(kind BounceKind, m Message, rcpts []Recipient, body Body) (*Message, []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	c := bounceCall{kind: kind, id: m.ID, rcpts: rcpts}
	if b.none {
		b.calls = append(b.calls, c)
		return nil, nil
	}
	c.dsnID = NewID()
	b.calls = append(b.calls, c)
	return &Message{
		ID:         c.dsnID,
		From:       b.from,
		Recipients: []Recipient{{Addr: m.From, State: Failed, Reply: "junk the scheduler resets"}},
		MessageID:  "<" + c.dsnID + ".dsn@example.com>",
		Attempts:   7,
	}, []byte(fmt.Sprintf("%s DSN about %s\r\n", kind, m.ID))
}

func (b *bouncer) recorded() []bounceCall {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

func addrs(rs []Recipient) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Addr)
	}
	return out
}

func TestBounceOnePerCompletion(t *testing.T) {
	st, _ := openStore(t)
	dsns := make(chan Message, 10)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if m.DSN {
			if got := content(t, body); m.From != "" || !strings.HasPrefix(string(got), "failed DSN about ") {
				t.Errorf("DSN from %q with body %q, want the null sender and the body Bounce built", m.From, got)
			}
			dsns <- m
			return results(m, Delivered, "250 ok")
		}
		switch m.Attempts {
		case 1:
			return []Result{
				{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok"},
				{Rcpt: "b@example.net", State: Failed, Reply: "550 5.1.1 no b"},
				{Rcpt: "c@example.net", State: Failed, Reply: "550 5.1.1 no c"},
				{Rcpt: "d@example.net", State: Pending, Reply: "451 4.3.0 later"},
			}
		default:
			return []Result{{Rcpt: "d@example.net", State: Failed, Reply: "554 5.7.1 refused"}}
		}
	})
	b := &bouncer{}
	s.Bounce = b.bounce
	done := doneChan(s, 3)
	start(t, s)
	m := newMessage("a@example.net", "b@example.net", "c@example.net", "d@example.net")
	put(t, st, m, "x")

	// The original and its two DSNs leave the queue.
	got := map[string]Message{}
	for range 3 {
		d := receive(t, done, "a message done")
		got[d.ID] = d
	}
	calls := b.recorded()
	if len(calls) != 2 {
		t.Fatalf("Bounce called %d times, want 2 (one per attempt with failures): %+v", len(calls), calls)
	}
	for i, want := range [][]string{{"b@example.net", "c@example.net"}, {"d@example.net"}} {
		c := calls[i]
		if c.kind != BounceFailed || c.id != m.ID || !slices.Equal(addrs(c.rcpts), want) {
			t.Errorf("call %d: %v about %s for %q, want BounceFailed for %q", i, c.kind, c.id, addrs(c.rcpts), want)
		}
		for _, r := range c.rcpts {
			if r.State != Failed || r.Reply == "" {
				t.Errorf("call %d: recipient %+v, want Failed with its reply", i, r)
			}
		}
		d, ok := got[c.dsnID]
		if !ok {
			t.Errorf("DSN %s of call %d never delivered", c.dsnID, i)
			continue
		}
		if !d.DSN || d.Attempts != 1 || len(d.Recipients) != 1 || d.Recipients[0].Addr != m.From ||
			d.Recipients[0].State != Delivered {
			t.Errorf("DSN %d done as %+v", i, d)
		}
	}
	if o := got[m.ID]; o.Attempts != 2 || o.Recipients[3].State != Failed {
		t.Errorf("original done as %+v", o)
	}
	if len(dsns) != 2 {
		t.Errorf("%d DSN deliveries, want 2", len(dsns))
	}
}

func TestBounceNeverForNullSenderOrDSN(t *testing.T) {
	st, _ := openStore(t)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		return results(m, Failed, "550 5.1.1 no such user")
	})
	b := &bouncer{from: "mailer-daemon@example.com"}
	s.Bounce = b.bounce
	s.DelayWarning = time.Nanosecond
	done := doneChan(s, 4)
	start(t, s)

	null := newMessage("a@example.net")
	null.From = ""
	put(t, st, null, "x")
	dsn := newMessage("b@example.net")
	dsn.DSN = true
	put(t, st, dsn, "y")
	for range 2 {
		receive(t, done, "a failed message")
	}
	if calls := b.recorded(); len(calls) != 0 {
		t.Errorf("Bounce called for a null sender or a DSN: %+v", calls)
	}

	// A DSN built without the DSN mark, from a non-null sender, is still
	// never bounced itself.
	orig := newMessage("c@example.net")
	put(t, st, orig, "z")
	for range 2 {
		receive(t, done, "the original or its DSN")
	}
	if calls := b.recorded(); len(calls) != 1 || calls[0].id != orig.ID {
		t.Errorf("Bounce calls %+v, want one, about %s", calls, orig.ID)
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d, want 0", n)
	}
}

func TestBounceOnExpiry(t *testing.T) {
	st, _ := openStore(t)
	dsn := make(chan Message, 1)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if m.DSN {
			dsn <- m
			return results(m, Delivered, "250 ok")
		}
		return []Result{
			{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok"},
			{Rcpt: "b@example.net", State: Pending, Reply: "451 4.7.1 greylisted"},
			{Rcpt: "c@example.net", State: Pending, Reply: "451 4.7.1 greylisted"},
		}
	})
	s.MaxAge = time.Hour
	s.Now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	b := &bouncer{}
	s.Bounce = b.bounce
	start(t, s)
	m := newMessage("a@example.net", "b@example.net", "c@example.net")
	put(t, st, m, "x")

	d := receive(t, dsn, "the DSN")
	calls := b.recorded()
	if len(calls) != 1 {
		t.Fatalf("Bounce calls %+v, want one", calls)
	}
	c := calls[0]
	if c.kind != BounceFailed || !slices.Equal(addrs(c.rcpts), []string{"b@example.net", "c@example.net"}) {
		t.Errorf("Bounce(%v, %q), want BounceFailed for the expired b and c", c.kind, addrs(c.rcpts))
	}
	want := "expired after 1h0m0s in queue; last reply: 451 4.7.1 greylisted"
	for _, r := range c.rcpts {
		if r.State != Failed || r.Reply != want {
			t.Errorf("expired recipient %+v, want Failed with %q", r, want)
		}
	}
	if d.ID != c.dsnID || !d.DSN {
		t.Errorf("delivered %+v, want DSN %s", d, c.dsnID)
	}
	if _, err := st.Get(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("expired message still queued: %v", err)
	}
}

// TestBounceStoredWithOutcome checks that the DSN and the attempt's outcome
// are committed together: a reader never sees one without the other, and
// after a reopen the DSN is there exactly once.
func TestBounceStoredWithOutcome(t *testing.T) {
	st, path := openStore(t)
	dsnAttempted := make(chan struct{}, 1)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if m.DSN {
			dsnAttempted <- struct{}{}
			return results(m, Pending, "451 4.3.0 later") // keep it queued
		}
		return []Result{
			{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok"},
			{Rcpt: "b@example.net", State: Failed, Reply: "550 5.1.1 no b"},
			{Rcpt: "c@example.net", State: Pending, Reply: "451 4.3.0 later"},
		}
	})
	s.RetryMin, s.RetryMax = time.Hour, time.Hour
	b := &bouncer{}
	s.Bounce = b.bounce
	m := newMessage("a@example.net", "b@example.net", "c@example.net")
	put(t, st, m, "x")

	// A reader that looks at both in each read transaction.
	var torn, seen atomic.Int32
	stop := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			st.db.View(func(tx *bolt.Tx) error {
				rec, err := decodeRecord(tx.Bucket(msgsBucket).Get([]byte(m.ID)))
				if err != nil {
					t.Errorf("original: %v", err)
					return nil
				}
				dsns := 0
				tx.Bucket(msgsBucket).ForEach(func(k, v []byte) error {
					if r, err := decodeRecord(v); err == nil && r.DSN {
						dsns++
					}
					return nil
				})
				failed := rec.Recipients[1].State == Failed
				if failed != (dsns == 1) || dsns > 1 {
					torn.Add(1)
				}
				if failed {
					seen.Add(1)
				}
				return nil
			})
		}
	}()
	start(t, s)
	receive(t, dsnAttempted, "the DSN's first attempt")
	testwait.For(t, 10*time.Second, "the reader to see the outcome", func() bool { return seen.Load() > 0 })
	close(stop)
	<-readerDone
	if n := torn.Load(); n > 0 {
		t.Errorf("%d reads saw the outcome without its DSN or the reverse", n)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	st = reopen(t, st, path)
	list, _, err := st.List()
	if err != nil {
		t.Fatal(err)
	}
	var dsns []Message
	for _, l := range list {
		if l.DSN {
			dsns = append(dsns, l.Message)
		}
	}
	calls := b.recorded()
	if len(list) != 2 || len(dsns) != 1 || len(calls) != 1 {
		t.Fatalf("after reopen: %d messages, %d DSNs, %d Bounce calls; want the original and one DSN", len(list), len(dsns), len(calls))
	}
	d := dsns[0]
	if d.ID != calls[0].dsnID || d.From != "" || !slices.Equal(addrs(d.Recipients), []string{m.From}) ||
		d.Recipients[0].State != Pending || d.Attempts != 1 || d.Received.IsZero() {
		t.Errorf("stored DSN %+v", d)
	}
	if body, err := st.Body(d.ID); err != nil || string(body) != "failed DSN about "+m.ID+"\r\n" {
		t.Errorf("DSN body %q, %v", body, err)
	}
	if d.Size != int64(len("failed DSN about "+m.ID+"\r\n")) {
		t.Errorf("DSN size %d", d.Size)
	}
	o := get(t, st, m.ID)
	if o.Recipients[0].State != Delivered || o.Recipients[1].State != Failed || o.Recipients[2].State != Pending {
		t.Errorf("original after reopen %+v", o)
	}
	checkIndex(t, st)
}

// TestFinishAllOrNothing makes the transaction that records an outcome
// fail because of its DSN, and checks that neither was stored.
func TestFinishAllOrNothing(t *testing.T) {
	st, path := openStore(t)
	m, other := newMessage("a@example.net"), newMessage("b@example.net")
	other.Received = time.Now().Add(time.Hour) // not due: not claimed
	put(t, st, m, "x")
	put(t, st, other, "y")
	now := time.Now()
	claimAll(t, st, now, now.Add(time.Hour))

	update := func(dsnID string) func(m *Message) (bool, []DSN) {
		return func(m *Message) (bool, []DSN) {
			m.Recipients[0].State = Failed
			return true, []DSN{{
				Message: Message{ID: dsnID, Recipients: []Recipient{{Addr: "app@example.com"}}, DSN: true, NextAttempt: now},
				Body:    []byte("dsn"),
			}}
		}
	}
	// A DSN ID that is taken makes the whole transaction fail.
	if _, err := finish(t, st, m.ID, update(other.ID)); err == nil {
		t.Fatal("finish with a clashing DSN ID succeeded")
	}
	got := get(t, st, m.ID)
	if !got.InFlight || got.Recipients[0].State != Pending {
		t.Errorf("after a failed finish: %+v, want the claim and state unchanged", got)
	}
	if b, _ := st.Body(other.ID); string(b) != "y" {
		t.Errorf("other body %q", b)
	}

	dsnID := NewID()
	f, err := finish(t, st, m.ID, update(dsnID))
	if err != nil || !f.Removed {
		t.Fatalf("finish: %+v, %v", f, err)
	}
	st = reopen(t, st, path)
	if _, err := st.Get(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("original after reopen: %v, want removed", err)
	}
	if d := get(t, st, dsnID); !d.DSN {
		t.Errorf("DSN after reopen: %+v", d)
	}
	if n, _ := st.Len(); n != 2 {
		t.Errorf("Len = %d, want the other message and the DSN", n)
	}
	checkIndex(t, st)
}

func TestDelayWarning(t *testing.T) {
	for _, none := range []bool{false, true} {
		t.Run(fmt.Sprintf("none=%v", none), func(t *testing.T) {
			st, _ := openStore(t)
			var dsnDeliveries atomic.Int32
			s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
				if m.DSN {
					dsnDeliveries.Add(1)
					return results(m, Delivered, "250 ok")
				}
				if m.MessageID != "old" {
					if m.Attempts == 1 {
						return results(m, Pending, "451 4.3.0 later")
					}
					return results(m, Delivered, "250 ok")
				}
				if m.Attempts >= 2 {
					if stored := get(t, st, m.ID); !stored.Warned || !m.Warned {
						t.Errorf("attempt %d: stored Warned %v, claimed Warned %v; want both true", m.Attempts, stored.Warned, m.Warned)
					}
				}
				if m.Attempts < 4 {
					return []Result{
						{Rcpt: "a@example.net", State: Delivered, Reply: "250 ok"},
						{Rcpt: "b@example.net", State: Pending, Reply: "451 4.7.1 greylisted"},
					}
				}
				return results(m, Delivered, "250 ok")
			})
			b := &bouncer{none: none}
			s.Bounce = b.bounce
			s.DelayWarning = 30 * time.Minute
			done := doneChan(s, 3)
			start(t, s)

			// A message younger than DelayWarning gets no warning.
			fresh := newMessage("x@example.net", "y@example.net")
			put(t, st, fresh, "fresh")
			m := newMessage("a@example.net", "b@example.net")
			m.MessageID = "old"
			m.Received = time.Now().Add(-time.Hour)
			put(t, st, m, "x")

			var final Message
			for final.ID != m.ID {
				final = receive(t, done, "the old message done")
			}
			if final.Attempts != 4 || !final.Warned {
				t.Errorf("done %+v, want 4 attempts and Warned", final)
			}
			calls := b.recorded()
			if len(calls) != 1 || calls[0].kind != BounceDelayed || calls[0].id != m.ID ||
				!slices.Equal(addrs(calls[0].rcpts), []string{"b@example.net"}) || calls[0].rcpts[0].State != Pending {
				t.Fatalf("Bounce calls %+v, want one BounceDelayed about b", calls)
			}
			// The DSN, if any, was queued with the first deferral.
			want := int32(1)
			if none {
				want = 0
			}
			testwait.For(t, 10*time.Second, "the queue to empty", func() bool { n, _ := st.Len(); return n == 0 })
			if n := dsnDeliveries.Load(); n != want {
				t.Errorf("%d warnings delivered, want %d", n, want)
			}
		})
	}
}

func TestNotBeforePacing(t *testing.T) {
	st, _ := openStore(t)
	type call struct {
		at time.Time
		m  Message
	}
	calls := make(chan call, 10)
	var notBefore []time.Time // of attempts 1 to 3, read after each
	var mu sync.Mutex
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		calls <- call{time.Now(), m}
		switch {
		case m.Attempts <= 3:
			// Paced: the rate limit asks for more than the 20ms backoff.
			nb := time.Now().Add(60 * time.Millisecond)
			mu.Lock()
			notBefore = append(notBefore, nb)
			mu.Unlock()
			return []Result{{Rcpt: "a@example.net", State: Pending, Reply: "rate limited", NotBefore: nb}}
		case m.Attempts <= 5:
			return results(m, Pending, "451 4.3.0 later")
		}
		return results(m, Delivered, "250 ok")
	})
	s.RetryMin, s.RetryMax = 20*time.Millisecond, time.Hour
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net"), "x")

	// Paced attempts leave the exponent alone: it is Attempts − Paced.
	wantDelay := []time.Duration{20, 20, 20, 20, 40, 80}
	for n := 1; n <= 6; n++ {
		c := receive(t, calls, fmt.Sprintf("attempt %d", n))
		if c.m.Attempts != n || c.m.Paced != min(n-1, 3) {
			t.Errorf("attempt %d: Attempts %d, Paced %d", n, c.m.Attempts, c.m.Paced)
		}
		if got := c.m.NextAttempt.Sub(c.m.LastAttempt); got != wantDelay[n-1]*time.Millisecond {
			t.Errorf("attempt %d: backoff %v, want %v", n, got, wantDelay[n-1]*time.Millisecond)
		}
		if n >= 2 && n <= 4 {
			mu.Lock()
			nb := notBefore[n-2]
			mu.Unlock()
			if c.at.Before(nb) {
				t.Errorf("attempt %d at %v, before the NotBefore %v of the attempt before", n, c.at, nb)
			}
		}
	}
	if m := receive(t, done, "delivery"); m.Attempts != 6 || m.Paced != 3 {
		t.Errorf("done %+v, want 6 attempts of which 3 paced", m)
	}
}

func TestNotBeforeSoonerThanBackoff(t *testing.T) {
	st, _ := openStore(t)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		if m.Attempts == 1 {
			return []Result{{Rcpt: "a@example.net", State: Pending, Reply: "rate limited", NotBefore: time.Now().Add(20 * time.Millisecond)}}
		}
		return results(m, Delivered, "250 ok")
	})
	// A paced attempt is not a failure: it waits for the upstream's
	// capacity, not for an hour of backoff.
	s.RetryMin, s.RetryMax = time.Hour, time.Hour
	done := doneChan(s, 1)
	start(t, s)
	put(t, st, newMessage("a@example.net"), "x")
	if m := receive(t, done, "delivery after pacing"); m.Attempts != 2 || m.Paced != 1 {
		t.Errorf("done %+v, want delivered on attempt 2 with 1 paced", m)
	}
}

func TestApplyNotBefore(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	backoff := now.Add(time.Minute)
	soon, late := now.Add(10*time.Second), now.Add(time.Hour)
	for _, tc := range []struct {
		name    string
		results []Result
		next    time.Time
		paced   int
	}{
		{"temporary failure", []Result{
			{Rcpt: "a", State: Pending}, {Rcpt: "b", State: Pending},
		}, backoff, 0},
		{"all paced, later than backoff", []Result{
			{Rcpt: "a", State: Pending, NotBefore: late}, {Rcpt: "b", State: Pending, NotBefore: soon},
		}, late, 1},
		{"all paced, sooner than backoff", []Result{
			{Rcpt: "a", State: Pending, NotBefore: soon}, {Rcpt: "b", State: Pending, NotBefore: soon},
		}, soon, 1},
		{"paced in the past", []Result{
			{Rcpt: "a", State: Pending, NotBefore: now.Add(-time.Hour)}, {Rcpt: "b", State: Delivered},
		}, now, 1},
		{"one paced one failed, later", []Result{
			{Rcpt: "a", State: Pending, NotBefore: late}, {Rcpt: "b", State: Pending},
		}, late, 0},
		{"one paced one failed, sooner", []Result{
			{Rcpt: "a", State: Pending, NotBefore: soon}, {Rcpt: "b", State: Pending},
		}, backoff, 0},
		{"paced but another recipient without a result", []Result{
			{Rcpt: "a", State: Pending, NotBefore: late},
		}, late, 0},
		{"NotBefore on a delivered result is ignored", []Result{
			{Rcpt: "a", State: Delivered, NotBefore: late}, {Rcpt: "b", State: Pending},
		}, backoff, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewScheduler(nil, nil)
			m := &Message{
				ID: "x", Received: now.Add(-time.Minute), Attempts: 3, Paced: 0, NextAttempt: backoff,
				Recipients: []Recipient{{Addr: "a"}, {Addr: "b"}},
			}
			out := s.apply(m, tc.results, now)
			if !m.NextAttempt.Equal(tc.next) || m.Paced != tc.paced || out.done {
				t.Errorf("NextAttempt %v, Paced %d, done %v; want %v, %d", m.NextAttempt, m.Paced, out.done, tc.next, tc.paced)
			}
		})
	}
}

// TestApplyRecipientOutcomes: an attempt names what it decided for each
// recipient it had a result for, and a recipient that expires is expired,
// whether this attempt deferred it or had no result for it.
func TestApplyRecipientOutcomes(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	s := NewScheduler(nil, nil)
	s.MaxAge = time.Hour
	for _, tc := range []struct {
		name     string
		age      time.Duration
		results  []Result
		want     string
		relayFor string
	}{
		{"fresh", time.Minute, []Result{
			{Rcpt: "a", State: Delivered, Relay: "192.0.2.1:465"}, {Rcpt: "b", State: Failed}, {Rcpt: "c", State: Pending},
		}, "a:delivered b:bounced c:deferred", "a"},
		{"expired", 2 * time.Hour, []Result{
			{Rcpt: "a", State: Delivered}, {Rcpt: "c", State: Pending, Reply: "451 busy", Relay: "192.0.2.1:465"},
		}, "a:delivered c:expired b:expired", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &Message{ID: "x", Received: now.Add(-tc.age), Attempts: 1, Recipients: []Recipient{{Addr: "a"}, {Addr: "b"}, {Addr: "c"}}}
			out := s.apply(m, tc.results, now)
			var got []string
			for _, ro := range out.rcpts {
				got = append(got, ro.Addr+":"+string(ro.outcome))
				if ro.outcome == OutcomeExpired && !strings.HasPrefix(ro.Reply, "expired after 1h0m0s in queue") {
					t.Errorf("%s expired with reply %q", ro.Addr, ro.Reply)
				}
				if ro.Addr == tc.relayFor && ro.relay != "192.0.2.1:465" {
					t.Errorf("%s: relay %q", ro.Addr, ro.relay)
				}
			}
			if strings.Join(got, " ") != tc.want {
				t.Errorf("outcomes %q, want %q", strings.Join(got, " "), tc.want)
			}
		})
	}
}

// TestAttemptEventsTried: the upstreams a recipient failed over from in an
// attempt are events of its history, before its outcome.
func TestAttemptEventsTried(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	s := NewScheduler(nil, nil)
	s.MaxAge = time.Hour
	m := &Message{ID: "x", Received: now, Attempts: 1, Recipients: []Recipient{{Addr: "a"}}}
	out := s.apply(m, []Result{{Rcpt: "a", State: Delivered, Upstream: "b", Reply: "250 ok", Relay: "192.0.2.2:25",
		Earlier: []Result{{Rcpt: "a", State: Pending, Upstream: "a", Reply: "421 busy", Relay: "192.0.2.1:25"}}}}, now)
	evs := attemptEvents(*m, out, nil, now)
	want := []Event{
		{At: now, Type: EventTried, Attempt: 1, Rcpt: "a", Upstream: "a", Relay: "192.0.2.1:25", Reply: "421 busy"},
		{At: now, Type: EventDelivered, Attempt: 1, Rcpt: "a", Upstream: "b", Relay: "192.0.2.2:25", Reply: "250 ok"},
	}
	if !slices.Equal(evs, want) {
		t.Errorf("events %+v\nwant %+v", evs, want)
	}
}

// TestRecipientOutcomesAreEvents: each outcome a recipient's log line
// names is an event type of the history, by the same name.
func TestRecipientOutcomesAreEvents(t *testing.T) {
	events := map[EventType]bool{EventDelivered: true, EventDeferred: true, EventBounced: true, EventExpired: true}
	for _, o := range RecipientOutcomes() {
		if !events[EventType(o)] {
			t.Errorf("outcome %q is no event type", o)
		}
	}
}
