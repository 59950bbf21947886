package relay

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"smarthost/internal/mailproto"
)

// waitServed dials until a connection is greeted with 220, since a slot
// frees only once the server has seen the closed connection go.
func waitServed(t *testing.T, addr, localIP string) *client {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := dialFrom(t, addr, localIP)
		if code, _ := c.read(); code == 220 {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot for %s", localIP)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestMaxConnectionsPerIP(t *testing.T) {
	env := startServer(t, func(s *Server) { s.Limits.MaxConnectionsPerIP = 3 })
	var held []*client
	for range 3 {
		held = append(held, dialFrom(t, env.addrs[0], "127.0.0.2"))
		if code, msg := held[len(held)-1].read(); code != 220 {
			t.Fatalf("connection %d: %d %s", len(held), code, msg)
		}
	}
	over := dialFrom(t, env.addrs[0], "127.0.0.2")
	if code, msg := over.read(); code != 421 || msg != "4.7.0 relay.test Too many connections from your address, try again later" {
		t.Fatalf("fourth connection from one address: %d %s", code, msg)
	}
	if !readClosed(over, 2*time.Second) {
		t.Error("refused connection left open")
	}
	// Another address is not affected.
	other := dialFrom(t, env.addrs[0], "127.0.0.3")
	if code, msg := other.read(); code != 220 {
		t.Fatalf("other address: %d %s", code, msg)
	}
	// Closing one gives its place back.
	held[0].expect(221, "QUIT")
	waitServed(t, env.addrs[0], "127.0.0.2")
	held[1].expect(250, "NOOP")
}

// TestMaxConnectionsPerIPv6Prefix: addresses of one IPv6 /64 count as one
// client, for the connection limit and the AUTH failure limit alike. The
// addresses come in PROXY headers, as from a load balancer.
func TestMaxConnectionsPerIPv6Prefix(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Limits.MaxConnectionsPerIP = 2
		s.Limits.AuthFailuresPerIP = 2
		s.Listeners = []Listener{{
			Address:       "127.0.0.1:0",
			TLS:           mailproto.TLSStartTLS,
			AuthRequired:  true,
			ProxyProtocol: true,
			ProxyTrusted:  []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		}}
	})
	greet := func(client string) (*client, int) {
		c := dialProxied(t, env.addrs[0], "", 2, client)
		code, _ := c.read()
		return c, code
	}
	a, code := greet("2001:db8:1:1::1")
	if code != 220 {
		t.Fatalf("first: %d", code)
	}
	if _, code := greet("2001:db8:1:1::2"); code != 220 {
		t.Fatalf("second, same /64: %d", code)
	}
	if _, code := greet("2001:db8:1:1:ffff::3"); code != 421 {
		t.Fatalf("third from the same /64: %d, want 421", code)
	}
	b, code := greet("2001:db8:1:2::1")
	if code != 220 {
		t.Fatalf("another /64: %d", code)
	}
	a.expect(221, "QUIT")
	b.expect(221, "QUIT")

	login := func(client, password string) int {
		c := dialProxied(t, env.addrs[0], "", 2, client)
		for {
			code, _ := c.read()
			if code == 220 {
				break
			}
			// The slot of a connection just closed may not be free yet.
			c = dialProxied(t, env.addrs[0], "", 2, client)
			time.Sleep(20 * time.Millisecond)
		}
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		code, _ := c.authPlain("app", password)
		c.cmd("QUIT")
		return code
	}
	login("2001:db8:1:3::1", "wrong")
	login("2001:db8:1:3::2", "wrong")
	if code := login("2001:db8:1:3::99", testPassword); code != 421 {
		t.Errorf("third address of a /64 that failed twice: AUTH %d, want 421", code)
	}
	if code := login("2001:db8:1:4::1", testPassword); code != 235 {
		t.Errorf("another /64: AUTH %d, want 235", code)
	}
}

// TestListenersDoNotStarveEachOther: the public listener full of idle
// connections leaves the trusted network's listener its own places.
func TestListenersDoNotStarveEachOther(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Limits.MaxConnections = 4
		s.Listeners = append(s.Listeners, Listener{
			Address:         "127.0.0.1:0",
			TLS:             mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.9/32")},
		})
	})
	for i := range 4 {
		c := dialFrom(t, env.addrs[0], fmt.Sprintf("127.0.1.%d", i+1))
		if code, msg := c.read(); code != 220 {
			t.Fatalf("public connection %d: %d %s", i, code, msg)
		}
	}
	full := dialFrom(t, env.addrs[0], "127.0.1.9")
	if code, _ := full.read(); code != 421 {
		t.Fatalf("public listener over its limit: %d, want 421", code)
	}
	in := dialFrom(t, env.addrs[1], "127.0.0.9")
	if code, msg := in.read(); code != 220 {
		t.Fatalf("trusted listener while the public one is full: %d %s", code, msg)
	}
	in.expect(250, "EHLO cron.test")
	if code, msg := in.send("cron@example.com", []string{"ops@example.net"}, "Subject: nightly\r\n\r\nok\r\n"); code != 250 {
		t.Fatalf("trusted submission: %d %s", code, msg)
	}
}

