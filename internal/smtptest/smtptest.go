// Package smtptest runs a real go-smtp server on loopback that records what
// it receives and answers as a test scripts it. Tests use it as a fake
// upstream provider.
package smtptest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// TLSMode says how the server protects connections.
type TLSMode string

const (
	// TLSNone is plain text. AUTH is offered without TLS.
	TLSNone TLSMode = "none"
	// TLSStartTLS offers STARTTLS; AUTH is offered only after it.
	TLSStartTLS TLSMode = "starttls"
	// TLSImplicit speaks TLS from the first byte.
	TLSImplicit TLSMode = "implicit"
)

// Drop, returned by a reply hook or set as the greeting reply, makes the
// server close the connection at that point without answering.
var Drop = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "smtptest: connection dropped"}

// Options configure a Server. The reply hooks may also be changed later
// with the Server's Set methods.
type Options struct {
	TLS TLSMode // default TLSNone
	// TLSConfig is required for TLSStartTLS and TLSImplicit, e.g.
	// testpki.New(t).ServerTLS().
	TLSConfig *tls.Config
	// Username and Password, when Username is set, make AUTH (PLAIN or
	// LOGIN) required before MAIL.
	Username, Password string
	// AuthMechanisms offered when Username is set; default PLAIN and LOGIN.
	AuthMechanisms []string
	// AuthServer, when set, serves AUTH for the mechanisms in
	// AuthMechanisms (required with it) instead of PLAIN and LOGIN, and
	// makes AUTH required before MAIL. It returns the server side of mech
	// for one exchange; the exchange calls authenticated with the user it
	// logged in, before it ends successfully.
	AuthServer func(mech string, authenticated func(username string)) sasl.Server
	// Addr to listen on; default "127.0.0.1:0". A fixed address lets a
	// test bring a closed server back on the same port.
	Addr string

	GreetReply *smtp.SMTPError
	MailReply  func(from string) *smtp.SMTPError
	RcptReply  func(to string) *smtp.SMTPError
	DataReply  func(from string, to []string, data []byte) *smtp.SMTPError
}

// Message is one message the server accepted with 250 after DATA.
type Message struct {
	From     string
	To       []string
	Data     []byte // as received, dot-unstuffed, including the final CRLF
	AuthUser string // the user that authenticated on the connection, if any
	TLS      bool   // whether the connection was protected by TLS
	ConnID   int    // which connection it came over, from 1 in accept order
	// Began is when its MAIL command was accepted and Ended when its
	// data was, so that a test can tell transactions that overlapped.
	Began, Ended time.Time
}

// Server is a running fake SMTP server. Its methods are safe for
// concurrent use.
type Server struct {
	t    testing.TB
	opts Options
	ln   net.Listener // the raw TCP listener
	srv  *smtp.Server

	serveDone chan struct{}
	rejects   sync.WaitGroup // greeting rejections in progress

	mu           sync.Mutex
	closed       bool
	greetReply   *smtp.SMTPError
	mailReply    func(string) *smtp.SMTPError
	rcptReply    func(string) *smtp.SMTPError
	dataReply    func(string, []string, []byte) *smtp.SMTPError
	password     string // accepted by AUTH; see SetPassword
	msgs         []Message
	changed      chan struct{} // closed and replaced when msgs grows
	conns        []*conn
	authAttempts []string
	seq          int64         // orders connection events, see MaxConcurrent
	connEvent    chan struct{} // closed and replaced when a connection settles
	waiters      int           // MaxConcurrent calls waiting on connEvent
}

// Start starts a server and registers its Close with t.Cleanup. The server
// is listening when Start returns.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.TLS == "" {
		opts.TLS = TLSNone
	}
	switch opts.TLS {
	case TLSNone:
	case TLSStartTLS, TLSImplicit:
		if opts.TLSConfig == nil {
			t.Fatalf("smtptest: TLS %q needs Options.TLSConfig", opts.TLS)
		}
	default:
		t.Fatalf("smtptest: unknown TLS mode %q", opts.TLS)
	}
	if opts.Addr == "" {
		opts.Addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		t.Fatalf("smtptest: %v", err)
	}
	s := &Server{
		t:          t,
		opts:       opts,
		ln:         ln,
		serveDone:  make(chan struct{}),
		greetReply: opts.GreetReply,
		mailReply:  opts.MailReply,
		rcptReply:  opts.RcptReply,
		dataReply:  opts.DataReply,
		password:   opts.Password,
		changed:    make(chan struct{}),
		connEvent:  make(chan struct{}),
	}
	s.srv = smtp.NewServer(smtp.BackendFunc(s.newSession))
	s.srv.Domain = "smtptest.localhost"
	s.srv.ErrorLog = testLogger{s}
	if opts.TLS == TLSStartTLS {
		s.srv.TLSConfig = opts.TLSConfig
	}
	// Without TLS there is nothing to wait for; with STARTTLS, AUTH is
	// withheld until TLS as real providers do (RFC 4954 section 4).
	s.srv.AllowInsecureAuth = opts.TLS == TLSNone
	go func() {
		defer close(s.serveDone)
		_ = s.srv.Serve(&listener{s: s})
	}()
	t.Cleanup(s.Close)
	return s
}

