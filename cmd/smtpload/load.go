package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Run sends cfg.Messages messages over cfg.Concurrency sessions and
// reports what happened. Messages are split evenly between the sessions;
// each session is one goroutine that sends its messages one after the
// other.
//
// When ctx ends, each session finishes the transaction it is in and
// stops; the messages it did not start count as NotSent. A setup failure
// that every later connection would repeat (a 5xx reply to the greeting,
// EHLO or AUTH, a certificate that does not verify, no AUTH offered) stops
// the run the same way: Run then returns the partial Result and that
// error. Failures of single messages are in the Result, not the error.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if err := cfg.Validate(); err != nil {
		return Result{}, err
	}
	tlsConf, err := cfg.TLSConfig()
	if err != nil {
		return Result{}, err
	}
	msgs := newMessages(cfg, newRunID())
	runCtx, stop := context.WithCancelCause(ctx)
	defer stop(nil)

	var p *pacer
	if cfg.Rate > 0 {
		p = &pacer{interval: time.Duration(float64(time.Second) / cfg.Rate)}
	}
	n := min(cfg.Concurrency, cfg.Messages)
	sessions := make([]*session, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range sessions {
		s := &session{
			cfg:      &cfg,
			tls:      tlsConf,
			msgs:     msgs,
			pacer:    p,
			abort:    stop,
			first:    i + 1,
			step:     n,
			failed:   map[string]int{},
			examples: map[string]string{},
		}
		sessions[i] = s
		wg.Go(func() { s.run(runCtx) })
	}
	wg.Wait()

	res := Result{
		Messages: cfg.Messages,
		Wall:     time.Since(start),
		Failed:   map[string]int{},
		Replies:  map[string]string{},
	}
	for _, s := range sessions {
		res.Sent += s.sent
		res.ConnErrors += s.connErrors
		res.NotSent += s.notSent
		res.Connections += s.connections
		res.Bytes += s.bytes
		res.Latencies = append(res.Latencies, s.latencies...)
		res.Setups = append(res.Setups, s.setups...)
		for k, v := range s.failed {
			res.Failed[k] += v
			if _, ok := res.Replies[k]; !ok {
				res.Replies[k] = s.examples[k]
			}
		}
		if res.FirstConnError == "" {
			res.FirstConnError = s.firstConnError
		}
	}
	slices.Sort(res.Latencies)
	slices.Sort(res.Setups)
	res.Interrupted = ctx.Err() != nil

	var fatal *fatalError
	if cause := context.Cause(runCtx); errors.As(cause, &fatal) {
		res.Stopped = fatal.Error()
		return res, fatal
	}
	return res, nil
}

// fatalError is a setup failure that every later connection would
// repeat. Retrying a refused login on each connection would also count
// against the client in the server's failed-login limits.
type fatalError struct{ err error }

func (e *fatalError) Error() string { return e.err.Error() }
func (e *fatalError) Unwrap() error { return e.err }

// isFatal tells whether a setup error should stop the run.
func isFatal(err error) bool {
	var fe *fatalError
	if errors.As(err, &fe) {
		return true
	}
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code >= 500
	}
	var ve *tls.CertificateVerificationError
	return errors.As(err, &ve)
}

// pacer spaces message starts over all sessions by interval: each call
// to wait takes the next free slot.
type pacer struct {
	interval time.Duration

	mu   sync.Mutex
	next time.Time
}

