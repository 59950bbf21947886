package upstream

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// corpRoutes sends corp.example.com's recipients through corp and every
// other recipient of every sender through ses.
func corpRoutes(t *testing.T, corp, ses *smtptest.Server) *deliverEnv {
	t.Helper()
	env := newDeliverer(t, plainUpstream("corp", corp), plainUpstream("ses", ses))
	setRoutes(env.d,
		Route{FromDomain: "*", Upstreams: []string{"ses"}},
		Route{ToDomain: "corp.example.com", Upstreams: []string{"corp"}},
	)
	return env
}

// toOf returns the recipients of the messages an upstream got, one line
// per message.
func toOf(msgs []smtptest.Message) []string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.From+" -> "+strings.Join(m.To, " "))
	}
	return out
}

func TestDeliverRouteByRecipient(t *testing.T) {
	corp := smtptest.Start(t, smtptest.Options{})
	ses := smtptest.Start(t, smtptest.Options{})
	env := corpRoutes(t, corp, ses)

	res := deliver(t, env.d, testMessage("app@example.com", "a@corp.example.com", "b@gmail.test", "c@Corp.Example.COM"), deliverBody)
	checkResult(t, res[0], "a@corp.example.com", queue.Delivered, "250 ", "corp")
	checkResult(t, res[1], "b@gmail.test", queue.Delivered, "250 ", "ses")
	checkResult(t, res[2], "c@Corp.Example.COM", queue.Delivered, "250 ", "corp")
	corp.WaitMessages(t, 1, 5*time.Second)
	ses.WaitMessages(t, 1, 5*time.Second)
	if got := toOf(corp.Messages()); len(got) != 1 || got[0] != "app@example.com -> a@corp.example.com c@Corp.Example.COM" {
		t.Errorf("corp got %q", got)
	}
	if got := toOf(ses.Messages()); len(got) != 1 || got[0] != "app@example.com -> b@gmail.test" {
		t.Errorf("ses got %q", got)
	}
	for _, up := range []*smtptest.Server{corp, ses} {
		if got := up.Messages()[0].Data; !strings.Contains(string(got), "Subject: test\r\n") {
			t.Errorf("content not delivered whole: %q", got)
		}
	}
}

func TestDeliverRouteFailsOnlyItsRecipients(t *testing.T) {
	t.Run("permanent", func(t *testing.T) {
		corp := smtptest.Start(t, smtptest.Options{RcptReply: reply(550, smtp.EnhancedCode{5, 1, 1}, "No such user")})
		ses := smtptest.Start(t, smtptest.Options{})
		env := corpRoutes(t, corp, ses)
		res := deliver(t, env.d, testMessage("app@example.com", "b@gmail.test", "a@corp.example.com"), deliverBody)
		checkResult(t, res[0], "b@gmail.test", queue.Delivered, "250 ", "ses")
		checkResult(t, res[1], "a@corp.example.com", queue.Failed, "550 5.1.1 No such user", "corp")
		if got := toOf(ses.WaitMessages(t, 1, 5*time.Second)); len(got) != 1 || got[0] != "app@example.com -> b@gmail.test" {
			t.Errorf("ses got %q", got)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		corp := smtptest.Start(t, smtptest.Options{})
		ses := smtptest.Start(t, smtptest.Options{})
		corp.Close()
		env := corpRoutes(t, corp, ses)
		res := deliver(t, env.d, testMessage("app@example.com", "a@corp.example.com", "b@gmail.test"), deliverBody)
		checkResult(t, res[0], "a@corp.example.com", queue.Pending, "", "corp")
		checkResult(t, res[1], "b@gmail.test", queue.Delivered, "250 ", "ses")
		if res[0].Reply == "" {
			t.Errorf("no reply for the unreachable route: %+v", res[0])
		}
		// The other route's upstream is no failover for corp's recipients.
		if got := toOf(ses.WaitMessages(t, 1, 5*time.Second)); len(got) != 1 || got[0] != "app@example.com -> b@gmail.test" {
			t.Errorf("ses got %q", got)
		}
	})
}

func TestDeliverRouteToWithoutSenderRoute(t *testing.T) {
	corp := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("corp", corp))
	setRoutes(env.d, Route{ToDomain: "corp.example.com", Upstreams: []string{"corp"}})
	res := deliver(t, env.d, testMessage("app@example.com", "b@gmail.test", "a@corp.example.com"), deliverBody)
	checkResult(t, res[0], "b@gmail.test", queue.Pending, "no route for sender domain", "")
	checkResult(t, res[1], "a@corp.example.com", queue.Delivered, "250 ", "corp")
	if got := toOf(corp.WaitMessages(t, 1, 5*time.Second)); len(got) != 1 || got[0] != "app@example.com -> a@corp.example.com" {
		t.Errorf("corp got %q", got)
	}
}

