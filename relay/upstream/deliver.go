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
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/queue"
)

// Deliverer is the upstream side: it hands queued messages to the upstream
// providers of the sender's route, in order, and reports per recipient what
// happened. It keeps connections open for reuse, leaves out upstreams that
// keep failing, and paces each upstream under its RateLimit. Set the fields
// before the first Deliver and do not change them afterwards; Deliver may
// be called concurrently. Close releases the idle connections.
type Deliverer struct {
	Hostname  string // EHLO name; default "localhost"
	Upstreams []Upstream
	// Routes choose upstreams by the envelope sender's domain; FromDomain
	// "*" takes every other sender, the null sender <> included. A DSN is
	// routed by its recipient's domain instead (see Deliver).
	Routes []Route
	// Dial opens connections; default (&net.Dialer{}).DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// CommandTimeout bounds connecting and each command's reply; default
	// 2m. With STARTTLS, it bounds the greeting, EHLO and STARTTLS before
	// TLS together.
	CommandTimeout time.Duration
	// DataTimeout bounds sending the message and the reply after the final
	// dot; default 10m.
	DataTimeout time.Duration
	// DownAfter is how many connection-level failures in a row (connect,
	// TLS, greeting, EHLO, 421, a connection lost in a session) mark an
	// upstream down; default 3. A refused AUTH (530, 534, 535) marks it
	// down at once: that is our configuration, and retrying cannot help.
	DownAfter int
	// DownFor is how long a down upstream is left out before one delivery
	// probes it; it doubles each time the probe fails, up to MaxDownFor.
	// Defaults 30s and 5m.
	DownFor    time.Duration
	MaxDownFor time.Duration
	// IdleTimeout closes an upstream connection that has carried no
	// message for that long; default 30s.
	IdleTimeout time.Duration
	// MaxRateWait is the longest a delivery waits for a slot under an
	// upstream's RateLimit; when a slot is further away, the upstream is
	// left out of this attempt rather than holding a worker. Default 5s.
	MaxRateWait time.Duration
	// Now is the clock for health and rate limits; default time.Now.
	Now    func() time.Time
	Logger *slog.Logger // default slog.Default()
	// Observer, if set, is told about every upstream transaction and skip.
	Observer Observer

	mu     sync.Mutex
	states map[string]*upstreamState // by upstream name
	closed bool                      // Close was called: keep no idle connections
}

