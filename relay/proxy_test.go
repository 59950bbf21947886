package relay

import (
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"smarthost/internal/mailproto"

	"github.com/pires/go-proxyproto"
)

// proxyListenerEnv runs one PROXY listener: plain text, no AUTH, for the
// clients of 10.1.2.0/24, behind balancers in trusted.
func proxyListenerEnv(t *testing.T, trusted string, tweak func(*Server)) *testEnv {
	t.Helper()
	return startServer(t, func(s *Server) {
		s.Listeners = []Listener{{
			Address:         "127.0.0.1:0",
			TLS:             mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24"), netip.MustParsePrefix("127.0.0.1/32")},
			ProxyProtocol:   true,
			ProxyTrusted:    []netip.Prefix{netip.MustParsePrefix(trusted)},
		}}
		if tweak != nil {
			tweak(s)
		}
	})
}

// dialProxied connects from localIP ("" for 127.0.0.1) and sends a PROXY
// header of the given version claiming the connection comes from client.
func dialProxied(t *testing.T, addr, localIP string, version byte, client string) *client {
	t.Helper()
	c := dialFrom(t, addr, localIP)
	src := &net.TCPAddr{IP: net.ParseIP(client), Port: 40000}
	h := proxyproto.HeaderProxyFromAddrs(version, src, c.conn.RemoteAddr())
	if _, err := h.WriteTo(c.conn); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestProxyProtocol(t *testing.T) {
	env := proxyListenerEnv(t, "127.0.0.1/32", nil)
	addr := env.addrs[0]

	for _, tt := range []struct {
		name    string
		version byte
		client  string
	}{
		{"v1", 1, "10.1.2.3"},
		{"v2", 2, "10.1.2.4"},
	} {
		t.Run(tt.name+" inside trusted_networks", func(t *testing.T) {
			c := dialProxied(t, addr, "", tt.version, tt.client)
			if code, msg := c.read(); code != 220 {
				t.Fatalf("greeting: %d %s", code, msg)
			}
			c.expect(250, "EHLO client.test")
			if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
				t.Fatalf("%d %s", code, msg)
			}
			msgs := env.q.all()
			body := string(msgs[len(msgs)-1].body)
			if !strings.Contains(body, "["+tt.client+"]") {
				t.Errorf("Received: does not show %s:\n%s", tt.client, body)
			}
		})
	}
	t.Run("outside trusted_networks", func(t *testing.T) {
		for _, v := range []byte{1, 2} {
			c := dialProxied(t, addr, "", v, "192.0.2.7")
			if code, msg := c.read(); code != 554 || !strings.Contains(msg, "5.7.1") {
				t.Errorf("v%d: %d %s, want 554 5.7.1", v, code, msg)
			}
		}
	})
	t.Run("trusted source without a header", func(t *testing.T) {
		// The balancer must send a header: without one, even its own
		// address (in trusted_networks here) is not served.
		c := dialFrom(t, addr, "")
		if err := c.tp.PrintfLine("EHLO client.test"); err != nil {
			t.Fatal(err)
		}
		if line, err := c.tp.ReadLine(); err == nil {
			t.Errorf("served without a PROXY header: %q", line)
		}
	})
	t.Run("malformed header", func(t *testing.T) {
		c := dialFrom(t, addr, "")
		if _, err := c.conn.Write([]byte("PROXY TCP4 10.1.2.3 nonsense\r\n")); err != nil {
			t.Fatal(err)
		}
		if line, err := c.tp.ReadLine(); err == nil {
			t.Errorf("served after a malformed header: %q", line)
		}
	})
	t.Run("LOCAL command", func(t *testing.T) {
		// A balancer's health check speaks for itself: 127.0.0.1 is in
		// trusted_networks.
		c := dialFrom(t, addr, "")
		h := &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
		if _, err := h.WriteTo(c.conn); err != nil {
			t.Fatal(err)
		}
		if code, msg := c.read(); code != 220 {
			t.Fatalf("greeting: %d %s", code, msg)
		}
	})
}

