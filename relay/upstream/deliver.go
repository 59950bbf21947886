// Package upstream is the delivery side of the smarthost: it hands queued
// messages to the upstream providers of their route, in order, reusing
// connections, leaving out upstreams that keep failing, pacing each under
// its rate limit and logging in with a password or OAuth2; it writes the
// bounces (DSNs) and checks an upstream's settings for check-upstream.
// It shares with the submission side, package relay, only what is in
// internal/mailproto.
package upstream

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"smarthost/internal/mailproto"
	"smarthost/queue"
)

// Deliverer is the delivery side: it hands queued messages to the
// upstream providers of the sender's route, in order, and reports per
// recipient what happened. It keeps connections open for reuse, leaves out
// upstreams that keep failing, and paces each upstream under its
// RateLimit.
//
// One Deliverer lives as long as the process: SetConfig puts its first
// configuration in effect and every reload's after it, keeping what it
// has learnt about the upstreams that stay the same. Set the fields before
// the first Deliver (NewHealth and NewRateWindow before the first
// SetConfig) and leave them afterwards; Deliver may be called
// concurrently. Close releases the idle connections.
type Deliverer struct {
	Hostname string // EHLO name
	// Dial opens connections.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// DownAfter is how many connection-level failures in a row (connect,
	// TLS, greeting, EHLO, 421, a connection lost in a session) mark an
	// upstream down. A refused AUTH (530, 534, 535) marks it
	// down at once: that is our configuration, and retrying cannot help.
	DownAfter int
	// DownFor is how long a down upstream is left out before one delivery
	// probes it; it doubles each time the probe fails, up to MaxDownFor.
	DownFor    time.Duration
	MaxDownFor time.Duration
	// IdleTimeout closes an upstream connection that has carried no
	// message for that long.
	IdleTimeout time.Duration
	// MaxRateWait is the longest a delivery waits for a slot under an
	// upstream's RateLimit; when a slot is further away, the upstream is
	// left out of this attempt rather than holding a worker.
	MaxRateWait time.Duration
	// Now is the clock for health and rate limits.
	Now    func() time.Time
	Logger *slog.Logger
	// Observer, if set, is told about every upstream transaction and skip.
	Observer Observer
	// NewHealth makes the up/down state of the upstream called name, and
	// NewRateWindow its rate-limit window; nil keeps them in this
	// process's memory. Kept in a store that several relays share, they
	// hold for all of them: an upstream that one found down is left out
	// by all, and a provider's quota counts the messages of all. SetConfig
	// calls them with the Deliverer's lock held: they must be quick.
	NewHealth     func(name string) Health
	NewRateWindow func(name string) RateWindow

	mu     sync.Mutex
	cur    *setup // the configuration in effect; see SetConfig
	closed bool   // Close was called: keep no idle connections
}

// NewDeliverer returns a Deliverer with every field at its default: EHLO
// as "localhost", a plain dialer, down after 3 failures for 30s doubling
// up to 5m, idle connections closed after 30s, rate-limit waits of 5s at
// most, the system clock and slog's default logger. Change the fields
// before the first SetConfig.
func NewDeliverer() *Deliverer {
	return &Deliverer{
		Hostname:    "localhost",
		Dial:        (&net.Dialer{}).DialContext,
		DownAfter:   3,
		DownFor:     30 * time.Second,
		MaxDownFor:  5 * time.Minute,
		IdleTimeout: 30 * time.Second,
		MaxRateWait: 5 * time.Second,
		Now:         time.Now,
		Logger:      slog.Default(),
	}
}

