package queue

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync"

	bolt "go.etcd.io/bbolt"
)

// The journal makes a new message durable with one write and one
// fdatasync, and leaves the bbolt commit, whose two fdatasyncs of
// scattered pages are most of the time a client waits for its 250, to be
// shared by many messages a moment later.
//
// A Put writes the message's record and body as one entry at the journal's
// tail, syncs the file and answers; the entry is then pending. Every bbolt
// write transaction first inserts every pending entry, with the sequence
// number of the last one (journalKey), and once it commits they are no
// longer pending. So a write about a message (its outcome, an admin's
// hold) always commits with or after its insert, and bbolt is never
// written without its fsyncs.
//
// Entries are written from the start of the file again once none is
// pending, over the old ones. Open reads the entries that follow each
// other from the start of the file, each with the next sequence number and
// a matching checksum, and makes those past journalKey pending again: a
// torn entry, or an old one past the new tail, ends the chain.

// journalKey in metaBucket holds the sequence number of the last journal
// entry inserted: be64.
var journalKey = []byte("journal")

// Limits of the journal. Past maxJournalPending bytes waiting for their
// commit, or maxJournalSize of file, Puts commit to bbolt themselves
// (which inserts the pending entries first), so that a stalled commit
// never lets memory or the file grow without bound; a file that grew past
// shrinkJournalSize is truncated once nothing is pending.
const (
	maxJournalPending = 64 << 20
	maxJournalSize    = 256 << 20
	shrinkJournalSize = 64 << 20
	// journalHeader is crc32c ‖ be32 length of the rest ‖ be64 sequence
	// number ‖ be32 length of the record; the record and the body follow.
	journalHeader   = 4 + 4 + 8 + 4
	maxJournalEntry = 1 << 30
)

var crc32c = crc32.MakeTable(crc32.Castagnoli)

// errJournalFull sends a Put to bbolt directly (see the limits above).
var errJournalFull = errors.New("queue: journal full")

// journalEntry is a new message waiting in the journal for its commit.
type journalEntry struct {
	seq   uint64
	rec   record
	v     []byte // rec, encoded
	body  []byte
	posts []WebhookPost
	taken bool // claimed by the intake: inserted as in progress
}

// journalReq is a Put waiting for its entry to be on disk.
type journalReq struct {
	e   *journalEntry
	err chan error
}

// journal is the file and the entries pending in it. One goroutine (run)
// writes: it takes the Puts that queued up, writes them with one write
// and one fdatasync, and answers each.
type journal struct {
	f       *os.File
	reqs    chan journalReq
	done    chan struct{}
	exists  func(ids []string) (map[string]bool, error) // in bbolt
	closeMu sync.RWMutex                                // read-held while sending on reqs
	closed  bool

	mu      sync.Mutex
	pending []*journalEntry // written, not yet committed to bbolt, in order
	ids     map[string]bool // of pending
	size    int64           // bytes of pending records and bodies
	seq     uint64          // the last sequence number given
	end     int64           // where the next entry goes
}

// add writes e and returns once it is on disk; ErrExists if its ID is
// pending or in bbolt, errJournalFull or a storage error if it cannot be
// taken, and then nothing of it is kept.
func (j *journal) add(e *journalEntry) error {
	req := journalReq{e: e, err: make(chan error, 1)}
	j.closeMu.RLock()
	if j.closed {
		j.closeMu.RUnlock()
		return ErrClosed
	}
	j.reqs <- req
	j.closeMu.RUnlock()
	return <-req.err
}

func (j *journal) run() {
	defer close(j.done)
	batch := make([]journalReq, 0, maxGroup)
	for req := range j.reqs {
		batch = append(batch[:0], req)
	more:
		for len(batch) < maxGroup {
			select {
			case r, ok := <-j.reqs:
				if !ok {
					break more
				}
				batch = append(batch, r)
			default:
				break more
			}
		}
		j.write(batch)
	}
}

