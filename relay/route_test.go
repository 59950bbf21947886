package relay

import (
	"net/netip"
	"strings"
	"testing"

	"smarthost/internal/mailproto"
)

// startRouted runs a trusted plain listener whose routes take mail from
// example.com's senders to anyone and, when toCorp, mail from anyone to
// corp.example.com.
func startRouted(t *testing.T, toCorp bool) *testEnv {
	t.Helper()
	fromRouted := func(from string) bool { return mailproto.DomainOf(from) == "example.com" }
	return startServer(t, func(s *Server) {
		s.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSNone, TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}}
		s.TLSConfig = nil
		s.Routable = func(from string) bool { return toCorp || fromRouted(from) }
		s.RcptRoutable = func(from, rcpt string) bool {
			return toCorp && mailproto.DomainOf(rcpt) == "corp.example.com" || fromRouted(from)
		}
	})
}

func TestNoRouteRefusals(t *testing.T) {
	t.Run("sender", func(t *testing.T) {
		env := startRouted(t, false)
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		if code, msg := c.cmd("MAIL FROM:<a@other.example>"); code != 553 || !strings.HasPrefix(msg, "5.7.1 Sender domain is not relayed") {
			t.Fatalf("unrouted sender: %d %s", code, msg)
		}
		if code, msg := c.send("app@example.com", []string{"b@gmail.test"}, plainMsg); code != 250 {
			t.Fatalf("routed sender: %d %s", code, msg)
		}
	})
	t.Run("recipient", func(t *testing.T) {
		env := startRouted(t, true)
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		// A route by recipient domain takes any sender to its domain only.
		c.expect(250, "MAIL FROM:<a@other.example>")
		c.expect(250, "RCPT TO:<a@Corp.Example.COM>")
		if code, msg := c.cmd("RCPT TO:<b@gmail.test>"); code != 553 || !strings.HasPrefix(msg, "5.7.1 Sender domain is not relayed") {
			t.Fatalf("unrouted recipient: %d %s", code, msg)
		}
		if code, msg := c.data(plainMsg + ".\r\n"); code != 250 {
			t.Fatalf("DATA: %d %s", code, msg)
		}
		// A sender with a route of its own reaches everyone.
		if code, msg := c.send("app@example.com", []string{"b@gmail.test", "a@corp.example.com"}, plainMsg); code != 250 {
			t.Fatalf("routed sender: %d %s", code, msg)
		}
		got := env.q.all()
		if len(got) != 2 {
			t.Fatalf("queued %d messages, want 2", len(got))
		}
		var rcpts []string
		for _, r := range got[0].m.Recipients {
			rcpts = append(rcpts, r.Addr)
		}
		if strings.Join(rcpts, " ") != "a@Corp.Example.COM" {
			t.Errorf("queued recipients %q, want only the routed one", rcpts)
		}
		if n := len(got[1].m.Recipients); n != 2 {
			t.Errorf("second message has %d recipients, want 2", n)
		}
	})
}
