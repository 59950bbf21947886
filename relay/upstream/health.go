package upstream

import (
	"time"
)

// State is a snapshot of one upstream's health, connections and
// counters, for the HTTP API and metrics.
type State struct {
	Name string `json:"name"`
	// Up is false while the upstream is left out of deliveries after
	// failing, including while a probe is in flight.
	Up bool `json:"up"`
	// Since is when the upstream last went down or came back up; zero if
	// it has been up since the Deliverer started.
	Since time.Time `json:"since,omitzero"`
	// DownUntil, while the upstream is down, is when a delivery may probe
	// it again.
	DownUntil time.Time `json:"down_until,omitzero"`
	// LastError is the last connection-level failure, "" if none yet.
	LastError string `json:"last_error,omitempty"`
	// ConsecutiveFailures counts connection-level failures since the last
	// success; DownAfter of them mark the upstream down.
	ConsecutiveFailures int `json:"consecutive_failures"`

	OpenConnections int `json:"open_connections"` // busy or idle
	IdleConnections int `json:"idle_connections"`

	// Attempts counts deliveries tried through the upstream (not those
	// that left it out because it was down or rate limited).
	Attempts uint64 `json:"attempts"`
	// Failures counts connection-level failures: connect, TLS, greeting,
	// EHLO, AUTH, 421 replies, and connections lost in a session.
	Failures uint64 `json:"failures"`
	// Dials counts connections dialled, successfully or not; with reuse,
	// far fewer than Attempts.
	Dials uint64 `json:"dials"`
	// RateLimitWaits counts deliveries that waited for a slot under the
	// upstream's RateLimit, and RateLimitWaited is the time they waited in
	// all (nanoseconds in JSON).
	RateLimitWaits  uint64        `json:"rate_limit_waits"`
	RateLimitWaited time.Duration `json:"rate_limit_waited"`
	// RateLimited counts deliveries that passed the upstream by because a
	// slot was more than MaxRateWait away.
	RateLimited uint64 `json:"rate_limited"`
	// TokenExpiry is when the cached OAuth2 access token expires; zero
	// when none is cached or it has no expiry.
	TokenExpiry time.Time `json:"token_expiry,omitzero"`
}

// upstreamState is what the Deliverer keeps for one upstream. Guarded by
// Deliverer.mu.
type upstreamState struct {
	health health
	pool   pool
	rate   rateLog
	upstreamCounters

	tokens *tokenCache // for an OAuth2 upstream, once first used
}

// upstreamCounters are the counters of State, kept together so
// that TakeOver carries them over as one.
type upstreamCounters struct {
	attempts    uint64
	failures    uint64
	dials       uint64
	rateWaits   uint64
	rateWaited  time.Duration
	rateLimited uint64
}

// health tracks whether an upstream is worth trying. An upstream that keeps
// failing at the connection level is left out for a while, so that not
// every message pays a timeout or a refusal before it reaches the next
// upstream; after that, one delivery probes it.
type health struct {
	down      bool
	downUntil time.Time // while down: when the next probe may go
	since     time.Time // when it last went down or came back up
	probing   bool      // a delivery is probing the down upstream
	failures  int       // consecutive connection-level failures
	downs     int       // consecutive failed probes plus one, for backoff
	lastError string
}

// healthEvent is what an attempt showed about an upstream's health.
type healthEvent int

const (
	// healthNone: nothing learnt, e.g. the delivery was cancelled.
	healthNone healthEvent = iota
	// healthOK: the upstream answered a transaction on its merits.
	healthOK
	// healthFailed: a connection-level failure (connect, TLS, greeting,
	// EHLO, 421, a connection lost in a session).
	healthFailed
	// healthMisconfigured: the upstream refused our AUTH or demanded it
	// (530, 534, 535). Retrying soon cannot help, so it is down at once.
	healthMisconfigured
)

// state returns the state kept for up, creating it on first use.
// d.mu must be held.
func (d *Deliverer) state(up *Upstream) *upstreamState {
	if d.states == nil {
		d.states = make(map[string]*upstreamState)
	}
	st, ok := d.states[up.Name]
	if !ok {
		st = &upstreamState{rate: rateLog{rate: up.RateLimit}}
		d.states[up.Name] = st
	}
	return st
}

