package upstream

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

const (
	upUser = "relay@example.com"
	upPass = "s3cret-app-password"
)

const deliverBody = "From: app@example.com\r\n" +
	"To: x@example.net\r\n" +
	"Subject: test\r\n" +
	"\r\n" +
	"Hello.\r\n"

// logBuffer collects log output from concurrent deliveries.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type deliverEnv struct {
	d   *Deliverer
	log *logBuffer
}

// newDeliverer routes every sender through the upstreams in the given order.
func newDeliverer(t *testing.T, ups ...Upstream) *deliverEnv {
	t.Helper()
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("deliverer log:\n%s", lb.String())
		}
	})
	d := NewDeliverer()
	d.Hostname = "relay.test"
	d.Logger = slog.New(slog.NewTextHandler(lb, nil))
	d.SetConfig(testConfig(ups...))
	// Registered after the upstreams started, so it runs before they stop.
	t.Cleanup(d.Close)
	return &deliverEnv{d: d, log: lb}
}

// testConfig routes every sender through ups in the given order.
func testConfig(ups ...Upstream) Config {
	var names []string
	for _, u := range ups {
		names = append(names, u.Name)
	}
	return Config{
		Upstreams:      ups,
		Routes:         []Route{{FromDomain: "*", Upstreams: names}},
		CommandTimeout: 10 * time.Second,
		DataTimeout:    10 * time.Second,
	}
}

// setRoutes puts routes in effect in d, instead of its routes.
func setRoutes(d *Deliverer, routes ...Route) {
	cfg := d.Config()
	cfg.Routes = routes
	d.SetConfig(cfg)
}

func plainUpstream(name string, s *smtptest.Server) Upstream {
	return Upstream{Name: name, Address: s.Addr(), TLS: mailproto.TLSNone}
}

func testMessage(from string, rcpts ...string) queue.Message {
	m := queue.Message{ID: "Q1", From: from, MessageID: "<m1@example.com>"}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, queue.Recipient{Addr: r})
	}
	return m
}

func deliver(t *testing.T, d *Deliverer, m queue.Message, body string) []queue.Result {
	t.Helper()
	res := d.Deliver(context.Background(), m, queue.NewBody([]byte(body)))
	if want := len(m.Pending()); len(res) != want {
		t.Fatalf("%d results for %d pending recipients: %+v", len(res), want, res)
	}
	return res
}

// checkResult compares one result; reply is a prefix of the expected reply.
func checkResult(t *testing.T, r queue.Result, rcpt string, state queue.RcptState, reply, upstream string) {
	t.Helper()
	if r.Rcpt != rcpt || r.State != state || !strings.HasPrefix(r.Reply, reply) || r.Upstream != upstream {
		t.Errorf("result %+v, want %s %s reply %q... via %q", r, rcpt, state, reply, upstream)
	}
}

func reply(code int, ec smtp.EnhancedCode, msg string) func(string) *smtp.SMTPError {
	return func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: code, EnhancedCode: ec, Message: msg}
	}
}

func TestDeliverFailover(t *testing.T) {
	pki := testpki.New(t)
	tests := []struct {
		name  string
		first func(t *testing.T) Upstream // upstream "a", which must not take the message
	}{
		{"down", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{})
			s.Close()
			return plainUpstream("a", s)
		}},
		{"auth refused", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: "other"})
			return Upstream{Name: "a", Address: s.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool, Username: upUser, Password: upPass}
		}},
		{"421 at greeting", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{GreetReply: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Busy"}})
			return plainUpstream("a", s)
		}},
		{"4xx to mail", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{MailReply: reply(451, smtp.EnhancedCode{4, 3, 0}, "Try later")})
			return plainUpstream("a", s)
		}},
		{"530 to mail", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{Username: upUser, Password: upPass})
			return plainUpstream("a", s) // configured without credentials
		}},
		{"untrusted certificate", func(t *testing.T) Upstream {
			s := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})
			return Upstream{Name: "a", Address: s.Addr(), TLS: mailproto.TLSImplicit}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := smtptest.Start(t, smtptest.Options{})
			env := newDeliverer(t, tt.first(t), plainUpstream("b", b))
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "b")
			// What a said is kept for the history.
			if e := res[0].Earlier; len(e) != 1 || e[0].Upstream != "a" || e[0].State != queue.Pending || e[0].Reply == "" || len(e[0].Earlier) != 0 {
				t.Errorf("earlier results %+v, want a's failure", e)
			}
			b.WaitMessages(t, 1, 5*time.Second)
			logs := env.log.String()
			if n := strings.Count(logs, "delivery attempt"); n != 2 {
				t.Errorf("%d attempt lines, want 2:\n%s", n, logs)
			}
			if !strings.Contains(logs, "level=WARN") || !strings.Contains(logs, "upstream=a") {
				t.Errorf("failed attempt on a not logged as a warning:\n%s", logs)
			}
		})
	}
}

