package queue

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	bolt "go.etcd.io/bbolt"

	"smarthost/internal/testpg"
)

// The benchmarks below measure the message history: finding messages in
// a store that holds 100k and 1M history events (25k and 250k messages
// of four events each, received over a week), and what keeping the
// history adds to the commits of each message. Run them with
//
//	go test -run '^$' -bench 'HistoryFind$' -benchtime 5000x ./queue
//	go test -run '^$' -bench HistoryFindPostgres -benchtime 2000x ./queue
//	go test -run '^$' -bench HistoryCost -benchtime 1000x ./queue
//
// A recipient has about five messages in either store, and a lookup by
// it, by Message-ID or by user (newest 100) costs nearly the same in the
// store ten times larger: each is one range of an index, not a scan.
// HistoryCost runs messages through Put, Claim and Finish with history
// kept (on) and with none (off), on a new store and on the 1M-event one,
// and reports on's time over off's as "ratio".
//
// The bbolt stores are cached under os.TempDir(), in a directory named
// by historyBenchFormat (630 MB for both); each benchmark works on a
// copy, removed when it ends. The PostgreSQL ones are filled at each run,
// which takes about three minutes for 1M events.

// historyBenchFormat names the layout of the cached fixtures: change it
// whenever historyFill or the history's format changes.
const historyBenchFormat = 2

// historySize is a store to measure: events history events, four per
// message.
type historySize struct {
	name   string
	events int
}

var historySizes = []historySize{
	{name: "100k", events: 100_000},
	{name: "1M", events: 1_000_000},
}

func (size historySize) messages() int { return size.events / 4 }

// recipients is how many addresses the messages are sent to: two per
// message, so that each has about five messages, whatever the size.
func (size historySize) recipients() int { return size.messages() * 2 / 5 }

// historyUsers is how many users submit the messages.
const historyUsers = 20

// historyRetention is the retention of the fixtures: a week.
const historyRetention = 7 * 24 * time.Hour

// historyOptions opens the fixtures, with the history kept.
var historyOptions = Options{
	Now: func() time.Time { return benchNow }, noCompact: true,
	HistoryRetention: historyRetention, Logger: slog.New(slog.DiscardHandler),
}

