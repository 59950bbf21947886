package queue

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
)

// LostMessage is a message that Salvage could not save, and why.
type LostMessage struct {
	ID     string
	Reason string
}

// SalvageReport is what Salvage saved and what it could not.
type SalvageReport struct {
	Saved int // messages stored in the new queue
	// Present counts the messages that the new queue refused as copied
	// before (ErrExists): by an earlier run into the same queue.
	Present int
	Spooled int // of them, with a spool file
	Held    int // of them, on hold
	// Journal counts the messages saved from the journal beside the file:
	// accepted, and not yet in the file when its relay stopped.
	Journal int
	// Lost are the messages known by their ID that could not be saved,
	// sorted by ID.
	Lost []LostMessage
	// Unnamed counts messages that the file's own totals say it held but
	// whose IDs are nowhere readable: every trace of them is in damaged
	// pages. It is -1 when the totals cannot be read either: how many
	// were lost is not known.
	Unnamed int
	// Unsure are the messages saved on hold because their records were
	// found only in pages that the damaged tree no longer reaches: each is
	// the latest version found, but may be an old one, or that of a
	// message that had already left the queue. Sorted.
	Unsure []string
	// Damage is what is wrong with the file, page by page.
	Damage []string
}

// salvageWorkers bounds the messages copied at once: enough for the new
// store's group commit to write many in one commit.
const salvageWorkers = 32

// Salvage is a queue file open for salvage: read only, never written, and
// locked as a reader, so that no relay opens it meanwhile.
type Salvage struct {
	f    *os.File
	path string
}

