package queue

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// maxGroup bounds how many writes share one commit, so that one commit
// stays short enough for the writers that wait on it.
const maxGroup = 1000

// ErrClosed is returned for a write to a store that has been closed.
var ErrClosed = errors.New("queue: closed")

// committer is the queue's group commit. Every write (a new message, a
// claim, an outcome) is a function queued for one goroutine, which runs
// whatever has queued up in a single bbolt transaction: one commit, and
// its fsyncs, for all of them. It starts a commit as soon as the previous
// one ends, with no timer: a lone writer waits for its own commit only,
// and writers that arrive during a commit share the next one. (bbolt's own
// Batch waits a fixed delay before each commit, which costs a single
// session that delay on every message.)
type committer struct {
	db   *bolt.DB
	reqs chan commitReq

	// failing is set by a commit that fails and cleared by one that
	// succeeds: while it is set the queue cannot be written (a full disk,
	// an I/O error), and the relay is not ready. A writer's own error is
	// not a failure of the commit and changes nothing.
	failing atomic.Bool
	// probe, if set, is a small write that run commits every probeEvery
	// while failing and idle, so that failing clears by itself once the
	// file can be written again, with no traffic.
	probe func(*bolt.Tx) error
	// changed, if set, is told when failing changes, with the error of the
	// commit that set it.
	changed func(failing bool, err error)
	// prelude, if set, runs first in every write transaction: it inserts
	// the journal's pending messages (journal.go), so that a write about
	// a message never commits before its insert. Its mark is handed to
	// committedMark once that transaction is on disk.
	prelude       func(*bolt.Tx) (mark uint64, err error)
	committedMark func(mark uint64)

	mu     sync.RWMutex // read-held while sending on reqs; Close takes it
	closed bool
	done   chan struct{} // closed when run returns
}

type commitReq struct {
	fn     func(*bolt.Tx) error
	err    chan error
	lazy   bool // may wait lazyDelay for a write that is waited on
	client bool // a client waits for it to answer 250
}

// lazyDelay is how long a group of lazy writes waits for another write to
// share its commit. It waits only while clients are submitting (a client
// write within lazyActive), so that lazy writes alone, as when a backlog
// drains, never wait. New messages are already on disk in the journal and
// nobody waits for their commit (nudge): they wait for the next outcome's
// commit, or lazyDelay, so that several share one commit's page writes
// and fsyncs.
const (
	lazyDelay  = 20 * time.Millisecond
	lazyActive = 100 * time.Millisecond
)

// probeEvery spaces the probe writes while commits fail.
const probeEvery = time.Second

func newCommitter(db *bolt.DB, probe func(*bolt.Tx) error, changed func(failing bool, err error)) *committer {
	c := &committer{db: db, reqs: make(chan commitReq, maxGroup), done: make(chan struct{}), probe: probe, changed: changed}
	go c.run()
	return c
}

// healthy reports whether the last commit succeeded (or none failed yet).
func (c *committer) healthy() bool { return !c.failing.Load() }

// committed records the outcome of a commit.
func (c *committer) committed(err error) {
	if failing := err != nil; c.failing.Swap(failing) != failing && c.changed != nil {
		c.changed(failing, err)
	}
}

// update runs fn in a write transaction of its own, outside the group,
// and records whether the commit worked: fn's own error says nothing of
// the storage.
func (c *committer) update(fn func(*bolt.Tx) error) error {
	var fnErr error
	var mark uint64
	err := c.db.Update(func(tx *bolt.Tx) error {
		var err error
		if mark, err = c.runPrelude(tx); err != nil {
			return err
		}
		fnErr = safely(fn, tx)
		return fnErr
	})
	if fnErr == nil && !errors.Is(err, berrors.ErrDatabaseNotOpen) {
		c.committed(err)
	}
	if err == nil {
		c.markCommitted(mark)
	}
	return err
}

// runPrelude runs the prelude in tx, if there is one.
func (c *committer) runPrelude(tx *bolt.Tx) (uint64, error) {
	if c.prelude == nil {
		return 0, nil
	}
	return c.prelude(tx)
}

// markCommitted hands a committed transaction's prelude mark on.
func (c *committer) markCommitted(mark uint64) {
	if c.committedMark != nil {
		c.committedMark(mark)
	}
}

// nudge asks for a commit and does not wait for it: the journal's pending
// messages then go into bbolt with the writes of the next moment. It counts
// as a client's write, so that outcomes wait lazyDelay to share its commit.
func (c *committer) nudge() {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if !c.closed {
		c.reqs <- commitReq{fn: func(*bolt.Tx) error { return nil }, err: make(chan error, 1), lazy: true, client: true}
	}
}

