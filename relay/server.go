// Package relay is the submission side of the smarthost: the server that
// authenticates clients, checks their senders, signs their messages with
// DKIM at the door and queues them. Package relay/upstream delivers them.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/queue"
	"smarthost/relay/upstream"
)

// Queue stores an accepted message durably; Put and PutSpooled return
// only once the message is on disk. A message larger than the door keeps
// in memory is written to a spool file from NewSpool as it arrives, and
// stored with PutSpooled (*queue.Store is one).
type Queue interface {
	Put(ctx context.Context, m *queue.Message, body []byte) error
	NewSpool() (*queue.Spool, error)
	PutSpooled(ctx context.Context, m *queue.Message, head []byte, sp *queue.Spool) error
}

// maxLineLength bounds one command line, and one line of message data.
// RFC 5321 section 4.5.3.1.6 allows 1000 octets; real mail has longer lines
// and upstreams accept them, so this is a memory bound, not a syntax rule.
const maxLineLength = 64 << 10

// Server is the submission side: it listens on every configured listener
// and hands each accepted message to Queue. Make one with NewServer,
// change the fields you need, then call Listen; do not change them
// afterwards (SetUsers and SetSigner replace the users and the signer).
type Server struct {
	Hostname  string
	Listeners []Listener
	TLSConfig *tls.Config // serving certificate for starttls and implicit listeners
	Users     []User
	Limits    Limits
	Queue     Queue
	Signer    *dkim.Signer           // optional: nil relays unsigned; SetSigner replaces it
	Routable  func(from string) bool // optional: refuse senders no route delivers
	Logger    *slog.Logger           // NewServer sets slog.Default()
	Now       func() time.Time       // NewServer sets time.Now
	// Observer, if set, is told about connections, messages and
	// refusals, for metrics.
	Observer Observer
	// RcptRoutable, if set, refuses at RCPT a recipient that no route
	// delivers mail to from the transaction's sender.
	RcptRoutable func(from, rcpt string) bool
	// ProxyHeaderTimeout bounds how long a connection from a listener's
	// ProxyTrusted sources may take to send its PROXY header; NewServer
	// sets 5s.
	ProxyHeaderTimeout time.Duration
	// NewRateWindow, if set, makes the sliding window of the users' and
	// clients' limits called key ("user:NAME", "user-recipients:NAME",
	// "client:LISTENER:ADDRESS"), so that they can be shared by the
	// replicas of a cluster; nil keeps them in this process's memory.
	// Windows outlive SetUsers.
	NewRateWindow func(key string) upstream.RateWindow

	// spoolAfter, when positive, replaces spoolThreshold; tests lower it.
	spoolAfter int

	windows  windows
	users    atomic.Pointer[users]
	signer   atomic.Pointer[dkim.Signer]
	creds    *credentialCache
	limiter  *authLimiter
	clients  *clientCounts // connections per client address
	memory   *memoryBudget // Limits.MessageMemory, lent to sessions in DATA
	shutting atomic.Bool

	mu    sync.Mutex
	bound []*boundListener
	conns map[*trackedConn]struct{}
	idle  chan struct{} // signalled whenever a connection closes
}

type boundListener struct {
	cfg   Listener
	raw   net.Listener
	smtp  *smtp.Server
	slots chan struct{} // one per open connection when MaxConnections > 0
}

// NewServer returns a Server that hands the messages it accepts to q,
// its other fields set to their defaults.
func NewServer(q Queue) *Server {
	return &Server{
		Queue:              q,
		Logger:             slog.Default(),
		Now:                time.Now,
		ProxyHeaderTimeout: defaultProxyHeaderTimeout,
		creds:              newCredentialCache(),
		conns:              make(map[*trackedConn]struct{}),
		idle:               make(chan struct{}, 1),
	}
}

// check reports a field that Listen cannot work with.
func (s *Server) check() error {
	switch {
	case s.conns == nil:
		return errors.New("relay: server not made by NewServer")
	case s.Queue == nil:
		return errors.New("relay: server without Queue")
	case s.Logger == nil || s.Now == nil:
		return errors.New("relay: server without Logger or Now")
	case s.ProxyHeaderTimeout <= 0:
		return fmt.Errorf("relay: server needs ProxyHeaderTimeout above zero (have %v)", s.ProxyHeaderTimeout)
	}
	return nil
}

