package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/queue"
)

// Deliverer is the upstream side: it hands queued messages to the upstream
// providers of the sender's route, in order, and reports per recipient what
// happened. Set the fields before the first Deliver and do not change them
// afterwards; Deliver may be called concurrently.
type Deliverer struct {
	Hostname  string // EHLO name; default "localhost"
	Upstreams []Upstream
	// Routes choose upstreams by the envelope sender's domain; FromDomain
	// "*" takes every other sender, the null sender <> included.
	Routes []Route
	// Dial opens connections; default (&net.Dialer{}).DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// CommandTimeout bounds connecting and each command's reply; default 2m.
	CommandTimeout time.Duration
	// DataTimeout bounds sending the message and the reply after the final
	// dot; default 10m.
	DataTimeout time.Duration
	Logger      *slog.Logger // default slog.Default()

	mu    sync.Mutex
	slots map[string]chan struct{} // per upstream name: one token per open connection
}

const defaultMaxConnections = 4

// Deliver delivers m's pending recipients and returns one Result per
// pending recipient, in the order of m.Pending(). It matches
// queue.DeliverFunc.
func (d *Deliverer) Deliver(ctx context.Context, m queue.Message, body []byte) []queue.Result {
	rcpts := m.Pending()
	if len(rcpts) == 0 {
		return nil
	}
	route, ok := d.Route(m.From)
	if !ok {
		// The submission side refuses such senders; a route may come back
		// with a reload, so this is not the message's fault.
		reply := "no route for sender domain"
		d.logAttempt(ctx, m, "", 0, nil, reply, errors.New(reply))
		return allResults(rcpts, queue.Pending, reply, "")
	}
	var (
		lastReply    = "no upstream in route"
		lastUpstream string
	)
	for _, name := range route.Upstreams {
		up, ok := d.upstream(name)
		if !ok {
			lastReply, lastUpstream = "unknown upstream", name
			d.logAttempt(ctx, m, name, 0, nil, lastReply, errors.New(lastReply))
			continue
		}
		start := time.Now()
		results, err := d.deliverVia(ctx, up, m.From, rcpts, body)
		if err != nil && ctx.Err() != nil {
			err = &stageError{stage: "interrupted", err: context.Cause(ctx)}
		}
		reply := summaryReply(results, err)
		d.logAttempt(ctx, m, up.Name, time.Since(start), results, reply, err)
		if results != nil {
			return results
		}
		lastReply, lastUpstream = reply, up.Name
		if ctx.Err() != nil {
			break
		}
	}
	return allResults(rcpts, queue.Pending, lastReply, lastUpstream)
}

