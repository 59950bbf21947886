package relay

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"smarthost/internal/mailproto"
	"smarthost/relay/upstream"
)

// clock is a Server.Now that tests move forward.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// twoUsers returns app and other, both with the test password.
func twoUsers(t *testing.T, app, other User) []User {
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	app.Name, app.PasswordHash = "app", hash
	other.Name, other.PasswordHash = "other", hash
	if app.AllowedFrom == nil {
		app.AllowedFrom = []string{"app@example.com"}
	}
	if other.AllowedFrom == nil {
		other.AllowedFrom = []string{"other@example.com"}
	}
	return []User{app, other}
}

func (c *client) loginAs(env *testEnv, user string) {
	c.t.Helper()
	c.expect(250, "EHLO client.test")
	c.startTLS(env.pki.ClientTLS())
	c.expect(250, "EHLO client.test")
	if code, msg := c.authPlain(user, testPassword); code != 235 {
		c.t.Fatalf("AUTH %s: %d %s", user, code, msg)
	}
}

func msgFrom(addr string) string {
	return "From: <" + addr + ">\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHi.\r\n"
}

// wantReply checks a reply's code and enhanced code.
func wantReply(t *testing.T, what string, code int, msg string, wantCode int, wantEnhanced string) {
	t.Helper()
	if code != wantCode || !strings.HasPrefix(msg, wantEnhanced+" ") {
		t.Errorf("%s: %d %s, want %d %s", what, code, msg, wantCode, wantEnhanced)
	}
}

// TestUserRateLimit: a user's accepted messages count in a sliding window
// of its own; over it, MAIL is refused for a while with 450 4.7.1, and a
// message refused later does not count.
func TestUserRateLimit(t *testing.T) {
	clk := newClock()
	rec := newRecorder()
	env := startServer(t, func(s *Server) {
		s.Now = clk.Now
		s.Observer = rec
		s.Users = twoUsers(t, User{RateLimit: upstream.Rate{N: 2, Per: time.Minute}}, User{RateLimit: upstream.Rate{N: 2, Per: time.Minute}})
	})
	l := env.addrs[0]
	c := dial(t, l)
	c.loginAs(env, "app")
	// Refused at DATA (no From: and a null sender is not allowed anyway):
	// a message refused after MAIL gives its slot back.
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	if code, _ := c.data("Subject: a\r\nFrom: a\r\nFrom: b\r\n\r\nx\r\n.\r\n"); code != 550 {
		t.Fatalf("two From: fields answered %d", code)
	}
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RSET")
	for i := range 2 {
		if code, msg := c.send("app@example.com", []string{"bob@example.net"}, msgFrom("app@example.com")); code != 250 {
			t.Fatalf("message %d: %d %s", i+1, code, msg)
		}
	}
	clk.advance(30 * time.Second)
	code, msg := c.cmd("MAIL FROM:<app@example.com>")
	wantReply(t, "third message in the window", code, msg, 450, "4.7.1")

	// The other user's window is its own.
	d := dial(t, l)
	d.loginAs(env, "other")
	for i := range 2 {
		if code, msg := d.send("other@example.com", []string{"bob@example.net"}, msgFrom("other@example.com")); code != 250 {
			t.Fatalf("other's message %d: %d %s", i+1, code, msg)
		}
	}

	// 30s later the first two have left the minute; the third one was
	// never counted.
	clk.advance(30 * time.Second)
	for i := range 2 {
		if code, msg := c.send("app@example.com", []string{"bob@example.net"}, msgFrom("app@example.com")); code != 250 {
			t.Fatalf("after the window slid, message %d: %d %s", i+1, code, msg)
		}
	}
	code, msg = c.cmd("MAIL FROM:<app@example.com>")
	wantReply(t, "over the limit again", code, msg, 450, "4.7.1")
	c.expect(221, "QUIT")
	d.expect(221, "QUIT")

	if n := len(env.q.all()); n != 6 {
		t.Errorf("%d messages queued, want 6", n)
	}
	ev := rec.snapshot()
	if ev["user_accepted app"] != 4 || ev["user_accepted other"] != 2 || ev["user_rate_limited app"] != 2 ||
		ev["rejected "+l+" rate_limited"] != 2 || ev["user_rate_limited other"] != 0 {
		t.Errorf("events: %v", ev)
	}
}

