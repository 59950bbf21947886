package queue

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The benchmarks below measure the queue operations as the relay performs
// them (Put with its group commit, a scheduler pass claiming a message,
// a worker recording a delivery, a restart) against stores that already
// hold 1k, 100k and 1M messages, to show that their cost does not grow
// with the queue. Run them with
//
//	go test -run '^$' -bench '(Put|PutParallel|Claim|Complete)/' -benchtime 1000x ./queue
//	go test -run '^$' -bench Open -benchtime 5x ./queue
//
// The pre-filled stores take a while to build (a minute or two for the
// two of a million messages, 6 GB each) and are cached under
// os.TempDir(), in a directory named by benchFormat; each benchmark works
// on a copy of its own, removed when it ends, so about 19 GB of disk are
// needed.

// benchFormat names the layout of the cached fixtures: change it whenever
// benchFill or the store's format changes, so stale files are not reused.
const benchFormat = 1

// benchSize is a store to measure: n messages, in a file that held from
// messages before most were delivered, if from is set.
type benchSize struct {
	name    string
	n, from int
}

// benchSizes are the stores measured. The last is a queue that drained
// from a backlog of a million messages: bbolt never shrinks its file, so
// it holds a million pages' worth of free space.
var benchSizes = []benchSize{
	{name: "1k", n: 1_000},
	{name: "100k", n: 100_000},
	{name: "1M", n: 1_000_000},
	{name: "1k-after-1M", n: 1_000, from: 1_000_000},
}

// benchRound is how many operations run between two resets of a store
// to its size: small next to the smallest store, so that the size measured
// is the size named.
const benchRound = 100

// benchNow is the fixtures' present: messages were received in the six
// hours before it and are due from then to three hours after it.
var benchNow = time.Date(2026, 3, 2, 12, 0, 0, 0, time.UTC)