// admit decides whether a delivery may try the upstream now. A down
// upstream is left out until DownUntil; then the first delivery probes it
// while the others still leave it out. until is when a left-out upstream
// may be tried again, zero if that is unknown (a probe is in flight).
// d.mu must be held.
func (d *Deliverer) admit(st *upstreamState, now time.Time) (probe bool, until time.Time, ok bool) {
	h := &st.health
	switch {
	case !h.down:
		return false, time.Time{}, true
	case now.Before(h.downUntil):
		return false, h.downUntil, false
	case h.probing:
		return false, time.Time{}, false
	}
	h.probing = true
	return true, time.Time{}, true
}

// report records what an attempt showed about the upstream's health; probe
// says whether the attempt was the probe that admit allowed. It logs when
// the upstream goes down or comes back up.
func (d *Deliverer) report(st *upstreamState, name string, probe bool, ev healthEvent, reason string) {
	d.mu.Lock()
	h := &st.health
	now := d.now()
	if probe {
		h.probing = false
	}
	var (
		wentDown, cameUp bool
		downFor          time.Duration
		failures         int
	)
	switch ev {
	case healthOK:
		h.failures = 0
		if h.down {
			cameUp, downFor = true, now.Sub(h.since)
			h.down, h.downs, h.downUntil, h.since = false, 0, time.Time{}, now
		}
	case healthFailed, healthMisconfigured:
		h.failures++
		st.failures++
		h.lastError = reason
		failures = h.failures
		// A failed probe puts it down again, for longer; an upstream that
		// is already down because of another delivery stays as it is.
		if (h.down && probe) || (!h.down && (ev == healthMisconfigured || h.failures >= d.downAfter())) {
			wentDown = true
			if !h.down {
				h.down, h.since = true, now
			}
			h.downs++
			h.downUntil = now.Add(d.downFor(h.downs))
		}
	}
	until := h.downUntil
	d.mu.Unlock()

	switch {
	case wentDown:
		d.logger().Warn("upstream down", "upstream", name, "reason", reason,
			"failures", failures, "until", until.Format(time.RFC3339Nano), "probe", probe)
	case cameUp:
		d.logger().Info("upstream up", "upstream", name, "down_for", downFor.Round(time.Millisecond))
	}
}

// downFor is how long an upstream stays down the n-th time in a row:
// DownFor, doubling up to MaxDownFor.
func (d *Deliverer) downFor(n int) time.Duration {
	dur := d.DownFor
	if dur <= 0 {
		dur = 30 * time.Second
	}
	limit := d.MaxDownFor
	if limit <= 0 {
		limit = 5 * time.Minute
	}
	limit = max(limit, dur)
	for i := 1; i < n && dur < limit; i++ {
		dur *= 2
	}
	return min(dur, limit)
}

func (d *Deliverer) downAfter() int {
	if d.DownAfter <= 0 {
		return 3
	}
	return d.DownAfter
}

// UpstreamStates returns the state of every configured upstream, in the
// order of Deliverer.Upstreams.
func (d *Deliverer) UpstreamStates() []State {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]State, 0, len(d.Upstreams))
	for i := range d.Upstreams {
		up := &d.Upstreams[i]
		st := d.state(up)
		h := &st.health
		s := State{
			Name:                up.Name,
			Up:                  !h.down,
			Since:               h.since,
			LastError:           h.lastError,
			ConsecutiveFailures: h.failures,
			OpenConnections:     st.pool.open,
			IdleConnections:     len(st.pool.idle),
			Attempts:            st.attempts,
			Failures:            st.failures,
			Dials:               st.dials,
			RateLimitWaits:      st.rateWaits,
			RateLimitWaited:     st.rateWaited,
			RateLimited:         st.rateLimited,
			TokenExpiry:         st.tokens.expiry(),
		}
		if h.down {
			s.DownUntil = h.downUntil
		}
		out = append(out, s)
	}
	return out
}

// ProbeNow lets the next delivery probe every upstream that is down, as an
// operator's flush or retry asks: they want mail to go now, not when the
// down period ends.
func (d *Deliverer) ProbeNow() {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	for _, st := range d.states {
		if st.health.down && now.Before(st.health.downUntil) {
			st.health.downUntil = now
		}
	}
}
