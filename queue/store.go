package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// ErrNotFound is returned for a queue ID that is not in the store.
var ErrNotFound = errors.New("queue: message not found")

// ErrLocked is returned by Open when another process holds the file.
var ErrLocked = errors.New("locked by another process")

// ErrHeld is returned by Retry for a message that is on hold: it must be
// released first.
var ErrHeld = errors.New("queue: message is on hold")

// Bucket names. Keys of dueBucket sort by time (big-endian UnixNano ‖ ID),
// so the scheduler finds due messages with a cursor from the start.
var (
	metaBucket    = []byte("meta")    // "schema" → schemaVersion
	msgsBucket    = []byte("msgs")    // ID → record (recordVersion ‖ JSON)
	bodiesBucket  = []byte("bodies")  // ID → message bytes
	dueBucket     = []byte("due")     // be64(NextAttempt) ‖ ID → empty
	claimedBucket = []byte("claimed") // ID → inProgress, while an attempt is in progress
	// receivedBucket indexes every message by when it was received, for
	// the age of the oldest one: be64(Received) ‖ ID → empty.
	receivedBucket = []byte("received")
)

// inProgress is claimedBucket's value: empty, and not nil, since bbolt's
// Get finds a key put with a nil value only once its transaction is
// committed, and a message is inserted and finished in one transaction
// when its outcome comes before its insert is committed (journal.go).
var inProgress = []byte{}

var (
	schemaKey = []byte("schema")
	// probeKey holds the time of the last probe write: the small write
	// that the store commits every second while writes fail, to find out
	// when they work again (committer.probe).
	probeKey = []byte("probe")
	// countsKey holds the number of messages and of held messages,
	// be64 ‖ be64, changed in the transaction of every change they count.
	countsKey = []byte("counts")
)

const (
	schemaVersion = 1
	recordVersion = 1
)

// Options tunes a Store. The zero value is usable.
type Options struct {
	// LockTimeout bounds the wait for bbolt's file lock, so a second
	// process fails fast instead of hanging. Default 1s.
	LockTimeout time.Duration
	// Now is the clock for Received in Put and for "due now" in the
	// administrative operations. Default time.Now.
	Now func() time.Time
	// Observer, if set, is told when messages leave the queue and when
	// DSNs are stored.
	Observer Observer
	// Logger receives a line when Open checks every page of the file or
	// compacts it, and when writes to the file start and stop failing.
	// Default slog.Default().
	Logger *slog.Logger

	// HistoryRetention is how long a message's history is kept after it
	// left the queue; zero keeps none (PruneHistory removes it).
	HistoryRetention time.Duration
	// Webhooks are the subscriptions whose posts are stored with the
	// events they ask for (DueWebhooks).
	Webhooks []Subscription

	// freelistSyncMax overrides defaultFreelistSyncMax, and noCompact
	// keeps Open from compacting, for tests.
	freelistSyncMax int
	noCompact       bool
	// noHistory keeps no history at all, for benchmarks: the baseline of
	// the history's cost.
	noHistory bool
}

// Store is the bbolt Backend: the queue in one file, with the part of
// large messages past their head in spool files beside it. Its methods are
// safe for concurrent use.
type Store struct {
	db        *bolt.DB
	path      string
	spool     string // directory of the spool files: path + ".spool"
	recovered int
	now       func() time.Time
	observer  Observer
	log       *slog.Logger

	// wake tells the scheduler that a message may be due now (Wake).
	// Buffered with capacity 1: one pending signal is enough to make it
	// look.
	wake chan struct{}

	// commit is the group commit every write goes through (commit.go).
	commit *committer
	// journal makes new messages durable ahead of their commit
	// (journal.go).
	journal *journal
	// intake, if set, takes new messages for their first attempt, claimed
	// in the commit that stores them (SetIntake). Without that, each
	// message would cost a second commit for the claim, which a single
	// submitting session waits behind.
	intake intakeSlot

	// freelistSyncMax is the number of free pages past which commits may
	// stop writing the freelist (chooseFreelistSync).
	freelistSyncMax int
	// historyRetention is Options.HistoryRetention, subs Options.Webhooks.
	historyRetention time.Duration
	subs             []Subscription
	// noHistory is Options.noHistory.
	noHistory bool

	closed atomic.Bool // Close has run
}

