package e2e

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// faultKind is how the fault proxy misbehaves on a connection.
type faultKind int

const (
	faultNone faultKind = iota
	// faultResetInData passes on n bytes of the message after DATA, then
	// resets both connections (RST, not FIN).
	faultResetInData
	// faultReply421 answers the command verb itself with 421 and closes
	// both connections, without passing the command on.
	faultReply421
	// faultRefuse answers the command verb itself with 454 and carries on
	// in the same session, as an attacker refusing STARTTLS would.
	faultRefuse
	// faultHangAfterDot passes on the whole message and its final dot but
	// never the upstream's reply, and keeps the connection open.
	faultHangAfterDot
	// faultSlow passes the upstream's bytes on at one a second.
	faultSlow
	// faultStripStartTLS rewrites STARTTLS out of the EHLO reply, as an
	// attacker on the path would.
	faultStripStartTLS
	// faultHandshakeClose reads the relay's TLS ClientHello and closes.
	faultHandshakeClose
	// faultHandshakeGarbage answers the ClientHello with bytes that are
	// not TLS.
	faultHandshakeGarbage
	// faultBadTLS speaks TLS to the relay with fault.tls: a certificate
	// from another CA, or TLS 1.0 only.
	faultBadTLS
)

// fault is what the proxy does to the connections accepted while it is set.
type fault struct {
	kind faultKind
	verb string      // faultReply421, faultRefuse: the command to answer
	n    int         // faultResetInData: message bytes passed on before the reset
	tls  *tls.Config // faultBadTLS: in place of the proxy's own
}

// faultProxy stands between the relay and an smtptest upstream on
// loopback. With a TLS configuration it speaks implicit TLS to the relay
// and plain text to the upstream, so that it sees the SMTP dialogue;
// without, bytes pass as they are (STARTTLS goes through end to end).
// Each connection keeps the fault that was set when it was accepted.
type faultProxy struct {
	t        *testing.T
	ln       net.Listener
	upstream string
	tls      *tls.Config

	mu       sync.Mutex
	fault    fault
	hits     int      // times a fault struck
	commands []string // command verbs the relay sent on faulty connections
	conns    []net.Conn
	closed   bool
	wg       sync.WaitGroup
}

func startFaultProxy(t *testing.T, upstream string, tlsConfig *tls.Config) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{t: t, ln: ln, upstream: upstream, tls: tlsConfig}
	p.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !p.track(c) {
				return
			}
			p.wg.Go(func() { p.serve(c) })
		}
	})
	t.Cleanup(p.close)
	return p
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

// set makes the proxy misbehave on the connections it accepts from now
// on; fault{} lets them through untouched.
func (p *faultProxy) set(f fault) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fault = f
}

func (p *faultProxy) hitCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hits
}

func (p *faultProxy) sent() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.commands...)
}

func (p *faultProxy) hit() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.hits++
}

// track registers a connection for close; false once closed.
func (p *faultProxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	p.conns = append(p.conns, c)
	return true
}

func (p *faultProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	conns := p.conns
	p.closed = true
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	p.wg.Wait()
}

