package upstream

import (
	"context"
	"sync"
	"time"
)

// Health is the up/down state of one upstream. An upstream that keeps
// failing at the connection level is left out for a while, so that not
// every message pays a timeout or a refusal before it reaches the next
// upstream; after that, one delivery probes it. The Deliverer keeps each
// upstream's Health in memory unless its NewHealth makes them otherwise.
// The methods are safe for concurrent use.
type Health interface {
	// Admit tells whether a delivery may try the upstream at now. While
	// it is up, yes. While it is down, no until st.DownUntil; then yes
	// for one delivery, the probe (probe is true), and no for the others
	// until the probe has reported.
	Admit(ctx context.Context, now time.Time) (probe bool, st HealthStatus, err error)
	// Report records what an attempt showed and returns the status
	// before and after it.
	Report(ctx context.Context, now time.Time, r HealthReport) (before, after HealthStatus, err error)
	// Status returns the current status.
	Status(ctx context.Context) (HealthStatus, error)
	// ProbeNow ends a down period at now, so that the next delivery
	// probes the upstream.
	ProbeNow(ctx context.Context, now time.Time) error
}

// HealthStatus is an upstream's up/down state at one moment.
type HealthStatus struct {
	Down bool
	// DownUntil, while Down, is when a delivery may probe the upstream.
	DownUntil time.Time
	// Since is when the upstream last went down or came back up; zero if
	// it has never been down.
	Since time.Time
	// Failures counts connection-level failures since the last success.
	Failures int
	// LastError is the last connection-level failure, "" if none yet.
	LastError string
}

// HealthEvent is what an attempt showed about an upstream's health.
type HealthEvent int

const (
	// HealthNone: nothing learnt, e.g. the delivery was cancelled.
	HealthNone HealthEvent = iota
	// HealthOK: the upstream answered a transaction on its merits.
	HealthOK
	// HealthFailed: a connection-level failure (connect, TLS, greeting,
	// EHLO, 421, a connection lost in a session).
	HealthFailed
	// HealthMisconfigured: the upstream refused our AUTH or demanded it
	// (530, 534, 535). Retrying soon cannot help, so it is down at once.
	HealthMisconfigured
)

// HealthReport is what one attempt tells Health.Report.
type HealthReport struct {
	Event HealthEvent
	// Reason is the failure, for HealthFailed and HealthMisconfigured,
	// with the upstream's secrets redacted.
	Reason string
	// Probe says whether the attempt was the probe that Admit allowed.
	Probe  bool
	Policy HealthPolicy
}

// HealthPolicy says when an upstream goes down and for how long; zero
// fields take the defaults.
type HealthPolicy struct {
	// DownAfter is how many connection-level failures in a row mark an
	// upstream down; default 3. HealthMisconfigured marks it down at once.
	DownAfter int
	// DownFor is how long a down upstream is left out before one
	// delivery probes it; it doubles each time the probe fails, up to
	// MaxDownFor. Defaults 30s and 5m.
	DownFor    time.Duration
	MaxDownFor time.Duration
}

func (p HealthPolicy) downAfter() int {
	if p.DownAfter <= 0 {
		return 3
	}
	return p.DownAfter
}

// downFor is how long an upstream stays down the n-th time in a row:
// DownFor, doubling up to MaxDownFor.
func (p HealthPolicy) downFor(n int) time.Duration {
	dur := p.DownFor
	if dur <= 0 {
		dur = 30 * time.Second
	}
	limit := p.MaxDownFor
	if limit <= 0 {
		limit = 5 * time.Minute
	}
	limit = max(limit, dur)
	for i := 1; i < n && dur < limit; i++ {
		dur *= 2
	}
	return min(dur, limit)
}

// healthState is the state machine behind a Health: what Admit, Report
// and ProbeNow decide, on a plain value that localHealth guards with a
// mutex and the Cluster loads from and stores to a shared row.
type healthState struct {
	st      HealthStatus
	probing bool // a delivery is probing the down upstream
	downs   int  // consecutive failed probes plus one, for backoff
}

