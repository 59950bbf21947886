package upstream

import (
	"context"
	"time"
)

// rateLog enforces an upstream's Rate: at most N transactions in any
// window of Per. Providers' quotas are rolling windows (Gmail: 2000 in any
// 24 hours), which a token bucket does not respect: a full bucket lets N
// through at once and refills N more within the same window. So the log
// keeps the end times of the last N transactions in a ring, and a
// transaction in flight counts as if it ended now. End times, not start
// times, because a provider counts a message when it takes it: counting
// starts would let a slow transaction and a fast later one land within one
// window at the provider. Guarded by Deliverer.mu.
type rateLog struct {
	rate     Rate
	ended    []time.Time // ring of the last N end times, oldest at head
	head     int
	n        int // entries in ended
	inflight int // slots taken and not yet released
	// changed is closed and replaced when a slot is released, so that a
	// waiter whose wait was not known recomputes it.
	changed chan struct{}
}

// take takes a slot at now if one is free. Otherwise it returns how long
// until one frees, and exact is false when transactions in flight hold the
// slots: then no slot frees before one of them ends, and wait is the least
// it can be.
func (r *rateLog) take(now time.Time) (wait time.Duration, exact bool) {
	r.expire(now)
	busy := r.n + r.inflight
	if busy < r.rate.N {
		r.inflight++
		return 0, true
	}
	// The slot frees when the (busy-N+1)th oldest end time leaves the window.
	if k := busy - r.rate.N; k < r.n {
		return r.at(k).Add(r.rate.Per).Sub(now), true
	}
	return r.rate.Per, false
}

// release gives back a slot taken with take. counted says whether the
// transaction may count against the quota (the message was sent): then its
// end time is logged and occupies the slot for Per.
func (r *rateLog) release(now time.Time, counted bool) {
	r.inflight--
	if counted {
		if r.ended == nil {
			r.ended = make([]time.Time, r.rate.N)
		}
		if r.n > 0 && now.Before(r.at(r.n-1)) {
			now = r.at(r.n - 1) // keep the ring sorted if the clock steps back
		}
		if r.n == len(r.ended) {
			r.head = (r.head + 1) % len(r.ended)
			r.n--
		}
		r.ended[(r.head+r.n)%len(r.ended)] = now
		r.n++
	}
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
}

// wake returns a channel that is closed at the next release.
func (r *rateLog) wake() <-chan struct{} {
	if r.changed == nil {
		r.changed = make(chan struct{})
	}
	return r.changed
}

// expire drops the end times that have left the window (now-Per, now].
func (r *rateLog) expire(now time.Time) {
	for r.n > 0 && !r.at(0).Add(r.rate.Per).After(now) {
		r.head = (r.head + 1) % len(r.ended)
		r.n--
	}
}

// at returns the k-th oldest end time.
func (r *rateLog) at(k int) time.Time { return r.ended[(r.head+k)%len(r.ended)] }

// takeRateSlot waits for a slot under up's RateLimit, MaxRateWait at most
// in all, and returns the function that gives it back when the transaction
// ends, saying whether the message was sent. When a slot would take longer,
// it returns a nil release and when a slot should be free: the message
// should go elsewhere or later rather than hold a worker. The error is
// non-nil only when ctx ends the wait.
func (d *Deliverer) takeRateSlot(ctx context.Context, st *upstreamState, up *Upstream) (release func(sent bool), until time.Time, err error) {
	if up.RateLimit.N <= 0 || up.RateLimit.Per <= 0 {
		return func(bool) {}, time.Time{}, nil
	}
	release = func(sent bool) {
		d.mu.Lock()
		defer d.mu.Unlock()
		st.rate.release(d.now(), sent)
	}
	var start, deadline time.Time
	d.mu.Lock()
	defer d.mu.Unlock()
	for {
		now := d.now()
		if start.IsZero() {
			start, deadline = now, now.Add(d.maxRateWait())
		}
		wait, exact := st.rate.take(now)
		if wait <= 0 {
			if now.After(start) {
				st.rateWaits++
				st.rateWaited += now.Sub(start)
			}
			return release, time.Time{}, nil
		}
		if next := now.Add(wait); next.After(deadline) {
			st.rateLimited++
			if now.After(start) {
				st.rateWaited += now.Sub(start)
			}
			return nil, next, nil
		}
		woken := st.rate.wake()
		d.mu.Unlock()
		timer := time.NewTimer(wait)
		if !exact {
			// Only a release can free a slot; the timer is a fallback.
			timer.Reset(d.maxRateWait())
		}
		select {
		case <-timer.C:
		case <-woken:
		case <-ctx.Done():
			timer.Stop()
			d.mu.Lock()
			st.rateWaited += d.now().Sub(start)
			return nil, time.Time{}, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		}
		timer.Stop()
		d.mu.Lock()
	}
}

func (d *Deliverer) maxRateWait() time.Duration {
	if d.MaxRateWait <= 0 {
		return 5 * time.Second
	}
	return d.MaxRateWait
}
