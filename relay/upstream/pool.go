package upstream

import (
	"context"
	"slices"
	"sync"
	"time"
)

const defaultMaxConnections = 4

// maxConnections is how many connections to up may be open at once.
func (up *Upstream) maxConnections() int {
	if up.MaxConnections <= 0 {
		return defaultMaxConnections
	}
	return up.MaxConnections
}

// pool holds one upstream's open connections, busy and idle, at most
// MaxConnections of them. A connection goes back to the pool after a
// transaction that left it usable, and carries the next message after RSET;
// one that has been idle for IdleTimeout is closed.
type pool struct {
	mu    sync.Mutex
	limit int
	open  int             // connections open or being opened, busy or idle
	idle  []*upstreamConn // most recently used last
	freed chan struct{}   // closed and replaced when a connection goes idle or closes
	// closed: the pool keeps no idle connections, since the Deliverer
	// was closed or a reload dropped the upstream.
	closed bool
}

func newPool(limit int, closed bool) *pool {
	return &pool{limit: limit, closed: closed}
}

// take returns the most recently used idle connection, so that those
// beyond the current need stay idle and time out. Else, while fewer than
// the limit are open, it reserves the place of a new connection
// (reserved), which the caller opens, or gives back with free. Else it
// returns a channel that is closed when a connection goes idle or closes.
func (p *pool) take() (uc *upstreamConn, reserved bool, freed <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.idle); n > 0 {
		uc = p.idle[n-1]
		p.idle = p.idle[:n-1]
		return uc, false, nil
	}
	if p.open < p.limit {
		p.open++
		return nil, true, nil
	}
	if p.freed == nil {
		p.freed = make(chan struct{})
	}
	return nil, false, p.freed
}

// put keeps uc for reuse, to be closed after idle without use. It reports
// false when the pool keeps no idle connections: the caller discards uc.
func (p *pool) put(uc *upstreamConn, idle time.Duration) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.idle = append(p.idle, uc)
	uc.idleTimer = time.AfterFunc(idle, func() { p.expire(uc) })
	p.signal()
	return true
}

// expire closes uc if it is still idle.
func (p *pool) expire(uc *upstreamConn) {
	p.mu.Lock()
	i := slices.Index(p.idle, uc)
	if i >= 0 {
		p.idle = slices.Delete(p.idle, i, i+1)
	}
	p.mu.Unlock()
	if i >= 0 { // else taken by a delivery, or closed
		p.discard(uc, true)
	}
}

// discard closes a connection taken out of the pool and frees its place.
// The place is freed only once the connection is closed, so that the
// upstream never sees more than the limit at a time.
func (p *pool) discard(uc *upstreamConn, quit bool) {
	uc.close(quit)
	p.free()
}

// free gives back the place of a connection that closed or never opened.
func (p *pool) free() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.open--
	p.signal()
}

// setLimit changes how many connections may be open; deliveries waiting
// for a place look again.
func (p *pool) setLimit(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.limit = n
	p.signal()
}

// signal wakes the deliveries waiting for a place. p.mu is held.
func (p *pool) signal() {
	if p.freed != nil {
		close(p.freed)
		p.freed = nil
	}
}

// close makes the pool keep no idle connections from now on, and ends
// those it holds with QUIT. Busy connections are closed when their
// deliveries end.
func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, uc := range idle {
		wg.Go(func() {
			uc.idleTimer.Stop()
			p.discard(uc, true)
		})
	}
	wg.Wait()
}

// size returns how many connections are open, busy or idle, and how many
// of them are idle.
func (p *pool) size() (open, idle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open, len(p.idle)
}

// getConn returns a connection to up, ready for a transaction and attached
// to ctx: the most recently used idle one, else a new one, waiting while
// MaxConnections are open. An idle connection that fails RSET is closed
// and replaced without counting against the upstream, which may close
// connections that stay idle.
func (d *Deliverer) getConn(ctx context.Context, up *Upstream, ep *endpoint) (*upstreamConn, error) {
	for {
		if ctx.Err() != nil {
			return nil, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		}
		uc, reserved, freed := ep.pool.take()
		switch {
		case uc != nil:
			uc.idleTimer.Stop() // if it has fired already, expire finds uc gone
			err := d.reuse(ctx, uc)
			if err == nil {
				return uc, nil
			}
			d.Logger.Debug("idle upstream connection unusable, opening another", "upstream", up.Name,
				"err", redactorFor(up, ep.tokens).Replace(replyText(err)))
			ep.pool.discard(uc, false)
		case reserved:
			ep.counters.dials.Add(1)
			uc, err := d.connect(ctx, up, ep.tokens)
			if err != nil {
				ep.pool.free()
				return nil, err
			}
			return uc, nil
		default:
			select {
			case <-freed:
			case <-ctx.Done():
			}
		}
	}
}

// reuse prepares an idle connection for another transaction.
func (d *Deliverer) reuse(ctx context.Context, uc *upstreamConn) error {
	uc.attach(ctx)
	// RSET (RFC 5321 section 4.1.1.5) clears whatever the last transaction
	// left, such as a MAIL whose recipients were all refused, and finds out
	// whether the upstream closed the connection while it was idle.
	if err := uc.client.Reset(); err != nil {
		return err
	}
	// go-smtp's Reset makes the client send EHLO again before the next
	// MAIL; do it now so that a failure counts against this connection
	// rather than the upstream. A later EHLO resets the session as RSET
	// does (RFC 5321 section 4.1.4), which leaves AUTH in place.
	return uc.client.Hello(d.Hostname)
}

// putConn ends a delivery's use of a connection: back to the pool when the
// transaction left it usable, else closed, with QUIT if it can still
// answer.
func (d *Deliverer) putConn(ep *endpoint, uc *upstreamConn, reusable, canQuit bool) {
	if !uc.detach() {
		// The delivery's context closed it.
		reusable, canQuit = false, false
	}
	if !reusable || !ep.pool.put(uc, d.IdleTimeout) {
		ep.pool.discard(uc, canQuit)
	}
}
