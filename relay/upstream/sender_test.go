package upstream

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

func TestUpstreamMailFrom(t *testing.T) {
	const (
		app  = "app@example.com"
		env  = "relay@example.ru"
		dsnF = "bounces@example.ru"
	)
	msg := queue.Message{From: app}
	null := queue.Message{From: ""}
	dsn := queue.Message{From: "", DSN: true}
	tests := []struct {
		name         string
		envelopeFrom string
		dsnFrom      string
		m            queue.Message
		want         string
	}{
		{"plain message", "", "", msg, app},
		{"rewritten", env, "", msg, env},
		{"rewritten, dsn_from set", env, dsnF, msg, env},
		{"dsn_from does not touch mail", "", dsnF, msg, app},
		{"DSN from <>", "", "", dsn, ""},
		{"DSN from dsn_from", "", dsnF, dsn, dsnF},
		{"DSN: dsn_from wins", env, dsnF, dsn, dsnF},
		{"DSN: envelope_from without dsn_from", env, "", dsn, env},
		{"null sender", "", "", null, ""},
		{"null sender from dsn_from", env, dsnF, null, dsnF},
		{"null sender from envelope_from", env, "", null, env},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u := Upstream{EnvelopeFrom: tt.envelopeFrom, DSNFrom: tt.dsnFrom}
			if got := u.MailFrom(tt.m); got != tt.want {
				t.Errorf("MailFrom = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestRewriteHeaderFrom(t *testing.T) {
	const addr = "relay@example.ru"
	tests := []struct {
		name, in, want string
	}{
		{
			"bare address",
			"From: app@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
			"From: <relay@example.ru>\r\nReply-To: app@example.com\r\nSubject: hi\r\n\r\nbody\r\n",
		},
		{
			"display name kept, folded field moved whole",
			"Subject: hi\r\nfrom: \"Billing, Inc.\"\r\n <billing@example.com>\r\nTo: x@example.net\r\n\r\nFrom: not a header\r\n",
			"Subject: hi\r\nFrom: \"Billing, Inc.\" <relay@example.ru>\r\nReply-To: \"Billing, Inc.\"\r\n <billing@example.com>\r\nTo: x@example.net\r\n\r\nFrom: not a header\r\n",
		},
		{
			"existing Reply-To kept",
			"Reply-To: help@example.com\r\nFrom: Bob <bob@example.com>\r\n\r\nx\r\n",
			"Reply-To: help@example.com\r\nFrom: \"Bob\" <relay@example.ru>\r\n\r\nx\r\n",
		},
		{
			"encoded display name",
			"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n\r\nx\r\n",
			"From: =?utf-8?q?J=C3=B6rg?= <relay@example.ru>\r\nReply-To: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n\r\nx\r\n",
		},
		{
			"undecodable name dropped",
			"From: =?koi8-r?b?8NLJ18XU?= <p@example.com>\r\n\r\nx\r\n",
			"From: <relay@example.ru>\r\nReply-To: =?koi8-r?b?8NLJ18XU?= <p@example.com>\r\n\r\nx\r\n",
		},
		{
			"second From dropped",
			"From: a@example.com\r\nFrom: b@example.com\r\n\r\nx\r\n",
			"From: <relay@example.ru>\r\nReply-To: a@example.com\r\n\r\nx\r\n",
		},
		{
			"no From",
			"Subject: hi\r\n\r\nx\r\n",
			"From: <relay@example.ru>\r\nSubject: hi\r\n\r\nx\r\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := []byte(tt.in)
			got := rewriteHeaderFrom(in, addr)
			if string(got) != tt.want {
				t.Errorf("got\n%q\nwant\n%q", got, tt.want)
			}
			if string(in) != tt.in {
				t.Errorf("input changed to %q", in)
			}
		})
	}
}

// yandexUpstream starts a fake Yandex: implicit TLS, AUTH required, and
// MAIL FROM refused unless it is one of the login's own addresses, as
// smtp.yandex.ru answers. It returns the server and an upstream made from
// the yandex profile with only the address (and trust) pointed at it.
func yandexUpstream(t *testing.T, own ...string) (*smtptest.Server, Upstream) {
	t.Helper()
	pki := testpki.New(t)
	s := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(),
		Username: upUser, Password: upPass,
		MailReply: func(from string) *smtp.SMTPError {
			if slices.Contains(own, from) {
				return nil
			}
			return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
				Message: "Sender address rejected: not owned by auth user."}
		},
		RcptReply: func(to string) *smtp.SMTPError {
			if strings.HasPrefix(to, "nobody@") {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "No such user!"}
			}
			return nil
		},
	})
	p, ok := LookupProvider("yandex")
	if !ok {
		t.Fatal("no yandex profile")
	}
	up := p.Upstream("yandex", "")
	if up.TLS != mailproto.TLSImplicit {
		t.Fatalf("yandex profile TLS %q", up.TLS)
	}
	up.Address, up.RootCAs = s.Addr(), pki.CAPool
	up.Username, up.Password = upUser, upPass
	return s, up
}