// benchBody is the content of every message: 2 KB, a typical
// transactional mail.
var benchBody = func() []byte {
	var b bytes.Buffer
	b.WriteString("Received: from app1.internal (app1.internal [10.0.0.7])\r\n\tby relay.example.com with ESMTPSA id 0123456789abcdef; Mon, 2 Mar 2026 11:58:01 +0000\r\n")
	b.WriteString("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s2026;\r\n\th=from:to:subject:date:message-id; bh=frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=;\r\n\tb=Qm9vbGVhbiBzaWduYXR1cmUgcGxhY2Vob2xkZXIgZm9yIHRoZSBiZW5jaG1hcmsgZml4dHVyZQ==\r\n")
	b.WriteString("From: Billing <billing@example.com>\r\nTo: customer@example.net\r\nSubject: Your invoice\r\n")
	b.WriteString("Date: Mon, 2 Mar 2026 11:58:01 +0000\r\nMessage-ID: <invoice@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
	for b.Len() < 2048-2 {
		b.WriteString("Thank you for your order. Your invoice is attached to this message.\r\n")
	}
	b.Truncate(2048 - 2)
	b.WriteString("\r\n")
	return b.Bytes()
}()

// benchMessage returns a message as a client submits it: one to three
// recipients.
func benchMessage(rng *rand.Rand) *Message {
	m := &Message{From: "billing@example.com", User: "billing-app", MessageID: "<invoice@example.com>"}
	for range 1 + rng.IntN(3) {
		m.Recipients = append(m.Recipients, Recipient{Addr: fmt.Sprintf("customer%d@example.net", rng.IntN(1_000_000))})
	}
	return m
}

// benchRecord returns a stored message with the given ID as it may be
// found in a busy queue: received in the last six hours and, one time in
// six, new and due at once; else retried before and due any time from
// an hour ago to three hours from now.
func benchRecord(rng *rand.Rand, id string) *record {
	m := benchMessage(rng)
	m.ID = id
	m.MessageID = "<" + id + "@example.com>"
	m.Size = int64(len(benchBody))
	m.Received = benchNow.Add(-time.Duration(rng.Int64N(int64(6 * time.Hour))))
	m.NextAttempt = m.Received
	if a := rng.IntN(6); a > 0 {
		m.Attempts = a
		m.LastAttempt = benchNow.Add(-time.Duration(rng.Int64N(int64(time.Hour))))
		m.NextAttempt = benchNow.Add(time.Duration(rng.Int64N(int64(4*time.Hour))) - time.Hour)
		m.LastReply = "451 4.7.1 Service temporarily unavailable, try again later"
		for i := range m.Recipients {
			m.Recipients[i].Reply = m.LastReply
			m.Recipients[i].Upstream = "gmail"
		}
	}
	return &record{Message: *m}
}

// benchIDs returns n random queue IDs, sorted.
func benchIDs(rng *rand.Rand, n int) []string {
	ids := make([]string, n)
	var b [8]byte
	for i := range ids {
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		ids[i] = hex.EncodeToString(b[:])
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// benchFill stores n messages in the new store s, with large transactions
// rather than a commit per message. Every bucket is filled in key order,
// which bbolt appends fast; the tree is the one that random inserts would
// give, give or take how full its pages are.
func benchFill(s *Store, n int) error {
	rng := rand.New(rand.NewPCG(1, uint64(n)))
	ids := benchIDs(rng, n)
	var due, received [][]byte
	const batch = 50_000
	for chunk := range slices.Chunk(ids, batch) {
		err := s.db.Update(func(tx *bolt.Tx) error {
			msgs, bodies := tx.Bucket(msgsBucket), tx.Bucket(bodiesBucket)
			for _, id := range chunk {
				rec := benchRecord(rng, id)
				if err := putRecord(msgs, rec); err != nil {
					return err
				}
				if err := bodies.Put([]byte(id), benchBody); err != nil {
					return err
				}
				due = append(due, dueKey(rec.NextAttempt, id))
				received = append(received, receivedKey(rec.Received, id))
			}
			return addCounts(tx, int64(len(chunk)), 0)
		})
		if err != nil {
			return err
		}
	}
	for _, index := range []struct {
		bucket []byte
		keys   [][]byte
	}{{dueBucket, due}, {receivedBucket, received}} {
		slices.SortFunc(index.keys, bytes.Compare)
		for chunk := range slices.Chunk(index.keys, 4*batch) {
			err := s.db.Update(func(tx *bolt.Tx) error {
				b := tx.Bucket(index.bucket)
				for _, k := range chunk {
					if err := b.Put(k, nil); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// benchFixture returns the path of the cached store of the given size,
// building it on first use.
func benchFixture(b *testing.B, size benchSize) string {
	dir := filepath.Join(os.TempDir(), fmt.Sprintf("smarthost-queue-bench-v%d", benchFormat))
	name := fmt.Sprintf("queue-%d.db", size.n)
	seed := ""
	if size.from > 0 {
		name = fmt.Sprintf("queue-%d-from-%d.db", size.n, size.from)
		seed = benchFixture(b, benchSize{n: size.from})
	}
	return cachedFixture(b, filepath.Join(dir, name), Options{}, seed, func(s *Store) error {
		if size.from > 0 {
			return benchDrain(b, s, size.n)
		}
		return benchFill(s, size.n)
	})
}

// cachedFixture returns path, a store that fill wrote (into a copy of
// seed, if set), building it on first use. It is built under a temporary
// name and renamed, so an interrupted build leaves nothing that looks
// finished.
func cachedFixture(b *testing.B, path string, opts Options, seed string, fill func(*Store) error) string {
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	defer func() {
		for _, p := range []string{tmp, tmp + cleanSuffix, tmp + ".spool"} {
			os.RemoveAll(p)
		}
	}()
	if seed != "" {
		if err := copyFile(seed, tmp); err != nil {
			b.Fatal(err)
		}
	}
	s, err := Open(tmp, opts)
	if err != nil {
		b.Fatal(err)
	}
	if err := fill(s); err != nil {
		s.Close()
		b.Fatalf("build %s: %v", path, err)
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		b.Fatal(err)
	}
	b.Logf("built %s in %v", path, time.Since(start).Round(time.Millisecond))
	return path
}

// benchDrain removes all but n of the messages in s, keeping n spread
// over the whole ID range, in large transactions.
func benchDrain(b *testing.B, s *Store, n int) error {
	var drop []string
	err := s.db.View(func(tx *bolt.Tx) error {
		total := tx.Bucket(msgsBucket).Stats().KeyN
		i := 0
		return tx.Bucket(msgsBucket).ForEach(func(k, _ []byte) error {
			if i%(total/n) != 0 {
				drop = append(drop, string(k))
			}
			i++
			return nil
		})
	})
	if err != nil {
		return err
	}
	for chunk := range slices.Chunk(drop, 50_000) {
		benchRemove(b, s, chunk)
	}
	return nil
}

// copyFile copies src to the new file dst and fsyncs it, so that the
// first commit of a benchmark does not write it out.
func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// benchCopy copies the fixture of the given size into dir.
func benchCopy(b *testing.B, size benchSize, dir string) string {
	path := filepath.Join(dir, "queue.db")
	if err := copyFile(benchFixture(b, size), path); err != nil {
		b.Fatal(err)
	}
	return path
}

// benchOptions opens the fixtures. A drained one is not compacted: the
// benchmarks measure the queue as it runs on, right after the drain.
var benchOptions = Options{Now: func() time.Time { return benchNow }, noCompact: true}

// benchEachSize runs f as one sub-benchmark per size, each on its own
// copy of the fixture, opened once and kept open across the runs with
// growing b.N. A size left out by -bench costs nothing.
func benchEachSize(b *testing.B, f func(b *testing.B, s *Store)) {
	for _, size := range benchSizes {
		var s *Store
		b.Run("size="+size.name, func(sb *testing.B) {
			if s == nil {
				path := benchCopy(sb, size, b.TempDir())
				var err error
				if s, err = Open(path, benchOptions); err != nil {
					sb.Fatal(err)
				}
				b.Cleanup(func() { s.Close() })
			}
			sb.ReportAllocs()
			f(sb, s)
			st := s.db.Stats()
			sb.ReportMetric(float64(st.FreePageN+st.PendingPageN), "free-pages")
		})
	}
}

// benchRounds runs round(k) with k operations until b.N are done. Around
// each round, with the timer stopped, it calls prepare and reset to bring
// the store back to its size. It reports the page writes per operation
// (a run of contiguous pages, such as a freelist, is one write): the cost
// of a commit grows with them; and the time per operation in the fastest
// round (best-ns/op), which other work on a shared machine disturbs less
// than the mean, which it returns.
func benchRounds(b *testing.B, s *Store, prepare func(k int), round func(k int), reset func()) (best time.Duration) {
	var writes int64
	defer func() {
		b.ReportMetric(float64(writes)/float64(b.N), "writes/op")
		b.ReportMetric(float64(best.Nanoseconds()), "best-ns/op")
	}()
	for done := 0; done < b.N; {
		k := min(benchRound, b.N-done)
		b.StopTimer()
		if prepare != nil {
			prepare(k)
		}
		b.StartTimer()
		before := s.db.Stats().TxStats
		start := time.Now()
		round(k)
		if d := time.Since(start) / time.Duration(k); best == 0 || d < best {
			best = d
		}
		after := s.db.Stats().TxStats
		writes += after.GetWrite() - before.GetWrite()
		b.StopTimer()
		if reset != nil {
			reset()
		}
		b.StartTimer()
		done += k
	}
	return best
}

// benchScheduler returns a scheduler over s whose deliveries all succeed,
// for its claim pass and its recording of outcomes; it is never Run.
func benchScheduler(s *Store) *Scheduler {
	sch := NewScheduler(s, func(_ context.Context, m Message, _ Body) []Result {
		var out []Result
		for _, r := range m.Pending() {
			out = append(out, Result{Rcpt: r, State: Delivered, Reply: "250 2.0.0 OK", Upstream: "gmail"})
		}
		return out
	})
	sch.Now = func() time.Time { return benchNow }
	sch.Logger = slog.New(slog.DiscardHandler)
	return sch
}

// benchClaim claims up to limit messages as a scheduler pass does when
// limit workers are free.
func benchClaim(b testing.TB, sch *Scheduler, limit int) []Attempt {
	c, err := sch.Backend.Claim(context.Background(), sch.start(sch.Now()), limit, nil)
	if err != nil || len(c.Unreadable) > 0 {
		b.Fatalf("claim: %v (unreadable: %v)", err, c.Unreadable)
	}
	return c.Attempts
}

// benchRemove removes the messages ids in one transaction.
func benchRemove(b testing.TB, s *Store, ids []string) {
	s.settle() // what Put left in the journal is in the file first
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, id := range ids {
			key := []byte(id)
			rec, err := decodeRecord(tx.Bucket(msgsBucket).Get(key))
			if err != nil {
				return fmt.Errorf("%s: %w", id, err)
			}
			if err := tx.Bucket(dueBucket).Delete(dueKey(rec.NextAttempt, id)); err != nil {
				return err
			}
			if err := deleteReceived(tx, id, rec); err != nil {
				return err
			}
			for _, name := range [][]byte{msgsBucket, bodiesBucket, claimedBucket} {
				if err := tx.Bucket(name).Delete(key); err != nil {
					return err
				}
			}
		}
		return addCounts(tx, -int64(len(ids)), 0)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// benchAdd stores k new messages, due at once, in one transaction.
func benchAdd(b testing.TB, s *Store, rng *rand.Rand, k int) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		for range k {
			rec := benchRecord(rng, NewID())
			rec.NextAttempt = rec.Received
			if err := putRecord(tx.Bucket(msgsBucket), rec); err != nil {
				return err
			}
			if err := tx.Bucket(bodiesBucket).Put([]byte(rec.ID), benchBody); err != nil {
				return err
			}
			if err := tx.Bucket(dueBucket).Put(dueKey(rec.NextAttempt, rec.ID), nil); err != nil {
				return err
			}
			if err := tx.Bucket(receivedBucket).Put(receivedKey(rec.Received, rec.ID), nil); err != nil {
				return err
			}
		}
		return addCounts(tx, int64(k), 0)
	})
	if err != nil {
		b.Fatal(err)
	}
}

// benchRequeue makes the claimed messages ids due again, at a time in the
// last hour, as if their attempt had been deferred long ago. With
// keepClaims their claims stay, as a crash mid-delivery leaves them.
func benchRequeue(b testing.TB, s *Store, rng *rand.Rand, ids []string, keepClaims bool) {
	err := s.db.Update(func(tx *bolt.Tx) error {
		msgs, due := tx.Bucket(msgsBucket), tx.Bucket(dueBucket)
		for _, id := range ids {
			rec, err := decodeRecord(msgs.Get([]byte(id)))
			if err != nil {
				return fmt.Errorf("%s: %w", id, err)
			}
			if err := due.Delete(dueKey(rec.NextAttempt, id)); err != nil {
				return err
			}
			rec.NextAttempt = benchNow.Add(-time.Duration(rng.Int64N(int64(time.Hour))))
			if err := due.Put(dueKey(rec.NextAttempt, id), nil); err != nil {
				return err
			}
			if !keepClaims {
				if err := tx.Bucket(claimedBucket).Delete([]byte(id)); err != nil {
					return err
				}
			}
			if err := putRecord(msgs, rec); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

func ids(ds []Attempt) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.Message.ID
	}
	return out
}

// BenchmarkPut measures one Put from a single client, which shares its
// commit and fsyncs with no other.
func BenchmarkPut(b *testing.B) {
	benchEachSize(b, func(b *testing.B, s *Store) {
		rng := rand.New(rand.NewPCG(2, 0))
		var put []string
		benchRounds(b, s, nil, func(k int) {
			for range k {
				m := benchMessage(rng)
				if err := s.Put(context.Background(), m, benchBody); err != nil {
					b.Fatal(err)
				}
				put = append(put, m.ID)
			}
		}, func() {
			benchRemove(b, s, put)
			put = put[:0]
		})
	})
}

// benchWriters is how many clients submit at once in BenchmarkPutParallel:
// a busy relay's concurrent SMTP sessions.
const benchWriters = 16

// BenchmarkPutParallel measures Put with benchWriters clients submitting
// at once, whose Puts share commits and fsyncs; ns/op is per message.
func BenchmarkPutParallel(b *testing.B) {
	benchEachSize(b, func(b *testing.B, s *Store) {
		rng := rand.New(rand.NewPCG(3, 0))
		var (
			msgs []*Message
			next atomic.Int64
		)
		benchRounds(b, s, func(k int) {
			msgs = msgs[:0]
			for range k {
				msgs = append(msgs, benchMessage(rng))
			}
			next.Store(0)
		}, func(k int) {
			var wg sync.WaitGroup
			for range benchWriters {
				wg.Go(func() {
					for i := int(next.Add(1) - 1); i < k; i = int(next.Add(1) - 1) {
						if err := s.Put(context.Background(), msgs[i], benchBody); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
		}, func() {
			put := make([]string, 0, len(msgs))
			for _, m := range msgs {
				if m.ID != "" {
					put = append(put, m.ID)
				}
			}
			benchRemove(b, s, put)
		})
	})
}

// BenchmarkClaim measures a scheduler pass that claims one due message
// (one worker free, the usual case under load): the look for due
// messages, then the fsynced transaction that records the attempt.
func BenchmarkClaim(b *testing.B) {
	benchEachSize(b, func(b *testing.B, s *Store) {
		sch := benchScheduler(s)
		rng := rand.New(rand.NewPCG(4, 0))
		var claimed []string
		benchRounds(b, s, nil, func(k int) {
			for range k {
				out := benchClaim(b, sch, 1)
				if len(out) != 1 {
					b.Fatalf("claimed %d messages, want 1", len(out))
				}
				claimed = append(claimed, out[0].Message.ID)
			}
		}, func() {
			benchRequeue(b, s, rng, claimed, false)
			claimed = claimed[:0]
		})
	})
}

// BenchmarkComplete measures a worker recording a successful delivery:
// the outcome applied, the message removed, in a group-committed,
// fsynced transaction.
func BenchmarkComplete(b *testing.B) {
	benchEachSize(b, func(b *testing.B, s *Store) {
		sch := benchScheduler(s)
		rng := rand.New(rand.NewPCG(5, 0))
		var claimed []Attempt
		benchRounds(b, s, func(k int) {
			// Replace the messages the last round removed, then claim
			// as many.
			benchAdd(b, s, rng, k)
			claimed = benchClaim(b, sch, k)
			if len(claimed) != k {
				b.Fatalf("claimed %d messages, want %d", len(claimed), k)
			}
		}, func(int) {
			for _, d := range claimed {
				sch.wg.Add(1)
				sch.work(d)
			}
		}, nil)
		if n := inFlightCount(sch); n != 0 {
			b.Fatalf("%d messages still in flight", n)
		}
	})
}

// restartWorkers is how many messages BenchmarkOpen finds claimed at
// each open: as many as the default number of workers, all interrupted.
const restartWorkers = defaultWorkers

// BenchmarkOpen measures a restart: Open, with recovery of the claims
// left by restartWorkers interrupted deliveries, then what the relay
// reads at start (Len, Stats) and the scheduler's first pass, which
// claims restartWorkers due messages. The previous process either closed
// the store (restart=clean) or died without closing it (restart=crash);
// restart=reboot is a crash whose file was then dropped from the page
// cache, so that Open reads it from the disk. These leave a drained file
// as it is; restart=compact is the first Open of one, which compacts it
// (each run on a fresh copy: use a small -benchtime).
func BenchmarkOpen(b *testing.B) {
	for _, size := range benchSizes {
		var path string
		for _, restart := range []string{"clean", "crash", "reboot", "compact"} {
			if restart == "compact" && size.from == 0 {
				continue
			}
			b.Run("size="+size.name+"/restart="+restart, func(b2 *testing.B) {
				if restart == "compact" {
					benchOpenCompact(b2, size, b.TempDir())
					return
				}
				if path == "" {
					path = benchCopy(b2, size, b.TempDir())
				}
				benchOpen(b2, path, restart != "clean", restart == "reboot")
			})
		}
	}
}

// benchRestart is what the relay does at start, after Open: Len, Stats
// and the scheduler's first pass. It returns the claimed messages.
func benchRestart(b *testing.B, s *Store) []Attempt {
	if _, err := s.Len(); err != nil {
		b.Fatal(err)
	}
	if _, err := s.Stats(); err != nil {
		b.Fatal(err)
	}
	return benchClaim(b, benchScheduler(s), restartWorkers)
}

func benchOpenCompact(b *testing.B, size benchSize, dir string) {
	b.ReportAllocs()
	opts := benchOptions
	opts.noCompact = false
	opts.Logger = slog.New(slog.DiscardHandler)
	for range b.N {
		b.StopTimer()
		path := benchCopy(b, size, dir)
		before := fileSize(b, path)
		b.StartTimer()
		s, err := Open(path, opts)
		if err != nil {
			b.Fatal(err)
		}
		benchRestart(b, s)
		b.StopTimer()
		if after := fileSize(b, path); after >= before {
			b.Fatalf("file of %d bytes not compacted (%d bytes)", before, after)
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
		if err := os.Remove(path); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

func benchOpen(b *testing.B, path string, crash, cold bool) {
	b.ReportAllocs()
	rng := rand.New(rand.NewPCG(6, 0))
	var recovered int
	for range b.N {
		b.StopTimer()
		if cold {
			if err := dropPageCache(path); err != nil {
				b.Skipf("cannot drop the page cache: %v", err)
			}
		}
		b.StartTimer()
		s, err := Open(path, benchOptions)
		if err != nil {
			b.Fatal(err)
		}
		out := benchRestart(b, s)
		b.StopTimer()
		if len(out) != restartWorkers {
			b.Fatalf("first pass claimed %d messages, want %d", len(out), restartWorkers)
		}
		recovered = s.Recovered()
		// The deliveries are interrupted: their claims stay, and the next
		// Open recovers them.
		benchRequeue(b, s, rng, ids(out), true)
		if crash {
			err = s.db.Close() // without what Store.Close adds
		} else {
			err = s.Close()
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	if b.N > 1 && recovered != restartWorkers {
		b.Fatalf("Open recovered %d claims, want %d", recovered, restartWorkers)
	}
}

// TestBenchHelpers checks that the benchmarks' helpers leave a store as
// the real code would have written it (index, counts, claims), so that the
// figures are measured on a store the relay could meet.
func TestBenchHelpers(t *testing.T) {
	s, path := openStore(t)
	if err := benchFill(s, 300); err != nil {
		t.Fatal(err)
	}
	check := func(step string, want int) {
		t.Helper()
		checkIndex(t, s)
		got, err := s.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if scan := scanStats(t, s); !sameStats(got, scan) {
			t.Fatalf("%s: Stats = %+v, the records say %+v", step, got, scan)
		}
		if n, err := s.Len(); err != nil || n != want {
			t.Fatalf("%s: Len = %d, %v; want %d", step, n, err, want)
		}
	}
	check("fill", 300)

	sch := benchScheduler(s)
	rng := rand.New(rand.NewPCG(7, 0))
	benchAdd(t, s, rng, 10)
	check("add", 310)
	claimed := benchClaim(t, sch, 20)
	if len(claimed) != 20 {
		t.Fatalf("claimed %d, want 20", len(claimed))
	}
	benchRequeue(t, s, rng, ids(claimed[:10]), false)
	check("requeue", 310)
	benchRemove(t, s, ids(claimed[10:]))
	check("remove", 300)

	// Claims kept by benchRequeue are what a crash leaves: Open recovers
	// them and the messages are due.
	claimed = benchClaim(t, sch, 5)
	benchRequeue(t, s, rng, ids(claimed), true)
	s = reopen(t, s, path)
	if got := s.Recovered(); got != 5 {
		t.Errorf("Recovered = %d, want 5", got)
	}
	check("reopen", 300)
	due := 0
	for _, id := range ids(claimed) {
		if m := get(t, s, id); !m.NextAttempt.After(benchNow) && !m.InFlight {
			due++
		}
	}
	if due != 5 {
		t.Errorf("%d of the 5 recovered messages are due, want all", due)
	}
}