var _ Backend = (*Store)(nil)

// record is what msgsBucket holds for a message. Whether an attempt is in
// progress is not in it: claimedBucket holds that.
type record struct {
	Message
	// Spooled marks a message whose body is its bytes in bodiesBucket
	// followed by its spool file (see spool.go).
	Spooled bool `json:"spooled,omitempty"`
}

// Open opens or creates the queue file at path. An existing file is
// checked before bbolt opens it (see checkOpen for what is checked when):
// a damaged one is neither served nor written, and Open returns a
// *DamagedError, which wraps ErrDamaged.
func Open(path string, opts Options) (*Store, error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.freelistSyncMax <= 0 {
		opts.freelistSyncMax = defaultFreelistSyncMax
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("queue: create directory: %w", err)
	}
	// The file is opened, locked and checked here, and only then handed to
	// bbolt, which writes as it opens (the freelist, then prepare and
	// compaction here). Nothing is written to it before the check passes.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: open %s: %w", path, err)
	}
	if err := lockFile(f, true, opts.LockTimeout); err != nil {
		f.Close()
		if errors.Is(err, ErrLocked) {
			return nil, fmt.Errorf("queue: %s is %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("queue: lock %s: %w", path, err)
	}
	fi, err := f.Stat()
	if err == nil {
		err = checkOpen(f, fi, path, opts.Logger)
	}
	if err != nil {
		f.Close()
		return nil, err
	}

	// The hashmap freelist allocates and releases pages without walking
	// every free page at each commit, as the array one does. Whether
	// commits write the freelist is chosen by each write transaction, the
	// first being prepare's (chooseFreelistSync); until then, none is
	// written, so that Open after a crash does not write a long one that
	// the next commit leaves out.
	bopts := &bolt.Options{Timeout: opts.LockTimeout, FreelistType: bolt.FreelistMapType, NoFreelistSync: true}
	checked := *bopts
	checked.OpenFile = func(string, int, fs.FileMode) (*os.File, error) { return f, nil }
	db, err := bolt.Open(path, 0o600, &checked)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("queue: open %s: %w", path, err)
	}
	if !opts.noCompact {
		if db, err = compactDrained(db, path, bopts, opts.freelistSyncMax, opts.Logger); err != nil {
			return nil, storageError("open "+path, err)
		}
	}

	s := &Store{db: db, path: path, spool: path + ".spool", now: opts.Now, observer: opts.Observer, wake: make(chan struct{}, 1),
		freelistSyncMax: opts.freelistSyncMax, log: opts.Logger, historyRetention: opts.HistoryRetention, subs: opts.Webhooks, noHistory: opts.noHistory}
	s.commit = newCommitter(db, s.probeWrite, s.writesChanged)
	if err := db.Update(s.prepare); err != nil {
		s.commit.close()
		db.Close()
		return nil, storageError("open "+path, err)
	}
	// Before the spool is cleaned: a spooled message may have its record
	// in the journal only.
	replayed, err := s.openJournal()
	if err != nil {
		s.commit.close()
		db.Close()
		return nil, storageError("open "+path, err)
	}
	s.commit.prelude, s.commit.committedMark = s.applyJournal, s.journalCommitted
	if replayed > 0 {
		opts.Logger.Info("queue: messages accepted before the last stop are in the journal only; committing them", "path", path, "messages", replayed)
		s.commit.nudge()
	}
	if err := os.MkdirAll(s.spool, 0o700); err != nil {
		s.closeAll()
		return nil, fmt.Errorf("queue: create spool directory: %w", err)
	}
	if err := s.cleanSpool(); err != nil {
		s.closeAll()
		return nil, storageError("open "+path, err)
	}
	return s, nil
}

