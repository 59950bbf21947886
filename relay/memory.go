package relay

import "sync/atomic"

// The memory of sessions in DATA is bounded by configuration, not by
// traffic. Each session holds on its own its message's header section,
// which is parsed and signed in memory and must end within a fixed floor
// (headerLimit), and at least minFree bytes of it; past that, a message is
// held in memory only with bytes borrowed from one relay-wide budget
// (Limits.MessageMemory), up to the spool threshold. A session that cannot
// borrow spools the rest of its message, as a message over the threshold
// does, and then holds only its header section and two small buffers.
// So mail up to about 1 MiB is stored from memory in one commit under
// normal load, and under any load the door holds at most
// MaxConnections × floor + MessageMemory of messages.

// memoryBudget is the relay-wide budget of message bytes that sessions in
// DATA hold in memory past their floor. Its methods are safe for
// concurrent use.
type memoryBudget struct {
	limit int64
	used  atomic.Int64
}

func newMemoryBudget(limit int64) *memoryBudget {
	return &memoryBudget{limit: max(limit, 0)}
}

// take borrows n bytes, or reports that the budget cannot lend them.
func (b *memoryBudget) take(n int64) bool {
	for {
		used := b.used.Load()
		if used+n > b.limit {
			return false
		}
		if b.used.CompareAndSwap(used, used+n) {
			return true
		}
	}
}

// give returns n bytes taken earlier.
func (b *memoryBudget) give(n int64) { b.used.Add(-n) }

// inUse returns the bytes lent out now.
func (b *memoryBudget) inUse() int64 { return b.used.Load() }

// minFree is what a session may hold of its message without a loan once
// its header section is known to end before that: small messages are
// received without touching the budget.
const minFree = 16 << 10

// messageSpare is kept free at the end of a message buffer, for the empty
// line that store inserts after a header section that has none.
const messageSpare = 2

// messageBuffer is what one session in DATA reads its message into:
// headroom for the fields added at the door, then the message, which may
// take up to floor bytes of its own while its header section goes on, its
// header section or minFree once that has ended, and past them what
// budget lends, up to max. release gives the loan back; it must be called
// on every path.
type messageBuffer struct {
	budget *memoryBudget
	floor  int   // message bytes held without borrowing, at most
	free   int   // message bytes held without borrowing now
	max    int   // message bytes held at most: past them, the message is spooled
	held   int64 // borrowed from budget
	buf    []byte
}

// newMessageBuffer starts a buffer sized for a message of about hint bytes
// (SIZE= of MAIL; 0 if not declared). A declared size past the floor is
// borrowed at once, so that such a message is read without growing.
func newMessageBuffer(budget *memoryBudget, floor, maxSize int, hint int64) *messageBuffer {
	floor = min(floor, maxSize)
	mb := &messageBuffer{budget: budget, floor: floor, free: floor, max: maxSize}
	want := 4 << 10
	if hint > 0 {
		// Normalising may add bytes: a CR before each bare LF.
		want = int(min(hint+hint/32+64, int64(maxSize)))
	}
	size := min(want, floor)
	if want > floor && mb.borrow(want) {
		size = want
	}
	mb.buf = make([]byte, headroom, headroom+size+messageSpare)
	return mb
}

// borrow makes the loan what a message of size bytes needs past what the
// session may hold on its own.
func (mb *messageBuffer) borrow(size int) bool {
	need := int64(size-mb.free) - mb.held
	if need <= 0 {
		return true
	}
	if !mb.budget.take(need) {
		return false
	}
	mb.held += need
	return true
}

// size is how many message bytes the buffer can hold now.
func (mb *messageBuffer) size() int { return cap(mb.buf) - headroom - messageSpare }

// read reads the message from norm until it ends (spool false) or until
// holding more would pass max or what the budget lends (spool true: the
// rest is to be spooled). The buffer grows by doubling, never by append:
// each fill is given a limit such that normalising, which can double what
// it reads, stays within the capacity.
func (mb *messageBuffer) read(norm *normalizer) (spool bool, err error) {
	for {
		end := cap(mb.buf) - messageSpare
		// fill ends within 2·limit − len + 4 bytes; see normalizer.fill.
		if limit := (end + len(mb.buf) - 4) / 2; limit > len(mb.buf) {
			if mb.buf, err = norm.fill(mb.buf, limit); err != nil {
				return false, err
			}
			if norm.eof {
				return false, nil
			}
			continue
		}
		size := mb.size()
		if size >= mb.max {
			return true, nil
		}
		if mb.free == mb.floor {
			// Once the header section has ended, the session holds only
			// it, or minFree, without a loan. One that goes on past the
			// floor is refused: nothing more is read for it.
			end, _, ended := headerSection(mb.message(), false)
			switch {
			case ended:
				mb.free = min(mb.floor, max(end+2, minFree))
			case size >= mb.floor:
				return true, nil
			}
		}
		next := min(2*size, mb.max)
		if !mb.borrow(next) {
			if size >= mb.free {
				return true, nil
			}
			next = mb.free // no loan needed
		}
		grown := make([]byte, len(mb.buf), headroom+next+messageSpare)
		copy(grown, mb.buf)
		mb.buf = grown
	}
}

// message returns what was read, after the headroom.
func (mb *messageBuffer) message() []byte { return mb.buf[headroom:] }

// release gives the loan back and drops the buffer. It may be called more
// than once.
func (mb *messageBuffer) release() {
	mb.budget.give(mb.held)
	mb.held = 0
	mb.buf = nil
}
