package upstream

import (
	"bytes"
	"context"
	"fmt"
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
	var names []string
	for _, u := range ups {
		names = append(names, u.Name)
	}
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("deliverer log:\n%s", lb.String())
		}
	})
	d := &Deliverer{
		Hostname:       "relay.test",
		Upstreams:      ups,
		Routes:         []Route{{FromDomain: "*", Upstreams: names}},
		CommandTimeout: 10 * time.Second,
		DataTimeout:    10 * time.Second,
		Logger:         slog.New(slog.NewTextHandler(lb, nil)),
	}
	// Registered after the upstreams started, so it runs before they stop.
	t.Cleanup(d.Close)
	return &deliverEnv{d: d, log: lb}
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

func TestDeliverTLSAuth(t *testing.T) {
	pki := testpki.New(t)
	for _, mode := range []mailproto.TLSMode{mailproto.TLSImplicit, mailproto.TLSStartTLS} {
		t.Run(string(mode), func(t *testing.T) {
			s := smtptest.Start(t, smtptest.Options{
				TLS: smtptest.TLSMode(mode), TLSConfig: pki.ServerTLS(),
				Username: upUser, Password: upPass,
			})
			env := newDeliverer(t, Upstream{
				Name: "gmail", Address: s.Addr(), TLS: mode,
				Username: upUser, Password: upPass, RootCAs: pki.CAPool,
			})
			m := testMessage("app@example.com", "x@example.net", "y@example.net")
			res := deliver(t, env.d, m, deliverBody)
			checkResult(t, res[0], "x@example.net", queue.Delivered, "250 2.0.0 ", "gmail")
			checkResult(t, res[1], "y@example.net", queue.Delivered, "250 2.0.0 ", "gmail")

			got := s.WaitMessages(t, 1, 5*time.Second)
			if len(got) != 1 {
				t.Fatalf("%d messages upstream, want 1", len(got))
			}
			g := got[0]
			if string(g.Data) != deliverBody {
				t.Errorf("upstream got %q, want %q", g.Data, deliverBody)
			}
			if g.From != m.From || strings.Join(g.To, " ") != "x@example.net y@example.net" {
				t.Errorf("envelope %q -> %q", g.From, g.To)
			}
			if !g.TLS || g.AuthUser != upUser {
				t.Errorf("TLS %v, AuthUser %q", g.TLS, g.AuthUser)
			}
			if a := s.AuthAttempts(); len(a) != 1 || a[0] != upUser {
				t.Errorf("AuthAttempts %q", a)
			}
			logs := env.log.String()
			for _, want := range []string{"queue_id=Q1", "msg_id=", "upstream=gmail", "delivered=2", "deferred=0", "failed=0", "reply=\"250 2.0.0"} {
				if !strings.Contains(logs, want) {
					t.Errorf("log lacks %q:\n%s", want, logs)
				}
			}
			if strings.Contains(logs, upPass) {
				t.Errorf("log contains the password:\n%s", logs)
			}
		})
	}
}

func TestDeliverAuthLoginOnly(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{Username: upUser, Password: upPass, AuthMechanisms: []string{"LOGIN"}})
	env := newDeliverer(t, Upstream{Name: "a", Address: s.Addr(), TLS: mailproto.TLSNone, Username: upUser, Password: upPass})
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	if g := s.WaitMessages(t, 1, 5*time.Second)[0]; g.AuthUser != upUser {
		t.Errorf("AuthUser %q", g.AuthUser)
	}
}

func TestDeliverStartTLSNotOffered(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{}) // plain, no STARTTLS
	var mails int
	var mu sync.Mutex
	s.SetMailReply(func(string) *smtp.SMTPError {
		mu.Lock()
		defer mu.Unlock()
		mails++
		return nil
	})
	env := newDeliverer(t, Upstream{Name: "a", Address: s.Addr(), TLS: mailproto.TLSStartTLS, RootCAs: testpki.New(t).CAPool})
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Pending, "starttls: ", "a")
	if !strings.Contains(res[0].Reply, "STARTTLS") {
		t.Errorf("reply %q does not name STARTTLS", res[0].Reply)
	}
	mu.Lock()
	defer mu.Unlock()
	if mails != 0 || len(s.Messages()) != 0 {
		t.Errorf("sent in plain text: %d MAIL, %d messages", mails, len(s.Messages()))
	}
}