// Deliver delivers m's pending recipients and returns one Result per
// pending recipient, in the order of m.Pending(). It matches
// queue.DeliverFunc.
//
// Each recipient takes the route of its domain (Route.ToDomain), else the
// route of the sender's domain; the recipients of each route are
// delivered through it apart from the others. A route's upstreams are
// tried in order; the recipients that one leaves pending with a temporary
// failure go on to the next. Delivered and failed (5xx) recipients are
// final. Recipients whose message was sent but whose reply after the
// final dot never came stay pending for a later attempt instead: the
// upstream may have taken the message, and sending it through another at
// once would likely deliver it twice. A recipient that no upstream could
// try stays pending: when some were at their rate limit, with NotBefore
// set to when the first of them is available again; when all were down,
// without it, to be retried with backoff.
//
// A DSN (m.DSN) is routed by the domain of its recipient, the original
// sender, and sent from the upstream's DSNFrom, or from the null sender
// (RFC 3461 section 6.2, RFC 5321 section 4.5.5). An upstream with
// EnvelopeFrom gets that as the sender instead (see Upstream.MailFrom).
//
// The content is streamed from body to each upstream tried, never held
// whole: a spooled message costs a copy buffer, not its size.
func (d *Deliverer) Deliver(ctx context.Context, m queue.Message, body queue.Body) []queue.Result {
	rcpts := m.Pending()
	if len(rcpts) == 0 {
		return nil
	}
	s := d.current()
	type group struct {
		route *Route
		idx   []int // indexes in rcpts
	}
	var groups []*group
	var unrouted []int
	for i, rcpt := range rcpts {
		route := s.routeFor(m, rcpt)
		if route == nil {
			unrouted = append(unrouted, i)
			continue
		}
		var g *group
		for _, h := range groups {
			if h.route == route {
				g = h
				break
			}
		}
		if g == nil {
			g = &group{route: route}
			groups = append(groups, g)
		}
		g.idx = append(g.idx, i)
	}
	results := make([]queue.Result, len(rcpts))
	if len(unrouted) > 0 {
		// The submission side refuses such senders; a route may come back
		// with a reload, so this is not the message's fault.
		reply := "no route for sender domain"
		d.logAttempt(ctx, m, "", 0, len(unrouted), nil, reply, errors.New(reply))
		for _, i := range unrouted {
			results[i] = queue.Result{Rcpt: rcpts[i], State: queue.Pending, Reply: reply}
		}
	}
	for _, g := range groups {
		sub := make([]string, len(g.idx))
		for j, i := range g.idx {
			sub[j] = rcpts[i]
		}
		for j, r := range d.deliverRoute(ctx, s, m, body, *g.route, sub) {
			results[g.idx[j]] = r
		}
	}
	return results
}

// deliverRoute delivers m to rcpts through route's upstreams, in order,
// and returns one Result per recipient; see Deliver.
func (d *Deliverer) deliverRoute(ctx context.Context, s *setup, m queue.Message, body queue.Body, route Route, rcpts []string) []queue.Result {
	results := allResults(rcpts, queue.Pending, "no upstream in route", "")
	tried := make([]bool, len(rcpts)) // an upstream answered for it, or failed trying
	todo := make([]int, len(rcpts))   // indexes of the recipients still to try
	for i := range todo {
		todo[i] = i
	}
	var skips []skip
	for k, name := range route.Upstreams {
		if len(todo) == 0 {
			break
		}
		if ctx.Err() != nil {
			reply := replyText(&stageError{stage: "interrupted", err: context.Cause(ctx)})
			for _, i := range todo {
				if !tried[i] {
					results[i] = queue.Result{Rcpt: rcpts[i], State: queue.Pending, Reply: reply}
				}
			}
			return results
		}
		up, ep, ok := s.upstream(name)
		if !ok {
			reply := "unknown upstream"
			d.logAttempt(ctx, m, name, 0, len(todo), nil, reply, errors.New(reply))
			for _, i := range todo {
				results[i] = queue.Result{Rcpt: rcpts[i], State: queue.Pending, Reply: reply, Upstream: name}
				tried[i] = true
			}
			continue
		}
		sub := make([]string, len(todo))
		for j, i := range todo {
			sub[j] = rcpts[i]
		}
		// The upstream may demand its own sender; only the wire changes.
		from := up.MailFrom(m)
		data := body
		if up.HeaderFromRewrite && up.EnvelopeFrom != "" {
			// The head holds the whole header section.
			data = body.WithHead(rewriteHeaderFrom(body.Head(), up.EnvelopeFrom))
		}
		start := time.Now()
		a := d.try(ctx, up, ep, from, sub, data, k == len(route.Upstreams)-1)
		if a.skip != nil {
			d.Logger.LogAttrs(ctx, slog.LevelDebug, "upstream left out",
				slog.String("queue_id", m.ID), slog.String("upstream", up.Name), slog.String("reason", a.skip.reply))
			if d.Observer != nil {
				d.Observer.Skipped(up.Name)
			}
			skips = append(skips, *a.skip)
			continue
		}
		took := time.Since(start)
		d.logAttempt(ctx, m, up.Name, took, len(sub), a.results, summaryReply(a.results, a.err), a.err)
		d.observe(m, up.Name, took, a.results)
		var next []int
		for j, i := range todo {
			r := a.results[j]
			if tried[i] {
				// What the upstream before said, for the history.
				prev := results[i]
				r.Earlier = append(prev.Earlier, prev)
				r.Earlier[len(r.Earlier)-1].Earlier = nil
			}
			results[i], tried[i] = r, true
			if a.results[j].State == queue.Pending && a.failover[j] {
				next = append(next, i)
			}
		}
		todo = next
	}
	if len(skips) > 0 {
		for _, i := range todo {
			if !tried[i] {
				results[i] = skipResult(rcpts[i], skips)
			}
		}
	}
	return results
}