// Addr is the listening address, "127.0.0.1:PORT".
func (s *Server) Addr() string { return s.ln.Addr().String() }

// SetGreetReply makes the server answer new connections with e instead of
// its 220 greeting and close them; nil restores the greeting.
func (s *Server) SetGreetReply(e *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.greetReply = e
}

// SetMailReply sets the hook that answers MAIL FROM; a nil result accepts.
func (s *Server) SetMailReply(f func(from string) *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mailReply = f
}

// SetRcptReply sets the hook that answers RCPT TO; a nil result accepts.
func (s *Server) SetRcptReply(f func(to string) *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcptReply = f
}

// SetDataReply sets the hook that answers the end of DATA; a nil result
// accepts and records the message.
func (s *Server) SetDataReply(f func(from string, to []string, data []byte) *smtp.SMTPError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dataReply = f
}

// SetPassword changes the password AUTH accepts from now on, as when a
// provider's credentials are rotated; sessions already logged in stay so.
func (s *Server) SetPassword(password string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.password = password
}

// Messages returns copies of the messages accepted so far.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.copyMessages()
}

func (s *Server) copyMessages() []Message {
	out := make([]Message, len(s.msgs))
	for i, m := range s.msgs {
		m.To = slices.Clone(m.To)
		m.Data = slices.Clone(m.Data)
		out[i] = m
	}
	return out
}

// WaitMessages waits until at least n messages were accepted and returns
// them all. After timeout it fails the test with what it has. Call it from
// the test's goroutine.
func (s *Server) WaitMessages(t testing.TB, n int, timeout time.Duration) []Message {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if len(s.msgs) >= n {
			out := s.copyMessages()
			s.mu.Unlock()
			return out
		}
		changed := s.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-timer.C:
			got := s.Messages()
			t.Fatalf("smtptest %s: %d messages after %v, want %d: %+v", s.Addr(), len(got), timeout, n, got)
			return nil
		}
	}
}

// AuthAttempts returns the usernames of every AUTH attempt, in order.
func (s *Server) AuthAttempts() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.authAttempts)
}

// Connections is the number of connections accepted so far, including
// those refused at the greeting.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// MaxConcurrent is the largest number of connections that were open at
// the same time. A connection counts from accept until the server has read
// the last bytes the client sent on it, so a client that waits for the
// reply to QUIT before it opens another connection is never counted twice,
// while a connection kept open, even idle, keeps counting. A client that
// closes without QUIT counts until the server notices the close.
//
// So that the figure does not depend on how far the server's goroutines
// have got, MaxConcurrent first waits (up to five seconds) until every
// open connection is waiting for the client.
func (s *Server) MaxConcurrent() int {
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for timedOut := false; !timedOut && !s.settled(); {
		// Past the deadline, connections still busy count as open.
		s.waiters++
		ch := s.connEvent
		s.mu.Unlock()
		select {
		case <-ch:
		case <-deadline.C:
			timedOut = true
		}
		s.mu.Lock()
		s.waiters--
	}
	best := 0
	for _, a := range s.conns {
		n := 0
		for _, b := range s.conns {
			if b.start <= a.start && b.end() >= a.start {
				n++
			}
		}
		best = max(best, n)
	}
	return best
}

// settled reports whether every connection is closed or waiting for the
// client. s.mu must be held.
func (s *Server) settled() bool {
	for _, c := range s.conns {
		if !c.closed && !c.reading {
			return false
		}
	}
	return true
}

// connChanged wakes MaxConcurrent. s.mu must be held.
func (s *Server) connChanged() {
	if s.waiters > 0 {
		close(s.connEvent)
		s.connEvent = make(chan struct{})
	}
}