// prepare creates the buckets, checks the schema version and clears the
// claims left by a process that stopped mid-delivery, counting them. (A
// record written before claims left records may still say "claimed"; it
// is ignored.)
func (s *Store) prepare(tx *bolt.Tx) error {
	s.chooseFreelistSync(tx)
	for _, name := range slices.Concat([][]byte{metaBucket, msgsBucket, bodiesBucket, dueBucket, claimedBucket, receivedBucket}, historyBuckets, webhookBuckets) {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	meta := tx.Bucket(metaBucket)
	switch v := meta.Get(schemaKey); {
	case v == nil:
		if err := meta.Put(schemaKey, []byte{schemaVersion}); err != nil {
			return err
		}
	case len(v) != 1 || v[0] != schemaVersion:
		return fmt.Errorf("unsupported schema version %x", v)
	}
	if meta.Get(countsKey) == nil {
		if err := indexCounts(tx); err != nil {
			return err
		}
	}

	claimed := tx.Bucket(claimedBucket)
	var ids [][]byte
	if err := claimed.ForEach(func(k, _ []byte) error {
		ids = append(ids, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	msgs := tx.Bucket(msgsBucket)
	for _, id := range ids {
		if err := claimed.Delete(id); err != nil {
			return err
		}
		v := msgs.Get(id)
		if v == nil {
			continue
		}
		if _, err := decodeRecord(v); err != nil {
			continue // left for an operator; Claim skips it too
		}
		s.recovered++
	}
	return nil
}

// Writable reports whether the store can write its file: false from a
// commit that failed (a full disk, an I/O error, the file size limit)
// until one succeeds. While it is false and nothing else writes, the store
// commits a small write every second, so that it turns true by itself
// once the file can be written again.
func (s *Store) Writable() bool { return s.commit.healthy() }

// probeWrite is the committer's probe: the time, under probeKey.
func (s *Store) probeWrite(tx *bolt.Tx) error {
	return tx.Bucket(metaBucket).Put(probeKey, binary.BigEndian.AppendUint64(nil, uint64(s.now().UnixNano())))
}

// writesChanged logs when writes start and stop failing.
func (s *Store) writesChanged(failing bool, err error) {
	if failing {
		s.log.Error("queue: the queue file cannot be written; the relay is not ready until a write succeeds", "path", s.path, "err", err)
		return
	}
	s.log.Info("queue: the queue file can be written again", "path", s.path)
}

// Recovered returns how many messages Open found with an attempt in
// progress: the previous process stopped while delivering them. Each is
// retried when due and may reach its recipients twice (at-least-once).
func (s *Store) Recovered() int { return s.recovered }

// Close closes the file. It waits for transactions in progress. Once the
// file is closed, it records so beside it, which spares the next Open a
// check of every page (see checkOpen). A second Close does nothing.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	// The Puts already queued are answered, their messages committed with
	// the writes already queued; what a failing disk keeps from bbolt
	// stays in the journal for the next Open.
	s.journal.stop()
	s.settle()
	s.commit.close()
	if err := s.journal.close(); err != nil {
		s.log.Warn("queue: close journal", "err", err)
	}
	// If commits stopped writing the freelist, write it once now, so that
	// the next Open reads it rather than walking every page in use. Should
	// this fail, that Open walks them: slower, not wrong.
	errSynced := errors.New("freelist already written")
	serr := s.db.Update(func(*bolt.Tx) error {
		if !s.db.NoFreelistSync {
			return errSynced // nothing to commit
		}
		s.db.NoFreelistSync = false
		return nil
	})
	if errors.Is(serr, errSynced) || errors.Is(serr, berrors.ErrDatabaseNotOpen) {
		serr = nil // nothing to write, or closed already
	}
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("queue: close: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("queue: close: write freelist: %w", serr)
	}
	recordClean(s.path)
	return nil
}

// defaultFreelistSyncMax: 32768 free pages (128 MiB of a file with 4 KiB
// pages) make a freelist of 256 KiB, written at each commit.
const defaultFreelistSyncMax = 1 << 15

// chooseFreelistSync decides, at the start of write transaction tx,
// whether its commit writes bbolt's freelist. bbolt never shrinks its
// file; the pages that departed messages free are listed for reuse, and
// by default every commit writes that whole list. After a backlog of a
// million messages drains, that is megabytes per commit, and draining it
// costs time quadratic in its size. So while the list is long (over
// freelistSyncMax) and longer than the pages in use, commits leave it out
// (bbolt's NoFreelistSync). If the process then stops without Close, the
// next Open rebuilds the list by reading the pages in use, which are
// then the lesser part of the file; with a short list, as in a full
// queue, it is written at each commit and read back at once.
// bbolt reads NoFreelistSync only when committing, under the writer lock
// that tx holds, so changing it here is safe.
func (s *Store) chooseFreelistSync(tx *bolt.Tx) {
	st := s.db.Stats()
	free := st.FreePageN + st.PendingPageN
	total := int(tx.Size() / int64(s.db.Info().PageSize))
	s.db.NoFreelistSync = free > s.freelistSyncMax && free > total-free
}

// NewID returns a random queue ID: 16 lowercase hex characters.
func NewID() string {
	var b [8]byte
	rand.Read(b[:]) // never fails; see crypto/rand.Read
	return hex.EncodeToString(b[:])
}

// Put implements Backend: it returns only after the message is fsynced in
// the journal (journal.go), or, while the journal cannot take it, in a
// commit of its own; concurrent Puts share the write and the fsync. The
// journal and a first attempt started at once read body itself rather than
// a copy.
func (s *Store) Put(ctx context.Context, m *Message, body []byte) error {
	return s.put(ctx, m, body, false)
}

// put is Put; spooled marks body as the head of a message whose spool
// file is already in place (PutSpooled).
func (s *Store) put(ctx context.Context, m *Message, body []byte, spooled bool) error {
	if err := checkPut(ctx, m); err != nil {
		return err
	}
	// Everything random or clock-dependent is decided here, outside the
	// transaction, because a group commit may run the function more than
	// once. Round(0) drops the monotonic reading, which is not stored.
	rec := newRecord(m, body, spooled, s.now(), func(t time.Time) time.Time { return t.Round(0) })
	in := s.intake.reserve(&rec)
	taken := in != nil
	posts := acceptedPosts(s.subs, &rec.Message)
	v, err := encodeRecord(&rec)
	if err == nil && s.commit.healthy() {
		// The entry has recipients of its own: the attempt changes its own.
		e := &journalEntry{rec: rec, v: v, body: body, posts: posts, taken: taken}
		e.rec.Recipients = slices.Clone(rec.Recipients)
		switch jerr := s.journal.add(e); {
		case jerr == nil:
			s.commit.nudge()
			if taken {
				in.Enqueue(attemptOn(&rec, body))
			}
			return nil
		case errors.Is(jerr, ErrExists), errors.Is(jerr, ErrClosed):
			if taken {
				in.Cancel(m.ID)
			}
			return fmt.Errorf("queue: put %s: %w", m.ID, jerr)
		}
		// Full, or the file failed: a commit of its own, as without a
		// journal.
	}
	if err != nil {
		err = fmt.Errorf("queue: put: %w", err)
	} else if err = s.commit.writeClient(func(tx *bolt.Tx) error {
		s.chooseFreelistSync(tx)
		if err := s.insert(tx, &rec, v, body, taken); err != nil {
			return err
		}
		return putWebhooks(tx, posts)
	}); err != nil {
		err = storageError("put "+m.ID, err)
	}
	if err != nil {
		if taken {
			in.Cancel(m.ID)
		}
		return err
	}
	if taken {
		// body itself, not a copy: a message received into memory is not
		// held twice while its first attempt runs.
		in.Enqueue(attemptOn(&rec, body))
		return nil
	}
	s.notify()
	return nil
}

// closeAll closes what Open opened, after a failure.
func (s *Store) closeAll() {
	s.journal.close()
	s.commit.close()
	s.db.Close()
}

// SetIntake implements Backend.
func (s *Store) SetIntake(in Intake) { s.intake.set(in) }

// begin records on m an attempt that starts as at says.
func begin(m *Message, at Start) {
	m.Attempts++
	m.LastAttempt = at.Now.Round(0)
	m.NextAttempt = at.Retry(m.Attempts - m.Paced).Round(0)
}

// attemptOn is the Attempt that a claim of rec hands out, with its content
// as read then. The token is the attempt's number, which each claim
// raises: an outcome is recorded only while the record has that number
// and is claimed.
func attemptOn(rec *record, head []byte) Attempt {
	return Attempt{Message: rec.Message, Token: uint64(rec.Attempts), head: head, spooled: rec.Spooled}
}

// checkPut refuses a Put that cannot succeed, before any work is done.
func checkPut(ctx context.Context, m *Message) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("queue: put: %w", err)
	}
	if len(m.Recipients) == 0 {
		return errors.New("queue: put: message has no recipients")
	}
	return nil
}

// insert stores a new message in tx: its record rec, encoded as v, its
// body, and its entries in the indexes and counts; a held one is not due,
// and a claimed one is recorded as in progress. It returns ErrExists if
// the ID is taken.
func (s *Store) insert(tx *bolt.Tx, rec *record, v, body []byte, claimed bool) error {
	id := []byte(rec.ID)
	msgs := tx.Bucket(msgsBucket)
	if msgs.Get(id) != nil {
		return ErrExists
	}
	if err := msgs.Put(id, v); err != nil {
		return err
	}
	if err := tx.Bucket(bodiesBucket).Put(id, body); err != nil {
		return err
	}
	if err := tx.Bucket(receivedBucket).Put(receivedKey(rec.Received, rec.ID), nil); err != nil {
		return err
	}
	if !s.noHistory {
		if err := putHistory(tx, newHistory(&rec.Message), true); err != nil {
			return err
		}
	}
	if err := addCounts(tx, 1, b2i(rec.Held)); err != nil {
		return err
	}
	if claimed {
		if err := tx.Bucket(claimedBucket).Put(id, inProgress); err != nil {
			return err
		}
	}
	if rec.Held {
		return nil // a held message has no due index entry
	}
	return tx.Bucket(dueBucket).Put(dueKey(rec.NextAttempt, rec.ID), nil)
}

// notify tells the scheduler that a message may be due now.
func (s *Store) notify() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Wake implements Backend.
func (s *Store) Wake() <-chan struct{} { return s.wake }

// Get implements Backend. InFlight tells whether a claim is recorded.
func (s *Store) Get(id string) (*Entry, error) {
	s.settle()
	var m *Entry
	err := s.db.View(func(tx *bolt.Tx) error {
		key := []byte(id)
		v := tx.Bucket(msgsBucket).Get(key)
		if v == nil {
			return ErrNotFound
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return err
		}
		m = &Entry{Message: rec.Message, InFlight: tx.Bucket(claimedBucket).Get(key) != nil}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("queue: get %s: %w", id, err)
	}
	return m, nil
}

// Body returns a copy of the stored message bytes, with the content of
// its spool file if it has one, or ErrNotFound.
func (s *Store) Body(id string) ([]byte, error) {
	s.settle()
	var (
		body  []byte
		spool bool
	)
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bodiesBucket).Get([]byte(id))
		if v == nil {
			return ErrNotFound
		}
		body = bytes.Clone(v) // v is only valid inside the transaction
		spool = spooled(tx, []byte(id))
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("queue: body %s: %w", id, err)
	}
	if spool {
		if body, err = s.readSpooled(id, body); errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("queue: body %s: %w (%w)", id, ErrNotFound, err)
		} else if err != nil {
			return nil, fmt.Errorf("queue: body %s: %w", id, err)
		}
	}
	return body, nil
}

