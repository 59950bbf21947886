package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"smarthost/internal/mailproto"

	"github.com/pires/go-proxyproto"
)

const (
	// defaultProxyHeaderTimeout bounds how long a load balancer may take
	// to send its PROXY header; it sends it at once on connecting.
	defaultProxyHeaderTimeout = 5 * time.Second
	// defaultPendingHeaders bounds the headers read at once when there is
	// no connection limit.
	defaultPendingHeaders = 1024
)

// proxyListener is a listener with ProxyProtocol. Headers are read by one
// goroutine per connection, never by the accept loop, so that a client
// that is slow to send its header holds up no one else; their number is
// bounded by the connection limit. Connections are handed to Accept once
// their header is read.
type proxyListener struct {
	net.Listener // the bound socket
	srv          *Server
	cfg          Listener
	timeout      time.Duration

	slots chan struct{} // one per header being read
	conns chan net.Conn // admitted connections, for Accept
	done  chan struct{} // closed when the socket no longer accepts
	err   error         // why, set before done is closed

	mu      sync.Mutex
	reading map[net.Conn]struct{} // connections whose header is being read
}

func (s *Server) newProxyListener(bl *boundListener) *proxyListener {
	pending := s.Limits.MaxConnections
	if pending <= 0 {
		pending = defaultPendingHeaders
	}
	l := &proxyListener{
		Listener: bl.raw,
		srv:      s,
		cfg:      bl.cfg,
		timeout:  s.ProxyHeaderTimeout,
		slots:    make(chan struct{}, pending),
		conns:    make(chan net.Conn),
		done:     make(chan struct{}),
		reading:  make(map[net.Conn]struct{}),
	}
	go l.run()
	return l
}

// Accept returns the next connection ready to be served: from a trusted
// source, with its header read; from any other source, as it came.
func (l *proxyListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, l.err
	}
}

// run is the accept loop of the socket.
func (l *proxyListener) run() {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				l.stop(err)
				return
			}
			// Out of file descriptors or a connection aborted before it
			// was accepted: try again, slower each time, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			l.srv.Logger.Warn("accept failed", "listener", l.cfg.Name, "error", err, "retry_in", delay)
			select {
			case <-time.After(delay):
				continue
			case <-l.done:
				return
			}
		}
		delay = 0
		src := remoteIP(c)
		if !containsAddr(l.cfg.ProxyTrusted, src) {
			l.handOver(&untrustedConn{Conn: c, l: l, ip: src, br: bufio.NewReaderSize(c, 256)})
			continue
		}
		select {
		case l.slots <- struct{}{}:
		default:
			l.srv.Logger.Warn("connection refused", "listener", l.cfg.Name, "proxy_ip", src.String(), "reason", ReasonMaxConnections, "detail", "too many PROXY headers pending")
			l.srv.observer().ConnectionRefused(l.cfg.Name, ReasonMaxConnections)
			c.Close()
			continue
		}
		if !l.startReading(c) {
			c.Close()
			<-l.slots
			continue
		}
		go l.readHeader(c, src)
	}
}

// stop ends Accept with err, and the header reads in progress.
func (l *proxyListener) stop(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.done:
		return
	default:
	}
	l.err = err
	close(l.done)
	for c := range l.reading {
		c.Close()
	}
}

// startReading records c as having its header read, unless the listener
// has stopped.
func (l *proxyListener) startReading(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.done:
		return false
	default:
	}
	l.reading[c] = struct{}{}
	return true
}

// Close closes the socket; Accept then returns net.ErrClosed.
func (l *proxyListener) Close() error {
	err := l.Listener.Close()
	l.stop(net.ErrClosed)
	return err
}

