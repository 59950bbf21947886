package upstream

import (
	"context"
	"slices"
	"time"
)

const defaultMaxConnections = 4

// pool holds one upstream's open connections, busy and idle, at most
// MaxConnections of them. A connection goes back to the pool after a
// transaction that left it usable, and carries the next message after RSET;
// one that has been idle for IdleTimeout is closed. Guarded by
// Deliverer.mu.
type pool struct {
	open  int             // connections open or being opened, busy or idle
	idle  []*upstreamConn // most recently used last
	freed chan struct{}   // closed and replaced when a connection goes idle or closes
}

// wake returns a channel that is closed when a connection goes idle or
// closes.
func (p *pool) wake() <-chan struct{} {
	if p.freed == nil {
		p.freed = make(chan struct{})
	}
	return p.freed
}

func (p *pool) signal() {
	if p.freed != nil {
		close(p.freed)
		p.freed = nil
	}
}

// getConn returns a connection to up, ready for a transaction and attached
// to ctx: the most recently used idle one, else a new one, waiting while
// MaxConnections are open. An idle connection that fails RSET is closed
// and replaced without counting against the upstream, which may close
// connections that stay idle.
func (d *Deliverer) getConn(ctx context.Context, st *upstreamState, up *Upstream) (*upstreamConn, error) {
	limit := up.MaxConnections
	if limit <= 0 {
		limit = defaultMaxConnections
	}
	p := &st.pool
	d.mu.Lock()
	for {
		if ctx.Err() != nil {
			d.mu.Unlock()
			return nil, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		}
		if n := len(p.idle); n > 0 {
			// The most recent, so that connections beyond the current need
			// stay idle and time out.
			uc := p.idle[n-1]
			p.idle = p.idle[:n-1]
			d.mu.Unlock()
			uc.idleTimer.Stop() // if it has fired already, expire finds uc gone
			err := d.reuse(ctx, uc)
			if err == nil {
				return uc, nil
			}
			d.logger().Debug("idle upstream connection unusable, opening another", "upstream", up.Name,
				"err", d.redactor(up).Replace(replyText(err)))
			d.discard(st, uc, false)
			d.mu.Lock()
			continue
		}
		if p.open < limit {
			p.open++
			st.dials++
			d.mu.Unlock()
			uc, err := d.connect(ctx, up)
			if err != nil {
				d.mu.Lock()
				p.open--
				p.signal()
				d.mu.Unlock()
				return nil, err
			}
			return uc, nil
		}
		freed := p.wake()
		d.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
		}
		d.mu.Lock()
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
	return uc.client.Hello(d.hostname())
}

// putConn ends a delivery's use of a connection: back to the pool when the
// transaction left it usable, else closed, with QUIT if it can still
// answer.
func (d *Deliverer) putConn(st *upstreamState, uc *upstreamConn, reusable, canQuit bool) {
	if !uc.detach() {
		// The delivery's context closed it.
		reusable, canQuit = false, false
	}
	d.mu.Lock()
	if !reusable || d.closed {
		d.mu.Unlock()
		d.discard(st, uc, canQuit)
		return
	}
	st.pool.idle = append(st.pool.idle, uc)
	uc.idleTimer = time.AfterFunc(d.idleTimeout(), func() { d.expire(st, uc) })
	st.pool.signal()
	d.mu.Unlock()
}

// expire closes uc if it is still idle.
func (d *Deliverer) expire(st *upstreamState, uc *upstreamConn) {
	d.mu.Lock()
	i := slices.Index(st.pool.idle, uc)
	if i < 0 {
		d.mu.Unlock()
		return // taken by a delivery, or closed
	}
	st.pool.idle = slices.Delete(st.pool.idle, i, i+1)
	d.mu.Unlock()
	d.discard(st, uc, true)
}

// discard closes a connection taken out of the pool and frees its place.
// The place is freed only once the connection is closed, so that the
// upstream never sees more than MaxConnections at a time.
func (d *Deliverer) discard(st *upstreamState, uc *upstreamConn, quit bool) {
	uc.close(quit)
	d.mu.Lock()
	st.pool.open--
	st.pool.signal()
	d.mu.Unlock()
}

func (d *Deliverer) idleTimeout() time.Duration {
	if d.IdleTimeout <= 0 {
		return 30 * time.Second
	}
	return d.IdleTimeout
}