// write writes a batch of entries at the tail and syncs the file, then
// makes them pending and answers their Puts.
func (j *journal) write(batch []journalReq) {
	ids := make([]string, len(batch))
	for i, r := range batch {
		ids[i] = r.e.rec.ID
	}
	inBolt, err := j.exists(ids)
	if err != nil {
		for _, r := range batch {
			r.err <- err
		}
		return
	}

	j.mu.Lock()
	if len(j.pending) == 0 && j.end > 0 {
		// Every entry is in bbolt: start over at the top of the file.
		j.end = 0
		if fi, err := j.f.Stat(); err == nil && fi.Size() > shrinkJournalSize {
			j.f.Truncate(0)
		}
	}
	start, seq, size := j.end, j.seq, j.size
	var buf []byte
	var ok []journalReq
	seen := map[string]bool{}
	for _, r := range batch {
		e := r.e
		switch {
		case j.ids[e.rec.ID] || seen[e.rec.ID] || inBolt[e.rec.ID]:
			r.err <- ErrExists
			continue
		case size > maxJournalPending || start+int64(len(buf)) > maxJournalSize:
			r.err <- errJournalFull
			continue
		}
		seen[e.rec.ID] = true
		seq++
		e.seq = seq
		size += int64(len(e.v) + len(e.body))
		buf = appendJournalEntry(buf, e)
		ok = append(ok, r)
	}
	// Whatever happens to the write, these numbers are not given again:
	// an entry that reached the disk although its write failed must not
	// continue the chain of the next ones.
	j.seq = seq
	j.mu.Unlock()
	if len(ok) == 0 {
		return
	}

	_, err = j.f.WriteAt(buf, start)
	if err == nil {
		err = datasync(j.f)
	}
	if err != nil {
		err = storageError("journal", err)
		for _, r := range ok {
			r.err <- err
		}
		return
	}
	j.mu.Lock()
	for _, r := range ok {
		j.pending = append(j.pending, r.e)
		j.ids[r.e.rec.ID] = true
	}
	j.size = size
	j.end = start + int64(len(buf))
	j.mu.Unlock()
	for _, r := range ok {
		r.err <- nil
	}
}

// appendJournalEntry appends e as the journal stores it.
func appendJournalEntry(buf []byte, e *journalEntry) []byte {
	at := len(buf)
	buf = append(buf, make([]byte, journalHeader)...)
	h := buf[at:]
	binary.BigEndian.PutUint32(h[4:], uint32(journalHeader-8+len(e.v)+len(e.body)))
	binary.BigEndian.PutUint64(h[8:], e.seq)
	binary.BigEndian.PutUint32(h[16:], uint32(len(e.v)))
	buf = append(buf, e.v...)
	buf = append(buf, e.body...)
	binary.BigEndian.PutUint32(buf[at:], crc32.Checksum(buf[at+4:], crc32c))
	return buf
}

// pendingEntries returns the entries waiting for their commit.
func (j *journal) pendingEntries() []*journalEntry {
	j.mu.Lock()
	defer j.mu.Unlock()
	return append([]*journalEntry(nil), j.pending...)
}

// holds reports whether the message id waits in the journal.
func (j *journal) holds(id string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.ids[id]
}

// hasDue reports whether an entry that the intake did not take waits for
// its commit: a message that only a claim will start.
func (j *journal) hasDue() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, e := range j.pending {
		if !e.taken {
			return true
		}
	}
	return false
}

// hasPending reports whether an entry waits for its commit.
func (j *journal) hasPending() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.pending) > 0
}

// committed drops the entries up to seq, now in bbolt, and reports
// whether one of them was not taken by the intake: due for the scheduler.
func (j *journal) committed(seq uint64) (due bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	n := 0
	for n < len(j.pending) && j.pending[n].seq <= seq {
		e := j.pending[n]
		delete(j.ids, e.rec.ID)
		j.size -= int64(len(e.v) + len(e.body))
		due = due || !e.taken
		j.pending[n] = nil
		n++
	}
	j.pending = j.pending[n:]
	return due
}

// stop stops the writer once the queued Puts are answered; later ones get
// ErrClosed.
func (j *journal) stop() {
	j.closeMu.Lock()
	if !j.closed {
		j.closed = true
		close(j.reqs)
	}
	j.closeMu.Unlock()
	<-j.done
}

// close stops the writer and closes the file. A file with nothing pending
// is emptied; one with entries is left for the next Open.
func (j *journal) close() error {
	j.stop()
	if !j.hasPending() {
		j.f.Truncate(0)
	}
	return j.f.Close()
}

// readJournal reads the chain of entries from the start of r, calling fn
// for each; it stops at the first that is torn, fails its checksum or does
// not follow the one before. It returns the last sequence number read and
// the offset after its entry.
func readJournal(r io.Reader, fn func(seq uint64, v, body []byte) error) (last uint64, end int64, err error) {
	br := bufio.NewReaderSize(r, 1<<20)
	var h [journalHeader]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return last, end, nil // the end, or a torn header
		}
		n := binary.BigEndian.Uint32(h[4:])
		seq := binary.BigEndian.Uint64(h[8:])
		vlen := binary.BigEndian.Uint32(h[16:])
		if n < journalHeader-8 || n > maxJournalEntry || vlen > n-(journalHeader-8) || (last != 0 && seq != last+1) {
			return last, end, nil
		}
		rest := make([]byte, n-(journalHeader-8))
		if _, err := io.ReadFull(br, rest); err != nil {
			return last, end, nil
		}
		crc := crc32.Update(crc32.Checksum(h[4:], crc32c), crc32c, rest)
		if crc != binary.BigEndian.Uint32(h[:4]) {
			return last, end, nil
		}
		if err := fn(seq, rest[:vlen], rest[vlen:]); err != nil {
			return last, end, err
		}
		last, end = seq, end+8+int64(n)
	}
}

