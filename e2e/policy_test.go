package e2e

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

const otherUser, otherPassword = "other", "other-password"

// wantSMTPError checks that err is the SMTP reply code with enhanced code
// enh ("4.7.1").
func wantSMTPError(t *testing.T, what string, err error, code int, enh string) {
	t.Helper()
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		t.Fatalf("%s: %v, want %d %s", what, err, code, enh)
	}
	got := fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	if se.Code != code || got != enh {
		t.Fatalf("%s: %d %s %s, want %d %s", what, se.Code, got, se.Message, code, enh)
	}
}

func policyMsg(from string, i int) string {
	return fmt.Sprintf("From: <%s>\r\nTo: bob@example.net\r\nSubject: %d\r\n\r\nmessage %d\r\n", from, i, i)
}

// TestUserRateLimitE2E (acceptance 1): a user with rate_limit = "5/3s"
// gets 450 4.7.1 on its 6th message and sends again once the window has
// slid; another user with the same limit has a window of its own. The
// refusal is logged and counted per user.
func TestUserRateLimitE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(),
		UserExtra: `rate_limit = "5/3s"`,
		Extra:     userTable(t, otherUser, otherPassword) + `rate_limit = "5/3s"` + "\n"}))

	s := connect(t, r.addr, pki)
	defer s.close()
	var first time.Time
	for i := range 5 {
		if _, err := s.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", i)); err != nil {
			t.Fatalf("message %d: %v", i+1, err)
		}
		if i == 0 {
			first = time.Now()
		}
	}
	_, err := s.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 5))
	wantSMTPError(t, "6th message", err, 450, "4.7.1")
	s.c.Reset()

	o := connectAs(t, r.addr, pki, otherUser, otherPassword)
	defer o.close()
	for i := range 5 {
		if _, err := o.send("other@example.com", []string{"bob@example.net"}, policyMsg("other@example.com", i)); err != nil {
			t.Fatalf("other user's message %d: %v", i+1, err)
		}
	}

	// The first message leaves the window 3s after it was accepted.
	time.Sleep(time.Until(first.Add(3*time.Second + 200*time.Millisecond)))
	if _, err := s.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 6)); err != nil {
		t.Fatalf("after the window slid: %v", err)
	}
	up.WaitMessages(t, 11, 10*time.Second)

	line := r.waitLog("rejected", map[string]string{"reason": "rate_limited"}, 5*time.Second)
	if line["user"] != userName || line["reply"] != float64(450) || line["limit"] != "rate_limit" {
		t.Errorf("rejection logged as %v", line)
	}
	_, fams := scrapeMetrics(t, r)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"smarthost_user_rate_limited_total", map[string]string{"user": userName}, 1},
		{"smarthost_user_rate_limited_total", map[string]string{"user": otherUser}, 0},
		{"smarthost_user_messages_accepted_total", map[string]string{"user": userName}, 6},
		{"smarthost_user_messages_accepted_total", map[string]string{"user": otherUser}, 5},
	} {
		if v, ok := series(fams, c.name, c.labels); !ok || v != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, v, ok, c.want)
		}
	}
	var limited float64
	for _, m := range fams["smarthost_messages_rejected_total"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "reason" && l.GetValue() == "rate_limited" {
				limited += m.GetCounter().GetValue()
			}
		}
	}
	if limited != 1 {
		t.Errorf("smarthost_messages_rejected_total{reason=rate_limited} = %v, want 1", limited)
	}
}