// Deliver delivers m's pending recipients and returns one Result per
// pending recipient, in the order of m.Pending(). It matches
// queue.DeliverFunc.
//
// The route's upstreams are tried in order; the recipients that one leaves
// pending with a temporary failure go on to the next. Delivered and failed
// (5xx) recipients are final. Recipients whose message was sent but whose
// reply after the final dot never came stay pending for a later attempt
// instead: the upstream may have taken the message, and sending it through
// another at once would likely deliver it twice. A recipient that no
// upstream could try stays pending: when some were at their rate limit,
// with NotBefore set to when the first of them is available again; when
// all were down, without it, to be retried with backoff.
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
	route, ok := d.routeFor(m)
	if !ok {
		// The submission side refuses such senders; a route may come back
		// with a reload, so this is not the message's fault.
		reply := "no route for sender domain"
		d.logAttempt(ctx, m, "", 0, len(rcpts), nil, reply, errors.New(reply))
		return allResults(rcpts, queue.Pending, reply, "")
	}
	results := allResults(rcpts, queue.Pending, "no upstream in route", "")
	tried := make([]bool, len(rcpts)) // an upstream answered for it, or failed trying
	todo := make([]int, len(rcpts))   // indexes of the recipients still to try
	for i := range todo {
		todo[i] = i
	}
	var skips []skip
	for _, name := range route.Upstreams {
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
		up, ok := d.upstream(name)
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
		a := d.try(ctx, up, from, sub, data)
		if a.skip != nil {
			d.logger().LogAttrs(ctx, slog.LevelDebug, "upstream left out",
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
			results[i], tried[i] = a.results[j], true
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

// routeFor returns the route for m: by the envelope sender's domain, or
// for a DSN by its recipient's, since the DSN goes back to the original
// sender through the route that sender's own mail takes.
func (d *Deliverer) routeFor(m queue.Message) (Route, bool) {
	if m.DSN && len(m.Recipients) > 0 {
		return d.Route(m.Recipients[0].Addr)
	}
	return d.Route(m.From)
}

// Route returns the route for an envelope sender: the one for its domain,
// else the "*" route. The null sender "" takes the "*" route.
func (d *Deliverer) Route(from string) (Route, bool) {
	domain := mailproto.DomainOf(from)
	var wildcard *Route
	for i := range d.Routes {
		r := &d.Routes[i]
		switch {
		case r.FromDomain == "*":
			if wildcard == nil {
				wildcard = r
			}
		case domain != "" && strings.EqualFold(r.FromDomain, domain):
			return *r, true
		}
	}
	if wildcard != nil {
		return *wildcard, true
	}
	return Route{}, false
}

func (d *Deliverer) upstream(name string) (*Upstream, bool) {
	for i := range d.Upstreams {
		if d.Upstreams[i].Name == name {
			return &d.Upstreams[i], true
		}
	}
	return nil, false
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
// rate limit is further away than MaxRateWait.
func (d *Deliverer) try(ctx context.Context, up *Upstream, from string, rcpts []string, body queue.Body) attempt {
	d.mu.Lock()
	st := d.state(up)
	probe, until, ok := d.admit(st, d.now())
	d.mu.Unlock()
	if !ok {
		if until.IsZero() {
			// Another delivery is probing it: come back once that has
			// told whether it is up, without counting a failure.
			return attempt{skip: &skip{upstream: up.Name, reply: "upstream " + up.Name + " is being probed", until: d.now().Add(probeRetry)}}
		}
		return attempt{skip: &skip{upstream: up.Name, reply: "upstream " + up.Name + " is down", until: until, down: true}}
	}
	release, until, err := d.takeRateSlot(ctx, st, up)
	if err != nil || release == nil {
		d.report(st, up.Name, probe, healthNone, "")
		if err != nil {
			return failAll(rcpts, up.Name, replyText(err), err) // cancelled: no text of the upstream
		}
		return attempt{skip: &skip{upstream: up.Name, reply: "rate limit of " + up.Name + " reached", until: until}}
	}
	d.mu.Lock()
	st.attempts++
	d.mu.Unlock()

	uc, err := d.getConn(ctx, st, up)
	if errors.Is(err, errTokenRefused) && ctx.Err() == nil {
		// The OAuth2 token was revoked or expired early; authenticate
		// has dropped it. One new token, on a new connection, since a
		// provider may close or distrust a session after a failed AUTH.
		d.logger().LogAttrs(ctx, slog.LevelWarn, "upstream refused oauth2 token, retrying with a new one",
			slog.String("upstream", up.Name), slog.String("reply", d.redactor(up).Replace(replyText(err))))
		uc, err = d.getConn(ctx, st, up)
	}
	if err != nil {
		release(false)
		ev := healthFailed
		var se *stageError
		switch {
		case ctx.Err() != nil:
			ev, err = healthNone, &stageError{stage: "interrupted", err: context.Cause(ctx)}
		case errors.As(err, &se) && se.stage == "auth" && authRefused(se.err):
			ev = healthMisconfigured
		}
		reply := d.redactor(up).Replace(replyText(err))
		d.report(st, up.Name, probe, ev, reply)
		return failAll(rcpts, up.Name, reply, err)
	}
	tx := d.transact(uc, from, rcpts, body)
	release(tx.dataSent)
	d.putConn(st, uc, tx.err == nil && tx.reusable, tx.canQuit)
	if tx.err != nil && uc.closed {
		// The delivery's context closed the connection: not the
		// upstream's failure.
		ierr := &stageError{stage: "interrupted", err: context.Cause(ctx)}
		for i, r := range tx.results {
			if r.State == queue.Pending && r.Reply == replyText(tx.err) {
				tx.results[i].Reply = replyText(ierr)
			}
		}
		tx.err, tx.health = ierr, healthNone
	}
	// The upstream's words leave the session here, for the results, the
	// logs and the health report.
	red := d.redactor(up)
	for i := range tx.results {
		tx.results[i].Reply = red.Replace(tx.results[i].Reply)
	}
	tx.healthReason = red.Replace(tx.healthReason)
	d.report(st, up.Name, probe, tx.health, tx.healthReason)
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

// authRefused reports whether an AUTH failure is our misconfiguration:
// the credentials refused (535), the mechanism too weak (534), encryption
// or authentication required (538, 530), or no mechanism we can use.
func authRefused(err error) bool {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		switch se.Code {
		case 530, 534, 535, 538:
			return true
		}
		return false
	}
	// authenticate's own errors: AUTH not offered, or no usable
	// mechanism; an OAuth2 token refused by OAUTHBEARER's error
	// challenge; the token endpoint refusing our grant.
	return errors.Is(err, errNoAuth) || errors.Is(err, errTokenRefused) || errors.Is(err, errGrantRefused)
}

// errNoAuth is an upstream that offers no AUTH mechanism we can use while
// credentials are configured for it.
var errNoAuth = errors.New("no usable AUTH")

// upstreamConn is an open, greeted and authenticated upstream connection.
type upstreamConn struct {
	upstream string // name, for results
	client   *smtp.Client
	raw      net.Conn // below TLS, for deadlines
	// stop detaches the connection from the context of the delivery using
	// it (see attach); nil when detached.
	stop      func() bool
	closed    bool        // closed by a delivery's context
	idleTimer *time.Timer // while idle: closes it after IdleTimeout
}

// connect dials up and prepares a session: TLS as configured, EHLO, AUTH.
// The connection is attached to ctx. Any failure here is the upstream's or
// ours, never the message's.
func (d *Deliverer) connect(ctx context.Context, up *Upstream) (*upstreamConn, error) {
	cctx, cancel := context.WithTimeout(ctx, d.commandTimeout())
	defer cancel()
	raw, err := d.dial(cctx, up)
	if err != nil {
		return nil, &stageError{stage: "connect", err: err}
	}
	uc := &upstreamConn{upstream: up.Name, raw: raw}
	uc.attach(ctx)
	c, err := d.startSession(cctx, raw, up)
	if err != nil {
		uc.detach()
		_ = raw.Close()
		return nil, err
	}
	uc.client = c
	if up.Username != "" {
		if _, err := d.authenticate(cctx, c, up); err != nil {
			uc.close(isSMTPError(err))
			return nil, &stageError{stage: "auth", err: err}
		}
	}
	return uc, nil
}

// dial opens a TCP connection to up with the Deliverer's Dial.
func (d *Deliverer) dial(ctx context.Context, up *Upstream) (net.Conn, error) {
	dial := d.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	return dial(ctx, "tcp", up.Address)
}

// startSession protects raw as up.TLS says and introduces the relay with
// EHLO. cctx bounds the TLS handshake and, with STARTTLS, everything
// before TLS. A failure is a *stageError naming the step ("connect",
// "tls", "starttls", "hello"); the caller closes raw.
func (d *Deliverer) startSession(cctx context.Context, raw net.Conn, up *Upstream) (*smtp.Client, error) {
	fail := func(stage string, err error) (*smtp.Client, error) {
		return nil, &stageError{stage: stage, err: err}
	}
	cfg, err := up.clientTLS()
	if err != nil {
		return fail("connect", err)
	}
	var c *smtp.Client
	switch up.TLS {
	case mailproto.TLSImplicit:
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(cctx); err != nil {
			return fail("tls", err)
		}
		c = smtp.NewClient(tc)
	case mailproto.TLSStartTLS:
		// NewClientStartTLS fails when STARTTLS is not offered: the session
		// never continues in plain text. It introduces itself as
		// "localhost" before TLS; the EHLO that counts is the one after
		// (RFC 3207 section 4.2), which uses Hostname.
		//
		// It reads the greeting and the EHLO and STARTTLS replies under
		// go-smtp's own five-minute timeout, before CommandTimeout can be
		// set on the client; an upstream silent there would hold the
		// delivery that long. Closing the connection when cctx ends
		// bounds the three by one CommandTimeout.
		stop := context.AfterFunc(cctx, func() { _ = raw.Close() })
		c, err = smtp.NewClientStartTLS(raw, cfg)
		if !stop() {
			return fail("starttls", fmt.Errorf("no reply within %v: %w", d.commandTimeout(), context.Cause(cctx)))
		}
		if err != nil {
			return fail("starttls", err)
		}
	case mailproto.TLSNone:
		c = smtp.NewClient(raw)
	default:
		return fail("connect", fmt.Errorf("unknown TLS mode %q", up.TLS))
	}
	c.CommandTimeout = d.commandTimeout()
	c.SubmissionTimeout = d.dataTimeout()
	if err := c.Hello(d.hostname()); err != nil {
		if isTLSError(err) {
			// After STARTTLS the handshake happens at the first EHLO.
			return fail("tls", err)
		}
		return fail("hello", err)
	}
	return c, nil
}

// clientTLS is the TLS configuration for connections to up: its host name
// verified against RootCAs, TLS 1.2 or later.
func (up *Upstream) clientTLS() (*tls.Config, error) {
	host, _, err := net.SplitHostPort(up.Address)
	if err != nil {
		return nil, err
	}
	return &tls.Config{ServerName: host, RootCAs: up.RootCAs, MinVersion: tls.VersionTLS12}, nil
}

// authenticate logs in with PLAIN, or LOGIN where PLAIN is not offered
// (RFC 4954), and returns the mechanism it chose ("" when none fits).
// Both send the password in the clear, which is why the connection is
// protected by TLS unless configured otherwise. An upstream with OAuth2
// gets an access token instead (see authenticateOAuth).
func (d *Deliverer) authenticate(ctx context.Context, c *smtp.Client, up *Upstream) (mech string, err error) {
	if mode := up.authMode(); mode != AuthPassword {
		return d.authenticateOAuth(ctx, c, up, mode)
	}
	switch {
	case c.SupportsAuth(sasl.Plain):
		return sasl.Plain, c.Auth(sasl.NewPlainClient("", up.Username, up.Password))
	case c.SupportsAuth(sasl.Login):
		return sasl.Login, c.Auth(sasl.NewLoginClient(up.Username, up.Password))
	}
	return "", noAuth(c)
}

// txOutcome is what one mail transaction did.
type txOutcome struct {
	results []queue.Result // one per recipient, in order
	// failover marks the pending results that another upstream may try at
	// once.
	failover []bool
	err      error // the session broke; the connection is unusable
	reusable bool  // the connection may carry another transaction
	canQuit  bool  // the upstream can still answer QUIT
	dataSent bool  // the final dot went out: the message counts for the rate limit
	health   healthEvent
	// healthReason is the failure that health reports, if any.
	healthReason string
}

// set records a recipient's result; a temporary failure may go to the
// next upstream unless the caller says otherwise.
func (o *txOutcome) set(i int, rcpt, upstream string, state queue.RcptState, reply string) {
	o.results[i] = queue.Result{Rcpt: rcpt, State: state, Reply: reply, Upstream: upstream}
	o.failover[i] = state == queue.Pending
}

// transact runs one mail transaction (RFC 5321 section 3.3) on an open
// connection and returns one result per recipient. A 5xx to MAIL fails
// every recipient, a 5xx to RCPT that recipient, a 5xx to DATA or after the
// final dot every accepted one; 4xx leaves them pending for the next
// upstream, except when the reply after the final dot never came.
func (d *Deliverer) transact(uc *upstreamConn, from string, rcpts []string, body queue.Body) txOutcome {
	c := uc.client
	upName := uc.upstream
	out := txOutcome{results: make([]queue.Result, len(rcpts)), failover: make([]bool, len(rcpts))}
	set := func(idx []int, state queue.RcptState, reply string) {
		for _, i := range idx {
			out.set(i, rcpts[i], upName, state, reply)
		}
	}
	// broken ends the transaction on a lost connection: the recipients idx
	// stay pending, free to fail over unless the message may have been
	// taken.
	broken := func(stage string, err error, idx []int, failover bool) txOutcome {
		err = &stageError{stage: stage, err: err}
		out.err, out.reusable, out.canQuit = err, false, false
		out.health, out.healthReason = healthFailed, replyText(err)
		set(idx, queue.Pending, replyText(err))
		for _, i := range idx {
			out.failover[i] = failover
		}
		return out
	}
	// refused handles an SMTP reply that refuses a step for recipients idx.
	refused := func(se *smtp.SMTPError, idx []int) txOutcome {
		set(idx, stateFor(se), formatReply(se))
		out.reusable, out.canQuit = true, true
		if se.Code == 421 {
			// RFC 5321 section 3.8: the upstream is closing the connection.
			out.reusable, out.canQuit = false, false
			out.health, out.healthReason = healthFailed, formatReply(se)
		}
		return out
	}
	all := make([]int, len(rcpts))
	for i := range all {
		all[i] = i
	}

	opts := &smtp.MailOptions{Size: body.Size(), UTF8: !isASCII(from)}
	for _, r := range rcpts {
		opts.UTF8 = opts.UTF8 || !isASCII(r)
	}
	if err := c.Mail(from, opts); err != nil {
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			return broken("mail", err, all, true)
		}
		if se.Code == 530 {
			// Authentication required (RFC 4954 section 6): our
			// configuration, not the message's.
			set(all, queue.Pending, formatReply(se))
			out.canQuit = true
			out.health, out.healthReason = healthMisconfigured, formatReply(se)
			return out
		}
		out.health = healthOK
		return refused(se, all)
	}
	out.health = healthOK

	var accepted []int
	for i, r := range rcpts {
		err := c.Rcpt(r, nil)
		if err == nil {
			accepted = append(accepted, i)
			continue
		}
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			// Without a connection nothing more is decided: the accepted
			// recipients and the rest stay pending.
			return broken("rcpt", err, append(accepted, all[i:]...), true)
		}
		if se.Code == 421 {
			return refused(se, append(accepted, all[i:]...))
		}
		set([]int{i}, stateFor(se), formatReply(se))
	}
	if len(accepted) == 0 {
		out.reusable, out.canQuit = true, true
		return out
	}

	// From DATA on the upstream may take the message: cancellation no
	// longer closes the connection, since a message cut off half-way is
	// worse than a late one. Deadlines still bound every step.
	if !uc.detach() {
		broken("interrupted", errors.New("cancelled before DATA"), accepted, true)
		out.health, out.healthReason = healthNone, ""
		return out
	}
	w, err := c.Data()
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return refused(se, accepted)
		}
		return broken("data", err, accepted, true)
	}
	// The client sets no deadline while the message is written.
	_ = uc.raw.SetDeadline(time.Now().Add(d.dataTimeout()))
	src := &sourceReader{r: body.Reader()}
	if _, err := io.Copy(w, src); err != nil {
		if src.err != nil {
			// Our copy of the message failed to read: the final dot must
			// not go out after a part of it, so the connection is dropped
			// without QUIT. Not the upstream's failure, and another one
			// would read the same file: the attempt is retried later.
			out.err = &stageError{stage: "data", err: src.err}
			out.reusable, out.canQuit = false, false
			set(accepted, queue.Pending, errContentUnreadable)
			for _, i := range accepted {
				out.failover[i] = false
			}
			return out
		}
		// The final dot has not gone out: the upstream cannot have taken
		// the message.
		return broken("data", err, accepted, true)
	}
	resp, err := w.CloseWithResponse()
	out.dataSent = true
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return refused(se, accepted)
		}
		// The upstream may or may not have taken it (RFC 1047). Another
		// upstream now would likely make a duplicate; giving up risks a
		// loss: retry later.
		return broken("end of data", err, accepted, false)
	}
	set(accepted, queue.Delivered, "250 "+oneLine(resp.StatusText))
	out.reusable, out.canQuit = true, true
	return out
}

