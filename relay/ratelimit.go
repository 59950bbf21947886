package relay

import (
	"context"
	"sync"
	"time"

	"smarthost/relay/upstream"
)

// The kinds of the users' and clients' windows: a window's key is its kind,
// a colon and what it counts for.
const (
	userWindow           = "user"            // user:NAME, messages
	userRecipientsWindow = "user-recipients" // user-recipients:NAME
	clientWindow         = "client"          // client:LISTENER:ADDRESS
)

// RateWindowKinds are the key prefixes of the users' and clients' windows
// (before a colon), which a cluster keeps beside the upstreams' windows,
// named by the upstreams' names.
var RateWindowKinds = []string{userWindow, userRecipientsWindow, clientWindow}

// windows holds the sliding windows of the per-user and per-client
// limits by key. They live in the Server, not in the set of users that a
// reload replaces, so that a reload does not hand a user a fresh quota.
type windows struct {
	make func(key string) upstream.RateWindow

	mu sync.Mutex
	m  map[string]*window
	// sweepAt is the size of m at which windows that count nothing are
	// dropped: a client address seen once must not stay for ever.
	sweepAt int
}

// window is a RateWindow with what tells when it counts nothing.
type window struct {
	w    upstream.RateWindow
	per  time.Duration // the longest Per it was used with
	last time.Time     // the last Take or Release
	held int           // slots taken and not given back
}

// minSweep is the number of windows kept before any is dropped.
const minSweep = 1024

// take takes a slot under r in the window of key.
func (ws *windows) take(key string, r upstream.Rate, now time.Time) (*window, bool, error) {
	ws.mu.Lock()
	w := ws.m[key]
	if w == nil {
		ws.sweep(now)
		if ws.m == nil {
			ws.m = make(map[string]*window)
		}
		w = &window{}
		if ws.make != nil {
			w.w = ws.make(key)
		} else {
			w.w = upstream.NewLocalWindow()
		}
		ws.m[key] = w
	}
	w.held++ // until the Take is known to have failed: no sweep drops it meanwhile
	w.per = max(w.per, r.Per)
	ws.mu.Unlock()

	got, err := w.w.Take(context.Background(), now, r)
	if err != nil || !got.Taken {
		ws.done(w, now)
		return nil, false, err
	}
	return w, true, nil
}

// done records that a slot of w was given back, or never taken, at now.
func (ws *windows) done(w *window, now time.Time) {
	ws.mu.Lock()
	w.held--
	if now.After(w.last) {
		w.last = now
	}
	ws.mu.Unlock()
}

// sweep drops, once m has grown enough, the windows with no slot taken
// and nothing counted in the last Per: one made afresh is the same.
// ws.mu is held.
func (ws *windows) sweep(now time.Time) {
	if len(ws.m) < max(ws.sweepAt, minSweep) {
		return
	}
	for k, w := range ws.m {
		if w.held == 0 && !w.last.Add(w.per).After(now) {
			delete(ws.m, k)
		}
	}
	ws.sweepAt = 2 * len(ws.m)
}

// slot is a place taken in a window for a transaction in progress: given
// back when the transaction ends, it counts for the window's length only
// if the message was accepted.
type slot struct {
	w *window
	r upstream.Rate
}

// take takes a slot in the window of key under r. It reports false when
// the window is full; the error is the window's (a shared one that cannot
// be read).
func (s *session) take(key string, r upstream.Rate) (bool, error) {
	w, ok, err := s.srv.windows.take(key, r, s.srv.Now())
	if !ok {
		return false, err
	}
	s.mu.Lock()
	s.slots = append(s.slots, slot{w: w, r: r})
	s.mu.Unlock()
	return true, nil
}

// releaseSlots gives back the transaction's slots; accepted says whether
// its message was queued, and so counts against the limits.
func (s *session) releaseSlots(accepted bool) {
	s.mu.Lock()
	held := s.slots
	s.slots = nil
	s.mu.Unlock()
	now := s.srv.Now()
	for _, sl := range held {
		if err := sl.w.w.Release(context.Background(), now, sl.r, accepted); err != nil {
			s.log.Warn("rate limit slot not given back", "error", err)
		}
		s.srv.windows.done(sl.w, now)
	}
}