// TestAuthTimeout: a connection that does not log in is closed after
// AuthTimeout, whatever it sends; one that logged in is not.
func TestAuthTimeout(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startServer(t, func(s *Server) { s.Limits.AuthTimeout = 400 * time.Millisecond })
	idle := dial(t, env.addrs[0])
	loggedIn := loggedIn(t, env)
	idler := dial(t, env.addrs[0])
	idler.expect(250, "EHLO client.test")
	idler.startTLS(env.pki.ClientTLS())

	start := time.Now()
	var code int
	var msg string
	for time.Since(start) < 5*time.Second {
		// NOOP, RSET and EHLO keep it busy but do not extend the wait.
		code, msg = idler.cmd("NOOP")
		if code != 250 {
			break
		}
		idler.cmd("RSET")
		idler.cmd("EHLO client.test")
		time.Sleep(50 * time.Millisecond)
	}
	if code != 421 || msg != "4.7.0 relay.test Authentication timeout, closing connection" {
		t.Fatalf("after the auth timeout: %d %s", code, msg)
	}
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("closed after %v, before the timeout", took)
	}
	if !readClosed(idler, 2*time.Second) {
		t.Error("connection still open after 421")
	}
	// One that never said anything gets the same, on the plain connection.
	if code, msg := idle.read(); code != 421 || !strings.HasPrefix(msg, "4.7.0") {
		t.Errorf("silent connection: %d %s", code, msg)
	}
	if code, msg := loggedIn.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Errorf("logged-in session after the auth timeout: %d %s", code, msg)
	}
}

// TestExactSizeLimit: a message of exactly MaxMessageBytes is accepted by
// DATA and BDAT alike, one byte more is refused; a declared SIZE over the
// limit is refused at MAIL.
func TestExactSizeLimit(t *testing.T) {
	const limit = 4096
	env := startServer(t, func(s *Server) { s.Limits.MaxMessageBytes = limit })
	// message returns a message of exactly n bytes, in CRLF lines.
	message := func(n int) string {
		head := "From: app@example.com\r\nSubject: size\r\n\r\n"
		body := strings.Repeat(strings.Repeat("x", 62)+"\r\n", n/64+1)
		msg := head + body
		cut := msg[:n-2]
		if strings.HasSuffix(cut, "\r") {
			cut = cut[:len(cut)-1] + "y"
		}
		return cut + "\r\n"
	}
	if len(message(limit)) != limit || len(message(limit+1)) != limit+1 {
		t.Fatal("message helper")
	}
	c := loggedIn(t, env)
	if ehlo := c.expect(250, "EHLO client.test"); !strings.Contains("\n"+ehlo+"\n", "\nSIZE\n") {
		t.Errorf("EHLO does not offer SIZE:\n%s", ehlo)
	}
	c.expect(250, "MAIL FROM:<app@example.com> SIZE=%d", limit)
	c.expect(250, "RCPT TO:<bob@example.net>")
	if code, msg := c.data(message(limit) + ".\r\n"); code != 250 {
		t.Errorf("DATA of exactly the limit: %d %s", code, msg)
	}
	if code, msg := c.cmd("MAIL FROM:<app@example.com> SIZE=%d", limit+1); code != 552 || !strings.HasPrefix(msg, "5.3.4") {
		t.Errorf("SIZE one over the limit: %d %s", code, msg)
	}
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	if code, msg := c.data(message(limit+1) + ".\r\n"); code != 552 || !strings.HasPrefix(msg, "5.3.4") {
		t.Errorf("DATA one byte over the limit: %d %s", code, msg)
	}

	bdat := func(msg string) (int, string) {
		c.expect(250, "MAIL FROM:<app@example.com>")
		c.expect(250, "RCPT TO:<bob@example.net>")
		half := len(msg) / 2
		fmt.Fprintf(c.conn, "BDAT %d\r\n%s", half, msg[:half])
		if code, text := c.read(); code != 250 {
			return code, text
		}
		fmt.Fprintf(c.conn, "BDAT %d LAST\r\n%s", len(msg)-half, msg[half:])
		return c.read()
	}
	if code, msg := bdat(message(limit)); code != 250 {
		t.Errorf("BDAT of exactly the limit: %d %s", code, msg)
	}
	if code, msg := bdat(message(limit + 1)); code != 552 || !strings.HasPrefix(msg, "5.3.4") {
		t.Errorf("BDAT one byte over the limit: %d %s", code, msg)
	}
	if got := len(env.q.all()); got != 2 {
		t.Errorf("%d messages stored, want 2", got)
	}
}