// openJournal opens the journal beside the queue file. The entries that a
// stop left out of bbolt are pending again, to be inserted by the first
// commit, as when they were written: Open does not fail on a full disk
// for them. It returns how many there are.
func (s *Store) openJournal() (int, error) {
	f, err := os.OpenFile(s.path+".journal", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return 0, fmt.Errorf("open journal: %w", err)
	}
	// The file's own name must be on disk before an entry synced in it
	// counts: it may have just been made.
	if err := syncDir(filepath.Dir(s.path)); err != nil {
		f.Close()
		return 0, fmt.Errorf("sync the journal's directory: %w", err)
	}
	var applied uint64
	if err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(metaBucket).Get(journalKey); len(v) == 8 {
			applied = binary.BigEndian.Uint64(v)
		}
		return nil
	}); err != nil {
		f.Close()
		return 0, err
	}
	j := &journal{f: f, reqs: make(chan journalReq, maxGroup), done: make(chan struct{}),
		exists: s.existing, ids: map[string]bool{}}
	last, end, err := readJournal(f, func(seq uint64, v, body []byte) error {
		if seq <= applied {
			return nil
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return fmt.Errorf("journal entry %d: %w", seq, err)
		}
		j.pending = append(j.pending, &journalEntry{seq: seq, rec: *rec, v: v, body: body, posts: acceptedPosts(s.subs, &rec.Message)})
		j.ids[rec.ID] = true
		j.size += int64(len(v) + len(body))
		return nil
	})
	if err != nil {
		f.Close()
		return 0, fmt.Errorf("read journal: %w", err)
	}
	j.seq = max(last, applied)
	if len(j.pending) > 0 {
		j.end = end // new entries follow the chain
	}
	s.journal = j
	go j.run()
	return len(j.pending), nil
}

// insertJournal inserts entries into tx, and records last as the last
// entry in bbolt. An entry whose ID is already there is not inserted again.
func (s *Store) insertJournal(tx *bolt.Tx, entries []*journalEntry, last uint64) error {
	for _, e := range entries {
		err := s.insert(tx, &e.rec, e.v, e.body, e.taken)
		if errors.Is(err, ErrExists) {
			s.log.Error("queue: a journal entry's ID is already in the queue; not inserted again", "queue_id", e.rec.ID)
			continue
		}
		if err != nil {
			return err
		}
		if err := putWebhooks(tx, e.posts); err != nil {
			return err
		}
	}
	return tx.Bucket(metaBucket).Put(journalKey, binary.BigEndian.AppendUint64(nil, last))
}

// applyJournal inserts the pending entries into tx, the first thing every
// write transaction does; it returns the last one's sequence number, 0 if
// none, for committed once the transaction is on disk.
func (s *Store) applyJournal(tx *bolt.Tx) (uint64, error) {
	entries := s.journal.pendingEntries()
	// A transaction that committed may not have told committed yet, and
	// its entries may have left the queue since: the file says which are
	// in.
	if v := tx.Bucket(metaBucket).Get(journalKey); len(v) == 8 {
		applied := binary.BigEndian.Uint64(v)
		for len(entries) > 0 && entries[0].seq <= applied {
			entries = entries[1:]
		}
	}
	if len(entries) == 0 {
		return 0, nil
	}
	s.chooseFreelistSync(tx)
	last := entries[len(entries)-1].seq
	return last, s.insertJournal(tx, entries, last)
}

// journalCommitted is told by the committer which entries a commit
// stored.
func (s *Store) journalCommitted(seq uint64) {
	if seq > 0 && s.journal.committed(seq) {
		s.notify()
	}
}

// existing returns which of ids are in bbolt.
func (s *Store) existing(ids []string) (map[string]bool, error) {
	found := map[string]bool{}
	err := s.db.View(func(tx *bolt.Tx) error {
		msgs := tx.Bucket(msgsBucket)
		for _, id := range ids {
			if msgs.Get([]byte(id)) != nil {
				found[id] = true
			}
		}
		return nil
	})
	return found, err
}

// settle commits the pending entries, so that a read sees every message
// already answered 250. Reads by ID or by list call it; the scheduler's
// do not need to, since a message is due only once committed.
func (s *Store) settle() {
	if s.journal.hasPending() {
		s.commit.write(func(*bolt.Tx) error { return nil })
	}
}