// routeFor returns the route for rcpt, a recipient of m: the route to
// its domain, else the route of the envelope sender's domain, or for a
// DSN of rcpt's own, since the DSN goes back to the original sender
// through the route that sender's own mail takes. It returns nil when no
// route takes rcpt.
func (s *setup) routeFor(m queue.Message, rcpt string) *Route {
	if r := s.toRoute(rcpt); r != nil {
		return r
	}
	if m.DSN {
		return s.fromRoute(rcpt)
	}
	return s.fromRoute(m.From)
}

// toRoute returns the route to the domain of the recipient rcpt, or nil.
func (s *setup) toRoute(rcpt string) *Route {
	domain := mailproto.DomainOf(rcpt)
	if domain == "" {
		return nil
	}
	for i := range s.Routes {
		if r := &s.Routes[i]; r.ToDomain != "" && strings.EqualFold(r.ToDomain, domain) {
			return r
		}
	}
	return nil
}

// fromRoute returns the route for the envelope sender from: the one for
// its domain, else the "*" route, or nil.
func (s *setup) fromRoute(from string) *Route {
	domain := mailproto.DomainOf(from)
	var wildcard *Route
	for i := range s.Routes {
		r := &s.Routes[i]
		switch {
		case r.ToDomain != "":
		case r.FromDomain == "*":
			if wildcard == nil {
				wildcard = r
			}
		case domain != "" && strings.EqualFold(r.FromDomain, domain):
			return r
		}
	}
	return wildcard
}

// Route returns the route for an envelope sender: the one for its domain,
// else the "*" route. The null sender "" takes the "*" route. Routes by
// recipient domain are not among them; see RouteTo.
func (d *Deliverer) Route(from string) (Route, bool) {
	if r := d.current().fromRoute(from); r != nil {
		return *r, true
	}
	return Route{}, false
}

// RouteTo returns the route that a message from the envelope sender from
// takes to the recipient rcpt: the route to rcpt's domain, else the
// sender's.
func (d *Deliverer) RouteTo(from, rcpt string) (Route, bool) {
	if r := d.current().routeFor(queue.Message{From: from}, rcpt); r != nil {
		return *r, true
	}
	return Route{}, false
}

// Routable reports whether a route may take mail from the envelope
// sender from, for the submission side to refuse at MAIL a sender that
// none takes: a route of its domain or "*", or any route by recipient
// domain, which takes mail whatever the sender.
func (d *Deliverer) Routable(from string) bool {
	s := d.current()
	if s.fromRoute(from) != nil {
		return true
	}
	for _, r := range s.Routes {
		if r.ToDomain != "" {
			return true
		}
	}
	return false
}

// RcptRoutable reports whether a route takes mail from the envelope
// sender from to the recipient rcpt, for the submission side to refuse
// at RCPT a recipient that no route would deliver.
func (d *Deliverer) RcptRoutable(from, rcpt string) bool {
	_, ok := d.RouteTo(from, rcpt)
	return ok
}

// skip is an upstream left out of a delivery without being tried.
type skip struct {
	upstream string
	reply    string
	until    time.Time // when it may be tried again; zero: unknown, soon
	down     bool      // left out for its health, not its rate limit
}