// admit tells whether a delivery may try the upstream at now, and makes
// it the probe if the upstream is down and due.
func (h *healthState) admit(now time.Time) (probe bool) {
	if !h.st.Down || now.Before(h.st.DownUntil) || h.probing {
		return false
	}
	h.probing = true
	return true
}

func (h *healthState) report(now time.Time, r HealthReport) {
	st := &h.st
	if r.Probe {
		h.probing = false
	}
	switch r.Event {
	case HealthOK:
		st.Failures = 0
		if st.Down {
			st.Down, st.DownUntil, st.Since = false, time.Time{}, now
			h.downs = 0
		}
	case HealthFailed, HealthMisconfigured:
		st.Failures++
		st.LastError = r.Reason
		// A failed probe puts it down again, for longer; an upstream that
		// is already down because of another delivery stays as it is.
		if (st.Down && r.Probe) || (!st.Down && (r.Event == HealthMisconfigured || st.Failures >= r.Policy.downAfter())) {
			if !st.Down {
				st.Down, st.Since = true, now
			}
			h.downs++
			st.DownUntil = now.Add(r.Policy.downFor(h.downs))
		}
	}
}

func (h *healthState) probeNow(now time.Time) {
	if h.st.Down && now.Before(h.st.DownUntil) {
		h.st.DownUntil = now
	}
}

// localHealth is a Health kept in this process's memory.
type localHealth struct {
	mu sync.Mutex
	s  healthState
}

func (h *localHealth) Admit(_ context.Context, now time.Time) (bool, HealthStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	probe := h.s.admit(now)
	return probe, h.s.st, nil
}

func (h *localHealth) Report(_ context.Context, now time.Time, r HealthReport) (before, after HealthStatus, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	before = h.s.st
	h.s.report(now, r)
	return before, h.s.st, nil
}

func (h *localHealth) Status(context.Context) (HealthStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.s.st, nil
}

func (h *localHealth) ProbeNow(_ context.Context, now time.Time) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.s.probeNow(now)
	return nil
}

// healthPolicy is the Deliverer's HealthPolicy.
func (d *Deliverer) healthPolicy() HealthPolicy {
	return HealthPolicy{DownAfter: d.DownAfter, DownFor: d.DownFor, MaxDownFor: d.MaxDownFor}
}

// report records what an attempt through up showed about its health;
// probe says whether the attempt was the probe that Admit allowed, and
// last whether the message had no upstream after up (see
// endpoint.stranded). It logs when the upstream goes down or comes back
// up.
func (d *Deliverer) report(ctx context.Context, up *Upstream, ep *endpoint, probe, last bool, ev HealthEvent, reason string) {
	switch {
	case ev == HealthNone && !probe:
		return // nothing to record
	case ev == HealthFailed || ev == HealthMisconfigured:
		ep.counters.failures.Add(1)
	}
	if ev != HealthNone {
		ep.contacted.Store(true)
		ep.stranded.Store(ev != HealthOK && last)
	}
	now := d.Now()
	// Recorded even for a delivery that was cancelled: it is about the
	// upstream, not the delivery.
	before, after, err := ep.health.Report(context.WithoutCancel(ctx), now,
		HealthReport{Event: ev, Reason: reason, Probe: probe, Policy: d.healthPolicy()})
	switch {
	case err != nil:
		d.Logger.Warn("upstream health not recorded", "upstream", up.Name, "err", err)
	case after.Down && !after.DownUntil.Equal(before.DownUntil):
		d.Logger.Warn("upstream down", "upstream", up.Name, "reason", reason,
			"failures", after.Failures, "until", after.DownUntil.Format(time.RFC3339Nano), "probe", probe)
	case before.Down && !after.Down:
		d.Logger.Info("upstream up", "upstream", up.Name, "down_for", now.Sub(before.Since).Round(time.Millisecond))
	}
}