func (p *pacer) wait(ctx context.Context) error {
	if p == nil {
		return ctx.Err()
	}
	p.mu.Lock()
	now := time.Now()
	slot := p.next
	if slot.Before(now) {
		// Idle time is not saved up: no burst after a slow stretch.
		slot = now
	}
	p.next = slot.Add(p.interval)
	p.mu.Unlock()

	d := time.Until(slot)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// session sends the messages first, first+step, … up to cfg.Messages, over
// one connection at a time, and records the outcomes in its own fields;
// Run merges them when every session is done.
type session struct {
	cfg   *Config
	tls   *tls.Config
	msgs  *messages
	pacer *pacer
	abort context.CancelCauseFunc
	first int
	step  int

	sent           int
	bytes          int64
	failed         map[string]int    // by replyKey
	examples       map[string]string // first reply text for each key
	connErrors     int
	firstConnError string
	notSent        int
	connections    int
	latencies      []time.Duration
	setups         []time.Duration
}

// conn is one set-up SMTP connection.
type conn struct {
	c    *smtp.Client
	raw  net.Conn // below TLS: deadlines set here hold for the TLS layer too
	used int      // transactions started on it
}

func (s *session) run(ctx context.Context) {
	var cn *conn
	defer func() {
		if cn != nil {
			s.quit(cn)
		}
	}()
	for seq := s.first; seq <= s.cfg.Messages; seq += s.step {
		if err := s.pacer.wait(ctx); err != nil {
			s.notSent++
			continue
		}
		if cn == nil {
			var err error
			cn, err = s.connect(ctx)
			if err != nil {
				s.setupFailed(ctx, err)
				continue
			}
		}
		keep := s.send(cn, seq)
		cn.used++
		if !keep {
			_ = cn.c.Close()
			cn = nil
		} else if s.cfg.PerConn > 0 && cn.used >= s.cfg.PerConn {
			s.quit(cn)
			cn = nil
		}
	}
}

// setupFailed records a connection that could not be set up; the message
// it was meant for counts as failed with the server's reply, as a
// connection error, or as not sent when the run was stopping anyway.
func (s *session) setupFailed(ctx context.Context, err error) {
	fatal := isFatal(err)
	if fatal {
		s.abort(&fatalError{err: err})
	} else if ctx.Err() != nil {
		s.notSent++
		return
	}
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		s.reject(se)
		return
	}
	s.connError(err)
}

// connect dials and sets up a connection: TLS, EHLO and AUTH as
// configured. The whole setup is bounded by cfg.Timeout.
func (s *session) connect(ctx context.Context) (*conn, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	// go-smtp sets a deadline for each command itself, and with STARTTLS
	// it reads the greeting before its timeouts can be set. Closing the
	// connection when ctx ends bounds the setup whatever go-smtp does.
	stopClose := context.AfterFunc(ctx, func() { _ = raw.Close() })
	c, err := s.setUp(raw)
	if !stopClose() {
		if err == nil {
			_ = c.Close()
		}
		return nil, fmt.Errorf("connection setup: %w", ctx.Err())
	}
	if err != nil {
		_ = raw.Close()
		return nil, err
	}
	s.connections++
	s.setups = append(s.setups, time.Since(start))
	return &conn{c: c, raw: raw}, nil
}

// setUp runs greeting, TLS, EHLO and AUTH on a fresh connection.
func (s *session) setUp(raw net.Conn) (*smtp.Client, error) {
	var c *smtp.Client
	switch s.cfg.TLS {
	case TLSImplicit:
		tc := tls.Client(raw, s.tls)
		if err := tc.Handshake(); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		c = smtp.NewClient(tc)
	case TLSStartTLS:
		// go-smtp greets and sends EHLO (as "localhost") before STARTTLS;
		// the EHLO after TLS (RFC 3207 section 4.2) uses -helo.
		var err error
		c, err = smtp.NewClientStartTLS(raw, s.tls)
		if err != nil {
			return nil, fmt.Errorf("STARTTLS: %w", err)
		}
	default:
		c = smtp.NewClient(raw)
	}
	c.CommandTimeout = s.cfg.Timeout
	c.SubmissionTimeout = s.cfg.Timeout
	if err := c.Hello(s.cfg.Helo); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("greeting or EHLO: %w", err)
	}
	if s.cfg.User == "" {
		return c, nil
	}
	if ok, _ := c.Extension("AUTH"); !ok {
		_ = c.Close()
		hint := ""
		if s.cfg.TLS == TLSNone {
			hint = " (servers often offer it only after STARTTLS: try -tls starttls)"
		}
		return nil, &fatalError{err: fmt.Errorf("the server does not offer AUTH%s", hint)}
	}
	mech := sasl.NewPlainClient("", s.cfg.User, s.cfg.Password)
	if !c.SupportsAuth(sasl.Plain) && c.SupportsAuth(sasl.Login) {
		mech = sasl.NewLoginClient(s.cfg.User, s.cfg.Password)
	}
	if err := c.Auth(mech); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("AUTH as %s: %w", s.cfg.User, err)
	}
	return c, nil
}

