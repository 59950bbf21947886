package queue

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"smarthost/internal/testwait"
)

// scanStats counts the queue the slow way, from every record, as Stats
// must report it.
func scanStats(t *testing.T, st *Store) Stats {
	t.Helper()
	var want Stats
	err := st.db.View(func(tx *bolt.Tx) error {
		claimed := tx.Bucket(claimedBucket)
		return tx.Bucket(msgsBucket).ForEach(func(k, v []byte) error {
			rec, err := decodeRecord(v)
			if err != nil {
				return err
			}
			switch {
			case claimed.Get(k) != nil:
				want.InFlight++
			case rec.Held:
				want.Held++
			default:
				want.Queued++
			}
			if want.Oldest.IsZero() || rec.Received.Before(want.Oldest) {
				want.Oldest = rec.Received
			}
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return want
}

// checkStats fails unless Stats agrees with scanStats and with want.
func checkStats(t *testing.T, st *Store, step string, want Stats) {
	t.Helper()
	got, err := st.Stats()
	if err != nil {
		t.Fatalf("%s: %v", step, err)
	}
	if scan := scanStats(t, st); !sameStats(scan, want) {
		t.Fatalf("%s: the records say %+v, the test expects %+v", step, scan, want)
	}
	if !sameStats(got, want) {
		t.Errorf("%s: Stats = %+v, want %+v", step, got, want)
	}
	// Len reads the same totals as Stats.
	if n, err := st.Len(); err != nil || n != want.Queued+want.Held+want.InFlight {
		t.Errorf("%s: Len = %d, %v; want %d", step, n, err, want.Queued+want.Held+want.InFlight)
	}
}

func sameStats(a, b Stats) bool {
	return a.Queued == b.Queued && a.Held == b.Held && a.InFlight == b.InFlight && a.Oldest.Equal(b.Oldest)
}

func TestStats(t *testing.T) {
	t0 := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	path := filepath.Join(t.TempDir(), "queue.db")
	st, err := Open(path, Options{Now: func() time.Time { return t0.Add(time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	checkStats(t, st, "empty", Stats{})

	var ms []*Message
	for i := range 3 {
		m := newMessage("a@example.net")
		m.Received = t0.Add(time.Duration(i) * time.Second)
		put(t, st, m, "x")
		ms = append(ms, m)
	}
	checkStats(t, st, "three put", Stats{Queued: 3, Oldest: t0})

	if err := st.Hold(ms[1].ID); err != nil {
		t.Fatal(err)
	}
	if err := st.Hold(ms[1].ID); err != nil { // no change the second time
		t.Fatal(err)
	}
	checkStats(t, st, "one held", Stats{Queued: 2, Held: 1, Oldest: t0})

	if got := claimAll(t, st, t0.Add(time.Hour), t0.Add(2*time.Hour)); len(got) != 2 {
		t.Fatalf("claimed %d, want 2", len(got))
	}
	checkStats(t, st, "two claimed", Stats{Held: 1, InFlight: 2, Oldest: t0})

	// Held during its attempt, the message counts as in flight until the
	// attempt ends, and then as held.
	if err := st.Hold(ms[2].ID); err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, "held in flight", Stats{Held: 1, InFlight: 2, Oldest: t0})
	defer_(t, st, ms[2].ID)
	checkStats(t, st, "held after its attempt", Stats{Held: 2, InFlight: 1, Oldest: t0})

	// The oldest leaves: delivered.
	if _, err := finish(t, st, ms[0].ID, func(m *Message) (bool, []DSN) {
		m.Recipients[0].State = Delivered
		return true, nil
	}); err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, "oldest delivered", Stats{Held: 2, Oldest: t0.Add(time.Second)})

	if err := st.Delete(ms[1].ID); err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, "held one deleted", Stats{Held: 1, Oldest: t0.Add(2 * time.Second)})
	if err := st.Release(ms[2].ID); err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, "released", Stats{Queued: 1, Oldest: t0.Add(2 * time.Second)})

	st = reopen(t, st, path)
	checkStats(t, st, "reopened", Stats{Queued: 1, Oldest: t0.Add(2 * time.Second)})
	if err := st.Delete(ms[2].ID); err != nil {
		t.Fatal(err)
	}
	checkStats(t, st, "all gone", Stats{})
}

func TestStatsDeleteUnreadable(t *testing.T) {
	st, _ := openStore(t)
	m := newMessage("a@example.net")
	put(t, st, m, "x")
	// The record becomes unreadable after it was counted and indexed.
	err := st.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(msgsBucket).Put([]byte(m.ID), []byte{recordVersion, '{'})
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	got, err := st.Stats()
	if err != nil || !sameStats(got, Stats{}) {
		t.Errorf("Stats = %+v, %v; want an empty queue, the index entry gone too", got, err)
	}
}

// TestStatsBuiltForOldFile opens a file written before the counts and the
// index by Received existed: Open builds them.
func TestStatsBuiltForOldFile(t *testing.T) {
	st, path := openStore(t)
	t0 := time.Now().Add(-time.Hour).Round(0)
	for i := range 4 {
		m := newMessage("a@example.net")
		m.Received = t0.Add(time.Duration(3-i) * time.Minute)
		put(t, st, m, "x")
		if i == 1 {
			if err := st.Hold(m.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	err := st.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(metaBucket).Delete(countsKey); err != nil {
			return err
		}
		return tx.DeleteBucket(receivedBucket)
	})
	if err != nil {
		t.Fatal(err)
	}
	st = reopen(t, st, path)
	checkStats(t, st, "rebuilt", Stats{Queued: 3, Held: 1, Oldest: t0})
}

// observed records what a queue Observer is told.
type observed struct {
	mu       sync.Mutex
	finished map[string]Outcome // by queue ID
	dsns     map[string]Outcome // DSNs that finished, by queue ID
	queued   map[BounceKind]int
}

func newObserved() *observed {
	return &observed{finished: map[string]Outcome{}, dsns: map[string]Outcome{}, queued: map[BounceKind]int{}}
}

func (o *observed) Finished(m Message, outcome Outcome) {
	o.mu.Lock()
	defer o.mu.Unlock()
	into := o.finished
	if m.DSN {
		into = o.dsns
	}
	if prev, ok := into[m.ID]; ok {
		panic("message " + m.ID + " finished twice: " + string(prev) + " and " + string(outcome))
	}
	into[m.ID] = outcome
}

func (o *observed) DSNQueued(kind BounceKind) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.queued[kind]++
}

func (o *observed) snapshot() (finished, dsns map[string]Outcome, queued map[BounceKind]int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	finished, dsns, queued = map[string]Outcome{}, map[string]Outcome{}, map[BounceKind]int{}
	for k, v := range o.finished {
		finished[k] = v
	}
	for k, v := range o.dsns {
		dsns[k] = v
	}
	for k, v := range o.queued {
		queued[k] = v
	}
	return finished, dsns, queued
}

func TestObserver(t *testing.T) {
	obs := newObserved()
	st, err := Open(filepath.Join(t.TempDir(), "queue.db"), Options{Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	// The local part decides: ok@ is delivered, bad@ refused, later@
	// deferred every time; DSNs go to the sender and are delivered.
	s := newScheduler(t, st, func(ctx context.Context, m Message, body Body) []Result {
		var out []Result
		for _, r := range m.Pending() {
			state := Delivered
			switch {
			case strings.HasPrefix(r, "bad@"):
				state = Failed
			case strings.HasPrefix(r, "later@"):
				state = Pending
			}
			out = append(out, Result{Rcpt: r, State: state, Reply: "reply", Upstream: "test"})
		}
		return out
	})
	s.Logger = slog.New(slog.DiscardHandler)
	b := &bouncer{}
	s.Bounce = b.bounce
	s.DelayWarning = time.Nanosecond
	start(t, s)

	delivered := newMessage("ok@example.net", "ok2@example.net")
	bounced := newMessage("ok@example.net", "bad@example.net")
	deleted := newMessage("later@example.net")
	for _, m := range []*Message{delivered, bounced, deleted} {
		put(t, st, m, "x")
	}
	testwait.For(t, 10*time.Second, "two messages done, a delay warning and a failure DSN delivered", func() bool {
		finished, dsns, queued := obs.snapshot()
		return len(finished) == 2 && queued[BounceDelayed] == 1 && queued[BounceFailed] == 1 && len(dsns) == 2
	})
	if err := st.Delete(deleted.ID); err != nil {
		t.Fatal(err)
	}
	finished, dsns, queued := obs.snapshot()
	want := map[string]Outcome{delivered.ID: OutcomeDelivered, bounced.ID: OutcomeBounced, deleted.ID: OutcomeDeleted}
	if len(finished) != len(want) {
		t.Errorf("finished %v, want %v", finished, want)
	}
	for id, o := range want {
		if finished[id] != o {
			t.Errorf("message %s finished %q, want %q", id, finished[id], o)
		}
	}
	for id, o := range dsns {
		if o != OutcomeDelivered {
			t.Errorf("DSN %s finished %q, want delivered", id, o)
		}
	}
	if queued[BounceDelayed] != 1 || queued[BounceFailed] != 1 {
		t.Errorf("DSNs queued %v, want one of each kind", queued)
	}
	if got, err := st.Stats(); err != nil || !sameStats(got, Stats{}) {
		t.Errorf("Stats = %+v, %v; want an empty queue", got, err)
	}
}