// Listen binds every listener, so that their addresses are known (and a
// port in use is reported) before Serve.
func (s *Server) Listen() error {
	if err := s.check(); err != nil {
		return err
	}
	s.SetUsers(s.Users)
	s.SetSigner(s.Signer)
	s.windows.make = s.NewRateWindow
	window := s.Limits.AuthFailureWindow
	if window == 0 {
		window = time.Minute
	}
	s.limiter = newAuthLimiter(s.Limits.AuthFailuresPerIP, window, s.Now)
	s.clients = newClientCounts(s.Limits.MaxConnectionsPerIP)
	s.memory = newMemoryBudget(s.Limits.MessageMemory)

	for _, lc := range s.Listeners {
		if err := checkListener(lc); err != nil {
			s.closeBound()
			return err
		}
		if lc.TLS != mailproto.TLSNone && s.TLSConfig == nil {
			s.closeBound()
			return fmt.Errorf("listener %s: tls %q needs a certificate", lc.Address, lc.TLS)
		}
		raw, err := net.Listen("tcp", lc.Address)
		if err != nil {
			s.closeBound()
			return fmt.Errorf("listen %s: %w", lc.Address, err)
		}
		if lc.Name == "" {
			lc.Name = raw.Addr().String()
		}
		bl := &boundListener{cfg: lc, raw: raw}
		if s.Limits.MaxConnections > 0 {
			bl.slots = make(chan struct{}, s.Limits.MaxConnections)
		}
		bl.smtp = s.newSMTPServer(bl)
		s.bound = append(s.bound, bl)
	}
	return nil
}

// checkListener refuses a listener that would make an open relay: one
// without AUTH must admit only trusted networks, and never every address.
// The configuration refuses these too; this holds for any Server, however
// it was built.
func checkListener(lc Listener) error {
	if lc.AuthRequired {
		return nil
	}
	if len(lc.TrustedNetworks) == 0 {
		return fmt.Errorf("listener %s: without AUTH it must name trusted networks: it would be an open relay", lc.Address)
	}
	for _, p := range lc.TrustedNetworks {
		if p.Bits() == 0 {
			return fmt.Errorf("listener %s: without AUTH it cannot trust %s, every address: it would be an open relay", lc.Address, p)
		}
	}
	return nil
}

func (s *Server) newSMTPServer(bl *boundListener) *smtp.Server {
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return s.newSession(bl, c)
	}))
	srv.Domain = s.Hostname
	// No limit for go-smtp: its DATA reader refuses a message of exactly
	// MaxMessageBytes (it runs out of allowance before the end-of-data
	// line). The session enforces MaxMessageBytes on MAIL's SIZE and on
	// the bytes of DATA and BDAT alike; EHLO offers SIZE without a number.
	srv.MaxRecipients = s.Limits.MaxRecipients
	srv.MaxLineLength = maxLineLength
	srv.ReadTimeout = s.Limits.ReadTimeout
	srv.WriteTimeout = s.Limits.ReadTimeout
	srv.ErrorLog = smtpLogger{s.Logger}
	if bl.cfg.TLS != mailproto.TLSNone {
		srv.TLSConfig = s.TLSConfig
	}
	// AUTH in plain text only where the listener admits trusted networks
	// alone; configuration refuses it anywhere else.
	srv.AllowInsecureAuth = bl.cfg.TLS == mailproto.TLSNone && len(bl.cfg.TrustedNetworks) > 0
	return srv
}

// SetUsers replaces the set of users. A session logged in as a user that
// the new set removes, or whose password it changes, is refused at its
// next MAIL; the others go on under the user's new settings.
func (s *Server) SetUsers(list []User) {
	u := newUsers(list, s.users.Load())
	if len(u.costs) > 1 && s.Logger != nil {
		// An unknown name costs what the highest cost does, so a user of
		// a lower one answers measurably faster.
		s.Logger.Warn("users' password hashes have different bcrypt costs: login timing can tell a user of a lower cost from an unknown name; make them all with one cost (smarthost passwd -cost)",
			"costs", u.costs)
	}
	s.users.Store(u)
}

// SetSigner replaces the DKIM signer; nil turns signing off. A message
// is signed by the signer current when its DATA ends or, for one too
// large to hold in memory, when its header section has arrived.
func (s *Server) SetSigner(sig *dkim.Signer) {
	s.signer.Store(sig)
}

// Addrs returns the bound address of each listener, in configuration order.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.bound))
	for i, bl := range s.bound {
		out[i] = bl.raw.Addr()
	}
	return out
}