// historyFill stores the history of size.messages() messages received
// over the week before benchNow, in arrival order, through the functions
// the store's commits use: each message accepted, then the attempts of
// historyAttempts. The records and bodies, which Finish removed, are
// left out. A transaction takes a thousand messages: bbolt splits a node
// only at commit, and inserts into a large one are slow.
func historyFill(s *Store, size historySize) error {
	rng := historyRand(size)
	n := size.messages()
	const batch = 1_000
	for first := 0; first < n; first += batch {
		err := s.db.Update(func(tx *bolt.Tx) error {
			for i := first; i < min(first+batch, n); i++ {
				m := historyMessage(rng, size, i)
				m.Received = historyReceived(size, i)
				if err := putHistory(tx, newHistory(m), true); err != nil {
					return err
				}
				for _, a := range historyAttempts(m) {
					var err error
					if a.leave {
						err = s.leaveHistory(tx, m.ID, a.at, OutcomeDelivered, a.events...)
					} else {
						err = s.addHistory(tx, m.ID, a.events...)
					}
					if err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// historyAttempt is what an attempt adds to a fixture's history: its
// events, and whether the message left the queue at that time.
type historyAttempt struct {
	at     time.Time
	events []Event
	leave  bool
}

// historyAttempts are the attempts of a fixture's message m: one that
// delivers to its first recipient and defers the second, then one that
// delivers to the second.
func historyAttempts(m *Message) []historyAttempt {
	a, b := m.Recipients[0].Addr, m.Recipients[1].Addr
	first, second := m.Received.Add(2*time.Second), m.Received.Add(10*time.Minute)
	return []historyAttempt{
		{at: first, events: []Event{
			{At: first, Type: EventDelivered, Attempt: 1, Rcpt: a, Upstream: "gmail", Relay: "142.250.102.27:25", Reply: "250 2.0.0 OK 1772452681 a1b2c3d4e5f6 - gsmtp"},
			{At: first, Type: EventDeferred, Attempt: 1, Rcpt: b, Upstream: "gmail", Relay: "142.250.102.27:25", Reply: "451 4.7.1 Service temporarily unavailable, try again later"},
		}},
		{at: second, leave: true, events: []Event{
			{At: second, Type: EventDelivered, Attempt: 2, Rcpt: b, Upstream: "gmail", Relay: "142.250.102.26:25", Reply: "250 2.0.0 OK 1772453279 f6e5d4c3b2a1 - gsmtp"},
		}},
	}
}

// historyRand draws the messages of the fixture of the given size.
func historyRand(size historySize) *rand.Rand {
	return rand.New(rand.NewPCG(8, uint64(size.events)))
}

// historyReceived is when message i of a fixture was received: the
// messages arrive evenly over the retention before benchNow.
func historyReceived(size historySize, i int) time.Time {
	return benchNow.Add(-historyRetention + time.Duration(i)*(historyRetention/time.Duration(size.messages())))
}

// historyMessage returns message i of a fixture: an ID as NewID makes
// them, two recipients drawn from size.recipients() addresses, one of
// historyUsers users, and a Message-ID that names i.
func historyMessage(rng *rand.Rand, size historySize, i int) *Message {
	return &Message{
		ID: fmt.Sprintf("%016x", rng.Uint64()), From: "billing@example.com", User: historyUser(rng.IntN(historyUsers)),
		MessageID: historyMessageID(i),
		Recipients: []Recipient{
			{Addr: historyRecipient(rng.IntN(size.recipients()))},
			{Addr: historyRecipient(rng.IntN(size.recipients()))},
		},
	}
}

func historyUser(i int) string      { return fmt.Sprintf("app-%02d", i) }
func historyRecipient(i int) string { return fmt.Sprintf("customer%d@example.net", i) }
func historyMessageID(i int) string { return fmt.Sprintf("<invoice-%d@example.com>", i) }

// historyFixture returns the path of the cached store of the given size,
// building it on first use.
func historyFixture(b *testing.B, size historySize) string {
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("smarthost-history-bench-v%d", historyBenchFormat))
	return cachedFixture(b, filepath.Join(dir, fmt.Sprintf("history-%d.db", size.events)), historyOptions, "",
		func(s *Store) error { return historyFill(s, size) })
}

// historyOpen opens a copy of the fixture of the given size in dir.
func historyOpen(b *testing.B, size historySize, dir string, opts Options) *Store {
	path := filepath.Join(dir, "queue.db")
	if err := copyFile(historyFixture(b, size), path); err != nil {
		b.Fatal(err)
	}
	s, err := Open(path, opts)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// historyWarm reads every page of the history once, as a running relay
// has: else the first read of each page of the mapped file, not the
// lookup, is what the larger store measures.
func historyWarm(b *testing.B, s *Store) {
	var sum byte
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, name := range historyBuckets {
			if err := tx.Bucket(name).ForEach(func(k, v []byte) error {
				sum += k[len(k)-1]
				if len(v) > 0 {
					sum += v[len(v)-1]
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	_ = sum
}

// historyLookups are the lookups BenchmarkHistoryFind measures.
var historyLookups = []struct {
	name   string
	filter func(rng *rand.Rand, size historySize) HistoryFilter
}{
	{"to", func(rng *rand.Rand, size historySize) HistoryFilter {
		return HistoryFilter{To: historyRecipient(rng.IntN(size.recipients()))}
	}},
	{"msgid", func(rng *rand.Rand, size historySize) HistoryFilter {
		return HistoryFilter{MessageID: historyMessageID(rng.IntN(size.messages()))}
	}},
	{"user", func(rng *rand.Rand, size historySize) HistoryFilter {
		return HistoryFilter{User: historyUser(rng.IntN(historyUsers)), Limit: 100}
	}},
}

// BenchmarkHistoryFind measures FindHistory on bbolt: the messages to a
// recipient (about five), the message of a Message-ID, and a user's
// newest 100. found/op is how many histories each lookup returned.
func BenchmarkHistoryFind(b *testing.B) {
	for _, size := range historySizes {
		var s *Store
		for _, l := range historyLookups {
			b.Run("events="+size.name+"/by="+l.name, func(b2 *testing.B) {
				if s == nil {
					s = historyOpen(b2, size, b.TempDir(), historyOptions)
					b.Cleanup(func() { s.Close() })
					historyWarm(b2, s)
				}
				historyFind(b2, s, size, l.name, l.filter)
			})
		}
	}
}

// BenchmarkHistoryFindPostgres is BenchmarkHistoryFind on PostgreSQL,
// in a database filled at each run (a minute or two for 1M events) and
// analyzed, as autovacuum would have.
func BenchmarkHistoryFindPostgres(b *testing.B) {
	for _, size := range historySizes {
		var s *PGStore
		for _, l := range historyLookups {
			b.Run("events="+size.name+"/by="+l.name, func(b2 *testing.B) {
				if s == nil {
					s = historyOpenPG(b2, testpg.Shared(b2).NewDatabase(b), size)
					b.Cleanup(func() { s.Close() })
				}
				historyFind(b2, s, size, l.name, l.filter)
			})
		}
	}
}

func historyFind(b *testing.B, s Backend, size historySize, name string, filter func(*rand.Rand, historySize) HistoryFilter) {
	b.ReportAllocs()
	rng := rand.New(rand.NewPCG(9, 0))
	found := 0
	for range b.N {
		out, err := s.FindHistory(filter(rng, size))
		if err != nil {
			b.Fatal(err)
		}
		if len(out) == 0 && name != "to" {
			b.Fatalf("%s: nothing found", name)
		}
		found += len(out)
	}
	b.ReportMetric(float64(found)/float64(b.N), "found/op")
}

// historyOpenPG opens the new database dsn filled as historyFill fills a
// Store, through the statements of PGStore's Put and Finish.
func historyOpenPG(b *testing.B, dsn string, size historySize) *PGStore {
	ctx := context.Background()
	s, err := OpenPostgres(ctx, dsn, PostgresOptions{
		Now: historyOptions.Now, Logger: historyOptions.Logger, HistoryRetention: historyRetention,
	})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	rng := historyRand(size)
	n := size.messages()
	const batch = 1_000
	for first := 0; first < n; first += batch {
		err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
			for i := first; i < min(first+batch, n); i++ {
				m := historyMessage(rng, size, i)
				m.Received = historyReceived(size, i)
				m.NextAttempt = m.Received
				rec := &record{Message: *m}
				v, err := encodeRecord(rec)
				if err != nil {
					return err
				}
				if _, err := s.insertMessage(ctx, tx, rec, v, nil, false, false, nil); err != nil {
					return err
				}
				for _, ev := range historyAttempts(m) {
					if ev.leave {
						if err := s.leaveHistory(ctx, tx, m.ID, ev.at, OutcomeDelivered, ev.events); err != nil {
							return err
						}
						_, err = tx.Exec(ctx, `WITH b AS (DELETE FROM queue_bodies WHERE id = $1)
							DELETE FROM queue_messages WHERE id = $1`, m.ID)
					} else {
						err = s.addHistory(ctx, tx, m.ID, ev.events)
					}
					if err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			s.Close()
			b.Fatal(err)
		}
	}
	if _, err := s.pool.Exec(ctx, `ANALYZE`); err != nil {
		s.Close()
		b.Fatal(err)
	}
	b.Logf("filled %d events in %v", size.events, time.Since(start).Round(time.Millisecond))
	return s
}

// BenchmarkHistoryCost measures one message's way through the queue as
// a single client submits it: Put, a Claim of it, and a Finish that
// delivers to its two recipients, with their two events, and removes
// it. Messages are sent one after the other; each Finish runs while the
// next message is put, as when a single session submits while the last
// message's outcome is committed. With history=off the store keeps none; the
// on run reports its ns/op over off's as "ratio", and its best-ns/op
// over off's, which other work on the machine disturbs less, as
// "best-ratio".
func BenchmarkHistoryCost(b *testing.B) {
	for _, events := range []string{"0", "1M"} {
		var off, offBest float64 // ns/op and best-ns/op of the off run
		for _, mode := range []string{"off", "on"} {
			var s *Store
			b.Run("events="+events+"/history="+mode, func(b2 *testing.B) {
				if s == nil {
					opts := historyOptions
					opts.noHistory = mode == "off"
					if events == "0" {
						var err error
						if s, err = Open(filepath.Join(b.TempDir(), "queue.db"), opts); err != nil {
							b2.Fatal(err)
						}
					} else {
						s = historyOpen(b2, historySizes[len(historySizes)-1], b.TempDir(), opts)
					}
					b.Cleanup(func() { s.Close() })
				}
				b2.ReportAllocs()
				best := float64(historyPath(b2, s).Nanoseconds())
				nsop := float64(b2.Elapsed().Nanoseconds()) / float64(b2.N)
				if mode == "off" {
					off, offBest = nsop, best
				} else if off > 0 {
					b2.ReportMetric(nsop/off, "ratio")
					b2.ReportMetric(best/offBest, "best-ratio")
				}
			})
		}
	}
}

// historyPath runs b.N messages through Put, Claim and Finish on s, and
// returns benchRounds' best time per message.
func historyPath(b *testing.B, s *Store) time.Duration {
	sch := benchScheduler(s)
	rng := rand.New(rand.NewPCG(10, 0))
	size := historySizes[len(historySizes)-1]
	finish := func(a Attempt) error {
		now := benchNow
		var events []Event
		for _, r := range a.Message.Recipients {
			events = append(events, Event{At: now, Type: EventDelivered, Attempt: a.Message.Attempts, Rcpt: r.Addr,
				Upstream: "gmail", Relay: "142.250.102.27:25", Reply: "250 2.0.0 OK 1772452681 a1b2c3d4e5f6 - gsmtp"})
		}
		_, err := s.Finish(context.Background(), a, events, func(m *Message) (bool, []DSN) {
			for i := range m.Recipients {
				m.Recipients[i].State = Delivered
			}
			return true, nil
		})
		return err
	}
	return benchRounds(b, s, nil, func(k int) {
		done := make(chan error, k)
		for i := range k {
			m := historyMessage(rng, size, i)
			m.ID = ""
			if err := s.Put(context.Background(), m, benchBody); err != nil {
				b.Fatal(err)
			}
			out := benchClaim(b, sch, 1)
			if len(out) != 1 || out[0].Message.ID != m.ID {
				b.Fatalf("claimed %v, want %s", ids(out), m.ID)
			}
			go func() { done <- finish(out[0]) }()
		}
		for range k {
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		}
	}, nil)
}

// TestHistoryFill checks that historyFill writes the history exactly as
// the messages' Put, Claims and Finishes do, so that the figures are
// measured on a store the relay could meet.
func TestHistoryFill(t *testing.T) {
	size := historySize{name: "40", events: 40}
	var now time.Time
	opts := historyOptions
	opts.Now = func() time.Time { return now }
	open := func() *Store {
		s, err := Open(filepath.Join(t.TempDir(), "queue.db"), opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	filled, real := open(), open()
	if err := historyFill(filled, size); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	rng := historyRand(size)
	for i := range size.messages() {
		m := historyMessage(rng, size, i)
		m.Received = historyReceived(size, i)
		now = m.Received
		if err := real.Put(ctx, m, benchBody); err != nil {
			t.Fatal(err)
		}
		attempts := historyAttempts(m)
		for j, a := range attempts {
			now = a.at
			c, err := real.Claim(ctx, Start{Now: a.at, Retry: func(int) time.Time { return a.at.Add(time.Hour) }}, 1, nil)
			if err != nil || len(c.Attempts) != 1 {
				t.Fatalf("claim %s: %+v, %v", m.ID, c, err)
			}
			_, err = real.Finish(ctx, c.Attempts[0], a.events, func(m *Message) (bool, []DSN) {
				for _, ev := range a.events {
					for k := range m.Recipients {
						if ev.Type == EventDelivered && m.Recipients[k].Addr == ev.Rcpt {
							m.Recipients[k].State = Delivered
						}
					}
				}
				if !a.leave {
					m.NextAttempt = attempts[j+1].at
				}
				return a.leave, nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}

	dump := func(s *Store) map[string]string {
		out := map[string]string{}
		err := s.db.View(func(tx *bolt.Tx) error {
			for _, name := range historyBuckets {
				if err := tx.Bucket(name).ForEach(func(k, v []byte) error {
					out[string(name)+" "+string(k)] = string(v)
					return nil
				}); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	got, want := dump(filled), dump(real)
	if len(want) < size.messages()*6 {
		t.Fatalf("the queue wrote %d history entries for %d messages", len(want), size.messages())
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%q: filled %q, the queue wrote %q", k, got[k], v)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%q: filled, the queue wrote nothing", k)
		}
	}
	if n, err := real.Len(); err != nil || n != 0 {
		t.Errorf("%d messages left in the queue, %v", n, err)
	}
}
