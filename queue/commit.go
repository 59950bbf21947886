package queue

import (
	"errors"
	"fmt"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
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
// drains, never wait.
const (
	lazyDelay  = 5 * time.Millisecond
	lazyActive = 100 * time.Millisecond
)

func newCommitter(db *bolt.DB) *committer {
	c := &committer{db: db, reqs: make(chan commitReq, maxGroup), done: make(chan struct{})}
	go c.run()
	return c
}

// write runs fn in a write transaction shared with other writers, and
// returns once that transaction is committed, or failed. fn may run more
// than once, as with bbolt's Batch: when another function of the group
// fails, the group is committed without it and it is told to run alone.
func (c *committer) write(fn func(*bolt.Tx) error) error {
	return c.send(commitReq{fn: fn, err: make(chan error, 1)})
}

// writeLazy is write for a change that nobody waits on to answer a
// client, such as the outcome of a delivery: it may wait lazyDelay for a
// write that somebody waits on, so that both share one commit. With a
// single session submitting, that halves the commits per message.
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
		err = c.db.Update(func(tx *bolt.Tx) error { return safely(fn, tx) })
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
	for req := range c.reqs {
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

// commit runs the group in one transaction. A function that fails is
// taken out and told to run alone, and the rest are tried again, so that
// one writer's error never undoes another's write.
func (c *committer) commit(group []commitReq) {
	for len(group) > 0 {
		failed := -1
		err := c.db.Update(func(tx *bolt.Tx) error {
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
