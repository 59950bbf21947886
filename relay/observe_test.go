package relay

import (
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"smarthost/internal/mailproto"
)

// recorder counts what an Observer is told, by "event listener detail".
type recorder struct {
	mu     sync.Mutex
	events map[string]int
	sizes  []int
}

func newRecorder() *recorder { return &recorder{events: map[string]int{}} }

func (r *recorder) add(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events[fmt.Sprintf(format, args...)]++
}

func (r *recorder) ConnectionOpened(l string)              { r.add("opened %s", l) }
func (r *recorder) ConnectionClosed(l string)              { r.add("closed %s", l) }
func (r *recorder) ConnectionRefused(l string, why Reason) { r.add("refused %s %s", l, why) }
func (r *recorder) Rejected(l string, why Reason)          { r.add("rejected %s %s", l, why) }
func (r *recorder) AuthFailed(l string)                    { r.add("auth_failed %s", l) }
func (r *recorder) AuthBlocked(l string)                   { r.add("auth_blocked %s", l) }
func (r *recorder) UserAccepted(u string)                  { r.add("user_accepted %s", u) }
func (r *recorder) UserRateLimited(u string)               { r.add("user_rate_limited %s", u) }
func (r *recorder) Accepted(l string, size int, signed bool) {
	r.add("accepted %s signed=%v", l, signed)
	r.mu.Lock()
	r.sizes = append(r.sizes, size)
	r.mu.Unlock()
}
func (r *recorder) snapshot() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.events)
}

// waitEvents waits until the recorded events are exactly want.
func (r *recorder) waitEvents(t *testing.T, want map[string]int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := r.snapshot()
		if maps.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("events:\n%v\nwant:\n%v", got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestServerObserver(t *testing.T) {
	rec := newRecorder()
	env := startServer(t, func(s *Server) {
		s.Observer = rec
		s.Limits.AuthFailuresPerIP = 2
	})
	l := env.addrs[0] // a listener without a name is named by its address

	c := dial(t, env.addrs[0])
	c.login(env.pki)
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("send: %d %s", code, msg)
	}
	c.expect(553, "MAIL FROM:<boss@example.com>")
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(501, "RCPT TO:<josé@example.net>") // go-smtp answers bad syntax itself; this one is ours
	c.expect(250, "RSET")
	env.q.mu.Lock()
	env.q.fail = fmt.Errorf("queue: put: %w", syscall.ENOSPC)
	env.q.mu.Unlock()
	if code, _ := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 452 {
		t.Fatalf("storage failure answered %d", code)
	}
	c.expect(221, "QUIT")

	d := dial(t, env.addrs[0])
	d.expect(250, "EHLO client.test")
	d.startTLS(env.pki.ClientTLS())
	d.expect(250, "EHLO client.test")
	d.expect(530, "MAIL FROM:<app@example.com>")
	for range 2 {
		if code, _ := d.authPlain("app", "wrong"); code != 535 {
			t.Fatalf("wrong password answered %d", code)
		}
	}
	if code, _ := d.authPlain("app", testPassword); code != 421 {
		t.Fatalf("over the failure limit: %d", code)
	}

	rec.waitEvents(t, map[string]int{
		"opened " + l:                           2,
		"closed " + l:                           2,
		"accepted " + l + " signed=false":       1,
		"user_accepted app":                     1,
		"rejected " + l + " sender_not_allowed": 1,
		"rejected " + l + " bad_recipient":      1,
		"rejected " + l + " storage":            1,
		"rejected " + l + " auth_required":      1,
		"auth_failed " + l:                      2,
		"auth_blocked " + l:                     1,
	})
	rec.mu.Lock()
	sizes := rec.sizes
	rec.mu.Unlock()
	got := env.q.all()
	if len(sizes) != 1 || len(got) != 1 || sizes[0] != len(got[0].body) {
		t.Errorf("accepted sizes %v, want the stored size of the one message queued", sizes)
	}
}

func TestServerObserverRefusedConnections(t *testing.T) {
	rec := newRecorder()
	env := startServer(t, func(s *Server) {
		s.Observer = rec
		s.Limits.MaxConnections = 1
		s.Listeners = []Listener{{Name: "cron", Address: "127.0.0.1:0", TLS: mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}}
		s.TLSConfig = nil
	})
	out := dialFrom(t, env.addrs[0], "127.0.0.1")
	if code, _ := out.read(); code != 554 {
		t.Fatalf("untrusted client: %d", code)
	}
	in := dialFrom(t, env.addrs[0], "127.0.0.2")
	in.read()
	over := dialFrom(t, env.addrs[0], "127.0.0.2")
	if code, _ := over.read(); code != 421 {
		t.Fatalf("second connection over max_connections: %d", code)
	}
	rec.waitEvents(t, map[string]int{
		"opened cron":                    1,
		"refused cron untrusted_network": 1,
		"refused cron max_connections":   1,
	})
	in.expect(221, "QUIT")
	rec.waitEvents(t, map[string]int{
		"opened cron":                    1,
		"closed cron":                    1,
		"refused cron untrusted_network": 1,
		"refused cron max_connections":   1,
	})
}