// handOver gives c to Accept, or closes it if the listener has closed.
func (l *proxyListener) handOver(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

// readHeader reads the PROXY header that a connection from a trusted
// source must open with, and hands the connection over as coming from the
// address in the header.
func (l *proxyListener) readHeader(c net.Conn, proxyIP netip.Addr) {
	br := bufio.NewReaderSize(c, 256)
	h, err := proxyproto.ReadHeaderTimeout(c, br, l.timeout)
	// The place is free once the header is read: handing the connection
	// over waits only for the accept loop.
	l.mu.Lock()
	delete(l.reading, c)
	l.mu.Unlock()
	<-l.slots
	if err != nil {
		select {
		case <-l.done: // closed by Close
			return
		default:
		}
		detail := "no valid PROXY header"
		if errors.Is(err, proxyproto.ErrNoProxyProtocol) {
			detail = "no PROXY header"
		}
		l.srv.Logger.Info("connection refused", "listener", l.cfg.Name, "proxy_ip", proxyIP.String(), "reason", ReasonProxyHeader, "detail", detail, "error", err)
		l.srv.observer().ConnectionRefused(l.cfg.Name, ReasonProxyHeader)
		c.Close()
		return
	}
	remote := c.RemoteAddr()
	switch src, _, ok := h.TCPAddrs(); {
	case h.Command.IsLocal() || h.TransportProtocol.IsUnspec():
		// The balancer's own connection, such as a health check (LOCAL),
		// or a client it cannot describe (v1 UNKNOWN): the header's
		// addresses are ignored and the connection is what it is
		// (PROXY protocol specification, sections 2.1 and 2.2).
	case ok:
		remote = src
	default:
		l.srv.Logger.Info("connection refused", "listener", l.cfg.Name, "proxy_ip", proxyIP.String(),
			"reason", ReasonProxyHeader, "detail", "PROXY header for a transport other than TCP")
		l.srv.observer().ConnectionRefused(l.cfg.Name, ReasonProxyHeader)
		c.Close()
		return
	}
	l.handOver(&proxiedConn{Conn: c, br: br, remote: remote})
}

// proxiedConn is a connection whose PROXY header has been read: it reports
// the client's address from the header, and first returns what was read
// past the header.
type proxiedConn struct {
	net.Conn
	br     *bufio.Reader // nil once drained
	remote net.Addr
}

func (c *proxiedConn) RemoteAddr() net.Addr { return c.remote }

func (c *proxiedConn) Read(p []byte) (int, error) {
	if c.br != nil {
		if c.br.Buffered() > 0 {
			return c.br.Read(p)
		}
		c.br = nil
	}
	return c.Conn.Read(p)
}

// untrustedConn is a connection to a PROXY listener from a source outside
// ProxyTrusted. It is served as itself; a PROXY header from it would be a
// client claiming another address, so its connection is refused.
type untrustedConn struct {
	net.Conn
	l       *proxyListener
	ip      netip.Addr
	br      *bufio.Reader // until the opening bytes are checked and drained
	checked bool
	refused bool
}

func (c *untrustedConn) Read(p []byte) (int, error) {
	if c.refused {
		return 0, io.EOF
	}
	if !c.checked {
		// The header could only be the first bytes the client sends,
		// which for SMTP come after our greeting, so looking for it here
		// delays no one.
		_, err := proxyproto.Read(c.br)
		switch {
		case errors.Is(err, proxyproto.ErrNoProxyProtocol):
			c.checked = true
		case err != nil && ioError(err):
			return 0, err
		default:
			// A header, or a malformed one: either way it opened with the
			// PROXY signature.
			c.checked, c.refused = true, true
			c.refuse()
			return 0, io.EOF
		}
	}
	if c.br != nil {
		if c.br.Buffered() > 0 {
			return c.br.Read(p)
		}
		c.br = nil
	}
	return c.Conn.Read(p)
}

// refuse tells the client why it is cut off; an implicit-TLS client is
// mid-handshake and just loses the connection.
func (c *untrustedConn) refuse() {
	c.l.srv.Logger.Info("connection refused", "listener", c.l.cfg.Name, "client_ip", c.ip.String(),
		"reason", ReasonProxyHeader, "detail", "PROXY header from a source not in proxy_trusted")
	c.l.srv.observer().Rejected(c.l.cfg.Name, ReasonProxyHeader)
	if c.l.cfg.TLS == mailproto.TLSImplicit {
		return
	}
	c.Conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
	fmt.Fprintf(c.Conn, "554 5.7.1 %s PROXY header not accepted from this address\r\n", c.l.srv.Hostname)
}

// ioError reports whether err is the connection failing rather than what
// the client sent.
func ioError(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) || errors.As(err, &ne)
}

func containsAddr(nets []netip.Prefix, ip netip.Addr) bool {
	for _, p := range nets {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
