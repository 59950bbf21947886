// Package relay is both sides of the smarthost: the submission server that
// authenticates clients, checks their senders and queues their messages,
// and the upstream side that delivers queued messages to providers.
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
	"smarthost/queue"
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

// Signer signs a message at the door (*dkim.Signer is one): Stream takes
// the start of the message, its whole header section included, then the
// rest, and Finish returns header fields (each ending in CRLF) to put in
// front of it, or nil to leave it unsigned.
type Signer interface {
	Stream(fromDomain string, header []byte) (*dkim.Stream, error)
}

// maxLineLength bounds one command line, and one line of message data.
// RFC 5321 section 4.5.3.1.6 allows 1000 octets; real mail has longer lines
// and upstreams accept them, so this is a memory bound, not a syntax rule.
const maxLineLength = 64 << 10

// Server is the submission side: it listens on every configured listener
// and hands each accepted message to Queue.
type Server struct {
	Hostname  string
	Listeners []Listener
	TLSConfig *tls.Config // serving certificate for starttls and implicit listeners
	Users     []User
	Limits    Limits
	Queue     Queue
	Signer    Signer                 // optional DKIM signer; SetSigner replaces it
	Routable  func(from string) bool // optional: refuse senders no route delivers
	Logger    *slog.Logger
	Now       func() time.Time
	// Observer, if set, is told about connections, messages and
	// refusals, for metrics. Set it before Listen.
	Observer Observer
	// ProxyHeaderTimeout bounds how long a connection from a listener's
	// ProxyTrusted sources may take to send its PROXY header; default 5s.
	ProxyHeaderTimeout time.Duration

	// spoolAfter, when positive, replaces spoolThreshold; tests lower it.
	spoolAfter int

	users    atomic.Pointer[users]
	signer   atomic.Pointer[signerBox]
	creds    *credentialCache
	limiter  *authLimiter
	slots    chan struct{} // one per open connection when MaxConnections > 0
	shutting atomic.Bool

	mu    sync.Mutex
	bound []*boundListener
	conns map[*trackedConn]struct{}
	idle  chan struct{} // signalled whenever a connection closes
}

type boundListener struct {
	cfg  Listener
	raw  net.Listener
	smtp *smtp.Server
}

// Listen binds every listener, so that their addresses are known (and a
// port in use is reported) before Serve.
func (s *Server) Listen() error {
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	if s.Now == nil {
		s.Now = time.Now
	}
	s.SetUsers(s.Users)
	s.SetSigner(s.Signer)
	s.creds = newCredentialCache()
	window := s.Limits.AuthFailureWindow
	if window == 0 {
		window = time.Minute
	}
	s.limiter = newAuthLimiter(s.Limits.AuthFailuresPerIP, window, s.Now)
	if s.Limits.MaxConnections > 0 {
		s.slots = make(chan struct{}, s.Limits.MaxConnections)
	}
	s.conns = make(map[*trackedConn]struct{})
	s.idle = make(chan struct{}, 1)

	for _, lc := range s.Listeners {
		if lc.TLS != TLSNone && s.TLSConfig == nil {
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
		bl.smtp = s.newSMTPServer(bl)
		s.bound = append(s.bound, bl)
	}
	return nil
}

func (s *Server) newSMTPServer(bl *boundListener) *smtp.Server {
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return s.newSession(bl, c)
	}))
	srv.Domain = s.Hostname
	srv.MaxMessageBytes = s.Limits.MaxMessageBytes
	srv.MaxRecipients = s.Limits.MaxRecipients
	srv.MaxLineLength = maxLineLength
	srv.ReadTimeout = s.Limits.ReadTimeout
	srv.WriteTimeout = s.Limits.ReadTimeout
	srv.ErrorLog = smtpLogger{s.Logger}
	if bl.cfg.TLS != TLSNone {
		srv.TLSConfig = s.TLSConfig
	}
	// AUTH in plain text only where the listener admits trusted networks
	// alone; configuration refuses it anywhere else.
	srv.AllowInsecureAuth = bl.cfg.TLS == TLSNone && len(bl.cfg.TrustedNetworks) > 0
	return srv
}

// SetUsers replaces the set of users; sessions that already logged in keep
// the user they logged in as.
func (s *Server) SetUsers(list []User) {
	s.users.Store(newUsers(list))
}

// SetSigner replaces the DKIM signer; nil turns signing off. A message
// is signed by the signer current when its DATA ends or, for one too
// large to hold in memory, when its header section has arrived.
func (s *Server) SetSigner(sig Signer) {
	s.signer.Store(&signerBox{sig})
}

