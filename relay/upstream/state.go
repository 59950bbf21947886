package upstream

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// endpoint is what the Deliverer keeps for one upstream while its
// address, TLS and login stay the same (see SetConfig): its health, its
// rate-limit window, its connections, its OAuth2 token and its counters.
// Each part guards itself, so that no delivery waits on another
// upstream's, or on the Deliverer's, lock.
type endpoint struct {
	health   Health
	window   RateWindow
	pool     *pool
	tokens   *tokenCache // for an OAuth2 upstream; nil otherwise
	counters counters
	// contacted: an attempt learnt something of the upstream's health
	// (HealthOK, HealthFailed or HealthMisconfigured); until then its
	// state is StateUnknown.
	contacted atomic.Bool
	// stranded: the last attempt failed at the connection level and
	// the message had no upstream after this one. The upstream is
	// reported down (StateDown) at once, as the message could not leave,
	// though deliveries still try it until DownAfter failures in a row
	// leave it out.
	stranded atomic.Bool
}

// newEndpoint starts the endpoint of up: up, with an empty rate-limit
// window, no connections and no token yet. closed makes a pool that
// keeps no idle connections, for a Deliverer already closed.
func (d *Deliverer) newEndpoint(up *Upstream, closed bool) *endpoint {
	ep := &endpoint{
		pool:   newPool(up.maxConnections(), closed),
		tokens: newTokenCache(up, d.clock, d.log),
	}
	if d.NewHealth != nil {
		ep.health = d.NewHealth(up.Name)
	} else {
		ep.health = &localHealth{}
	}
	if d.NewRateWindow != nil {
		ep.window = d.NewRateWindow(up.Name)
	} else {
		ep.window = &localWindow{}
	}
	return ep
}

// counters count what deliveries did through one upstream, for State.
type counters struct {
	attempts    atomic.Uint64
	failures    atomic.Uint64
	dials       atomic.Uint64
	rateWaits   atomic.Uint64
	rateWaited  atomic.Int64 // nanoseconds
	rateLimited atomic.Uint64
}

// The states of an upstream, State.State.
const (
	// StateUnknown: no delivery has reached the upstream or failed to,
	// since the Deliverer started or its endpoint or login changed.
	StateUnknown = "unknown"
	// StateUp: the upstream answered, and is used.
	StateUp = "up"
	// StateDown: the upstream is left out after failing, until a probe;
	// or the last attempt through it, with no other upstream after it in
	// the message's route, failed at the connection level.
	StateDown = "down"
)

// State is a snapshot of one upstream's health, connections and
// counters, for the HTTP API and metrics.
type State struct {
	Name string `json:"name"`
	// State is StateUnknown until the first contact, then StateUp or
	// StateDown.
	State string `json:"state"`
	// Up is true in StateUp only: false while the upstream is left out
	// of deliveries after failing, including while a probe is in flight,
	// after a failure that left a message no other way, and before any
	// contact.
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

// UpstreamStates returns the state of every configured upstream, in the
// order of Config.Upstreams.
func (d *Deliverer) UpstreamStates() []State {
	s := d.current()
	out := make([]State, 0, len(s.Upstreams))
	for i := range s.Upstreams {
		up := &s.Upstreams[i]
		ep := s.endpoints[up.Name]
		h, err := ep.health.Status(context.Background())
		if err != nil {
			d.Logger.Warn("upstream health unknown", "upstream", up.Name, "err", err)
		}
		open, idle := ep.pool.size()
		c := &ep.counters
		state := StateUp
		switch {
		case h.Down, ep.stranded.Load():
			state = StateDown
		case !ep.contacted.Load() && h.Failures == 0 && h.Since.IsZero():
			// Shared health says nothing either: no relay of the
			// cluster has seen it fail.
			state = StateUnknown
		}
		st := State{
			Name:                up.Name,
			State:               state,
			Up:                  state == StateUp,
			Since:               h.Since,
			LastError:           h.LastError,
			ConsecutiveFailures: h.Failures,
			OpenConnections:     open,
			IdleConnections:     idle,
			Attempts:            c.attempts.Load(),
			Failures:            c.failures.Load(),
			Dials:               c.dials.Load(),
			RateLimitWaits:      c.rateWaits.Load(),
			RateLimitWaited:     time.Duration(c.rateWaited.Load()),
			RateLimited:         c.rateLimited.Load(),
			TokenExpiry:         ep.tokens.expiry(),
		}
		if h.Down {
			st.DownUntil = h.DownUntil
		}
		out = append(out, st)
	}
	return out
}

// ProbeNow lets the next delivery probe every upstream that is down, as an
// operator's flush or retry asks: they want mail to go now, not when the
// down period ends.
func (d *Deliverer) ProbeNow() {
	s := d.current()
	now := d.Now()
	for name, ep := range s.endpoints {
		if err := ep.health.ProbeNow(context.Background(), now); err != nil {
			d.Logger.Warn("upstream not probed at once", "upstream", name, "err", err)
		}
	}
}

// closePools closes the pools of eps at once, each ending its idle
// connections with QUIT.
func closePools(eps []*endpoint) {
	var wg sync.WaitGroup
	for _, ep := range eps {
		wg.Go(ep.pool.close)
	}
	wg.Wait()
}