// skipResult is the result for a recipient that no upstream tried: the
// reason of the upstream available first, and when that is unless every
// upstream is down.
func skipResult(rcpt string, skips []skip) queue.Result {
	first, allDown := skips[0], true
	for _, s := range skips {
		allDown = allDown && s.down
		if s.until.Before(first.until) {
			first = s
		}
	}
	if allDown {
		// An outage, not pacing: the message is deferred with backoff like
		// any failed attempt, and skips the down upstreams cheaply.
		return queue.Result{Rcpt: rcpt, State: queue.Pending, Reply: "all upstreams down", Upstream: first.upstream}
	}
	return queue.Result{Rcpt: rcpt, State: queue.Pending, Reply: first.reply, Upstream: first.upstream, NotBefore: first.until}
}

// attempt is what one upstream did with a set of recipients.
type attempt struct {
	results []queue.Result // one per recipient, in order
	// failover marks the pending results that another upstream may try at
	// once.
	failover []bool
	err      error // why the session broke, if it did
	skip     *skip // the upstream was left out: no results
}

// probeRetry is how soon a delivery that found its upstream being probed
// comes back.
const probeRetry = 2 * time.Second

// try delivers to rcpts through up, or leaves up out when it is down or its
// rate limit is further away than MaxRateWait. last says that up is the
// last upstream of the route: the message has no other way to go.
func (d *Deliverer) try(ctx context.Context, up *Upstream, ep *endpoint, from string, rcpts []string, body queue.Body, last bool) attempt {
	now := d.Now()
	probe, health, err := ep.health.Admit(ctx, now)
	if err != nil {
		// Where the health is kept could not answer: not the upstream's
		// failure, and not a reason to leave it out for long.
		err = &stageError{stage: "health", err: err}
		return failAll(rcpts, up.Name, replyText(err), err)
	}
	if health.Down && !probe {
		if !now.Before(health.DownUntil) {
			// Another delivery is probing it: come back once that has
			// told whether it is up, without counting a failure.
			return attempt{skip: &skip{upstream: up.Name, reply: "upstream " + up.Name + " is being probed", until: d.Now().Add(probeRetry)}}
		}
		return attempt{skip: &skip{upstream: up.Name, reply: "upstream " + up.Name + " is down", until: health.DownUntil, down: true}}
	}
	release, until, err := d.takeRateSlot(ctx, up, ep)
	if err != nil || release == nil {
		d.report(ctx, up, ep, probe, last, HealthNone, "")
		if err != nil {
			return failAll(rcpts, up.Name, replyText(err), err) // no text of the upstream
		}
		return attempt{skip: &skip{upstream: up.Name, reply: "rate limit of " + up.Name + " reached", until: until}}
	}
	ep.counters.attempts.Add(1)

	uc, err := d.getConn(ctx, up, ep)
	if errors.Is(err, errTokenRefused) && ctx.Err() == nil {
		// The OAuth2 token was revoked or expired early; authenticate
		// has dropped it. One new token, on a new connection, since a
		// provider may close or distrust a session after a failed AUTH.
		d.Logger.LogAttrs(ctx, slog.LevelWarn, "upstream refused oauth2 token, retrying with a new one",
			slog.String("upstream", up.Name), slog.String("reply", redactorFor(up, ep.tokens).Replace(replyText(err))))
		uc, err = d.getConn(ctx, up, ep)
	}
	if err != nil {
		release(false)
		ev := HealthFailed
		var se *stageError
		switch {
		case ctx.Err() != nil:
			ev, err = HealthNone, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		case errors.As(err, &se) && se.stage == "auth" && authRefused(se.err):
			ev = HealthMisconfigured
		}
		reply := redactorFor(up, ep.tokens).Replace(replyText(err))
		d.report(ctx, up, ep, probe, last, ev, reply)
		return failAll(rcpts, up.Name, reply, err)
	}
	tx := d.transact(uc, from, rcpts, body)
	release(tx.dataSent)
	d.putConn(ep, uc, tx.err == nil && tx.reusable, tx.canQuit)
	if tx.err != nil && uc.closed {
		// The delivery's context closed the connection: not the
		// upstream's failure.
		ierr := &stageError{stage: "interrupted", err: context.Cause(ctx)}
		for i, r := range tx.results {
			if r.State == queue.Pending && r.Reply == replyText(tx.err) {
				tx.results[i].Reply = replyText(ierr)
			}
		}
		tx.err, tx.health = ierr, HealthNone
	}
	// The upstream's words leave the session here, for the results, the
	// logs and the health report.
	red := redactorFor(up, ep.tokens)
	for i := range tx.results {
		tx.results[i].Reply = red.Replace(tx.results[i].Reply)
	}
	tx.healthReason = red.Replace(tx.healthReason)
	d.report(ctx, up, ep, probe, last, tx.health, tx.healthReason)
	return attempt{results: tx.results, failover: tx.failover, err: tx.err}
}