// TestProxyUntrustedHop: a client that is not one of the listener's
// balancers is served as itself, and a PROXY header from it is refused.
func TestProxyUntrustedHop(t *testing.T) {
	env := proxyListenerEnv(t, "127.0.0.2/32", nil)
	addr := env.addrs[0]

	c := dialProxied(t, addr, "", 1, "10.1.2.3")
	// The greeting comes first: a client's first bytes are read after it.
	if code, msg := c.read(); code != 220 {
		t.Fatalf("greeting: %d %s", code, msg)
	}
	if code, msg := c.read(); code != 554 || !strings.Contains(msg, "PROXY header not accepted") {
		t.Fatalf("header from an untrusted hop: %d %s", code, msg)
	}
	if _, err := c.tp.ReadLine(); err == nil {
		t.Error("connection still open after the refusal")
	}

	// The same source without a header: served as itself (127.0.0.1 is in
	// trusted_networks), its address in Received:.
	plain := dial(t, addr)
	plain.expect(250, "EHLO client.test")
	if code, msg := plain.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	if body := string(env.q.all()[0].body); !strings.Contains(body, "[127.0.0.1]") {
		t.Errorf("Received:\n%s", body)
	}

	// The trusted balancer, 127.0.0.2, may speak for 10.1.2.3.
	lb := dialProxied(t, addr, "127.0.0.2", 2, "10.1.2.3")
	if code, msg := lb.read(); code != 220 {
		t.Fatalf("greeting through the balancer: %d %s", code, msg)
	}
	lb.expect(250, "EHLO client.test")
	if code, msg := lb.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	if body := string(env.q.all()[1].body); !strings.Contains(body, "[10.1.2.3]") {
		t.Errorf("Received:\n%s", body)
	}
}

// TestProxyHeaderOffAcceptLoop: a balancer connection that is slow to send
// its header holds up no other client, and such connections are bounded.
func TestProxyHeaderOffAcceptLoop(t *testing.T) {
	env := proxyListenerEnv(t, "127.0.0.1/32", func(s *Server) {
		s.Limits.MaxConnections = 2
		s.ProxyHeaderTimeout = 30 * time.Second
	})
	addr := env.addrs[0]
	slow := dialFrom(t, addr, "") // sends nothing

	start := time.Now()
	c := dialProxied(t, addr, "", 1, "10.1.2.3")
	c.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if code, msg := c.read(); code != 220 {
		t.Fatalf("greeting while another header is pending: %d %s", code, msg)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("greeting took %v", d)
	}

	// slow and one more fill the two places for pending headers: a third
	// is closed at once rather than waiting.
	slow2 := dialFrom(t, addr, "")
	third := dialFrom(t, addr, "")
	third.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := third.conn.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Errorf("third pending header: read %v, want the connection closed", err)
	}
	slow.conn.Close()
	slow2.conn.Close()
}

// TestProxyImplicitTLS: the header comes before the TLS handshake.
func TestProxyImplicitTLS(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Listeners = []Listener{{
			Address:       "127.0.0.1:0",
			TLS:           mailproto.TLSImplicit,
			AuthRequired:  true,
			ProxyProtocol: true,
			ProxyTrusted:  []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		}}
	})
	c := dialProxied(t, env.addrs[0], "", 2, "203.0.113.9")
	tc := tls.Client(c.conn, env.pki.ClientTLS())
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.conn, c.tp = tc, textproto.NewConn(tc)
	if code, msg := c.read(); code != 220 {
		t.Fatalf("greeting: %d %s", code, msg)
	}
	c.expect(250, "EHLO client.test")
	if code, msg := c.authPlain("app", testPassword); code != 235 {
		t.Fatalf("AUTH: %d %s", code, msg)
	}
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	if body := string(env.q.all()[0].body); !strings.Contains(body, "[203.0.113.9]") {
		t.Errorf("Received:\n%s", body)
	}
}

// TestProxyAuthLimiter: the auth-failure limit counts the address of the
// header, not the balancer's: one client's failures do not lock out
// another behind the same balancer.
func TestProxyAuthLimiter(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Limits.AuthFailuresPerIP = 2
		s.Listeners = []Listener{{
			Address:       "127.0.0.1:0",
			TLS:           mailproto.TLSStartTLS,
			AuthRequired:  true,
			ProxyProtocol: true,
			ProxyTrusted:  []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		}}
	})
	login := func(client, password string) int {
		c := dialProxied(t, env.addrs[0], "", 1, client)
		if code, msg := c.read(); code != 220 {
			t.Fatalf("greeting: %d %s", code, msg)
		}
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		code, _ := c.authPlain("app", password)
		return code
	}
	for range 2 {
		if code := login("198.51.100.1", "wrong"); code != 535 {
			t.Fatalf("bad password: %d", code)
		}
	}
	if code := login("198.51.100.1", testPassword); code != 421 {
		t.Errorf("blocked client with the right password: %d, want 421", code)
	}
	if code := login("198.51.100.2", testPassword); code != 235 {
		t.Errorf("another client behind the same balancer: %d, want 235", code)
	}
}