// OpenSalvage opens the queue file at path for salvage. It refuses a file
// that a running process holds (ErrLocked).
func OpenSalvage(path string) (*Salvage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("queue: salvage: %w", err)
	}
	if err := lockFile(f, false, 0); err != nil {
		f.Close()
		if errors.Is(err, ErrLocked) {
			return nil, fmt.Errorf("queue: %s is %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("queue: salvage: lock %s: %w", path, err)
	}
	return &Salvage{f: f, path: path}, nil
}

// Close closes the file.
func (s *Salvage) Close() error { return s.f.Close() }

// CopyTo copies every message that can still be read from the file into
// dst, with its full state (Import): its record, its body and its spool
// file (the file's path + ".spool/" + ID). The file is read through the
// same checked reader as Open's check, so damage cannot crash it. It
// returns an error only when the file cannot be read at all; every message
// it could not save is in the report, with the reason.
func (s *Salvage) CopyTo(ctx context.Context, dst Backend) (*SalvageReport, error) {
	fi, err := s.f.Stat()
	if err != nil {
		return nil, fmt.Errorf("queue: salvage: %w", err)
	}
	sv := &salvage{dst: dst, spool: s.path + ".spool", rep: &SalvageReport{}, recs: map[string]*record{},
		bad: map[string]string{}, seen: map[string][]string{}, withBody: map[string]bool{}, sent: map[string]bool{},
		unsure: map[string]bool{}, saved: map[string]bool{}, journaled: map[string]bool{}}
	if err := sv.listSpool(); err != nil {
		return nil, fmt.Errorf("queue: salvage: %w", err)
	}
	bf, problems, err := readBoltFile(s.f, fi.Size())
	if err != nil {
		sv.rep.Damage = []string{err.Error()}
		sv.reportUnsaved(map[string]bool{"": true})
		return sv.rep, nil
	}
	// First the records, the indexes and the totals; then the bodies,
	// each stored with its record as it is read. The bodies bucket sorts
	// first, so it is set aside and walked second.
	w := &boltWalk{f: bf, visit: sv.visit, skip: func(b string) bool { return b == string(bodiesBucket) }}
	w.start()
	w.tree("", bf.meta.root, nil, nil, 0)
	sv.store(ctx, func(jobs chan<- salvageJob) {
		w.visit = func(bucket string, k, v []byte) {
			if bucket != string(bodiesBucket) {
				return
			}
			id := string(k)
			sv.withBody[id] = true
			if rec := sv.recs[id]; rec != nil {
				sv.send(jobs, rec, v)
			} else if validSpoolID(id) {
				sv.seen[id] = append(sv.seen[id], "body")
			}
		}
		if v, ok := w.skipped[string(bodiesBucket)]; ok {
			w.bucket(string(bodiesBucket), v, bf.meta.root, 1)
		}
	})
	damaged := w.damaged
	if damaged == nil {
		damaged = map[string]bool{}
	}
	if len(problems) > 0 {
		damaged[""] = true // cut short: any page may be missing
	}
	if damaged[""] || damaged[string(msgsBucket)] || damaged[string(bodiesBucket)] {
		sv.scan(ctx, w, damaged[""] || damaged[string(msgsBucket)])
	}
	if err := sv.journal(ctx, s.path+".journal"); err != nil {
		problems = append(problems, fmt.Sprintf("journal: %v", err))
	}
	sv.rep.Damage = append(problems, w.problems...)
	sv.reportUnsaved(damaged)
	return sv.rep, nil
}

// journal saves the messages that the journal beside the file holds and
// the file does not: accepted before the relay stopped, not yet committed
// to it (journal.go). Where the file does not say which entries it holds,
// one whose ID it has no record of may also have left the queue already:
// it is saved on hold, as Unsure.
func (sv *salvage) journal(ctx context.Context, path string) error {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	sv.store(ctx, func(jobs chan<- salvageJob) {
		_, _, err = readJournal(f, func(seq uint64, v, body []byte) error {
			if sv.appliedKnown && seq <= sv.applied {
				return nil
			}
			rec, err := decodeRecord(v)
			if err != nil || !validSpoolID(rec.ID) || sv.recs[rec.ID] != nil || sv.sent[rec.ID] {
				return nil
			}
			if !sv.appliedKnown {
				rec.Held = true
				sv.unsure[rec.ID] = true
			}
			sv.recs[rec.ID] = rec
			sv.journaled[rec.ID] = true
			sv.send(jobs, rec, body)
			return nil
		})
	})
	return err
}

// scan looks for what the walk could not read in the pages that it did
// not reach: under a damaged page, or freed by bbolt. A body never
// changes, so any copy of one is the body. A record found there may be an
// old version, or that of a message that has left the queue since (bbolt
// does not clear freed pages), so of the copies of a record the latest is
// taken, and stored on hold for an operator to check (Unsure): a message
// is never sent again without one.
func (sv *salvage) scan(ctx context.Context, w *boltWalk, records bool) {
	found := map[string]*record{}
	if records {
		w.scanLeaves(func(elems []pageElem) {
			for _, e := range elems {
				id := string(e.key)
				if e.flags != 0 || sv.recs[id] != nil || sv.bad[id] != "" || !validSpoolID(id) {
					continue
				}
				rec, err := decodeRecord(e.value)
				if err != nil || rec.ID != id {
					continue
				}
				if old := found[id]; old == nil || newerRecord(rec, old) {
					found[id] = rec
				}
			}
		})
	}
	need := map[string]*record{}
	for id, rec := range sv.recs {
		if !sv.sent[id] {
			need[id] = rec
		}
	}
	for id, rec := range found {
		rec.Held = true
		sv.recs[id], need[id] = rec, rec
		sv.unsure[id] = true
	}
	if len(need) == 0 {
		return
	}
	sv.store(ctx, func(jobs chan<- salvageJob) {
		// The bodies the tree still leads to, passed over for want of a
		// record the first time: a walk of their bucket alone, whose
		// problems were found already.
		if v, ok := w.skipped[string(bodiesBucket)]; ok {
			again := &boltWalk{f: w.f, visit: func(bucket string, k, v []byte) {
				if rec := need[string(k)]; rec != nil {
					delete(need, rec.ID)
					sv.send(jobs, rec, v)
				}
			}}
			again.start()
			again.bucket(string(bodiesBucket), v, w.f.meta.root, 1)
		}
		w.scanLeaves(func(elems []pageElem) {
			for _, e := range elems {
				rec := need[string(e.key)]
				if rec == nil || e.flags != 0 || len(e.value) == 0 {
					continue // not wanted; a claim (empty)
				}
				if _, err := decodeRecord(e.value); err == nil {
					continue // a record, not a body
				}
				if isHistoryValue(rec.ID, e.value) {
					continue // its history, also keyed by its ID
				}
				delete(need, rec.ID)
				sv.withBody[rec.ID] = true
				sv.send(jobs, rec, e.value)
			}
		})
	})
}

// send hands a message to the workers that store it, with a copy of its
// body (body is only valid during the walk's call).
func (sv *salvage) send(jobs chan<- salvageJob, rec *record, body []byte) {
	sv.sent[rec.ID] = true
	jobs <- salvageJob{rec: rec, body: bytes.Clone(body)}
}

// newerRecord reports whether a is a later version of a message's record
// than b: each attempt adds to Attempts and moves LastAttempt, and an
// outcome settles recipients.
func newerRecord(a, b *record) bool {
	if a.Attempts != b.Attempts {
		return a.Attempts > b.Attempts
	}
	if !a.LastAttempt.Equal(b.LastAttempt) {
		return a.LastAttempt.After(b.LastAttempt)
	}
	if sa, sb := len(a.Pending()), len(b.Pending()); sa != sb {
		return sa < sb
	}
	return a.NextAttempt.After(b.NextAttempt)
}

// salvage is the state of one CopyTo.
type salvage struct {
	dst   Backend
	spool string // the old queue's spool directory
	rep   *SalvageReport

	recs     map[string]*record  // readable records, by ID
	bad      map[string]string   // records that do not decode: why
	seen     map[string][]string // IDs found elsewhere: in which buckets
	withBody map[string]bool     // IDs with a readable body
	sent     map[string]bool     // IDs handed to the workers to store
	unsure   map[string]bool     // records found outside the tree (scan)
	spooled  map[string]bool     // files in the old spool directory
	total    int64               // the file's count of messages; -1 unknown
	// applied is the file's journalKey: the journal's entries up to it are
	// in the file; appliedKnown is false when it could not be read.
	applied      uint64
	appliedKnown bool
	journaled    map[string]bool // IDs taken from the journal

	mu    sync.Mutex // guards rep and saved while messages are stored
	saved map[string]bool
}

type salvageJob struct {
	rec  *record
	body []byte
}

// listSpool lists the old queue's spool files.
func (sv *salvage) listSpool() error {
	sv.spooled, sv.total = map[string]bool{}, -1
	entries, err := os.ReadDir(sv.spool)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() && validSpoolID(e.Name()) {
			sv.spooled[e.Name()] = true
			sv.seen[e.Name()] = append(sv.seen[e.Name()], "spool file")
		}
	}
	return nil
}