// Serve accepts connections on every listener until Shutdown or Close.
func (s *Server) Serve() error {
	s.mu.Lock()
	bound := s.bound
	s.mu.Unlock()
	if len(bound) == 0 {
		return errors.New("relay: Serve called before Listen")
	}
	errc := make(chan error, len(bound))
	for _, bl := range bound {
		var base net.Listener = bl.raw
		if bl.cfg.ProxyProtocol {
			base = s.newProxyListener(bl)
		}
		var ln net.Listener = &gate{Listener: base, srv: s, cfg: bl.cfg, slots: bl.slots}
		if bl.cfg.TLS == mailproto.TLSImplicit {
			ln = tls.NewListener(ln, s.TLSConfig)
		}
		go func() { errc <- bl.smtp.Serve(ln) }()
	}
	var first error
	for range bound {
		if err := <-errc; err != nil && first == nil && !s.shutting.Load() {
			first = err
		}
	}
	return first
}

// Shutdown stops accepting connections, tells idle clients 421 at once,
// lets transactions in progress finish, and waits for every connection to
// end or for ctx to expire; then it closes whatever is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.shutting.Store(true)
	s.mu.Lock()
	for _, bl := range s.bound {
		bl.raw.Close()
	}
	s.mu.Unlock()
	for {
		s.mu.Lock()
		open := 0
		for tc := range s.conns {
			open++
			if !tc.busy() {
				go tc.hangUp()
			}
		}
		s.mu.Unlock()
		if open == 0 {
			break
		}
		select {
		case <-s.idle:
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		}
	}
	s.Close()
	return nil
}

// Close closes every listener and connection at once.
func (s *Server) Close() error {
	s.shutting.Store(true)
	s.mu.Lock()
	bound := s.bound
	s.mu.Unlock()
	for _, bl := range bound {
		bl.smtp.Close()
	}
	return nil
}

func (s *Server) closeBound() {
	for _, bl := range s.bound {
		bl.raw.Close()
	}
	s.bound = nil
}

func (s *Server) track(tc *trackedConn) {
	s.mu.Lock()
	s.conns[tc] = struct{}{}
	s.mu.Unlock()
}

func (s *Server) forget(tc *trackedConn) {
	s.mu.Lock()
	delete(s.conns, tc)
	s.mu.Unlock()
	s.clients.release(tc.ip)
	if tc.slots != nil {
		<-tc.slots
	}
	select {
	case s.idle <- struct{}{}:
	default:
	}
}

// gate admits connections to a listener: it enforces the listener's trusted
// networks, its connection limit and the per-address limit before go-smtp
// sees them.
type gate struct {
	net.Listener
	srv   *Server
	cfg   Listener
	slots chan struct{} // the listener's, nil for no limit
	retry acceptRetry
}

func (g *gate) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			if g.retry.wait(err, g.srv.Logger, g.cfg.Name) {
				continue
			}
			return nil, err
		}
		g.retry.reset()
		ip := remoteIP(c)
		if !g.trusted(ip) {
			g.srv.Logger.Info("connection refused", "listener", g.cfg.Name, "client_ip", ip.String(), "reason", ReasonUntrustedNetwork)
			g.srv.observer().ConnectionRefused(g.cfg.Name, ReasonUntrustedNetwork)
			go g.refuse(c, "554 5.7.1 Access denied")
			continue
		}
		if g.slots != nil {
			select {
			case g.slots <- struct{}{}:
			default:
				g.srv.Logger.Warn("connection refused", "listener", g.cfg.Name, "client_ip", ip.String(), "reason", ReasonMaxConnections)
				g.srv.observer().ConnectionRefused(g.cfg.Name, ReasonMaxConnections)
				go g.refuse(c, "421 4.7.0 Too many connections, try again later")
				continue
			}
		}
		if !g.srv.clients.acquire(ip) {
			if g.slots != nil {
				<-g.slots
			}
			g.srv.Logger.Warn("connection refused", "listener", g.cfg.Name, "client_ip", ip.String(), "reason", ReasonMaxConnectionsPerIP)
			g.srv.observer().ConnectionRefused(g.cfg.Name, ReasonMaxConnectionsPerIP)
			go g.refuse(c, "421 4.7.0 Too many connections from your address, try again later")
			continue
		}
		tc := &trackedConn{Conn: c, srv: g.srv, ip: ip, listener: g.cfg.Name, slots: g.slots}
		if g.cfg.TLS != mailproto.TLSImplicit {
			// Replies go on the connection itself until a session says
			// otherwise (after STARTTLS); under implicit TLS only a
			// session knows the TLS connection.
			var out net.Conn = tc
			tc.out.Store(&out)
		}
		g.srv.track(tc)
		if g.cfg.AuthRequired && g.srv.Limits.AuthTimeout > 0 {
			tc.authTimer = time.AfterFunc(g.srv.Limits.AuthTimeout, tc.authExpired)
		}
		g.srv.observer().ConnectionOpened(g.cfg.Name)
		return tc, nil
	}
}