func TestDeliverUntrustedCertificate(t *testing.T) {
	pki := testpki.New(t)
	other := testpki.New(t) // a CA that did not sign the upstream's certificate
	for _, mode := range []mailproto.TLSMode{mailproto.TLSImplicit, mailproto.TLSStartTLS} {
		t.Run(string(mode), func(t *testing.T) {
			s := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSMode(mode), TLSConfig: pki.ServerTLS()})
			env := newDeliverer(t, Upstream{Name: "a", Address: s.Addr(), TLS: mode, RootCAs: other.CAPool})
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", queue.Pending, "tls: ", "a")
			if !strings.Contains(res[0].Reply, "certificate") {
				t.Errorf("reply %q does not mention the certificate", res[0].Reply)
			}
			if n := len(s.Messages()); n != 0 {
				t.Errorf("%d messages delivered over an untrusted connection", n)
			}
		})
	}
}

func TestDeliverPerRecipient(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		switch to {
		case "gone@example.net":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
		case "full@example.net":
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "Mailbox full, try later"}
		}
		return nil
	}})
	env := newDeliverer(t, plainUpstream("a", s))
	m := testMessage("app@example.com", "x@example.net", "gone@example.net", "full@example.net", "y@example.net")
	m.Recipients[3].State = queue.Delivered // done in an earlier attempt: not sent again
	res := deliver(t, env.d, m, deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	checkResult(t, res[1], "gone@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	checkResult(t, res[2], "full@example.net", queue.Pending, "451 4.2.2 Mailbox full, try later", "a")
	got := s.WaitMessages(t, 1, 5*time.Second)
	if to := strings.Join(got[0].To, " "); to != "x@example.net" {
		t.Errorf("upstream recipients %q, want only x@example.net", to)
	}
	if !strings.Contains(env.log.String(), "delivered=1 deferred=1 failed=1") {
		t.Errorf("log lacks the counts:\n%s", env.log.String())
	}
}

func TestDeliverAllRecipientsRefused(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{RcptReply: reply(550, smtp.EnhancedCode{5, 1, 1}, "No such user")})
	env := newDeliverer(t, plainUpstream("a", s))
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	checkResult(t, res[1], "y@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	if n := len(s.Messages()); n != 0 {
		t.Errorf("%d messages, want none", n)
	}
}

func TestDeliverMessageReplies(t *testing.T) {
	tests := []struct {
		name  string
		opts  smtptest.Options
		state queue.RcptState
		reply string
	}{
		{"5xx after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Content rejected"}
		}}, queue.Failed, "554 5.6.0 Content rejected"},
		{"4xx after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try again"}
		}}, queue.Pending, "451 4.3.0 Try again"},
		{"5xx to mail", smtptest.Options{MailReply: reply(553, smtp.EnhancedCode{5, 7, 1}, "Sender not allowed")},
			queue.Failed, "553 5.7.1 Sender not allowed"},
		{"no reply after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return smtptest.Drop
		}}, queue.Pending, "end of data: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtptest.Start(t, tt.opts)
			env := newDeliverer(t, plainUpstream("a", s))
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", tt.state, tt.reply, "a")
			checkResult(t, res[1], "y@example.net", tt.state, tt.reply, "a")
		})
	}
}

func TestDeliverConnectionRefused(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	s.Close() // nothing listens on its port any more
	env := newDeliverer(t, plainUpstream("a", s))
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Pending, "connect: connection refused", "a")
	if strings.Contains(res[0].Reply, "127.0.0.1") {
		t.Errorf("reply %q carries the address", res[0].Reply)
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

func TestDeliverDotStuffing(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s))
	body := "Subject: dots\r\n\r\n.\r\n.leading dot\r\n..two dots\r\nmiddle . dot\r\n.\r\n\r\n.\r\nlast\r\n"
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), body)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	if got := s.WaitMessages(t, 1, 5*time.Second)[0].Data; string(got) != body {
		t.Errorf("upstream got %q, want %q", got, body)
	}
}