// visit collects what the first walk finds.
func (sv *salvage) visit(bucket string, k, v []byte) {
	switch bucket {
	case string(msgsBucket):
		id := string(k)
		rec, err := decodeRecord(v)
		switch {
		case err != nil:
			sv.bad[id] = fmt.Sprintf("its record does not decode: %v", err)
		case rec.ID != id:
			sv.bad[id] = fmt.Sprintf("its record names another ID, %q", rec.ID)
		case !validSpoolID(id):
			sv.bad[id] = "its ID is not a queue ID"
		default:
			sv.recs[id] = rec
		}
	case string(dueBucket), string(receivedBucket):
		if _, id, ok := parseDueKey(k); ok && validSpoolID(id) {
			sv.seen[id] = append(sv.seen[id], "index")
		}
	case string(claimedBucket):
		if id := string(k); validSpoolID(id) {
			sv.seen[id] = append(sv.seen[id], "claim")
		}
	case string(metaBucket):
		if bytes.Equal(k, countsKey) && len(v) == 16 {
			sv.total = int64(binary.BigEndian.Uint64(v[:8])) // as writeCounts keeps it
		}
		if bytes.Equal(k, journalKey) && len(v) == 8 {
			sv.applied, sv.appliedKnown = binary.BigEndian.Uint64(v), true
		}
		if bytes.Equal(k, schemaKey) {
			// A file that names no journal entry has inserted none.
			sv.appliedKnown = true
		}
	}
}