// TestUserRecipientLimitE2E (acceptance 1): recipient_limit counts
// recipients: the one over it gets 451 4.7.1 at RCPT and the message goes
// to the others.
func TestUserRecipientLimitE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), UserExtra: `recipient_limit = "3/1h"`}))
	s := connect(t, r.addr, pki)
	defer s.close()
	if _, err := s.send("app@example.com", []string{"a@example.net", "b@example.net"}, policyMsg("app@example.com", 1)); err != nil {
		t.Fatal(err)
	}
	if err := s.c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.c.Rcpt("c@example.net", nil); err != nil {
		t.Fatal(err)
	}
	wantSMTPError(t, "4th recipient", s.c.Rcpt("d@example.net", nil), 451, "4.7.1")
	w, err := s.c.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(w, policyMsg("app@example.com", 2))
	if err := w.Close(); err != nil {
		t.Fatalf("message to the recipient within the limit: %v", err)
	}
	msgs := up.WaitMessages(t, 2, 10*time.Second)
	var to []string
	for _, m := range msgs {
		to = append(to, m.To...)
	}
	slices.Sort(to) // the two messages may go out in either order
	if strings.Join(to, " ") != "a@example.net b@example.net c@example.net" {
		t.Errorf("delivered to %v", to)
	}
}

// TestTrustedListenerRateLimitE2E (acceptance 1): an auth = "none"
// listener's rate_limit bounds each client address on its own.
func TestTrustedListenerRateLimitE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), LimitsExtra: "max_connections_per_ip = 0", Extra: `
[[listen]]
name = "apps"
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]
rate_limit = "2/1h"
`}))
	if len(r.addrs) != 2 {
		t.Fatalf("listeners %v", r.addrs)
	}
	from := func(ip string) *submitter {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		conn, err := d.Dial("tcp", r.addrs[1])
		if err != nil {
			t.Fatal(err)
		}
		c := smtp.NewClient(conn)
		if err := c.Hello("app.test"); err != nil {
			t.Fatal(err)
		}
		return &submitter{c: c}
	}
	a := from("127.0.0.2")
	defer a.close()
	for i := range 2 {
		if _, err := a.send("cron@example.com", []string{"bob@example.net"}, policyMsg("cron@example.com", i)); err != nil {
			t.Fatalf("message %d from 127.0.0.2: %v", i+1, err)
		}
	}
	_, err := a.send("cron@example.com", []string{"bob@example.net"}, policyMsg("cron@example.com", 3))
	wantSMTPError(t, "3rd message from 127.0.0.2", err, 450, "4.7.1")
	b := from("127.0.0.3")
	defer b.close()
	if _, err := b.send("cron@example.com", []string{"bob@example.net"}, policyMsg("cron@example.com", 4)); err != nil {
		t.Fatalf("another address: %v", err)
	}
	up.WaitMessages(t, 3, 10*time.Second)
	line := r.waitLog("rejected", map[string]string{"reason": "rate_limited"}, 5*time.Second)
	if line["listener"] != "apps" || line["client_ip"] != "127.0.0.2" {
		t.Errorf("rejection logged as %v", line)
	}
}

// TestRateLimitKeptOnReloadE2E (acceptance 1): SIGHUP does not give a user
// a fresh window.
func TestRateLimitKeptOnReloadE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	rc := relayConfig{Dir: t.TempDir(), PKI: pki, UpstreamAddr: up.Addr(), UserExtra: `rate_limit = "2/1h"`}
	r := startRelay(t, writeConfig(t, rc))
	s := connect(t, r.addr, pki)
	for i := range 2 {
		if _, err := s.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", i)); err != nil {
			t.Fatal(err)
		}
	}
	s.close()
	// A reload that changes the user's senders and adds another user.
	rc.AllowedFrom = []string{"*@example.com", "*@example.org"}
	rc.Extra = userTable(t, otherUser, otherPassword)
	writeConfig(t, rc)
	r.cmd.Process.Signal(syscall.SIGHUP)
	r.waitLog("configuration reloaded", nil, 10*time.Second)
	s = connect(t, r.addr, pki)
	defer s.close()
	_, err := s.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 3))
	wantSMTPError(t, "3rd message after SIGHUP", err, 450, "4.7.1")
	o := connectAs(t, r.addr, pki, otherUser, otherPassword)
	defer o.close()
	if _, err := o.send("other@example.com", []string{"bob@example.net"}, policyMsg("other@example.com", 1)); err != nil {
		t.Fatalf("user added by the reload: %v", err)
	}
	up.WaitMessages(t, 3, 10*time.Second)
	_, fams := scrapeMetrics(t, r)
	if v, ok := series(fams, "smarthost_user_rate_limited_total", map[string]string{"user": otherUser}); !ok || v != 0 {
		t.Errorf("added user's series: %v %v, want 0", v, ok)
	}
}