func (p *faultProxy) serve(raw net.Conn) {
	defer raw.Close()
	p.mu.Lock()
	f := p.fault
	p.mu.Unlock()

	switch f.kind {
	case faultHandshakeClose, faultHandshakeGarbage:
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := raw.Read(make([]byte, 512)); err != nil {
			return
		}
		if f.kind == faultHandshakeGarbage {
			io.WriteString(raw, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
		}
		p.hit()
		return
	}
	client := raw
	cfg := p.tls
	if f.kind == faultBadTLS {
		cfg = f.tls
	}
	if cfg != nil {
		tc := tls.Server(raw, cfg)
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		if err := tc.Handshake(); err != nil {
			if f.kind == faultBadTLS {
				p.hit()
			}
			return
		}
		tc.SetDeadline(time.Time{})
		client = tc
	}
	server, err := net.DialTimeout("tcp", p.upstream, 5*time.Second)
	if err != nil {
		return
	}
	if !p.track(server) {
		return
	}
	defer server.Close()

	pc := &proxyConn{p: p, f: f, client: client, server: server}
	done := make(chan struct{})
	go func() {
		defer close(done)
		pc.replies()
		// The upstream is gone: so is the relay's connection.
		client.Close()
	}()
	pc.commands()
	server.Close()
	<-done
}

// proxyConn is one relayed connection with its fault.
type proxyConn struct {
	p      *faultProxy
	f      fault
	client net.Conn // the relay's side, in clear
	server net.Conn // the upstream's side
	mute   atomic.Bool
}

// commands passes the relay's commands and message to the upstream, line
// by line, striking where the fault says.
func (pc *proxyConn) commands() {
	switch pc.f.kind {
	case faultNone, faultSlow:
		io.Copy(pc.server, pc.client)
		return
	}
	r := bufio.NewReader(pc.client)
	// After DATA the relay waits for 354 and sends the message; none of
	// the faults here lets the upstream refuse DATA, so every line up to
	// the final dot is the message.
	inData, passed := false, 0
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if inData {
			switch {
			case line == ".\r\n":
				inData = false
				if pc.f.kind == faultHangAfterDot {
					// Before the dot goes out, so that the reply to it
					// cannot slip through.
					pc.mute.Store(true)
					pc.p.hit()
				}
			case pc.f.kind == faultResetInData && passed+len(line) >= pc.f.n:
				io.WriteString(pc.server, line[:pc.f.n-passed])
				pc.p.hit()
				resetConn(pc.client)
				resetConn(pc.server)
				return
			}
			passed += len(line)
			if _, err := io.WriteString(pc.server, line); err != nil {
				return
			}
			continue
		}
		verb, _, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
		verb = strings.ToUpper(verb)
		pc.p.mu.Lock()
		pc.p.commands = append(pc.p.commands, verb)
		pc.p.mu.Unlock()
		if verb == pc.f.verb {
			switch pc.f.kind {
			case faultReply421:
				io.WriteString(pc.client, "421 4.3.2 fault injected at "+verb+", closing\r\n")
				pc.p.hit()
				return
			case faultRefuse:
				io.WriteString(pc.client, "454 4.7.0 fault injected at "+verb+"\r\n")
				pc.p.hit()
				continue
			}
		}
		if _, err := io.WriteString(pc.server, line); err != nil {
			return
		}
		switch verb {
		case "DATA":
			inData = true
		case "STARTTLS":
			// What follows is TLS, no longer lines.
			io.Copy(pc.server, r)
			return
		}
	}
}

// replies passes the upstream's replies to the relay, as the fault says.
func (pc *proxyConn) replies() {
	switch pc.f.kind {
	case faultSlow:
		b := make([]byte, 1)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			if _, err := pc.server.Read(b); err != nil {
				return
			}
			<-tick.C
			if _, err := pc.client.Write(b); err != nil {
				return
			}
		}
	case faultStripStartTLS:
		r := bufio.NewReader(pc.server)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			// "250-STARTTLS" or "250 STARTTLS": the keyword goes, the
			// line stays, so that the reply keeps its shape.
			if len(line) > 4 && strings.EqualFold(strings.TrimRight(line[4:], "\r\n"), "STARTTLS") {
				line = line[:4] + "XSTRIPPED\r\n"
				pc.p.hit()
			}
			if _, err := io.WriteString(pc.client, line); err != nil {
				return
			}
		}
	}
	buf := make([]byte, 4096)
	for {
		n, err := pc.server.Read(buf)
		if n > 0 && !pc.mute.Load() {
			if _, err := pc.client.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// resetConn closes c with a TCP RST instead of an orderly FIN.
func resetConn(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if tcp, ok := c.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
	c.Close()
}