// send submits message seq on cn and records the outcome. It reports
// whether the connection may carry another message.
func (s *session) send(cn *conn, seq int) bool {
	hdr := s.msgs.header(seq, time.Now())
	size := len(hdr) + len(s.msgs.body)
	start := time.Now()
	open, err := s.transaction(cn, hdr, size)
	if err == nil {
		s.latencies = append(s.latencies, time.Since(start))
		s.sent++
		s.bytes += int64(size)
		return true
	}
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		s.connError(err)
		return false
	}
	s.reject(se)
	if se.Code == 421 {
		// RFC 5321 section 3.8: the server is closing the connection.
		return false
	}
	if open {
		// RFC 5321 section 4.1.1.5: RSET ends the refused transaction so
		// that the next MAIL starts afresh.
		if err := cn.c.Reset(); err != nil {
			return false
		}
	}
	return true
}

// transaction runs MAIL, RCPT and DATA for one message. open reports
// whether a refusal left the transaction open (MAIL accepted, no final
// reply to DATA).
func (s *session) transaction(cn *conn, hdr []byte, size int) (open bool, err error) {
	if err := cn.c.Mail(s.cfg.From, &smtp.MailOptions{Size: int64(size)}); err != nil {
		return false, fmt.Errorf("MAIL FROM: %w", err)
	}
	for _, to := range s.cfg.To {
		if err := cn.c.Rcpt(to, nil); err != nil {
			return true, fmt.Errorf("RCPT TO <%s>: %w", to, err)
		}
	}
	w, err := cn.c.Data()
	if err != nil {
		return true, fmt.Errorf("DATA: %w", err)
	}
	// go-smtp leaves the content without a deadline; -timeout bounds it
	// too, so a server that stops reading cannot hang the session.
	if err := cn.raw.SetDeadline(time.Now().Add(s.cfg.Timeout)); err != nil {
		return false, fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(hdr); err != nil {
		return false, fmt.Errorf("DATA content: %w", err)
	}
	if _, err := w.Write(s.msgs.body); err != nil {
		return false, fmt.Errorf("DATA content: %w", err)
	}
	if err := w.Close(); err != nil {
		return false, fmt.Errorf("end of DATA: %w", err)
	}
	return false, nil
}

// quit ends a connection politely; a server that does not answer QUIT
// within the timeout gets the connection closed.
func (s *session) quit(cn *conn) {
	if err := cn.c.Quit(); err != nil {
		_ = cn.c.Close()
	}
}

func (s *session) reject(se *smtp.SMTPError) {
	k := replyKey(se)
	s.failed[k]++
	if _, ok := s.examples[k]; !ok {
		s.examples[k] = se.Message
	}
}

func (s *session) connError(err error) {
	s.connErrors++
	if s.firstConnError == "" {
		s.firstConnError = err.Error()
	}
}

// replyKey is the reply code with its enhanced status code (RFC 3463)
// when the server sent one: "452 4.3.1".
func replyKey(se *smtp.SMTPError) string {
	ec := se.EnhancedCode
	if ec == (smtp.EnhancedCode{}) || ec == smtp.NoEnhancedCode {
		return fmt.Sprint(se.Code)
	}
	return fmt.Sprintf("%d %d.%d.%d", se.Code, ec[0], ec[1], ec[2])
}
