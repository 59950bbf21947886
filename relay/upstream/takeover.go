package upstream

import "time"

// TakeOver carries over to d what old has learnt about the upstreams that
// both know by name, for d to replace old after a configuration reload.
// Call it before d's first Deliver.
//
//   - Rate-limit history, always: a provider counts its quota over a
//     rolling window, and a reload must not start that window afresh.
//     Transactions still in flight on old count as if they ended now.
//   - Health and counters, when the upstream's address, TLS mode and
//     login are unchanged: a down upstream stays down until its probe,
//     and the counters keep counting from where they were.
//
// Open connections are not carried over: old keeps those of its
// deliveries in flight, and old.Close ends its idle ones.
func (d *Deliverer) TakeOver(old *Deliverer) {
	type carried struct {
		up      Upstream
		ended   []time.Time // oldest first
		busy    int
		health  health
		counted upstreamCounters
	}
	byName := map[string]carried{}
	old.mu.Lock()
	for i := range old.Upstreams {
		up := old.Upstreams[i]
		st, ok := old.states[up.Name]
		if !ok {
			continue
		}
		c := carried{up: up, busy: st.rate.inflight, health: st.health, counted: st.upstreamCounters}
		for k := range st.rate.n {
			c.ended = append(c.ended, st.rate.at(k))
		}
		byName[up.Name] = c
	}
	old.mu.Unlock()

	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	for i := range d.Upstreams {
		up := &d.Upstreams[i]
		c, ok := byName[up.Name]
		if !ok {
			continue
		}
		st := d.state(up)
		if up.RateLimit.N > 0 && up.RateLimit.Per > 0 {
			// release logs an end time for a slot that take counted.
			for _, t := range c.ended {
				st.rate.inflight++
				st.rate.release(t, true)
			}
			for range c.busy {
				st.rate.inflight++
				st.rate.release(now, true)
			}
			st.rate.expire(now)
		}
		if sameEndpoint(c.up, *up) {
			st.health = c.health
			// A probe in flight reports to old; d allows its own.
			st.health.probing = false
			st.upstreamCounters = c.counted
		}
	}
}

// sameEndpoint reports whether two configurations of an upstream reach
// the same server with the same login, so that what was learnt about one
// holds for the other.
func sameEndpoint(a, b Upstream) bool {
	return a.Address == b.Address && a.TLS == b.TLS && a.Username == b.Username && a.Password == b.Password
}
