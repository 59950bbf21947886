package upstream

import (
	"context"
	"sync"
	"time"
)

// RateWindow is an upstream's rate-limit window: at most Rate.N
// transactions in any window of Rate.Per. The Deliverer keeps each
// upstream's window in memory unless its NewRateWindow makes them
// otherwise. The methods are safe for concurrent use.
type RateWindow interface {
	// Take takes a slot under r at now, or tells how long until one may
	// be free.
	Take(ctx context.Context, now time.Time, r Rate) (RateWait, error)
	// Release gives back a slot that Take took. sent says whether the
	// message went out: then the slot counts against the quota for r.Per
	// from now; otherwise it is free at once.
	Release(ctx context.Context, now time.Time, r Rate, sent bool) error
}

// RateWait is what RateWindow.Take answers.
type RateWait struct {
	// Taken: a slot was taken, to be given back with Release.
	Taken bool
	// For is how long until a slot frees, when none was taken. Exact is
	// false when transactions in flight hold the slots: then no slot
	// frees before one of them ends, and For is the least it can be.
	For   time.Duration
	Exact bool
	// Changed, if not nil, is closed when a slot is released, so that a
	// waiter asks again before For has passed.
	Changed <-chan struct{}
}

// rateLog enforces a Rate: at most N transactions in any window of Per.
// Providers' quotas are rolling windows (Gmail: 2000 in any 24 hours),
// which a token bucket does not respect: a full bucket lets N through at
// once and refills N more within the same window. So the log keeps the
// end times of the last N transactions in a ring, and a transaction in
// flight counts as if it ended now. End times, not start times, because a
// provider counts a message when it takes it: counting starts would let a
// slow transaction and a fast later one land within one window at the
// provider. It does no locking: localWindow guards it.
type rateLog struct {
	rate     Rate
	ended    []time.Time // ring of the last N end times, oldest at head
	head     int
	n        int // entries in ended
	inflight int // slots taken and not yet released
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
}

// setRate makes the log enforce rate from now on, keeping the newest end
// times that it has room for: a reload that changes an upstream's
// rate_limit goes on counting the transactions already made.
func (r *rateLog) setRate(rate Rate) {
	if rate == r.rate {
		return
	}
	kept := make([]time.Time, 0, min(r.n, rate.N))
	for k := max(r.n-rate.N, 0); k < r.n; k++ {
		kept = append(kept, r.at(k))
	}
	r.rate, r.ended, r.head, r.n = rate, nil, 0, len(kept)
	if len(kept) > 0 {
		r.ended = make([]time.Time, rate.N)
		copy(r.ended, kept)
	}
}

// expire drops the end times that have left the window (now-Per, now].
func (r *rateLog) expire(now time.Time) {
	for r.n > 0 && !r.at(0).Add(r.rate.Per).After(now) {
		r.head = (r.head + 1) % len(r.ended)
		r.n--
	}
}

// loadRateLog returns the log of rate with the given end times, oldest
// first, and inflight slots taken: the state that a shared window keeps
// elsewhere, to decide on as the local one does. Only the newest end
// times that rate has room for are kept, as setRate does.
func loadRateLog(rate Rate, ended []time.Time, inflight int) rateLog {
	r := rateLog{rate: rate, inflight: inflight}
	if len(ended) > rate.N {
		ended = ended[len(ended)-rate.N:]
	}
	if len(ended) > 0 {
		r.ended = make([]time.Time, rate.N)
		r.n = copy(r.ended, ended)
	}
	return r
}

// endTimes returns the logged end times, oldest first.
func (r *rateLog) endTimes() []time.Time {
	out := make([]time.Time, r.n)
	for k := range out {
		out[k] = r.at(k)
	}
	return out
}

// at returns the k-th oldest end time.
func (r *rateLog) at(k int) time.Time { return r.ended[(r.head+k)%len(r.ended)] }

// NewLocalWindow returns a RateWindow kept in this process's memory, the
// kind a Deliverer uses when NewRateWindow is nil. Other limits that
// count in sliding windows (the submission side's per-user limits) take
// it too, so that a shared window can stand in for it.
func NewLocalWindow() RateWindow { return &localWindow{} }

// localWindow is a RateWindow kept in this process's memory.
type localWindow struct {
	mu  sync.Mutex
	log rateLog
	// changed is closed and replaced when a slot is released, so that a
	// waiter whose wait was not known recomputes it.
	changed chan struct{}
}

func (w *localWindow) Take(_ context.Context, now time.Time, r Rate) (RateWait, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.log.setRate(r)
	wait, exact := w.log.take(now)
	if wait <= 0 {
		return RateWait{Taken: true}, nil
	}
	if w.changed == nil {
		w.changed = make(chan struct{})
	}
	return RateWait{For: wait, Exact: exact, Changed: w.changed}, nil
}

func (w *localWindow) Release(_ context.Context, now time.Time, r Rate, sent bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.log.setRate(r)
	w.log.release(now, sent)
	if w.changed != nil {
		close(w.changed)
		w.changed = nil
	}
	return nil
}

// takeRateSlot waits for a slot under up's RateLimit, MaxRateWait at most
// in all, and returns the function that gives it back when the transaction
// ends, saying whether the message was sent. When a slot would take longer,
// it returns a nil release and when a slot should be free: the message
// should go elsewhere or later rather than hold a worker. The error is
// non-nil when ctx ends the wait or the window cannot be read.
func (d *Deliverer) takeRateSlot(ctx context.Context, up *Upstream, ep *endpoint) (release func(sent bool), until time.Time, err error) {
	r := up.RateLimit
	if r.N <= 0 || r.Per <= 0 {
		return func(bool) {}, time.Time{}, nil
	}
	c := &ep.counters
	var start, deadline time.Time
	for {
		now := d.Now()
		if start.IsZero() {
			start, deadline = now, now.Add(d.MaxRateWait)
		}
		w, err := ep.window.Take(ctx, now, r)
		if err != nil {
			return nil, time.Time{}, &stageError{stage: "rate limit", err: err}
		}
		if w.Taken {
			if now.After(start) {
				c.rateWaits.Add(1)
				c.rateWaited.Add(int64(now.Sub(start)))
			}
			release := func(sent bool) {
				// The end of a transaction counts however the delivery ends.
				if err := ep.window.Release(context.WithoutCancel(ctx), d.Now(), r, sent); err != nil {
					d.Logger.Warn("rate limit slot not given back", "upstream", up.Name, "err", err)
				}
			}
			return release, time.Time{}, nil
		}
		if next := now.Add(w.For); next.After(deadline) {
			c.rateLimited.Add(1)
			if now.After(start) {
				c.rateWaited.Add(int64(now.Sub(start)))
			}
			return nil, next, nil
		}
		timer := time.NewTimer(w.For)
		if !w.Exact {
			// Only a release can free a slot; the timer is a fallback.
			timer.Reset(d.MaxRateWait)
		}
		select {
		case <-timer.C:
		case <-w.Changed:
		case <-ctx.Done():
			timer.Stop()
			c.rateWaited.Add(int64(d.Now().Sub(start)))
			return nil, time.Time{}, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		}
		timer.Stop()
	}
}