// store runs produce, which sends the messages to store, and stores them
// with salvageWorkers at a time.
func (sv *salvage) store(ctx context.Context, produce func(chan<- salvageJob)) {
	jobs := make(chan salvageJob)
	var wg sync.WaitGroup
	for range salvageWorkers {
		wg.Go(func() {
			for j := range jobs {
				sv.storeOne(ctx, j)
			}
		})
	}
	produce(jobs)
	close(jobs)
	wg.Wait()
}

func (sv *salvage) storeOne(ctx context.Context, j salvageJob) {
	m := j.rec.Message
	var err error
	if j.rec.Spooled {
		var sf *os.File
		if sf, err = os.Open(filepath.Join(sv.spool, m.ID)); err == nil {
			err = sv.dst.Import(ctx, m, j.body, sf)
			sf.Close()
		} else if errors.Is(err, fs.ErrNotExist) {
			err = fmt.Errorf("its spool file %s is missing", filepath.Join(sv.spool, m.ID))
		}
	} else {
		err = sv.dst.Import(ctx, m, j.body, nil)
	}
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if errors.Is(err, ErrExists) {
		sv.saved[m.ID] = true
		sv.rep.Present++
		return
	}
	if err != nil {
		sv.rep.Lost = append(sv.rep.Lost, LostMessage{ID: m.ID, Reason: fmt.Sprintf("not stored in the new queue: %v", err)})
		return
	}
	sv.saved[m.ID] = true
	sv.rep.Saved++
	if sv.journaled[m.ID] {
		sv.rep.Journal++
	}
	if sv.unsure[m.ID] {
		sv.rep.Unsure = append(sv.rep.Unsure, m.ID)
	}
	if j.rec.Spooled {
		sv.rep.Spooled++
	}
	if m.Held {
		sv.rep.Held++
	}
}

// reportUnsaved adds to the report every message known by its ID that
// was not saved, and those counted but nowhere named. damaged names the
// buckets with problems ("" for the root, or the whole file): where the
// records are intact, an ID seen only in an index or as a spool file is
// a leftover of a message that already left the queue, not a loss.
func (sv *salvage) reportUnsaved(damaged map[string]bool) {
	recordsDamaged := damaged[""] || damaged[string(msgsBucket)]
	bodiesDamaged := damaged[""] || damaged[string(bodiesBucket)]
	for id, rec := range sv.recs {
		if sv.sent[id] {
			continue // stored, or failed to store (reported then)
		}
		reason := "it has no body"
		if bodiesDamaged {
			reason = "its body is in a damaged page"
		}
		if rec.Spooled && sv.spooled[id] {
			reason += fmt.Sprintf(" (the rest of its content is in %s)", filepath.Join(sv.spool, id))
		}
		sv.rep.Lost = append(sv.rep.Lost, LostMessage{ID: id, Reason: reason})
	}
	for id, why := range sv.bad {
		sv.rep.Lost = append(sv.rep.Lost, LostMessage{ID: id, Reason: why})
	}
	if recordsDamaged {
		for id, where := range sv.seen {
			if sv.recs[id] != nil || sv.bad[id] != "" {
				continue
			}
			slices.Sort(where)
			sv.rep.Lost = append(sv.rep.Lost, LostMessage{ID: id,
				Reason: "its record is in a damaged page (the ID is known from: " + strings.Join(slices.Compact(where), ", ") + ")"})
		}
	}
	slices.SortFunc(sv.rep.Lost, func(a, b LostMessage) int { return strings.Compare(a.ID, b.ID) })
	slices.Sort(sv.rep.Unsure)
	switch {
	case sv.total >= 0:
		sv.rep.Unnamed = max(int(sv.total)-sv.rep.Saved-sv.rep.Present-len(sv.rep.Lost), 0)
	case recordsDamaged:
		sv.rep.Unnamed = -1
	}
}

// isHistoryValue tells a value of historyBucket from a body: a history is
// JSON that begins with its ID, a body a header section.
func isHistoryValue(id string, v []byte) bool {
	return bytes.HasPrefix(v, []byte(`{"id":"`+id+`"`))
}