// errContentUnreadable is the reply recorded when a message's content
// could not be read while it was sent, as the queue records one it cannot
// open.
const errContentUnreadable = "local error: message content unreadable"

// sourceReader passes reads through and keeps the first error other than
// io.EOF, so that a failure to read the message is told apart from one
// to send it.
type sourceReader struct {
	r   io.Reader
	err error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF && s.err == nil {
		s.err = err
	}
	return n, err
}

func (d *Deliverer) hostname() string {
	if d.Hostname == "" {
		return "localhost"
	}
	return d.Hostname
}

func (d *Deliverer) commandTimeout() time.Duration {
	if d.CommandTimeout <= 0 {
		return 2 * time.Minute
	}
	return d.CommandTimeout
}

func (d *Deliverer) dataTimeout() time.Duration {
	if d.DataTimeout <= 0 {
		return 10 * time.Minute
	}
	return d.DataTimeout
}

func (d *Deliverer) now() time.Time {
	if d.Now == nil {
		return time.Now()
	}
	return d.Now()
}

func (d *Deliverer) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.Default()
	}
	return d.Logger
}

// observe tells the Observer about one upstream transaction for m.
func (d *Deliverer) observe(m queue.Message, upstream string, took time.Duration, results []queue.Result) {
	if d.Observer == nil {
		return
	}
	result := ResultDeferred
	for _, r := range results {
		if r.State == queue.Delivered {
			result = ResultDelivered
			break
		}
		if r.State == queue.Failed {
			result = ResultFailed
		}
	}
	d.Observer.Transaction(upstream, result, took)
	if result == ResultDelivered && !m.DSN {
		d.Observer.Delivered(upstream, d.now().Sub(m.Received))
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
		slog.Duration("duration", took),
		slog.Int("delivered", delivered),
		slog.Int("deferred", deferred),
		slog.Int("failed", failed),
		slog.String("reply", reply),
	}
	var se *stageError
	if errors.As(err, &se) {
		attrs = append(attrs, slog.String("stage", se.stage))
	}
	d.logger().LogAttrs(ctx, level, "delivery attempt", attrs...)
}