// write runs fn in a write transaction shared with other writers, and
// returns once that transaction is committed, or failed. fn may run more
// than once, as with bbolt's Batch: when another function of the group
// fails, the group is committed without it and it is told to run alone.
func (c *committer) write(fn func(*bolt.Tx) error) error {
	return c.send(commitReq{fn: fn, err: make(chan error, 1)})
}

// writeLazy is write for a change that nobody waits on and that may come
// late, such as the pruning of old histories: it may wait lazyDelay for a
// write that somebody waits on, so that both share one commit.
func (c *committer) writeLazy(fn func(*bolt.Tx) error) error {
	return c.send(commitReq{fn: fn, err: make(chan error, 1), lazy: true})
}

// writeClient is write for a new message, whose client waits for the
// commit to be answered 250.
func (c *committer) writeClient(fn func(*bolt.Tx) error) error {
	return c.send(commitReq{fn: fn, err: make(chan error, 1), client: true})
}

func (c *committer) send(req commitReq) error {
	fn := req.fn
	c.mu.RLock()
	if c.closed {
		c.mu.RUnlock()
		return ErrClosed
	}
	c.reqs <- req
	c.mu.RUnlock()
	err := <-req.err
	if errors.Is(err, errRunAlone) {
		err = c.update(fn)
	}
	return err
}

// close lets the queued writes finish and stops the goroutine.
func (c *committer) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.reqs)
	}
	c.mu.Unlock()
	<-c.done
}

// errRunAlone tells a writer that its function failed in a group and is
// to run in a transaction of its own, where its error is its own.
var errRunAlone = errors.New("queue: run the write alone")

func (c *committer) run() {
	defer close(c.done)
	group := make([]commitReq, 0, maxGroup)
	wait := time.NewTimer(lazyDelay)
	wait.Stop()
	var lastClient time.Time
	probe := time.NewTimer(probeEvery)
	probe.Stop()
	for {
		req, ok := c.next(probe)
		if !ok {
			return
		}
		group = append(group[:0], req)
		urgent, client := !req.lazy, req.client
		open := true
	more:
		for len(group) < maxGroup {
			select {
			case r, ok := <-c.reqs:
				if !ok {
					open = false
					break more
				}
				group = append(group, r)
				urgent = urgent || !r.lazy
				client = client || r.client
			default:
				break more
			}
		}
		if client {
			lastClient = time.Now()
		}
		if !urgent && open && len(group) < maxGroup && time.Since(lastClient) < lazyActive {
			// Only lazy writes: give a waited-on one a moment to join.
			wait.Reset(lazyDelay)
		lazy:
			for len(group) < maxGroup {
				select {
				case r, ok := <-c.reqs:
					if !ok {
						break lazy
					}
					group = append(group, r)
					if !r.lazy {
						break lazy
					}
				case <-wait.C:
					break lazy
				}
			}
			wait.Stop()
		}
		c.commit(group)
	}
}

// next waits for the next write and returns it, or false once closed.
// While commits fail and no write comes, it commits the probe write every
// probeEvery.
func (c *committer) next(probe *time.Timer) (commitReq, bool) {
	for {
		if c.probe == nil || c.healthy() {
			req, ok := <-c.reqs
			return req, ok
		}
		probe.Reset(probeEvery)
		select {
		case req, ok := <-c.reqs:
			probe.Stop()
			return req, ok
		case <-probe.C:
			c.update(c.probe)
		}
	}
}

// commit runs the group in one transaction. A function that fails is
// taken out and told to run alone, and the rest are tried again, so that
// one writer's error never undoes another's write.
func (c *committer) commit(group []commitReq) {
	for len(group) > 0 {
		failed := -1
		var mark uint64
		err := c.db.Update(func(tx *bolt.Tx) error {
			var err error
			if mark, err = c.runPrelude(tx); err != nil {
				return err
			}
			for i, r := range group {
				if err := safely(r.fn, tx); err != nil {
					failed = i
					return err
				}
			}
			return nil
		})
		if failed >= 0 {
			group[failed].err <- errRunAlone
			group = append(group[:failed], group[failed+1:]...)
			continue
		}
		c.committed(err)
		if err == nil {
			c.markCommitted(mark)
		}
		for _, r := range group {
			r.err <- err
		}
		return
	}
}

// safely runs fn, turning a panic into an error, so that one faulty
// writer cannot stop the goroutine that every writer waits on.
func safely(fn func(*bolt.Tx) error, tx *bolt.Tx) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("queue: write panicked: %v", p)
		}
	}()
	return fn(tx)
}