func TestDeliverRouteToDSN(t *testing.T) {
	corp := smtptest.Start(t, smtptest.Options{})
	ses := smtptest.Start(t, smtptest.Options{})
	env := corpRoutes(t, corp, ses)
	// A DSN to a recipient domain with a route of its own takes it.
	dsn := testMessage("", "app@corp.example.com")
	dsn.DSN = true
	res := deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "app@corp.example.com", queue.Delivered, "250 ", "corp")
	if got := toOf(corp.WaitMessages(t, 1, 5*time.Second)); len(got) != 1 || got[0] != " -> app@corp.example.com" {
		t.Errorf("corp got %q", got)
	}
	// Any other goes by its recipient's sender route, as before.
	dsn = testMessage("", "app@example.com")
	dsn.DSN = true
	res = deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "app@example.com", queue.Delivered, "250 ", "ses")
}

func TestDeliverRouteInterrupted(t *testing.T) {
	corp := smtptest.Start(t, smtptest.Options{})
	ses := smtptest.Start(t, smtptest.Options{})
	env := corpRoutes(t, corp, ses)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m := testMessage("app@example.com", "a@corp.example.com", "b@gmail.test")
	res := env.d.Deliver(ctx, m, queue.NewBody([]byte(deliverBody)))
	if len(res) != 2 {
		t.Fatalf("results %+v", res)
	}
	for i, rcpt := range []string{"a@corp.example.com", "b@gmail.test"} {
		checkResult(t, res[i], rcpt, queue.Pending, "", "")
		if !strings.Contains(res[i].Reply, "interrupted") {
			t.Errorf("result %+v, want interrupted", res[i])
		}
	}
	if n := corp.Connections() + ses.Connections(); n != 0 {
		t.Errorf("%d connections after cancel", n)
	}
}

func TestRouteTo(t *testing.T) {
	d := NewDeliverer()
	d.SetConfig(Config{Routes: []Route{
		{FromDomain: "example.com", Upstreams: []string{"gmail"}},
		{ToDomain: "Corp.Example.com", Upstreams: []string{"corp"}},
	}})
	tests := []struct {
		from, rcpt, want string // want "" for no route
	}{
		{"a@example.com", "x@corp.example.com", "corp"},
		{"a@other.example", "x@CORP.example.com", "corp"},
		{"", "x@corp.example.com", "corp"},
		{"a@example.com", "x@gmail.test", "gmail"},
		{"a@example.com", "x@sub.corp.example.com", "gmail"},
		{"a@other.example", "x@gmail.test", ""},
	}
	for _, tt := range tests {
		r, ok := d.RouteTo(tt.from, tt.rcpt)
		got := ""
		if ok {
			got = strings.Join(r.Upstreams, ",")
		}
		if got != tt.want || d.RcptRoutable(tt.from, tt.rcpt) != (tt.want != "") {
			t.Errorf("RouteTo(%q, %q) = %q, want %q", tt.from, tt.rcpt, got, tt.want)
		}
	}
	// A route by recipient domain is no route for a sender.
	if r, ok := d.Route("a@corp.example.com"); ok {
		t.Errorf("Route by sender took a to_domain route: %+v", r)
	}
	// At MAIL, any sender may still reach corp.example.com...
	if !d.Routable("a@other.example") {
		t.Error("Routable(a@other.example) with a to_domain route")
	}
	// ...and without routes by recipient, only the routed senders.
	setRoutes(d, Route{FromDomain: "example.com", Upstreams: []string{"gmail"}})
	if d.Routable("a@other.example") || !d.Routable("a@example.com") {
		t.Error("Routable without to_domain routes")
	}
}