// failAll is the attempt for a session that never reached a transaction,
// with reply for err: every recipient pending, free to go to the next
// upstream.
func failAll(rcpts []string, upstream, reply string, err error) attempt {
	a := attempt{
		results:  allResults(rcpts, queue.Pending, reply, upstream),
		failover: make([]bool, len(rcpts)),
		err:      err,
	}
	for i := range a.failover {
		a.failover[i] = true
	}
	return a
}

func (d *Deliverer) commandTimeout() time.Duration { return d.current().commandTimeout() }

func (d *Deliverer) dataTimeout() time.Duration { return d.current().dataTimeout() }

// clock and log read the Deliverer's Now and Logger when they are called:
// the token caches use them so, rather than keep the values of when they
// were made.
func (d *Deliverer) clock() time.Time  { return d.Now() }
func (d *Deliverer) log() *slog.Logger { return d.Logger }

// observe tells the Observer about one upstream transaction for m.
func (d *Deliverer) observe(m queue.Message, upstream string, took time.Duration, results []queue.Result) {
	if d.Observer == nil {
		return
	}
	result := queue.OutcomeDeferred
	for _, r := range results {
		if r.State == queue.Delivered {
			result = queue.OutcomeDelivered
			break
		}
		if r.State == queue.Failed {
			result = queue.OutcomeFailed
		}
	}
	d.Observer.Transaction(upstream, result, took)
	if result == queue.OutcomeDelivered && !m.DSN {
		d.Observer.Delivered(upstream, d.Now().Sub(m.Received))
	}
}

// logAttempt writes the one line per attempt per upstream, for n
// recipients. An attempt that broke or decided nothing is a warning: it
// points at the upstream, the network or our configuration.
func (d *Deliverer) logAttempt(ctx context.Context, m queue.Message, upstream string, took time.Duration, n int, results []queue.Result, reply string, err error) {
	var delivered, deferred, failed int
	for _, r := range results {
		switch r.State {
		case queue.Delivered:
			delivered++
		case queue.Failed:
			failed++
		default:
			deferred++
		}
	}
	if results == nil {
		deferred = n
	}
	level := slog.LevelInfo
	if err != nil || delivered+failed == 0 {
		level = slog.LevelWarn
	}
	attrs := []slog.Attr{
		slog.String("queue_id", m.ID),
		slog.String("msg_id", m.MessageID),
		slog.String("upstream", upstream),
		slog.Int64("duration_ms", took.Milliseconds()),
		slog.Int("delivered", delivered),
		slog.Int("deferred", deferred),
		slog.Int("failed", failed),
		slog.String("reply", reply),
	}
	var se *stageError
	if errors.As(err, &se) {
		attrs = append(attrs, slog.String("stage", se.stage))
	}
	d.Logger.LogAttrs(ctx, level, "delivery attempt", attrs...)
}

func allResults(rcpts []string, state queue.RcptState, reply, upstream string) []queue.Result {
	out := make([]queue.Result, len(rcpts))
	for i, r := range rcpts {
		out[i] = queue.Result{Rcpt: r, State: state, Reply: reply, Upstream: upstream}
	}
	return out
}

// summaryReply is the reply an attempt is logged with: the failure, or
// the end-of-data reply, or the first recipient's.
func summaryReply(results []queue.Result, err error) string {
	if results == nil {
		return replyText(err)
	}
	for _, r := range results {
		if r.State == queue.Delivered {
			return r.Reply
		}
	}
	return results[0].Reply
}

// Close ends the idle upstream connections with QUIT, for shutdown.
// Deliveries still in progress close their connections when they end;
// Deliver still works after Close but no longer keeps connections open.
func (d *Deliverer) Close() {
	d.mu.Lock()
	d.closed = true
	var eps []*endpoint
	if d.cur != nil {
		for _, ep := range d.cur.endpoints {
			eps = append(eps, ep)
		}
	}
	d.mu.Unlock()
	closePools(eps)
}