// Route returns the route for an envelope sender: the one for its domain,
// else the "*" route. The null sender "" takes the "*" route.
func (d *Deliverer) Route(from string) (Route, bool) {
	domain := DomainOf(from)
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

// deliverVia tries one upstream. It returns nil results and the reason when
// the upstream could not take the message at all, so that the next one may;
// otherwise one Result per recipient, and an error if the session broke.
func (d *Deliverer) deliverVia(ctx context.Context, up *Upstream, from string, rcpts []string, body []byte) ([]queue.Result, error) {
	release, err := d.acquire(ctx, up)
	if err != nil {
		return nil, &stageError{stage: "interrupted", err: err}
	}
	defer release()
	uc, err := d.connect(ctx, up)
	if err != nil {
		return nil, err
	}
	results, err := d.transact(uc, from, rcpts, body)
	// After a reply, even a refusal, the session can still be ended politely.
	uc.close(err == nil || isSMTPError(err))
	return results, err
}

// acquire takes one of the upstream's MaxConnections slots, waiting while
// all are in use.
func (d *Deliverer) acquire(ctx context.Context, up *Upstream) (release func(), err error) {
	d.mu.Lock()
	if d.slots == nil {
		d.slots = make(map[string]chan struct{})
	}
	slots, ok := d.slots[up.Name]
	if !ok {
		n := up.MaxConnections
		if n <= 0 {
			n = defaultMaxConnections
		}
		slots = make(chan struct{}, n)
		d.slots[up.Name] = slots
	}
	d.mu.Unlock()
	select {
	case slots <- struct{}{}:
		return func() { <-slots }, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// upstreamConn is an open, greeted and authenticated upstream connection.
type upstreamConn struct {
	upstream string // name, for results
	client   *smtp.Client
	raw      net.Conn // below TLS, for deadlines
	// stopCancel detaches the connection from the context, which closes
	// it when cancelled; false if that has already happened.
	stopCancel func() bool
}

// connect dials up and prepares a session: TLS as configured, EHLO, AUTH.
// Any failure here is the upstream's or ours, never the message's.
func (d *Deliverer) connect(ctx context.Context, up *Upstream) (*upstreamConn, error) {
	cctx, cancel := context.WithTimeout(ctx, d.commandTimeout())
	defer cancel()
	dial := d.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	raw, err := dial(cctx, "tcp", up.Address)
	if err != nil {
		return nil, &stageError{stage: "connect", err: err}
	}
	// go-smtp's client does not take a context: closing the connection is
	// what interrupts a command in progress.
	stop := context.AfterFunc(ctx, func() { _ = raw.Close() })
	fail := func(stage string, err error) (*upstreamConn, error) {
		stop()
		_ = raw.Close()
		return nil, &stageError{stage: stage, err: err}
	}

	host, _, err := net.SplitHostPort(up.Address)
	if err != nil {
		return fail("connect", err)
	}
	cfg := &tls.Config{ServerName: host, RootCAs: up.RootCAs, MinVersion: tls.VersionTLS12}
	var c *smtp.Client
	switch up.TLS {
	case TLSImplicit:
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(cctx); err != nil {
			return fail("tls", err)
		}
		c = smtp.NewClient(tc)
	case TLSStartTLS:
		// NewClientStartTLS fails when STARTTLS is not offered: the session
		// never continues in plain text. It introduces itself as
		// "localhost" before TLS; the EHLO that counts is the one after
		// (RFC 3207 section 4.2), which uses Hostname.
		c, err = smtp.NewClientStartTLS(raw, cfg)
		if err != nil {
			return fail("starttls", err)
		}
	case TLSNone:
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
	uc := &upstreamConn{upstream: up.Name, client: c, raw: raw, stopCancel: stop}
	if up.Username != "" {
		if err := authenticate(c, up); err != nil {
			uc.close(isSMTPError(err))
			return nil, &stageError{stage: "auth", err: err}
		}
	}
	return uc, nil
}

// authenticate logs in with PLAIN, or LOGIN where PLAIN is not offered
// (RFC 4954). Both send the password in the clear, which is why the
// connection is protected by TLS unless configured otherwise.
func authenticate(c *smtp.Client, up *Upstream) error {
	switch {
	case c.SupportsAuth(sasl.Plain):
		return c.Auth(sasl.NewPlainClient("", up.Username, up.Password))
	case c.SupportsAuth(sasl.Login):
		return c.Auth(sasl.NewLoginClient(up.Username, up.Password))
	}
	if ok, mechs := c.Extension("AUTH"); ok {
		return fmt.Errorf("no supported AUTH mechanism offered (%s)", mechs)
	}
	return errors.New("AUTH not offered")
}

// close ends the session with QUIT when the connection is still in a state
// to answer, else just closes it.
func (uc *upstreamConn) close(quit bool) {
	uc.stopCancel()
	if quit {
		if err := uc.client.Quit(); err == nil {
			return
		}
	}
	_ = uc.client.Close()
}

// transact runs one mail transaction (RFC 5321 section 3.3) on an open
// connection. It returns nil results when the upstream refused the
// transaction as a whole in a way that another upstream may not (4xx to
// MAIL, or a connection failure), with the reason; otherwise one Result per
// recipient, and a non-nil error if the connection is no longer usable.
// A caller that keeps the connection for another transaction must RSET
// first when not every recipient was tried through DATA.
func (d *Deliverer) transact(uc *upstreamConn, from string, rcpts []string, body []byte) ([]queue.Result, error) {
	c := uc.client
	opts := &smtp.MailOptions{Size: int64(len(body)), UTF8: !isASCII(from)}
	for _, r := range rcpts {
		opts.UTF8 = opts.UTF8 || !isASCII(r)
	}
	upName := uc.upstream
	if err := c.Mail(from, opts); err != nil {
		var se *smtp.SMTPError
		// 530 is "authentication required" (RFC 4954 section 6): our
		// configuration, not the message.
		if errors.As(err, &se) && se.Code/100 == 5 && se.Code != 530 {
			return allResults(rcpts, queue.Failed, formatReply(se), upName), nil
		}
		return nil, &stageError{stage: "mail", err: err}
	}

	results := make([]queue.Result, len(rcpts))
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
			err = &stageError{stage: "rcpt", err: err}
			for j := range rcpts {
				if j >= i || results[j].Rcpt == "" {
					results[j] = queue.Result{Rcpt: rcpts[j], State: queue.Pending, Reply: replyText(err), Upstream: upName}
				}
			}
			return results, err
		}
		results[i] = queue.Result{Rcpt: r, State: stateFor(se), Reply: formatReply(se), Upstream: upName}
	}
	if len(accepted) == 0 {
		return results, nil
	}
	decide := func(state queue.RcptState, reply string) {
		for _, i := range accepted {
			results[i] = queue.Result{Rcpt: rcpts[i], State: state, Reply: reply, Upstream: upName}
		}
	}

	// From DATA on the upstream may take the message: cancellation no
	// longer closes the connection, since a message cut off half-way is
	// worse than a late one. Deadlines still bound every step.
	if !uc.stopCancel() {
		err := &stageError{stage: "interrupted", err: errors.New("cancelled before DATA")}
		decide(queue.Pending, replyText(err))
		return results, err
	}
	w, err := c.Data()
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			decide(stateFor(se), formatReply(se))
			return results, nil
		}
		err = &stageError{stage: "data", err: err}
		decide(queue.Pending, replyText(err))
		return results, err
	}
	// The client sets no deadline while the message is written.
	_ = uc.raw.SetDeadline(time.Now().Add(d.dataTimeout()))
	if _, err := w.Write(body); err != nil {
		err = &stageError{stage: "data", err: err}
		decide(queue.Pending, replyText(err))
		return results, err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			decide(stateFor(se), formatReply(se))
			return results, nil
		}
		// The upstream may or may not have taken it; retrying risks a
		// duplicate, giving up risks a loss: retry.
		err = &stageError{stage: "end of data", err: err}
		decide(queue.Pending, replyText(err))
		return results, err
	}
	decide(queue.Delivered, "250 "+oneLine(resp.StatusText))
	return results, nil
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

func (d *Deliverer) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.Default()
	}
	return d.Logger
}

// logAttempt writes the one line per attempt per upstream. An attempt that
// failed short of a reply to the message is a warning: it points at the
// upstream, the network or our configuration.
func (d *Deliverer) logAttempt(ctx context.Context, m queue.Message, upstream string, took time.Duration, results []queue.Result, reply string, err error) {
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
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelWarn
	}
	if results == nil {
		deferred = len(m.Pending())
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
