package upstream

import (
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

func TestDeliverConnectionRefused(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	s.Close() // nothing listens on its port any more
	env := newDeliverer(t, plainUpstream("a", s))
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	// Where it tried is in the reply, for the operator and the history.
	checkResult(t, res[0], "x@example.net", queue.Pending, "connect to "+s.Addr()+": connection refused", "a")
}
