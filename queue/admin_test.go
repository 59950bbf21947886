package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"smarthost/internal/testwait"
)

// openStoreAt opens a fresh store whose clock stands still at now.
func openStoreAt(t *testing.T, now time.Time) *Store {
	t.Helper()
	path := filepath.Join(t.TempDir(), "queue.db")
	s, err := Open(path, Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// checkIndex fails unless the due index has exactly one entry, at its
// NextAttempt, for each message that is not held, and nothing else.
func checkIndex(t *testing.T, st *Store) {
	t.Helper()
	err := st.db.View(func(tx *bolt.Tx) error {
		want := map[string]string{}
		err := tx.Bucket(msgsBucket).ForEach(func(k, v []byte) error {
			rec, err := decodeRecord(v)
			if err != nil {
				return fmt.Errorf("record %s: %w", k, err)
			}
			if !rec.Held {
				want[string(dueKey(rec.NextAttempt, rec.ID))] = rec.ID
			}
			return nil
		})
		if err != nil {
			return err
		}
		err = tx.Bucket(dueBucket).ForEach(func(k, _ []byte) error {
			if _, ok := want[string(k)]; !ok {
				at, id, _ := parseDueKey(k)
				t.Errorf("due index has a stray entry for %s at %v", id, time.Unix(0, at))
			}
			delete(want, string(k))
			return nil
		})
		for _, id := range want {
			t.Errorf("due index lacks the entry of %s", id)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// claimAll claims every message due at now, as a scheduler pass would,
// with the next attempt at next.
func claimAll(t *testing.T, st *Store, now, next time.Time) []Attempt {
	t.Helper()
	c, err := st.Claim(context.Background(), Start{Now: now, Retry: func(int) time.Time { return next }}, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c.Attempts
}

// attemptOf is the attempt in progress on id, as its claim handed it out.
func attemptOf(t *testing.T, st *Store, id string) Attempt {
	t.Helper()
	var a Attempt
	err := st.db.View(func(tx *bolt.Tx) error {
		rec, err := decodeRecord(tx.Bucket(msgsBucket).Get([]byte(id)))
		if err != nil {
			return err
		}
		a = attemptOn(rec, bytes.Clone(tx.Bucket(bodiesBucket).Get([]byte(id))))
		return nil
	})
	if err != nil {
		t.Fatalf("attempt on %s: %v", id, err)
	}
	return a
}

// finish ends the attempt in progress on id with update.
func finish(t *testing.T, st *Store, id string, update func(m *Message) (bool, []DSN)) (Finished, error) {
	t.Helper()
	return st.Finish(context.Background(), attemptOf(t, st, id), nil, update)
}

// defer_ records a temporary failure for every pending recipient of id.
func defer_(t *testing.T, st *Store, id string) {
	t.Helper()
	f, err := finish(t, st, id, func(m *Message) (bool, []DSN) {
		m.LastReply = "451 4.3.0 later"
		return false, nil
	})
	if err != nil {
		t.Fatalf("finish %s: %+v, %v", id, f, err)
	}
}

func get(t *testing.T, st *Store, id string) *Entry {
	t.Helper()
	m, err := st.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestAdminNotFound(t *testing.T) {
	st, _ := openStore(t)
	const id = "0123456789abcdef"
	for name, op := range map[string]func(string) error{
		"Delete": st.Delete, "Hold": st.Hold, "Release": st.Release, "Retry": st.Retry,
	} {
		if err := op(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s of a missing ID: %v, want ErrNotFound", name, err)
		}
	}
	if n, err := st.Flush(); n != 0 || err != nil {
		t.Errorf("Flush of an empty queue = %d, %v", n, err)
	}
}

func TestDelete(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	a, b := newMessage("a@example.net"), newMessage("b@example.net")
	put(t, st, a, "body a")
	put(t, st, b, "body b")

	if err := st.Delete(a.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Get(a.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: %v, want ErrNotFound", err)
	}
	if _, err := st.Body(a.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Body after Delete: %v, want ErrNotFound", err)
	}
	if err := st.Delete(a.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Delete: %v, want ErrNotFound", err)
	}
	checkIndex(t, st)
	if got := claimAll(t, st, now, now.Add(time.Hour)); len(got) != 1 || got[0].Message.ID != b.ID {
		t.Errorf("claimed %+v, want only %s", got, b.ID)
	}
	deleted := Attempt{Message: *b, Token: 1} // the attempt just claimed

	// Delete of a message in flight also drops its claim.
	if err := st.Delete(b.ID); err != nil {
		t.Fatal(err)
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d after deleting both", n)
	}
	checkIndex(t, st)
	f, err := st.Finish(context.Background(), deleted, nil, func(m *Message) (bool, []DSN) {
		t.Error("finish ran update on a deleted message")
		return false, nil
	})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("finish of a deleted message: %+v, %v; want gone", f, err)
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d: the completion brought the message back", n)
	}
	err = st.db.View(func(tx *bolt.Tx) error {
		if n := tx.Bucket(claimedBucket).Stats().KeyN; n != 0 {
			t.Errorf("%d claims left", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestDeleteUnreadable(t *testing.T) {
	st, _ := openStore(t)
	const id = "00000000000000aa"
	err := st.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(msgsBucket).Put([]byte(id), []byte{recordVersion, '{'}); err != nil {
			return err
		}
		if err := tx.Bucket(bodiesBucket).Put([]byte(id), []byte("x")); err != nil {
			return err
		}
		return tx.Bucket(dueBucket).Put(dueKey(time.Now(), id), nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(id); err != nil {
		t.Fatalf("Delete of an unreadable record: %v", err)
	}
	err = st.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{msgsBucket, bodiesBucket, dueBucket} {
			if n := tx.Bucket(b).Stats().KeyN; n != 0 {
				t.Errorf("bucket %s has %d keys left", b, n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestHoldRelease(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	m, other := newMessage("a@example.net"), newMessage("b@example.net")
	put(t, st, m, "x")
	put(t, st, other, "y")

	if err := st.Hold(m.ID); err != nil {
		t.Fatal(err)
	}
	if err := st.Hold(m.ID); err != nil {
		t.Errorf("second Hold: %v", err)
	}
	if got := get(t, st, m.ID); !got.Held {
		t.Errorf("after Hold: %+v, want Held", got)
	}
	checkIndex(t, st)
	if err := st.Retry(m.ID); !errors.Is(err, ErrHeld) {
		t.Errorf("Retry of a held message: %v, want ErrHeld", err)
	}
	// Flush counts and touches only the other message.
	if n, err := st.Flush(); n != 1 || err != nil {
		t.Errorf("Flush = %d, %v; want 1 (the held message is left out)", n, err)
	}
	far := now.Add(24 * time.Hour)
	if got := claimAll(t, st, far, far.Add(time.Hour)); len(got) != 1 || got[0].Message.ID != other.ID {
		t.Fatalf("claimed %+v, want only %s", got, other.ID)
	}
	// A stale index entry for a held message (an older version's file)
	// is dropped, not claimed.
	err := st.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(dueBucket).Put(dueKey(now, m.ID), nil) })
	if err != nil {
		t.Fatal(err)
	}
	if got := claimAll(t, st, far, far.Add(time.Hour)); len(got) != 0 {
		t.Errorf("claimed a held message through a stale entry: %+v", got)
	}
	checkIndex(t, st)

	if err := st.Release(m.ID); err != nil {
		t.Fatal(err)
	}
	got := get(t, st, m.ID)
	if got.Held || !got.NextAttempt.Equal(now.Round(0)) {
		t.Errorf("after Release: Held %v, NextAttempt %v; want due now (%v)", got.Held, got.NextAttempt, now)
	}
	if err := st.Release(m.ID); err != nil {
		t.Errorf("Release of a message not held: %v", err)
	}
	checkIndex(t, st)
	if got := claimAll(t, st, now, now.Add(time.Hour)); len(got) != 1 || got[0].Message.ID != m.ID {
		t.Errorf("claimed %+v after Release, want %s", got, m.ID)
	}
}

func TestHoldSurvivesReopen(t *testing.T) {
	st, path := openStore(t)
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	now := time.Now()
	claimAll(t, st, now, now)
	if err := st.Hold(m.ID); err != nil {
		t.Fatal(err)
	}
	st = reopen(t, st, path) // stopped mid-delivery while held
	if got := get(t, st, m.ID); !got.Held || got.InFlight {
		t.Errorf("after reopen: %+v, want held and not in flight", got)
	}
	checkIndex(t, st)
	far := now.Add(24 * time.Hour)
	if got := claimAll(t, st, far, far); len(got) != 0 {
		t.Errorf("claimed a held message after reopen: %+v", got)
	}
}

func TestRetry(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	later := now.Add(time.Hour)
	claimAll(t, st, now, later)
	defer_(t, st, m.ID)
	if got := get(t, st, m.ID); !got.NextAttempt.Equal(later.Round(0)) {
		t.Fatalf("NextAttempt %v, want %v", got.NextAttempt, later)
	}
	if got := claimAll(t, st, now, later); len(got) != 0 {
		t.Fatalf("claimed before its time: %+v", got)
	}

	if err := st.Retry(m.ID); err != nil {
		t.Fatal(err)
	}
	got := get(t, st, m.ID)
	if !got.NextAttempt.Equal(now.Round(0)) || got.Attempts != 1 {
		t.Errorf("after Retry: %+v, want due now with Attempts 1", got)
	}
	checkIndex(t, st)
	if got := claimAll(t, st, now, later); len(got) != 1 || got[0].Message.Attempts != 2 {
		t.Errorf("claimed %+v after Retry, want attempt 2", got)
	}
}

func TestInFlight(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	if get(t, st, m.ID).InFlight {
		t.Error("InFlight before any claim")
	}
	later := now.Add(time.Hour)
	claimAll(t, st, now, later)

	got := get(t, st, m.ID)
	if !got.InFlight {
		t.Errorf("Get during the attempt: %+v, want InFlight", got)
	}
	if list, _, err := st.List(); err != nil || len(list) != 1 || !list[0].InFlight {
		t.Errorf("List during the attempt: %+v, %v; want InFlight", list, err)
	}
	// Retry of a message in flight does nothing; Flush leaves it out.
	if err := st.Retry(m.ID); err != nil {
		t.Errorf("Retry in flight: %v", err)
	}
	if n, err := st.Flush(); n != 0 || err != nil {
		t.Errorf("Flush = %d, %v; want 0", n, err)
	}
	if got := get(t, st, m.ID); !got.NextAttempt.Equal(later.Round(0)) {
		t.Errorf("NextAttempt %v changed while in flight, want %v", got.NextAttempt, later)
	}
	checkIndex(t, st)
	// InFlight is derived, never stored.
	err := st.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(msgsBucket).Get([]byte(m.ID)); bytes.Contains(v, []byte("in_flight")) {
			t.Errorf("stored record %q holds in_flight", v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	defer_(t, st, m.ID)
	if got := get(t, st, m.ID); got.InFlight {
		t.Errorf("Get after the attempt: %+v, want not InFlight", got)
	}
}

func TestFlush(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	later := now.Add(time.Hour)
	var ms []*Message
	for i := range 5 {
		m := newMessage(fmt.Sprintf("r%d@example.net", i))
		m.Received = now.Add(time.Duration(i-10) * time.Second)
		put(t, st, m, "x")
		ms = append(ms, m)
	}
	// 0 is due; 1 and 2 wait an hour; 3 waits and is held; 4 is in flight.
	claimAll(t, st, now, later)
	for _, m := range ms[:4] {
		defer_(t, st, m.ID)
	}
	if err := st.Retry(ms[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := st.Hold(ms[3].ID); err != nil {
		t.Fatal(err)
	}
	err := st.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(claimedBucket).Put([]byte(ms[4].ID), nil) })
	if err != nil {
		t.Fatal(err)
	}

	n, err := st.Flush()
	if err != nil || n != 3 {
		t.Fatalf("Flush = %d, %v; want 3", n, err)
	}
	for i, m := range ms {
		got := get(t, st, m.ID)
		wantDue := i <= 2
		if due := !got.NextAttempt.After(now); due != wantDue {
			t.Errorf("message %d: NextAttempt %v, due now %v, want %v", i, got.NextAttempt, due, wantDue)
		}
	}
	checkIndex(t, st)
	skip := func(id string) bool { return id == ms[4].ID } // the scheduler's own in-flight set
	got, err := st.Claim(context.Background(), Start{Now: now, Retry: func(int) time.Time { return later }}, 10, skip)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range got.Attempts {
		ids = append(ids, d.Message.ID)
	}
	slices.Sort(ids) // all due at the same instant: in ID order
	want := []string{ms[0].ID, ms[1].ID, ms[2].ID}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Errorf("claimed %v after Flush, want %v", ids, want)
	}
}

// syncBuffer is a log destination safe for concurrent writers.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func inFlightCount(s *Scheduler) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.inflight)
}

func TestHoldInFlight(t *testing.T) {
	st, _ := openStore(t)
	started := make(chan Message, 1)
	release := make(chan struct{})
	var mu sync.Mutex
	calls := map[string]int{}
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		mu.Lock()
		calls[m.ID]++
		n := calls[m.ID]
		mu.Unlock()
		if m.MessageID == "held" && n == 1 {
			started <- m
			<-release
			return results(m, Pending, "451 4.3.0 later")
		}
		return results(m, Delivered, "250 ok")
	})
	s.RetryMin, s.RetryMax = time.Millisecond, time.Millisecond
	done := doneChan(s, 2)
	start(t, s)

	m := newMessage("a@example.net")
	m.MessageID = "held"
	put(t, st, m, "x")
	receive(t, started, "delivery")
	if err := st.Hold(m.ID); err != nil {
		t.Fatal(err)
	}
	if got := get(t, st, m.ID); !got.Held || !got.InFlight {
		t.Errorf("during the attempt: %+v, want held and in flight", got)
	}
	close(release)
	testwait.For(t, 10*time.Second, "the attempt to complete", func() bool { return !get(t, st, m.ID).InFlight })
	if got := get(t, st, m.ID); !got.Held || got.Attempts != 1 {
		t.Errorf("after the attempt: %+v, want still held after 1 attempt", got)
	}
	checkIndex(t, st)

	// Scheduling passes go on for other messages; the held one waits.
	b := newMessage("b@example.net")
	put(t, st, b, "y")
	if got := receive(t, done, "the other message"); got.ID != b.ID {
		t.Fatalf("done %s, want %s", got.ID, b.ID)
	}
	mu.Lock()
	if calls[m.ID] != 1 {
		t.Errorf("held message delivered %d times, want 1", calls[m.ID])
	}
	mu.Unlock()

	if err := st.Release(m.ID); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, done, "the released message"); got.ID != m.ID || got.Attempts != 2 {
		t.Errorf("done %+v, want %s after 2 attempts", got, m.ID)
	}
}

func TestDeleteInFlight(t *testing.T) {
	st, _ := openStore(t)
	started := make(chan struct{})
	release := make(chan struct{})
	var logs syncBuffer
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		close(started)
		<-release
		return results(m, Failed, "550 5.1.1 no such user")
	})
	s.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	s.Bounce = func(kind BounceKind, m Message, rcpts []Recipient, body Body) (*Message, []byte) {
		return &Message{Recipients: []Recipient{{Addr: m.From}}}, []byte("dsn")
	}
	var doneCalls atomic.Int32
	s.OnDone = func(Message) { doneCalls.Add(1) }
	start(t, s)

	m := newMessage("a@example.net")
	put(t, st, m, "x")
	<-started
	if err := st.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	close(release)
	testwait.For(t, 10*time.Second, "the attempt to complete", func() bool { return inFlightCount(s) == 0 })

	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d: the completion brought back the message or stored a DSN", n)
	}
	if doneCalls.Load() != 0 {
		t.Error("OnDone called for a deleted message")
	}
	out := logs.String()
	if !strings.Contains(out, "deleted during delivery") {
		t.Errorf("no log line about the dropped outcome in:\n%s", out)
	}
	if strings.Contains(out, "level=ERROR") {
		t.Errorf("an error was logged:\n%s", out)
	}
	checkIndex(t, st)
}

func TestRetryAndFlushWakeScheduler(t *testing.T) {
	st, _ := openStore(t)
	attempts := make(chan Message, 10)
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		attempts <- m
		if m.Attempts == 1 {
			return results(m, Pending, "451 4.3.0 later")
		}
		return results(m, Delivered, "250 ok")
	})
	// Without Retry or Flush, the second attempt would be an hour away.
	s.RetryMin, s.RetryMax = time.Hour, time.Hour
	done := doneChan(s, 3)
	start(t, s)

	var ms []*Message
	for i := range 3 {
		m := newMessage(fmt.Sprintf("r%d@example.net", i))
		put(t, st, m, "x")
		ms = append(ms, m)
	}
	for range ms {
		receive(t, attempts, "first attempt")
	}
	for _, m := range ms {
		testwait.For(t, 10*time.Second, "the first attempt to be recorded", func() bool { return !get(t, st, m.ID).InFlight })
	}

	if err := st.Retry(ms[0].ID); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, done, "the retried message"); got.ID != ms[0].ID || got.Attempts != 2 {
		t.Errorf("done %+v, want %s after 2 attempts", got, ms[0].ID)
	}
	if n, err := st.Flush(); n != 2 || err != nil {
		t.Errorf("Flush = %d, %v; want 2", n, err)
	}
	for range 2 {
		if got := receive(t, done, "a flushed message"); got.Attempts != 2 {
			t.Errorf("done %+v, want 2 attempts", got)
		}
	}
}
