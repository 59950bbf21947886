package relay

import (
	"context"
	"sync"

	"smarthost/relay/upstream"
)

// windows holds the sliding windows of the per-user and per-client
// limits by key. They live in the Server, not in the set of users that a
// reload replaces, so that a reload does not hand a user a fresh quota.
type windows struct {
	make func(key string) upstream.RateWindow

	mu sync.Mutex
	m  map[string]upstream.RateWindow
}

func (w *windows) get(key string) upstream.RateWindow {
	w.mu.Lock()
	defer w.mu.Unlock()
	if win := w.m[key]; win != nil {
		return win
	}
	if w.m == nil {
		w.m = make(map[string]upstream.RateWindow)
	}
	var win upstream.RateWindow
	if w.make != nil {
		win = w.make(key)
	} else {
		win = upstream.NewLocalWindow()
	}
	w.m[key] = win
	return win
}

// slot is a place taken in a window for a transaction in progress: given
// back when the transaction ends, it counts for the window's length only
// if the message was accepted.
type slot struct {
	w upstream.RateWindow
	r upstream.Rate
}

// take takes a slot in the window of key under r. It reports false when
// the window is full; the error is the window's (a shared one that cannot
// be read).
func (s *session) take(key string, r upstream.Rate) (bool, error) {
	w := s.srv.windows.get(key)
	got, err := w.Take(context.Background(), s.srv.Now(), r)
	if err != nil || !got.Taken {
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
		if err := sl.w.Release(context.Background(), now, sl.r, accepted); err != nil {
			s.log.Warn("rate limit slot not given back", "error", err)
		}
	}
}