// TestDeliverYandexEnvelopeFrom runs the acceptance case through a real
// queue: a Yandex-profile upstream that refuses foreign senders takes a
// message with the envelope sender rewritten to the login, header and
// body untouched; the recipient it refuses is bounced to the original
// sender, and the DSN goes out through it from dsn_from.
func TestDeliverYandexEnvelopeFrom(t *testing.T) {
	const dsnFrom = "bounces@example.com"
	s, up := yandexUpstream(t, upUser, dsnFrom)

	// Without the rewrite the provider refuses the sender outright.
	bare := newDeliverer(t, up)
	res := deliver(t, bare.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Failed, "553 5.7.1 Sender address rejected", "yandex")

	up.EnvelopeFrom, up.DSNFrom = upUser, dsnFrom
	env := newDeliverer(t, up)
	st, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	done := make(chan queue.Message, 4)
	sched := queue.NewScheduler(st, env.d.Deliver)
	sched.Bounce = (&Bouncer{Hostname: "relay.test"}).Bounce
	sched.RetryMin = time.Hour // nothing here is retried
	sched.OnDone = func(m queue.Message) { done <- m }
	sched.Logger = env.d.Logger
	runErr := make(chan error, 1)
	go func() { runErr <- sched.Run() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := sched.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-runErr; !errors.Is(err, queue.ErrSchedulerClosed) {
			t.Errorf("Run: %v", err)
		}
	})

	m := &queue.Message{ID: queue.NewID(), From: "app@example.com", MessageID: "<m1@example.com>", Received: time.Now(),
		Recipients: []queue.Recipient{{Addr: "x@example.net"}, {Addr: "nobody@example.net"}}}
	if err := st.Put(context.Background(), m, []byte(deliverBody)); err != nil {
		t.Fatal(err)
	}

	got := s.WaitMessages(t, 2, 10*time.Second)
	if len(got) != 2 {
		t.Fatalf("%d messages upstream, want the message and its DSN: %+v", len(got), got)
	}
	msg, dsn := got[0], got[1]
	if msg.From != upUser || !slices.Equal(msg.To, []string{"x@example.net"}) || msg.AuthUser != upUser || !msg.TLS {
		t.Errorf("message envelope %q -> %q (auth %q, TLS %v), want from the login %q", msg.From, msg.To, msg.AuthUser, msg.TLS, upUser)
	}
	// The header section is what was signed at the door: unchanged.
	if string(msg.Data) != deliverBody {
		t.Errorf("message data changed:\n%q\nwant\n%q", msg.Data, deliverBody)
	}
	if dsn.From != dsnFrom || !slices.Equal(dsn.To, []string{"app@example.com"}) {
		t.Errorf("DSN envelope %q -> %q, want %q -> the original sender", dsn.From, dsn.To, dsnFrom)
	}
	if !strings.Contains(string(dsn.Data), "To: <app@example.com>") || !strings.Contains(string(dsn.Data), "Final-Recipient: rfc822; nobody@example.net") {
		t.Errorf("DSN is not about nobody@example.net for app@example.com:\n%s", dsn.Data)
	}

	// The queue kept the original sender all along.
	var finished []queue.Message
	for len(finished) < 2 {
		select {
		case dm := <-done:
			finished = append(finished, dm)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of 2 messages finished", len(finished))
		}
	}
	for _, dm := range finished {
		switch {
		case dm.ID == m.ID:
			if dm.From != "app@example.com" {
				t.Errorf("queued message's sender became %q", dm.From)
			}
		case dm.DSN:
			if dm.From != "" || dm.Recipients[0].Addr != "app@example.com" || dm.Recipients[0].State != queue.Delivered {
				t.Errorf("DSN in the queue: %+v", dm)
			}
		default:
			t.Errorf("unexpected message finished: %+v", dm)
		}
	}
}

// TestDeliverDSNFromEnvelopeFrom: without dsn_from, a DSN through an
// upstream with envelope_from leaves from that address, not from <>,
// which such a provider refuses.
func TestDeliverDSNFromEnvelopeFrom(t *testing.T) {
	s, up := yandexUpstream(t, upUser)
	up.EnvelopeFrom = upUser
	env := newDeliverer(t, up)
	dsn := testMessage("", "app@example.com")
	dsn.DSN = true
	res := deliver(t, env.d, dsn, deliverBody)
	checkResult(t, res[0], "app@example.com", queue.Delivered, "250 ", "yandex")
	if got := s.WaitMessages(t, 1, 5*time.Second)[0]; got.From != upUser {
		t.Errorf("DSN sent from %q, want %q", got.From, upUser)
	}
}

func TestDeliverHeaderFromRewrite(t *testing.T) {
	s, up := yandexUpstream(t, upUser)
	up.EnvelopeFrom, up.HeaderFromRewrite = upUser, true
	env := newDeliverer(t, up)
	body := "From: Billing <app@example.com>\r\nTo: x@example.net\r\nSubject: test\r\n\r\nHello.\r\n"
	m := testMessage("app@example.com", "x@example.net")
	res := deliver(t, env.d, m, body)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "yandex")
	got := s.WaitMessages(t, 1, 5*time.Second)[0]
	want := "From: \"Billing\" <" + upUser + ">\r\nReply-To: Billing <app@example.com>\r\nTo: x@example.net\r\nSubject: test\r\n\r\nHello.\r\n"
	if got.From != upUser || string(got.Data) != want {
		t.Errorf("upstream got from %q:\n%q\nwant\n%q", got.From, got.Data, want)
	}
	if m.From != "app@example.com" {
		t.Errorf("message sender changed to %q", m.From)
	}
}