// TestUserRecipientLimit: recipient_limit counts recipients, refusing
// the ones over it with 451 4.7.1 while the others go on.
func TestUserRecipientLimit(t *testing.T) {
	clk := newClock()
	env := startServer(t, func(s *Server) {
		s.Now = clk.Now
		s.Users = twoUsers(t, User{RecipientLimit: upstream.Rate{N: 3, Per: time.Hour}}, User{})
	})
	c := dial(t, env.addrs[0])
	c.loginAs(env, "app")
	if code, msg := c.send("app@example.com", []string{"a@example.net", "b@example.net"}, msgFrom("app@example.com")); code != 250 {
		t.Fatalf("two recipients: %d %s", code, msg)
	}
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<c@example.net>")
	c.expect(250, "RCPT TO:<c@example.net>") // the same one again counts once
	code, msg := c.cmd("RCPT TO:<d@example.net>")
	wantReply(t, "fourth recipient", code, msg, 451, "4.7.1")
	if code, msg := c.data(msgFrom("app@example.com") + ".\r\n"); code != 250 {
		t.Fatalf("message to the recipient within the limit: %d %s", code, msg)
	}
	clk.advance(59 * time.Minute)
	c.expect(250, "MAIL FROM:<app@example.com>")
	code, msg = c.cmd("RCPT TO:<e@example.net>")
	wantReply(t, "still within the hour", code, msg, 451, "4.7.1")
	c.expect(250, "RSET")
	clk.advance(time.Minute)
	if code, msg := c.send("app@example.com", []string{"e@example.net", "f@example.net"}, msgFrom("app@example.com")); code != 250 {
		t.Fatalf("after the window slid: %d %s", code, msg)
	}
	got := env.q.all()
	if len(got) != 3 || len(got[1].m.Recipients) != 1 || got[1].m.Recipients[0].Addr != "c@example.net" {
		t.Errorf("queued %+v", got)
	}
}

// TestAllowedRecipients: a recipient outside the user's
// allowed_recipients is refused with 550 5.7.1, the others unaffected;
// a user without the key may send to anyone.
func TestAllowedRecipients(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Users = twoUsers(t, User{AllowedRecipients: []string{"*@example.net", "Boss@Corp.test"}}, User{})
	})
	c := dial(t, env.addrs[0])
	c.loginAs(env, "app")
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@EXAMPLE.net>")
	code, msg := c.cmd("RCPT TO:<eve@evil.test>")
	wantReply(t, "recipient outside allowed_recipients", code, msg, 550, "5.7.1")
	c.expect(250, "RCPT TO:<boss@corp.test>")
	if code, msg := c.data(msgFrom("app@example.com") + ".\r\n"); code != 250 {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	d := dial(t, env.addrs[0])
	d.loginAs(env, "other")
	if code, msg := d.send("other@example.com", []string{"eve@evil.test"}, msgFrom("other@example.com")); code != 250 {
		t.Fatalf("user without allowed_recipients: %d %s", code, msg)
	}
	got := env.q.all()
	if len(got) != 2 || len(got[0].m.Recipients) != 2 ||
		got[0].m.Recipients[0].Addr != "bob@EXAMPLE.net" || got[0].m.Recipients[1].Addr != "boss@corp.test" {
		t.Errorf("queued %+v", got)
	}
}

// TestAllowNullSender: MAIL FROM:<> is admitted for the user that has
// allow_null_sender only, without widening its allowed_from.
func TestAllowNullSender(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Users = twoUsers(t, User{AllowNullSender: true}, User{})
	})
	bounce := "From: MAILER-DAEMON <app@example.com>\r\nTo: bob@example.net\r\nSubject: Undelivered\r\n\r\nSorry.\r\n"
	c := dial(t, env.addrs[0])
	c.loginAs(env, "app")
	if code, msg := c.send("", []string{"bob@example.net"}, bounce); code != 250 {
		t.Fatalf("null sender of a user allowed it: %d %s", code, msg)
	}
	code, msg := c.cmd("MAIL FROM:<boss@example.com>")
	wantReply(t, "other sender of the same user", code, msg, 553, "5.7.1")
	c.expect(250, "MAIL FROM:<>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	code, msg = c.data(strings.Replace(bounce, "app@example.com", "boss@example.com", 1) + ".\r\n")
	wantReply(t, "null sender with a header From: outside allowed_from", code, msg, 553, "5.7.1")

	d := dial(t, env.addrs[0])
	d.loginAs(env, "other")
	code, msg = d.cmd("MAIL FROM:<>")
	wantReply(t, "null sender of a user without allow_null_sender", code, msg, 553, "5.7.1")
	got := env.q.all()
	if len(got) != 1 || got[0].m.From != "" || got[0].m.User != "app" {
		t.Errorf("queued %+v", got)
	}
}