// Close stops listening, closes every connection and waits for the
// server's goroutines. A later Start with Options.Addr set to the old
// address brings the server back. Close is idempotent.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()

	// Stop accepting first and wait for Serve, so that no connection is
	// added to go-smtp's wait group while Shutdown waits on it.
	_ = s.ln.Close()
	<-s.serveDone
	s.mu.Lock()
	conns := slices.Clone(s.conns)
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
	s.rejects.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil && !errors.Is(err, net.ErrClosed) {
		s.t.Errorf("smtptest %s: shutdown: %v (a reply hook still running?)", s.Addr(), err)
	}
}

func (s *Server) nextSeq() int64 {
	s.seq++
	return s.seq
}

// listener hands go-smtp tracked connections, wrapped in TLS for implicit
// mode, and answers them itself when a greeting rejection is scripted:
// go-smtp greets as soon as it starts handling a connection, so this is
// the last point where the greeting can be replaced.
type listener struct{ s *Server }

func (l *listener) Accept() (net.Conn, error) {
	s := l.s
	for {
		raw, err := s.ln.Accept()
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = raw.Close()
			return nil, net.ErrClosed
		}
		c := &conn{Conn: raw, s: s, id: len(s.conns) + 1, start: s.nextSeq()}
		s.conns = append(s.conns, c)
		greet := s.greetReply
		s.mu.Unlock()

		var nc net.Conn = c
		if s.opts.TLS == TLSImplicit {
			// A *tls.Conn, so that go-smtp knows the session is protected.
			nc = tls.Server(c, s.opts.TLSConfig)
		}
		if greet == nil {
			return nc, nil
		}
		s.rejects.Add(1)
		go func() {
			defer s.rejects.Done()
			if greet != Drop {
				_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
				_, _ = fmt.Fprintf(nc, "%s\r\n", formatReply(greet))
			}
			_ = nc.Close()
		}()
	}
}

func (l *listener) Close() error   { return l.s.ln.Close() }
func (l *listener) Addr() net.Addr { return l.s.ln.Addr() }

// conn is an accepted TCP connection, below any TLS layer.
type conn struct {
	net.Conn
	s  *Server
	id int

	// Guarded by s.mu; sequence numbers from s.nextSeq.
	start    int64
	lastRead int64 // when the last Read returned; 0: none yet
	reading  bool  // a Read is in progress
	closed   bool
	closeSeq int64
	hold     bool // closed by a Drop hook: counts until the close, not the last read
}

func (c *conn) Read(p []byte) (int, error) {
	c.s.mu.Lock()
	if c.closed {
		// go-smtp reads once more after closing on QUIT; that is not the
		// client's doing.
		c.s.mu.Unlock()
		return c.Conn.Read(p)
	}
	c.reading = true
	c.s.connChanged()
	c.s.mu.Unlock()
	n, err := c.Conn.Read(p)
	c.s.mu.Lock()
	c.reading = false
	if c.closed {
		// Closed by the server while waiting for the client: open until then.
		c.lastRead = c.closeSeq
	} else {
		c.lastRead = c.s.nextSeq()
	}
	c.s.mu.Unlock()
	return n, err
}

func (c *conn) Close() error {
	c.s.mu.Lock()
	if !c.closed {
		c.closed = true
		c.closeSeq = c.s.nextSeq()
		c.s.connChanged()
	}
	c.s.mu.Unlock()
	return c.Conn.Close()
}

// end is the sequence number at which the connection stopped counting as
// open, math.MaxInt64 while it is open. s.mu must be held.
func (c *conn) end() int64 {
	switch {
	case !c.closed:
		return math.MaxInt64
	case c.hold || c.lastRead == 0:
		return c.closeSeq
	}
	return c.lastRead
}

// connOf finds the tracked connection below go-smtp's view of it.
func connOf(nc net.Conn) *conn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	c, _ := nc.(*conn)
	return c
}

func formatReply(e *smtp.SMTPError) string {
	if e.EnhancedCode == (smtp.EnhancedCode{}) || e.EnhancedCode == smtp.NoEnhancedCode {
		return fmt.Sprintf("%d %s", e.Code, e.Message)
	}
	ec := e.EnhancedCode
	return fmt.Sprintf("%d %d.%d.%d %s", e.Code, ec[0], ec[1], ec[2], e.Message)
}

// testLogger sends go-smtp's internal errors to the test log while the
// server is open; afterwards the test may have ended.
type testLogger struct{ s *Server }