func TestDeliverAllUpstreamsFail(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{MailReply: reply(451, smtp.EnhancedCode{4, 3, 0}, "Try later")})
	b := smtptest.Start(t, smtptest.Options{GreetReply: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Busy"}})
	env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
	res := deliver(t, env.d, testMessage("", "x@example.net", "y@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Pending, "421 4.3.2 Busy", "b")
	checkResult(t, res[1], "y@example.net", queue.Pending, "421 4.3.2 Busy", "b")
}

func TestDeliverNoRoute(t *testing.T) {
	d := NewDeliverer()
	d.Logger = slog.New(slog.DiscardHandler)
	d.SetConfig(Config{Routes: []Route{{FromDomain: "example.com", Upstreams: []string{"a"}}}})
	res := d.Deliver(context.Background(), testMessage("app@other.example", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	if len(res) != 1 || res[0].State != queue.Pending || res[0].Reply != "no route for sender domain" {
		t.Errorf("unroutable sender: %+v", res)
	}
}

func TestRoute(t *testing.T) {
	routes := []Route{
		{FromDomain: "example.com", Upstreams: []string{"gmail"}},
		{FromDomain: "*", Upstreams: []string{"ses"}},
		{FromDomain: "Notify.Example.com", Upstreams: []string{"yandex"}},
	}
	d := NewDeliverer()
	d.SetConfig(Config{Routes: routes})
	tests := []struct{ from, want string }{
		{"a@example.com", "gmail"},
		{"a@EXAMPLE.COM", "gmail"},
		{"a@notify.example.com", "yandex"},
		{"a@sub.example.com", "ses"},
		{"a@other.example", "ses"},
		{"", "ses"},
	}
	for _, tt := range tests {
		r, ok := d.Route(tt.from)
		if !ok || len(r.Upstreams) != 1 || r.Upstreams[0] != tt.want {
			t.Errorf("Route(%q) = %v, %v; want %s", tt.from, r, ok, tt.want)
		}
	}
	setRoutes(d, routes[:1]...)
	for _, from := range []string{"", "a@other.example"} {
		if r, ok := d.Route(from); ok {
			t.Errorf("Route(%q) = %v without a \"*\" route", from, r)
		}
	}
}

// stateOf returns the named upstream's state from UpstreamStates.
func stateOf(t *testing.T, d *Deliverer, name string) State {
	t.Helper()
	for _, s := range d.UpstreamStates() {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no state for upstream %q in %+v", name, d.UpstreamStates())
	return State{}
}

func TestDeliverRecipientFailover(t *testing.T) {
	t.Run("temporary", func(t *testing.T) {
		a := smtptest.Start(t, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
			if to == "busy@example.net" {
				return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Try again later"}
			}
			return nil
		}})
		b := smtptest.Start(t, smtptest.Options{})
		env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
		res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "busy@example.net", "y@example.net"), deliverBody)
		checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
		checkResult(t, res[1], "busy@example.net", queue.Delivered, "250 ", "b")
		checkResult(t, res[2], "y@example.net", queue.Delivered, "250 ", "a")
		if got := a.WaitMessages(t, 1, 5*time.Second); len(got) != 1 || strings.Join(got[0].To, " ") != "x@example.net y@example.net" {
			t.Errorf("a got %+v", got)
		}
		if got := b.WaitMessages(t, 1, 5*time.Second); len(got) != 1 || strings.Join(got[0].To, " ") != "busy@example.net" {
			t.Errorf("b got %+v", got)
		}
		// A 4xx about a recipient says nothing about the upstream's health.
		if st := stateOf(t, env.d, "a"); !st.Up || st.Failures != 0 {
			t.Errorf("state of a: %+v", st)
		}
	})
	t.Run("permanent", func(t *testing.T) {
		a := smtptest.Start(t, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
			if to == "gone@example.net" {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
			}
			return nil
		}})
		b := smtptest.Start(t, smtptest.Options{})
		env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
		res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "gone@example.net"), deliverBody)
		checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
		checkResult(t, res[1], "gone@example.net", queue.Failed, "550 5.1.1 No such user", "a")
		if b.Connections() != 0 {
			t.Errorf("b was tried for a permanent failure")
		}
	})
	t.Run("all refused for now", func(t *testing.T) {
		// Each upstream defers one recipient; what neither takes stays
		// pending with the last reply.
		a := smtptest.Start(t, smtptest.Options{RcptReply: reply(452, smtp.EnhancedCode{4, 2, 2}, "Mailbox full")})
		b := smtptest.Start(t, smtptest.Options{RcptReply: reply(450, smtp.EnhancedCode{4, 2, 1}, "Busy")})
		env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
		res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
		checkResult(t, res[0], "x@example.net", queue.Pending, "450 4.2.1 Busy", "b")
		if !res[0].NotBefore.IsZero() {
			t.Errorf("NotBefore set for an ordinary deferral: %v", res[0].NotBefore)
		}
	})
}

func TestDeliverDSNRouting(t *testing.T) {
	up1 := smtptest.Start(t, smtptest.Options{})
	up2 := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("up1", up1), plainUpstream("up2", up2))
	setRoutes(env.d,
		Route{FromDomain: "b.example", Upstreams: []string{"up2"}},
		Route{FromDomain: "*", Upstreams: []string{"up1"}},
	)
	dsn := testMessage("", "sender@b.example")
	dsn.DSN = true

	// A DSN goes by its recipient's domain, from <>.
	res := deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "sender@b.example", queue.Delivered, "250 ", "up2")
	if got := up2.WaitMessages(t, 1, 5*time.Second)[0]; got.From != "" {
		t.Errorf("DSN sent from %q, want <>", got.From)
	}
	// A message from <> that is not a DSN goes by its sender, as any other.
	res = deliver(t, env.d, testMessage("", "sender@b.example"), deliverBody)
	checkResult(t, res[0], "sender@b.example", queue.Delivered, "250 ", "up1")

	// The upstream may demand a sender of its own.
	cfg := env.d.Config()
	cfg.Upstreams[1].DSNFrom = "bounces@b.example"
	env.d.SetConfig(cfg)
	res = deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "sender@b.example", queue.Delivered, "250 ", "up2")
	if got := up2.WaitMessages(t, 2, 5*time.Second)[1]; got.From != "bounces@b.example" {
		t.Errorf("DSN sent from %q, want bounces@b.example", got.From)
	}
	if n := len(up1.Messages()); n != 1 {
		t.Errorf("up1 got %d messages, want 1", n)
	}
}