// stageError is a failure of one step of an upstream session.
type stageError struct {
	stage string
	err   error
}

func (e *stageError) Error() string { return e.stage + ": " + e.err.Error() }
func (e *stageError) Unwrap() error { return e.err }

// replyText is what a Result records for err: the upstream's reply when
// there was one, else a short local text such as "connect: connection
// refused", free of addresses and credentials.
func replyText(err error) string {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return formatReply(se)
	}
	var st *stageError
	if !errors.As(err, &st) {
		return oneLine(err.Error())
	}
	detail := st.err
	var op *net.OpError
	if errors.As(detail, &op) && op.Err != nil {
		detail = op.Err // drop "dial tcp 127.0.0.1:25" and the like
	}
	text := strings.TrimPrefix(detail.Error(), "smtp: ")
	if !strings.HasPrefix(text, st.stage+": ") {
		text = st.stage + ": " + text
	}
	return oneLine(text)
}

// formatReply renders an upstream reply as "550 5.1.1 No such user".
func formatReply(se *smtp.SMTPError) string {
	ec := se.EnhancedCode
	if ec == smtp.EnhancedCodeNotSet || ec == smtp.NoEnhancedCode {
		return fmt.Sprintf("%d %s", se.Code, oneLine(se.Message))
	}
	return fmt.Sprintf("%d %d.%d.%d %s", se.Code, ec[0], ec[1], ec[2], oneLine(se.Message))
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// stateFor maps a reply to a recipient state: 5xx is permanent, anything
// else (4xx, or a code outside the standard classes) is retried.
func stateFor(se *smtp.SMTPError) queue.RcptState {
	if se.Code/100 == 5 {
		return queue.Failed
	}
	return queue.Pending
}

func isSMTPError(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se)
}

func isTLSError(err error) bool {
	var (
		verify *tls.CertificateVerificationError
		alert  tls.AlertError
		record tls.RecordHeaderError
	)
	return errors.As(err, &verify) || errors.As(err, &alert) || errors.As(err, &record)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
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