func (l testLogger) Printf(format string, v ...any) { l.log(fmt.Sprintf(format, v...)) }
func (l testLogger) Println(v ...any)               { l.log(fmt.Sprint(v...)) }

func (l testLogger) log(msg string) {
	l.s.mu.Lock()
	defer l.s.mu.Unlock()
	if !l.s.closed {
		l.s.t.Logf("smtptest %s: %s", l.s.ln.Addr(), msg)
	}
}

// session is one SMTP session; STARTTLS starts a new one on the same
// connection.
type session struct {
	s        *Server
	c        *smtp.Conn
	conn     *conn
	tls      bool
	authUser string
	from     string
	to       []string
	began    time.Time // when MAIL was accepted
}

func (s *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	return &session{s: s, c: c, conn: connOf(c.Conn()), tls: isTLS}, nil
}

// reply turns a hook's result into the error go-smtp answers with,
// closing the connection first for Drop.
func (ss *session) reply(e *smtp.SMTPError) error {
	if e == nil {
		return nil
	}
	if e == Drop {
		ss.s.mu.Lock()
		ss.conn.hold = true
		ss.s.mu.Unlock()
		_ = ss.conn.Close()
	}
	return e
}

// authRequired reports whether the server demands AUTH before MAIL.
func (s *Server) authRequired() bool {
	return s.opts.Username != "" || s.opts.AuthServer != nil
}

func (ss *session) AuthMechanisms() []string {
	if !ss.s.authRequired() {
		return nil
	}
	if m := ss.s.opts.AuthMechanisms; m != nil {
		return m
	}
	return []string{sasl.Plain, sasl.Login}
}

func (ss *session) Auth(mech string) (sasl.Server, error) {
	if !slices.Contains(ss.AuthMechanisms(), mech) {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	if f := ss.s.opts.AuthServer; f != nil {
		return f(mech, func(username string) { ss.authUser = username }), nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				ss.s.recordAuth(username)
				return smtp.ErrAuthFailed
			}
			return ss.login(username, password)
		}), nil
	case sasl.Login:
		return &loginServer{check: ss.login}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// recordAuth records a login attempt and returns the password accepted.
func (s *Server) recordAuth(username string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.authAttempts = append(s.authAttempts, username)
	return s.password
}

func (ss *session) login(username, password string) error {
	want := ss.s.recordAuth(username)
	if username != ss.s.opts.Username || password != want {
		return smtp.ErrAuthFailed
	}
	ss.authUser = username
	return nil
}

func (ss *session) Mail(from string, _ *smtp.MailOptions) error {
	if ss.s.authRequired() && ss.authUser == "" {
		// RFC 4954 section 6.
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}
	ss.s.mu.Lock()
	hook := ss.s.mailReply
	ss.s.mu.Unlock()
	if hook != nil {
		if err := ss.reply(hook(from)); err != nil {
			return err
		}
	}
	ss.from = from
	ss.began = time.Now()
	return nil
}

func (ss *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.s.mu.Lock()
	hook := ss.s.rcptReply
	ss.s.mu.Unlock()
	if hook != nil {
		if err := ss.reply(hook(to)); err != nil {
			return err
		}
	}
	ss.to = append(ss.to, to)
	return nil
}

func (ss *session) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.s.mu.Lock()
	hook := ss.s.dataReply
	ss.s.mu.Unlock()
	if hook != nil {
		if err := ss.reply(hook(ss.from, slices.Clone(ss.to), slices.Clone(data))); err != nil {
			return err
		}
	}
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, Message{
		From:     ss.from,
		To:       slices.Clone(ss.to),
		Data:     data,
		AuthUser: ss.authUser,
		TLS:      ss.tls,
		ConnID:   ss.conn.id,
		Began:    ss.began,
		Ended:    time.Now(),
	})
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

func (ss *session) Reset() {
	ss.from = ""
	ss.to = nil
}

func (ss *session) Logout() error { return nil }

// loginServer is the server side of the LOGIN mechanism
// (draft-murchison-sasl-login), which go-sasl does not provide: the
// username, optionally as the initial response, then the password.
type loginServer struct {
	check    func(username, password string) error
	username []byte
	step     int
}

func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		l.username = response
		l.step = 2
		return []byte("Password:"), false, nil
	case 1:
		l.username = response
		l.step = 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.check(string(l.username), string(response))
	}
	return nil, false, sasl.ErrUnexpectedClientResponse
}