// TestAtInLocalPart: an "@" in an envelope address's local part is
// refused: the policy would judge one domain and a later hop use another.
// go-smtp unquotes a quoted local part, so a quoted one is refused too.
func TestAtInLocalPart(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Users[0].AllowedFrom = []string{"*@notify.example.com"}
	})
	c := loggedIn(t, env)
	for _, from := range []string{"ceo@evil.com@notify.example.com", `"ceo@evil.com"@notify.example.com`} {
		if code, msg := c.cmd("MAIL FROM:<%s>", from); code != 501 || !strings.HasPrefix(msg, "5.1.7") {
			t.Errorf("MAIL FROM:<%s>: %d %s", from, code, msg)
		}
	}
	c.expect(250, "MAIL FROM:<app@notify.example.com>")
	if code, msg := c.cmd("RCPT TO:<bob@example.net@victim.example>"); code != 501 || !strings.HasPrefix(msg, "5.1.3") {
		t.Errorf("RCPT with an @ in the local part: %d %s", code, msg)
	}
	c.expect(250, "RSET")
	for _, from := range []string{"ceo@evil.com@notify.example.com", "<ceo@evil.com@notify.example.com>"} {
		hdr := "From: " + from + "\r\nSubject: q\r\n\r\nhi\r\n"
		if code, text := c.send("app@notify.example.com", []string{"bob@example.net"}, hdr); code/100 != 5 {
			t.Errorf("header From: %s: %d %s", from, code, text)
		}
	}
	if got := env.q.all(); len(got) != 0 {
		t.Errorf("stored: %+v", got)
	}
}

// TestBDATDataTimeout: a BDAT transfer is bounded by DataTimeout as a
// whole, in chunks that keep coming and in a chunk that stalls.
func TestBDATDataTimeout(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startServer(t, func(s *Server) { s.Limits.DataTimeout = 500 * time.Millisecond })
	t.Run("chunks", func(t *testing.T) {
		c := loggedIn(t, env)
		c.expect(250, "MAIL FROM:<app@example.com>")
		c.expect(250, "RCPT TO:<bob@example.net>")
		fmt.Fprintf(c.conn, "BDAT 23\r\nFrom: app@example.com\r\n")
		start := time.Now()
		code, msg := c.read()
		for code == 250 && time.Since(start) < 5*time.Second {
			time.Sleep(50 * time.Millisecond)
			fmt.Fprintf(c.conn, "BDAT 5\r\nabc\r\n")
			code, msg = c.read()
		}
		if code != 421 || !strings.HasPrefix(msg, "4.4.") {
			t.Fatalf("chunks past the data timeout: %d %s", code, msg)
		}
		if took := time.Since(start); took < 400*time.Millisecond {
			t.Errorf("cut off after %v, before the timeout", took)
		}
		if !readClosed(c, 2*time.Second) {
			t.Error("connection still open")
		}
	})
	t.Run("stalled chunk", func(t *testing.T) {
		c := loggedIn(t, env)
		c.expect(250, "MAIL FROM:<app@example.com>")
		c.expect(250, "RCPT TO:<bob@example.net>")
		fmt.Fprintf(c.conn, "BDAT 23\r\nFrom: app@example.com\r\n")
		if code, msg := c.read(); code != 250 {
			t.Fatalf("first chunk: %d %s", code, msg)
		}
		fmt.Fprintf(c.conn, "BDAT 1000 LAST\r\nonly a little")
		start := time.Now()
		code, msg := c.read()
		if code != 421 || msg != "4.4.2 Timeout exceeded" {
			t.Errorf("stalled chunk: %d %s", code, msg)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("cut off after %v", took)
		}
	})
	if got := len(env.q.all()); got != 0 {
		t.Errorf("%d messages stored", got)
	}
	stillServes(t, env)
}

// TestListenRefusesOpenRelay: whoever builds a Server, a listener without
// AUTH must name trusted networks, and not every address.
func TestListenRefusesOpenRelay(t *testing.T) {
	for name, nets := range map[string][]netip.Prefix{
		"none":      nil,
		"every v4":  {netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("0.0.0.0/0")},
		"every v6":  {netip.MustParsePrefix("::/0")},
		"every v4b": {netip.MustParsePrefix("1.2.3.4/0")},
	} {
		t.Run(name, func(t *testing.T) {
			srv := NewServer(&memQueue{dir: t.TempDir()})
			srv.Hostname = "relay.test"
			srv.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSNone, TrustedNetworks: nets}}
			err := srv.Listen()
			if err == nil {
				srv.Close()
				t.Fatal("an open relay listener was bound")
			}
			if !strings.Contains(err.Error(), "open relay") {
				t.Errorf("error %q does not say why", err)
			}
			// Nothing was left bound.
			if len(srv.Addrs()) != 0 {
				t.Errorf("addresses bound: %v", srv.Addrs())
			}
		})
	}
}