func TestDeliverMaxConnections(t *testing.T) {
	var (
		mu     sync.Mutex
		inData int
		third  = make(chan struct{}) // closed if three deliveries overlap
	)
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		mu.Lock()
		inData++
		if inData == 3 {
			close(third)
		}
		mu.Unlock()
		// Hold the connection a little so that deliveries overlap; a third
		// one arriving ends the wait at once (and fails the test).
		select {
		case <-third:
		case <-time.After(30 * time.Millisecond):
		}
		mu.Lock()
		inData--
		mu.Unlock()
		return nil
	}})
	up := plainUpstream("a", s)
	up.MaxConnections = 2
	env := newDeliverer(t, up)

	const n = 10
	var wg sync.WaitGroup
	results := make([][]queue.Result, n)
	for i := range n {
		wg.Go(func() {
			m := testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i))
			results[i] = env.d.Deliver(context.Background(), m, queue.NewBody([]byte(deliverBody)))
		})
	}
	wg.Wait()
	for i, res := range results {
		if len(res) != 1 || res[0].State != queue.Delivered {
			t.Errorf("delivery %d: %+v", i, res)
		}
	}
	if got := s.MaxConcurrent(); got > 2 {
		t.Errorf("upstream saw %d connections at once, want at most 2", got)
	}
	// Connections are reused: one per slot at most.
	if got := s.Connections(); got > 2 {
		t.Errorf("%d connections, want at most 2", got)
	}
}