// TestClientRateLimit: on a listener without AUTH, each client address
// has a window of its own.
func TestClientRateLimit(t *testing.T) {
	clk := newClock()
	rec := newRecorder()
	env := startServer(t, func(s *Server) {
		s.Now = clk.Now
		s.Observer = rec
		s.TLSConfig = nil
		s.Listeners = []Listener{{Name: "cron", Address: "127.0.0.1:0", TLS: mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
			RateLimit:       upstream.Rate{N: 1, Per: time.Minute}}}
	})
	a := dialFrom(t, env.addrs[0], "127.0.0.2")
	a.read()
	a.expect(250, "EHLO a.test")
	if code, msg := a.send("cron@example.com", []string{"bob@example.net"}, msgFrom("cron@example.com")); code != 250 {
		t.Fatalf("first: %d %s", code, msg)
	}
	code, msg := a.cmd("MAIL FROM:<cron@example.com>")
	wantReply(t, "second from one address", code, msg, 450, "4.7.1")
	b := dialFrom(t, env.addrs[0], "127.0.0.3")
	b.read()
	b.expect(250, "EHLO b.test")
	if code, msg := b.send("cron@example.com", []string{"bob@example.net"}, msgFrom("cron@example.com")); code != 250 {
		t.Fatalf("another address: %d %s", code, msg)
	}
	clk.advance(time.Minute)
	if code, msg := a.send("cron@example.com", []string{"bob@example.net"}, msgFrom("cron@example.com")); code != 250 {
		t.Fatalf("after a minute: %d %s", code, msg)
	}
	if n := rec.snapshot()["rejected cron rate_limited"]; n != 1 {
		t.Errorf("rate_limited rejections %d, want 1", n)
	}
}

// TestRateLimitKeptOnReload: SetUsers keeps the windows of the users it
// keeps, and a changed limit applies to the messages already counted.
func TestRateLimitKeptOnReload(t *testing.T) {
	clk := newClock()
	users := twoUsers(t, User{RateLimit: upstream.Rate{N: 2, Per: time.Hour}}, User{})
	env := startServer(t, func(s *Server) {
		s.Now = clk.Now
		s.Users = users
	})
	c := dial(t, env.addrs[0])
	c.loginAs(env, "app")
	for range 2 {
		if code, msg := c.send("app@example.com", []string{"bob@example.net"}, msgFrom("app@example.com")); code != 250 {
			t.Fatalf("%d %s", code, msg)
		}
	}
	app := users[0]
	app.AllowedFrom = []string{"*@example.com"}
	env.srv.SetUsers([]User{app, users[1]})
	code, msg := c.cmd("MAIL FROM:<app@example.com>")
	wantReply(t, "after a reload", code, msg, 450, "4.7.1")
	app.RateLimit.N = 3
	env.srv.SetUsers([]User{app, users[1]})
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, msgFrom("app@example.com")); code != 250 {
		t.Fatalf("limit raised to 3: %d %s", code, msg)
	}
	code, msg = c.cmd("MAIL FROM:<app@example.com>")
	wantReply(t, "fourth under a limit of 3", code, msg, 450, "4.7.1")
}

// TestWindowsSweep: windows that count nothing are dropped once there are
// many, so that client addresses seen once do not pile up; a window with
// a slot taken, or a message still in its window, stays and counts.
func TestWindowsSweep(t *testing.T) {
	var ws windows
	r := upstream.Rate{N: 1, Per: time.Minute}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	// With held and recent, minSweep windows: the next new one sweeps.
	for i := range minSweep - 2 {
		w, ok, err := ws.take(fmt.Sprintf("client:%d", i), r, t0)
		if !ok || err != nil {
			t.Fatalf("take %d: %v %v", i, ok, err)
		}
		w.w.Release(context.Background(), t0, r, true)
		ws.done(w, t0)
	}
	held, _, _ := ws.take("client:held", r, t0)
	later := t0.Add(50 * time.Second)
	recent, _, _ := ws.take("client:recent", r, later)
	recent.w.Release(context.Background(), later, r, true)
	ws.done(recent, later)

	if _, ok, _ := ws.take("client:0", r, later); ok {
		t.Fatal("a full window was dropped before its message left it")
	}
	now := t0.Add(time.Minute)
	if _, ok, _ := ws.take("client:new", r, now); !ok {
		t.Fatal("new window full")
	}
	ws.mu.Lock()
	var kept []string
	for k := range ws.m {
		kept = append(kept, k)
	}
	heldKept := ws.m["client:held"] == held
	ws.mu.Unlock()
	slices.Sort(kept)
	// client:0 was last asked at 50s, refused: it stays until 1m50s.
	if want := []string{"client:0", "client:held", "client:new", "client:recent"}; !slices.Equal(kept, want) || !heldKept {
		t.Errorf("windows after the sweep %v (held the same %v), want %v", kept, heldKept, want)
	}
	if _, ok, _ := ws.take("client:recent", r, now); ok {
		t.Error("the window with a message in the last minute was forgotten")
	}
}