// TestAllowedRecipientsAndNullSenderE2E (acceptance 2): allowed_recipients
// refuses one recipient with 550 5.7.1 and the message goes to the
// others; allow_null_sender admits MAIL FROM:<> for that user only.
func TestAllowedRecipientsAndNullSenderE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(),
		UserExtra: "allowed_recipients = [\"*@example.net\"]\nallow_null_sender = true",
		Extra:     userTable(t, otherUser, otherPassword)}))
	s := connect(t, r.addr, pki)
	defer s.close()
	if err := s.c.Mail("", nil); err != nil {
		t.Fatalf("MAIL FROM:<> of a user with allow_null_sender: %v", err)
	}
	if err := s.c.Rcpt("bob@example.net", nil); err != nil {
		t.Fatal(err)
	}
	wantSMTPError(t, "recipient outside allowed_recipients", s.c.Rcpt("eve@example.org", nil), 550, "5.7.1")
	if err := s.c.Rcpt("carol@example.net", nil); err != nil {
		t.Fatal(err)
	}
	w, err := s.c.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(w, "From: Mail Delivery System <mailer-daemon@example.com>\r\nTo: bob@example.net\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nA bounce.\r\n")
	if err := w.Close(); err != nil {
		t.Fatalf("DATA: %v", err)
	}

	o := connectAs(t, r.addr, pki, otherUser, otherPassword)
	defer o.close()
	wantSMTPError(t, "MAIL FROM:<> of a user without allow_null_sender", o.c.Mail("", nil), 553, "5.7.1")
	o.c.Reset()
	if _, err := o.send("other@example.com", []string{"eve@example.org"}, policyMsg("other@example.com", 1)); err != nil {
		t.Fatalf("user without allowed_recipients: %v", err)
	}

	msgs := up.WaitMessages(t, 2, 10*time.Second)
	var bounce, other *smtptest.Message
	for i := range msgs {
		if msgs[i].From == "" {
			bounce = &msgs[i]
		} else {
			other = &msgs[i]
		}
	}
	if bounce == nil || strings.Join(bounce.To, " ") != "bob@example.net carol@example.net" {
		t.Errorf("null-sender message delivered as %+v", bounce)
	}
	if other == nil || other.From != "other@example.com" || strings.Join(other.To, " ") != "eve@example.org" {
		t.Errorf("other user's message delivered as %+v", other)
	}
	line := r.waitLog("rejected", map[string]string{"reason": "recipient_not_allowed"}, 5*time.Second)
	if line["to"] != "eve@example.org" || line["reply"] != float64(550) {
		t.Errorf("refused recipient logged as %v", line)
	}
}

// TestUserRateLimitClusterE2E: on a shared PostgreSQL queue, a user's
// window counts the messages of every replica.
func TestUserRateLimitClusterE2E(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	q := newSharedQueue(t, false)
	rs, _ := startReplicas(t, 2, q, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), UserExtra: `rate_limit = "3/1h"`})
	a := connect(t, rs[0].addr, pki)
	defer a.close()
	for i := range 2 {
		if _, err := a.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", i)); err != nil {
			t.Fatalf("message %d through the first replica: %v", i+1, err)
		}
	}
	b := connect(t, rs[1].addr, pki)
	defer b.close()
	if _, err := b.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 2)); err != nil {
		t.Fatalf("3rd message through the second replica: %v", err)
	}
	_, err := b.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 3))
	wantSMTPError(t, "4th message through the second replica", err, 450, "4.7.1")
	_, err = a.send("app@example.com", []string{"bob@example.net"}, policyMsg("app@example.com", 4))
	wantSMTPError(t, "4th message through the first replica", err, 450, "4.7.1")
	up.WaitMessages(t, 3, 10*time.Second)
}
