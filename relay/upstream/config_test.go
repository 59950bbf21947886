package upstream

import (
	"context"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

// TestTakeOverRateLimit: a reload that changes an upstream goes on
// counting the provider's quota where it was, including a transaction
// still in flight under the configuration before.
func TestTakeOverRateLimit(t *testing.T) {
	inData := make(chan struct{}, 1)
	release := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{DataReply: func(_ string, to []string, _ []byte) *smtp.SMTPError {
		if to[0] == "slow@example.net" {
			inData <- struct{}{}
			<-release
		}
		return nil
	}})
	up := plainUpstream("a", s)
	up.RateLimit = Rate{N: 2, Per: time.Hour}
	d := newDeliverer(t, up).d

	res := deliver(t, d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	slow := make(chan []queue.Result, 1)
	go func() {
		slow <- d.Deliver(context.Background(), testMessage("app@example.com", "slow@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-inData

	// The reload changes something else about the upstream.
	up.MaxConnections = 8
	d.SetConfig(testConfig(up))
	res = deliver(t, d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Pending, "rate limit of a reached", "a")
	if nb := res[0].NotBefore; nb.Before(time.Now().Add(time.Hour - time.Minute)) {
		t.Errorf("NotBefore %v, want about an hour from now", nb)
	}
	close(release)
	if res := <-slow; res[0].State != queue.Delivered {
		t.Errorf("delivery in flight before the reload: %+v", res)
	}
	if n := len(s.Messages()); n != 2 {
		t.Errorf("upstream got %d messages, want 2", n)
	}

	// A Deliverer that kept nothing would send at once.
	fresh := newDeliverer(t, up).d
	res = deliver(t, fresh, testMessage("app@example.com", "z@example.net"), deliverBody)
	checkResult(t, res[0], "z@example.net", queue.Delivered, "250 ", "a")
}

// TestTakeOverHealth: health and counters follow an upstream whose
// endpoint is unchanged, and are dropped when it points elsewhere.
func TestTakeOverHealth(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	b := smtptest.Start(t, smtptest.Options{})
	d := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b)).d
	d.DownAfter = 1
	res := deliver(t, d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "b")
	if st := stateOf(t, d, "a"); st.Up || st.Attempts != 1 {
		t.Fatalf("a before the reload: %+v", st)
	}

	// The same configuration, read again.
	d.SetConfig(testConfig(plainUpstream("a", a), plainUpstream("b", b)))
	if st := stateOf(t, d, "a"); st.Up || st.Attempts != 1 || st.Failures != 1 || st.LastError != "421 4.3.2 Busy" {
		t.Errorf("a after a reload that kept it: %+v", st)
	}
	if st := stateOf(t, d, "b"); !st.Up || st.Attempts != 1 {
		t.Errorf("b after the reload: %+v", st)
	}
	// Still down: left out without a connection.
	conns := a.Connections()
	res = deliver(t, d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "b")
	if a.Connections() != conns {
		t.Error("a down upstream was tried after the reload")
	}

	// Pointed at another server: a fresh start.
	c := smtptest.Start(t, smtptest.Options{})
	d.SetConfig(testConfig(plainUpstream("a", c), plainUpstream("b", b)))
	if st := stateOf(t, d, "a"); st.State != StateUnknown || st.Up || st.Attempts != 0 || st.Failures != 0 {
		t.Errorf("a after it moved: %+v; want unknown until contact", st)
	}
	res = deliver(t, d, testMessage("app@example.com", "z@example.net"), deliverBody)
	checkResult(t, res[0], "z@example.net", queue.Delivered, "250 ", "a")
	if st := stateOf(t, d, "a"); st.State != StateUp || !st.Up {
		t.Errorf("a after a delivery: %+v", st)
	}
}

// TestSetConfigRateWindowByName: an upstream that a reload points at
// another server starts afresh but for its rate-limit window, which
// counts the account's quota; under another name it is another upstream,
// with a window of its own.
func TestSetConfigRateWindowByName(t *testing.T) {
	s1 := smtptest.Start(t, smtptest.Options{})
	s2 := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("a", s1)
	up.RateLimit = Rate{N: 1, Per: time.Hour}
	d := newDeliverer(t, up).d
	res := deliver(t, d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")

	up.Address = s2.Addr()
	d.SetConfig(testConfig(up))
	if st := stateOf(t, d, "a"); st.Attempts != 0 || st.OpenConnections != 0 {
		t.Errorf("a after it moved: %+v", st)
	}
	res = deliver(t, d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Pending, "rate limit of a reached", "a")

	up.Name = "b"
	d.SetConfig(testConfig(up))
	res = deliver(t, d, testMessage("app@example.com", "z@example.net"), deliverBody)
	checkResult(t, res[0], "z@example.net", queue.Delivered, "250 ", "b")
	if len(s1.Messages()) != 1 || len(s2.Messages()) != 1 {
		t.Errorf("messages: %d to the first server, %d to the second; want 1 and 1", len(s1.Messages()), len(s2.Messages()))
	}
}

// TestSameEndpoint: what makes an upstream another server or another
// login for SetConfig, and what does not.
func TestSameEndpoint(t *testing.T) {
	pki := testpki.New(t)
	base := Upstream{Name: "a", Address: "smtp.example.com:465", TLS: mailproto.TLSImplicit, Username: upUser, Password: upPass,
		RootCAs: pki.CAPool, OAuth: &OAuth{ClientID: "id", RefreshToken: "r1"}}
	for _, tt := range []struct {
		name   string
		change func(*Upstream)
		same   bool
	}{
		{"nothing", func(*Upstream) {}, true},
		{"max_connections", func(u *Upstream) { u.MaxConnections = 9 }, true},
		{"rate_limit", func(u *Upstream) { u.RateLimit = Rate{N: 1, Per: time.Hour} }, true},
		{"envelope_from", func(u *Upstream) { u.EnvelopeFrom, u.DSNFrom, u.HeaderFromRewrite = upUser, upUser, true }, true},
		{"the same OAuth settings read again", func(u *Upstream) { u.OAuth = &OAuth{ClientID: "id", RefreshToken: "r1"} }, true},
		{"the same CA read again", func(u *Upstream) { u.RootCAs = pki.CAPool.Clone() }, true},
		{"address", func(u *Upstream) { u.Address = "smtp.example.com:587" }, false},
		{"tls", func(u *Upstream) { u.TLS = mailproto.TLSStartTLS }, false},
		{"ca_file", func(u *Upstream) { u.RootCAs = testpki.New(t).CAPool }, false},
		{"username", func(u *Upstream) { u.Username = "other@example.com" }, false},
		{"password", func(u *Upstream) { u.Password = "rotated" }, false},
		{"auth", func(u *Upstream) { u.Auth = AuthXOAUTH2 }, false},
		{"refresh token", func(u *Upstream) { u.OAuth = &OAuth{ClientID: "id", RefreshToken: "r2"} }, false},
	} {
		u := base
		tt.change(&u)
		if got := sameEndpoint(base, u); got != tt.same {
			t.Errorf("%s changed: sameEndpoint %v, want %v", tt.name, got, tt.same)
		}
	}
}