// acceptRetry paces an accept loop through errors that pass, such as a
// process out of file descriptors, as net/http does: each retry waits
// twice as long, up to a second, and is logged at warn, since clients are
// being turned away meanwhile.
type acceptRetry struct{ delay time.Duration }

// wait sleeps before the next try and reports true, or reports false for
// an error that ends the loop (a closed listener).
func (r *acceptRetry) wait(err error, log *slog.Logger, listener string) bool {
	if errors.Is(err, net.ErrClosed) {
		return false
	}
	r.delay = min(max(2*r.delay, 5*time.Millisecond), time.Second)
	log.Warn("accept failed", "listener", listener, "error", err, "retry_in", r.delay)
	time.Sleep(r.delay)
	return true
}

func (r *acceptRetry) reset() { r.delay = 0 }

func (g *gate) trusted(ip netip.Addr) bool {
	return len(g.cfg.TrustedNetworks) == 0 || containsAddr(g.cfg.TrustedNetworks, ip)
}

// refuse answers a connection that will not be served. On an implicit-TLS
// listener the client expects a handshake, so it is just closed.
func (g *gate) refuse(c net.Conn, reply string) {
	defer c.Close()
	if g.cfg.TLS == mailproto.TLSImplicit {
		return
	}
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	// "554 5.7.1 Access denied" becomes "554 5.7.1 <hostname> Access denied":
	// the enhanced code right after the reply code (RFC 2034 section 4).
	code, rest, _ := strings.Cut(reply, " ")
	enhanced, text, _ := strings.Cut(rest, " ")
	fmt.Fprintf(c, "%s %s %s %s\r\n", code, enhanced, g.srv.Hostname, text)
}

func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// trackedConn is an admitted client connection. It lets the server close a
// connection right after a final reply (421) and find idle sessions at
// shutdown.
type trackedConn struct {
	net.Conn
	srv      *Server
	ip       netip.Addr
	listener string        // Listener.Name, for the Observer
	slots    chan struct{} // the listener's, given back at Close

	wmu             sync.Mutex
	closeAfterReply atomic.Bool
	sess            atomic.Pointer[session]
	closeOnce       sync.Once
	hungUp          atomic.Bool
	// out is the connection replies go to, TLS included, as go-smtp
	// last gave it to a session; hangUp and authExpired write there.
	out atomic.Pointer[net.Conn]
	// authTimer closes the connection if it has not logged in by then
	// (Limits.AuthTimeout); authed stops it from doing so.
	authTimer *time.Timer
	authed    atomic.Bool

	// While a DATA transfer is read, each read of the connection must make
	// progress within dataIdle; a DATA or BDAT transfer must end by
	// dataEnd, go-smtp's reads of BDAT's commands and chunks included.
	dmu        sync.Mutex
	inData     bool
	dataIdle   time.Duration
	dataEnd    time.Time
	dataOver   bool      // the transfer's Data returned: dataEnd goes with the next command
	cmdTimeout time.Time // the deadline go-smtp set last
}

// beginData bounds the reads of a transfer in time: each read of a DATA
// transfer must make progress within idle, and the whole transfer must end
// by end; zero values leave either unbounded.
func (c *trackedConn) beginData(idle time.Duration, end time.Time) {
	c.dmu.Lock()
	c.inData, c.dataIdle, c.dataEnd, c.dataOver = true, idle, end, false
	c.dmu.Unlock()
}

// endData marks the end of the transfer's Data. dataEnd still bounds
// go-smtp's draining of what is left of a DATA transfer, up to the next
// command line.
func (c *trackedConn) endData() {
	c.dmu.Lock()
	c.dataOver = true
	c.dmu.Unlock()
}