func TestDeliverCancelledWhileWaiting(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	up := plainUpstream("a", s)
	up.MaxConnections = 1
	env := newDeliverer(t, up)

	first := make(chan []queue.Result)
	go func() {
		first <- env.d.Deliver(context.Background(), testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered // the only connection slot is taken

	ctx, cancel := context.WithCancel(context.Background())
	second := make(chan []queue.Result)
	go func() {
		second <- env.d.Deliver(ctx, testMessage("app@example.com", "y@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	waitFor(t, 5*time.Second, "second delivery not waiting for the connection", func() bool {
		env.d.mu.Lock()
		defer env.d.mu.Unlock()
		return env.d.states["a"].pool.freed != nil // a waiter asked to be woken
	})
	cancel()
	res := <-second
	if len(res) != 1 || res[0].State != queue.Pending || !strings.HasPrefix(res[0].Reply, "interrupted: ") {
		t.Errorf("cancelled delivery: %+v", res)
	}
	close(proceed)
	if res := <-first; len(res) != 1 || res[0].State != queue.Delivered {
		t.Errorf("first delivery: %+v", res)
	}
	if s.Connections() != 1 {
		t.Errorf("%d connections, want 1", s.Connections())
	}
}

func TestDeliverNotCancelledDuringData(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	env := newDeliverer(t, plainUpstream("a", s))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []queue.Result)
	go func() {
		done <- env.d.Deliver(ctx, testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered // the whole message has been sent
	cancel()
	close(proceed)
	res := <-done
	if len(res) != 1 || res[0].State != queue.Delivered {
		t.Errorf("delivery cancelled after DATA: %+v", res)
	}
}

func TestDeliverCancelledBeforeData(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{MailReply: func(string) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s), plainUpstream("b", b))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []queue.Result)
	go func() {
		done <- env.d.Deliver(ctx, testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered
	cancel()
	res := <-done // returns without waiting for the upstream's reply
	close(proceed)
	if len(res) != 1 || res[0].State != queue.Pending || !strings.HasPrefix(res[0].Reply, "interrupted: ") {
		t.Errorf("delivery cancelled before DATA: %+v", res)
	}
	if len(s.Messages())+len(b.Messages()) != 0 || b.Connections() != 0 {
		t.Errorf("delivery went on after cancellation")
	}
}

func TestDeliverNoRoute(t *testing.T) {
	d := &Deliverer{Routes: []Route{{FromDomain: "example.com", Upstreams: []string{"a"}}}, Logger: slog.New(slog.DiscardHandler)}
	res := d.Deliver(context.Background(), testMessage("app@other.example", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	if len(res) != 1 || res[0].State != queue.Pending || res[0].Reply != "no route for sender domain" {
		t.Errorf("unroutable sender: %+v", res)
	}
}

func TestRoute(t *testing.T) {
	d := &Deliverer{Routes: []Route{
		{FromDomain: "example.com", Upstreams: []string{"gmail"}},
		{FromDomain: "*", Upstreams: []string{"ses"}},
		{FromDomain: "Notify.Example.com", Upstreams: []string{"yandex"}},
	}}
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
	d.Routes = d.Routes[:1]
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

func TestDeliverAuthRefusedMarksDown(t *testing.T) {
	pki := testpki.New(t)
	a := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: "changed"})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t,
		Upstream{Name: "a", Address: a.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool, Username: upUser, Password: upPass},
		plainUpstream("b", b))

	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "b")
	st := stateOf(t, env.d, "a")
	if st.Up || !strings.HasPrefix(st.LastError, "535 ") || st.DownUntil.IsZero() || st.Failures != 1 {
		t.Errorf("after a refused AUTH, state of a: %+v", st)
	}
	if !stateOf(t, env.d, "b").Up {
		t.Errorf("b reported down")
	}
	logs := env.log.String()
	if !strings.Contains(logs, `msg="upstream down" upstream=a reason="535 `) {
		t.Errorf("no down line for a:\n%s", logs)
	}

	conns := a.Connections()
	res = deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "b")
	if got := a.Connections(); got != conns {
		t.Errorf("a down, yet connected to: %d connections, was %d", got, conns)
	}
	if got := len(a.AuthAttempts()); got != 1 {
		t.Errorf("%d AUTH attempts on a, want 1", got)
	}
	if got := len(b.WaitMessages(t, 2, 5*time.Second)); got != 2 {
		t.Errorf("b got %d messages", got)
	}
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

func TestDeliverNoFailoverAfterDot(t *testing.T) {
	tests := []struct {
		name  string
		reply *smtp.SMTPError
		state queue.RcptState
		via   string
		text  string
	}{
		// The upstream may have taken it: do not send it elsewhere now.
		{"connection lost", smtptest.Drop, queue.Pending, "a", "end of data: "},
		// A reply is an answer: 4xx goes on, 5xx is final.
		{"4xx", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try later"}, queue.Delivered, "b", "250 "},
		{"5xx", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Spam"}, queue.Failed, "a", "554 5.7.1 Spam"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError { return tt.reply }})
			b := smtptest.Start(t, smtptest.Options{})
			env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", tt.state, tt.text, tt.via)
			checkResult(t, res[1], "y@example.net", tt.state, tt.text, tt.via)
			if tried := b.Connections() > 0; tried != (tt.via == "b") {
				t.Errorf("b tried: %v", tried)
			}
		})
	}
}

func TestDeliverDSNRouting(t *testing.T) {
	up1 := smtptest.Start(t, smtptest.Options{})
	up2 := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("up1", up1), plainUpstream("up2", up2))
	env.d.Routes = []Route{
		{FromDomain: "b.example", Upstreams: []string{"up2"}},
		{FromDomain: "*", Upstreams: []string{"up1"}},
	}
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
	env.d.Upstreams[1].DSNFrom = "bounces@b.example"
	res = deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "sender@b.example", queue.Delivered, "250 ", "up2")
	if got := up2.WaitMessages(t, 2, 5*time.Second)[1]; got.From != "bounces@b.example" {
		t.Errorf("DSN sent from %q, want bounces@b.example", got.From)
	}
	if n := len(up1.Messages()); n != 1 {
		t.Errorf("up1 got %d messages, want 1", n)
	}
}