// currentSigner is the signer set last, nil for none.
func (s *Server) currentSigner() Signer {
	if b := s.signer.Load(); b != nil {
		return b.Signer
	}
	return nil
}

// signerBox lets an interface value, nil included, live in an atomic.Pointer.
type signerBox struct{ Signer }

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
		var ln net.Listener = &gate{Listener: base, srv: s, cfg: bl.cfg}
		if bl.cfg.TLS == TLSImplicit {
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
	if s.slots != nil {
		<-s.slots
	}
	select {
	case s.idle <- struct{}{}:
	default:
	}
}

// gate admits connections to a listener: it enforces the listener's trusted
// networks and the relay-wide connection limit before go-smtp sees them.
type gate struct {
	net.Listener
	srv *Server
	cfg Listener
}

func (g *gate) Accept() (net.Conn, error) {
	for {
		c, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := remoteIP(c)
		if !g.trusted(ip) {
			g.srv.Logger.Info("connection refused", "listener", g.cfg.Name, "client_ip", ip.String(), "reason", "not in trusted_networks")
			g.srv.observer().ConnectionRefused(g.cfg.Name, "untrusted_network")
			go g.refuse(c, "554 5.7.1 Access denied")
			continue
		}
		if g.srv.slots != nil {
			select {
			case g.srv.slots <- struct{}{}:
			default:
				g.srv.Logger.Warn("connection refused", "listener", g.cfg.Name, "client_ip", ip.String(), "reason", "max_connections reached")
				g.srv.observer().ConnectionRefused(g.cfg.Name, "max_connections")
				go g.refuse(c, "421 4.7.0 Too many connections, try again later")
				continue
			}
		}
		tc := &trackedConn{Conn: c, srv: g.srv, ip: ip, listener: g.cfg.Name}
		g.srv.track(tc)
		g.srv.observer().ConnectionOpened(g.cfg.Name)
		return tc, nil
	}
}

func (g *gate) trusted(ip netip.Addr) bool {
	return len(g.cfg.TrustedNetworks) == 0 || containsAddr(g.cfg.TrustedNetworks, ip)
}

// refuse answers a connection that will not be served. On an implicit-TLS
// listener the client expects a handshake, so it is just closed.
func (g *gate) refuse(c net.Conn, reply string) {
	defer c.Close()
	if g.cfg.TLS == TLSImplicit {
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
	listener string // Listener.Name, for the Observer

	wmu             sync.Mutex
	closeAfterReply atomic.Bool
	sess            atomic.Pointer[session]
	closeOnce       sync.Once
	hungUp          atomic.Bool

	// While a DATA transfer is read, each read of the connection must make
	// progress within dataIdle and the transfer must end by dataEnd.
	dmu      sync.Mutex
	inData   bool
	dataIdle time.Duration
	dataEnd  time.Time
}

// beginData bounds the reads of a DATA transfer in time: each read must
// make progress within idle, and the whole transfer must end by end; zero
// values leave either unbounded.
func (c *trackedConn) beginData(idle time.Duration, end time.Time) {
	c.dmu.Lock()
	c.inData, c.dataIdle, c.dataEnd = true, idle, end
	c.dmu.Unlock()
}

// SetReadDeadline is how go-smtp bounds each command line; once it sets
// one, the DATA transfer and go-smtp's draining of what is left of it are
// over, and reads return to that deadline.
func (c *trackedConn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	c.inData = false
	c.dmu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

func (c *trackedConn) Read(b []byte) (int, error) {
	c.dmu.Lock()
	inData, dl := c.inData, c.dataEnd
	if inData && c.dataIdle > 0 {
		if t := time.Now().Add(c.dataIdle); dl.IsZero() || t.Before(dl) {
			dl = t
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
	if s := c.sess.Load(); s != nil {
		if w := s.conn.Conn(); w != nil {
			w.SetWriteDeadline(time.Now().Add(time.Second))
			fmt.Fprintf(w, "421 4.3.2 %s Service shutting down\r\n", c.srv.Hostname)
		}
	}
	c.Close()
}

// smtpLogger sends go-smtp's own messages (mostly clients that vanished)
// to the debug level.
type smtpLogger struct{ l *slog.Logger }

func (l smtpLogger) Printf(format string, v ...any) { l.l.Debug(fmt.Sprintf(format, v...)) }
func (l smtpLogger) Println(v ...any)               { l.l.Debug(fmt.Sprint(v...)) }