// SetReadDeadline is how go-smtp bounds each command line; once it sets
// one, the reads of a DATA transfer (its draining included) are over and
// return to that deadline. A BDAT transfer goes on over several commands,
// still bounded by dataEnd until its Data returns.
func (c *trackedConn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	c.inData = false
	c.cmdTimeout = t
	if c.dataOver {
		c.dataEnd, c.dataOver = time.Time{}, false
	}
	end := c.dataEnd
	c.dmu.Unlock()
	return c.Conn.SetReadDeadline(earliest(t, end))
}

// earliest returns the earlier of two deadlines, zero meaning none.
func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func (c *trackedConn) Read(b []byte) (int, error) {
	c.dmu.Lock()
	inData, end := c.inData, c.dataEnd
	dl := earliest(c.cmdTimeout, end)
	if inData {
		dl = end
		if c.dataIdle > 0 {
			dl = earliest(time.Now().Add(c.dataIdle), end)
		}
	}
	c.dmu.Unlock()
	// Set here, per read of the socket: go-smtp's DATA reader fills a
	// whole buffer in one Read, so a deadline set around that call would
	// bound a chunk, not the progress of each read.
	if inData && !dl.IsZero() {
		c.Conn.SetReadDeadline(dl)
	}
	n, err := c.Conn.Read(b)
	var ne net.Error
	if err != nil && !inData && errors.As(err, &ne) && ne.Timeout() {
		if !end.IsZero() && !time.Now().Before(end) {
			// A BDAT transfer past data_timeout: go-smtp answers this
			// error when it reads a chunk, and closes on it when it reads
			// a command.
			c.closeAfterReply.Store(true)
			return n, errTimeout
		}
		// A command line cut short by ReadTimeout reaches go-smtp as a
		// whole line (bufio.Reader.ReadLine drops the error when it has
		// bytes), which it would run as a command and then read on. Close,
		// so that the slow client is cut off and nothing of it is answered.
		c.Close()
	}
	return n, err
}

func (c *trackedConn) Write(b []byte) (int, error) {
	c.wmu.Lock()
	n, err := c.Conn.Write(b)
	c.wmu.Unlock()
	if c.closeAfterReply.Load() {
		c.Close()
	}
	return n, err
}

func (c *trackedConn) Close() error {
	err := net.ErrClosed
	c.closeOnce.Do(func() {
		if c.authTimer != nil {
			c.authTimer.Stop()
		}
		err = c.Conn.Close()
		c.srv.forget(c)
		c.srv.observer().ConnectionClosed(c.listener)
	})
	return err
}

// busy reports whether a transaction (MAIL … end of DATA) is in progress.
func (c *trackedConn) busy() bool {
	s := c.sess.Load()
	return s != nil && s.inTransaction()
}

// hangUp tells an idle client that the service is going away, then closes.
func (c *trackedConn) hangUp() {
	if c.hungUp.Swap(true) {
		return
	}
	c.sayAndClose("421 4.3.2 %s Service shutting down")
}

// loggedIn stops the auth timeout: the session has authenticated.
func (c *trackedConn) loggedIn() {
	c.authed.Store(true)
	if c.authTimer != nil {
		c.authTimer.Stop()
	}
}

// authExpired closes a connection that has not logged in within
// AuthTimeout: a client that only holds a place, NOOP after NOOP.
func (c *trackedConn) authExpired() {
	if c.authed.Load() || c.hungUp.Swap(true) {
		return
	}
	c.srv.Logger.Info("rejected", "listener", c.listener, "client_ip", c.ip.String(), "reason", ReasonAuthTimeout, "reply", 421)
	c.srv.observer().Rejected(c.listener, ReasonAuthTimeout)
	c.sayAndClose("421 4.7.0 %s Authentication timeout, closing connection")
}

// sayAndClose writes a last reply (format with the hostname) from outside
// the session's goroutine, then closes.
func (c *trackedConn) sayAndClose(format string) {
	if w := c.out.Load(); w != nil {
		(*w).SetWriteDeadline(time.Now().Add(time.Second))
		fmt.Fprintf(*w, format+"\r\n", c.srv.Hostname)
	}
	c.Close()
}

// smtpLogger sends go-smtp's own messages (mostly clients that vanished)
// to the debug level.
type smtpLogger struct{ l *slog.Logger }

func (l smtpLogger) Printf(format string, v ...any) { l.l.Debug(fmt.Sprintf(format, v...)) }
func (l smtpLogger) Println(v ...any)               { l.l.Debug(fmt.Sprint(v...)) }