// List implements Backend. InFlight tells which have a claim recorded.
func (s *Store) List() ([]Entry, []Unreadable, error) {
	s.settle()
	var (
		out []Entry
		bad []Unreadable
	)
	err := s.db.View(func(tx *bolt.Tx) error {
		claimed := tx.Bucket(claimedBucket)
		return tx.Bucket(msgsBucket).ForEach(func(k, v []byte) error {
			rec, err := decodeRecord(v)
			if err == nil && rec.ID != string(k) {
				err = fmt.Errorf("the record is that of %q", rec.ID)
			}
			if err != nil {
				bad = append(bad, Unreadable{ID: string(k), Reason: err.Error()})
				return nil
			}
			out = append(out, Entry{Message: rec.Message, InFlight: claimed.Get(k) != nil})
			return nil
		})
	})
	if err != nil {
		return nil, nil, fmt.Errorf("queue: list: %w", err)
	}
	slices.SortFunc(out, func(a, b Entry) int {
		if c := a.Received.Compare(b.Received); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, bad, nil
}

// Len returns the number of queued messages. Like Stats, it reads the
// totals that every change keeps up to date (countsKey) rather than
// counting the messages, which at a million would read every page of the
// records at each start.
func (s *Store) Len() (int, error) {
	s.settle()
	var n int
	err := s.db.View(func(tx *bolt.Tx) error {
		n = int(readCounts(tx).messages)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("queue: len: %w", err)
	}
	return n, nil
}

// Claim implements Backend. It records each attempt as begin does, with
// the claim in claimedBucket; attempts deferred only by a rate limit do
// not grow the backoff. The claim holds until Finish, or until the
// message is due again at its NextAttempt (the Scheduler skips its own
// attempts in progress). A nil skip skips nothing.
func (s *Store) Claim(ctx context.Context, at Start, limit int, skip func(id string) bool) (Claimed, error) {
	if err := ctx.Err(); err != nil {
		return Claimed{}, fmt.Errorf("queue: claim: %w", err)
	}
	if skip == nil {
		skip = func(string) bool { return false }
	}
	now := at.Now.Round(0)
	var c Claimed
	// Look first in a read transaction: a pass that finds nothing to claim
	// costs no write and no fsync. Messages in the journal are not there
	// yet; if one waits for a claim, the write inserts it first. (Those
	// the intake took are in progress already: no reason to commit now.)
	err := s.db.View(func(tx *bolt.Tx) error {
		if s.journal.hasDue() {
			return nil
		}
		due := tx.Bucket(dueBucket)
		if len(dueHits(due, now, limit, skip)) == 0 {
			c.Wake = nextWake(due, skip, nil)
			return errNothingDue
		}
		return nil
	})
	if errors.Is(err, errNothingDue) {
		return c, nil
	}
	if err != nil {
		return Claimed{}, storageError("claim", err)
	}

	err = s.commit.write(func(tx *bolt.Tx) error {
		s.chooseFreelistSync(tx)
		c = Claimed{}
		msgs, bodies := tx.Bucket(msgsBucket), tx.Bucket(bodiesBucket)
		due, claimed := tx.Bucket(dueBucket), tx.Bucket(claimedBucket)

		hits := dueHits(due, now, limit, skip)
		taken := make(map[string]bool, len(hits))
		for _, h := range hits {
			if h.id != "" && claimed.Get([]byte(h.id)) != nil {
				// In progress: its first attempt, taken by the intake
				// after the scheduler listed what it runs.
				continue
			}
			if err := due.Delete(h.key); err != nil {
				return err
			}
			if h.id == "" {
				continue // malformed key
			}
			id := []byte(h.id)
			v, body := msgs.Get(id), bodies.Get(id)
			if v == nil {
				continue // stale index entry
			}
			rec, err := decodeRecord(v)
			if err != nil || rec.ID != h.id || body == nil {
				c.Unreadable = append(c.Unreadable, h.id)
				continue
			}
			// The record's own index entry may differ from h.key if the
			// index held a stale duplicate; keep exactly one entry, or none
			// for a held message (whose entry was stale).
			if err := due.Delete(dueKey(rec.NextAttempt, rec.ID)); err != nil {
				return err
			}
			if rec.Held {
				continue
			}
			begin(&rec.Message, at)
			if err := putRecord(msgs, rec); err != nil {
				return err
			}
			if err := due.Put(dueKey(rec.NextAttempt, rec.ID), nil); err != nil {
				return err
			}
			if err := claimed.Put(id, inProgress); err != nil {
				return err
			}
			c.Attempts = append(c.Attempts, attemptOn(rec, bytes.Clone(body)))
			taken[h.id] = true
		}
		c.Wake = nextWake(due, skip, taken)
		return nil
	})
	if err != nil {
		return Claimed{}, storageError("claim", err)
	}
	return c, nil
}

// errNothingDue ends claim's read-only look early.
var errNothingDue = errors.New("nothing due")

// dueHit is a due index entry; id is "" for a malformed key.
type dueHit struct {
	key []byte
	id  string
}

// dueHits returns up to limit index entries due at now, in time order,
// leaving out the IDs skip rejects. Keys are copied, so the caller may
// change the bucket afterwards (a bbolt cursor must not be used across
// Put or Delete).
func dueHits(due *bolt.Bucket, now time.Time, limit int, skip func(id string) bool) []dueHit {
	var hits []dueHit
	c := due.Cursor()
	for k, _ := c.First(); k != nil && len(hits) < limit; k, _ = c.Next() {
		at, id, ok := parseDueKey(k)
		if ok && at > now.UnixNano() {
			break // keys sort by time: nothing later is due
		}
		if ok && skip(id) {
			continue
		}
		hits = append(hits, dueHit{bytes.Clone(k), id})
	}
	return hits
}

// nextWake returns the due time of the earliest message neither skipped
// nor just taken, or zero if there is none. Messages in progress are left
// out: their worker wakes the scheduler when it finishes.
func nextWake(due *bolt.Bucket, skip func(id string) bool, taken map[string]bool) time.Time {
	c := due.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		at, id, ok := parseDueKey(k)
		if ok && !taken[id] && !skip(id) {
			return time.Unix(0, at)
		}
	}
	return time.Time{}
}

// Finish implements Backend. The outcome is recorded only while the
// message is claimed with the attempt's number (attemptOn). It is committed
// at once, with whatever else is waiting (the journal's new messages): a
// delivery whose outcome a crash loses is made again, so the fewer
// milliseconds between the upstream's reply and the commit, the fewer
// duplicates a crash causes.
func (s *Store) Finish(ctx context.Context, a Attempt, events []Event, update func(m *Message) (remove bool, dsns []DSN)) (Finished, error) {
	id := a.Message.ID
	if err := ctx.Err(); err != nil {
		return Finished{}, fmt.Errorf("queue: finish %s: %w", id, err)
	}
	left := s.now().Round(0)
	var posts []WebhookPost
	if !a.Message.DSN {
		posts = webhookPosts(s.subs, &a.Message, events)
	}
	key := []byte(id)
	var (
		f                    Finished
		added                []DSN // the DSNs stored, for the observer
		spooled, gone, stale bool
	)
	err := s.commit.write(func(tx *bolt.Tx) error {
		s.chooseFreelistSync(tx)
		f, added, spooled, gone, stale = Finished{}, nil, false, false, false
		msgs, bodies, due := tx.Bucket(msgsBucket), tx.Bucket(bodiesBucket), tx.Bucket(dueBucket)
		v := msgs.Get(key)
		if v == nil {
			gone = true
			return nil
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return err
		}
		claimed := tx.Bucket(claimedBucket)
		if claimed.Get(key) == nil || uint64(rec.Attempts) != a.Token {
			stale = true
			return nil
		}
		oldDue := dueKey(rec.NextAttempt, id)
		oldReceived := receivedKey(rec.Received, id)
		spooled = rec.Spooled
		remove, add := update(&rec.Message)
		f, added = Finished{Message: rec.Message, Removed: remove}, add
		if err := claimed.Delete(key); err != nil {
			return err
		}
		if err := putWebhooks(tx, posts); err != nil {
			return err
		}
		for _, n := range add {
			rec := record{Message: n.Message}
			v, err := encodeRecord(&rec)
			if err != nil {
				return err
			}
			if err := s.insert(tx, &rec, v, n.Body, false); err != nil {
				return err
			}
		}
		if err := due.Delete(oldDue); err != nil {
			return err
		}
		if remove {
			if err := s.leaveHistory(tx, id, left, finishedOutcome(rec.Message), events...); err != nil {
				return err
			}
			if err := tx.Bucket(receivedBucket).Delete(oldReceived); err != nil {
				return err
			}
			if err := addCounts(tx, -1, -b2i(rec.Held)); err != nil {
				return err
			}
			if err := msgs.Delete(key); err != nil {
				return err
			}
			return bodies.Delete(key)
		}
		if err := s.addHistory(tx, id, events...); err != nil {
			return err
		}
		// A message put on hold during the attempt stays out of the index.
		if !rec.Held {
			if err := due.Put(dueKey(rec.NextAttempt, id), nil); err != nil {
				return err
			}
		}
		return putRecord(msgs, rec)
	})
	switch {
	case err != nil:
		return Finished{}, storageError("finish "+id, err)
	case gone:
		return Finished{}, fmt.Errorf("queue: finish %s: %w", id, ErrNotFound)
	case stale:
		return Finished{}, fmt.Errorf("queue: finish %s: %w", id, ErrClaimLost)
	}
	if f.Removed && spooled {
		s.removeSpool(id) // after the commit: a crash in between leaves an orphan for Open
	}
	if s.observer != nil {
		for _, n := range added {
			s.observer.DSNQueued(n.Kind)
		}
		if f.Removed {
			s.observer.Finished(f.Message, finishedOutcome(f.Message))
		}
	}
	if len(added) > 0 {
		s.notify() // send the DSNs now, not at the next pass
	}
	return f, nil
}

func putRecord(b *bolt.Bucket, rec *record) error {
	v, err := encodeRecord(rec)
	if err != nil {
		return err
	}
	return b.Put([]byte(rec.ID), v)
}

func encodeRecord(rec *record) ([]byte, error) {
	j, err := json.Marshal(rec)
	if err != nil {
		return nil, fmt.Errorf("encode record: %w", err)
	}
	return append([]byte{recordVersion}, j...), nil
}

func decodeRecord(b []byte) (*record, error) {
	if len(b) == 0 {
		return nil, errors.New("decode record: empty")
	}
	if b[0] != recordVersion {
		return nil, fmt.Errorf("decode record: unknown version %d", b[0])
	}
	var rec record
	if err := json.Unmarshal(b[1:], &rec); err != nil {
		return nil, fmt.Errorf("decode record: %w", err)
	}
	if rec.ID == "" {
		return nil, errors.New("decode record: no id")
	}
	if len(rec.Recipients) == 0 {
		return nil, errors.New("decode record: no recipients")
	}
	return &rec, nil
}

// decodeMessage decodes a stored record. It returns an error, never
// panics, on any input; FuzzDecodeMessage holds it to that.
func decodeMessage(b []byte) (*Message, error) {
	rec, err := decodeRecord(b)
	if err != nil {
		return nil, err
	}
	return &rec.Message, nil
}

func dueKey(t time.Time, id string) []byte {
	k := make([]byte, 8, 8+len(id))
	binary.BigEndian.PutUint64(k, uint64(t.UnixNano()))
	return append(k, id...)
}

func parseDueKey(k []byte) (unixNano int64, id string, ok bool) {
	if len(k) <= 8 {
		return 0, "", false
	}
	return int64(binary.BigEndian.Uint64(k[:8])), string(k[8:]), true
}

// storageError wraps err for op. bbolt loses the cause of a failed file
// resize (it formats it with %s), so a full disk is recognised by its
// text there and re-attached, keeping errors.Is(err, syscall.ENOSPC) true
// for callers that answer 452 4.3.1 on a full disk.
func storageError(op string, err error) error {
	if !errors.Is(err, syscall.ENOSPC) && strings.Contains(err.Error(), syscall.ENOSPC.Error()) {
		return fmt.Errorf("queue: %s: %w (%w)", op, syscall.ENOSPC, err)
	}
	return fmt.Errorf("queue: %s: %w", op, err)
}
