package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// TestRouteByRecipient: one message to a corp.example.com recipient, one
// elsewhere and one that corp's upstream refuses. Each goes through the
// upstream of its route only, with its own result; the refusal comes back
// as a DSN through the sender's route.
func TestRouteByRecipient(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	corp := startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		if to == "gone@corp.example.com" {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such mailbox at corp"}
		}
		return nil
	}})
	ses := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: ses.Addr(), Extra: fmt.Sprintf(`
[[upstream]]
name = "corp"
address = %q
tls = "implicit"
username = "relay@example.com"
password_env = "E2E_UPSTREAM_PASSWORD"
ca_file = %q

[[route]]
to_domain = "Corp.Example.com"
upstreams = ["corp"]
`, corp.Addr(), pki.CAFile)}))
	s := connect(t, r.addr, pki)
	defer s.close()
	id, err := s.send("app@example.com", []string{"a@corp.example.com", "b@gmail.test", "gone@corp.example.com"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct{ msg, rcpt, upstream, reply string }{
		{"delivered", "a@corp.example.com", "corp", "250 "},
		{"delivered", "b@gmail.test", "up", "250 "},
		{"bounced", "gone@corp.example.com", "corp", "550 5.1.1 no such mailbox at corp"},
	} {
		l := r.waitLog(w.msg, map[string]string{"queue_id": id, "rcpt": w.rcpt}, 20*time.Second)
		if l["upstream"] != w.upstream || !strings.HasPrefix(fmt.Sprint(l["reply"]), w.reply) {
			t.Errorf("%s %s: upstream %v reply %v, want %s %q", w.msg, w.rcpt, l["upstream"], l["reply"], w.upstream, w.reply)
		}
	}
	testwait.For(t, 20*time.Second, "the DSN", func() bool { return len(dsnsTo(ses.Messages(), "app@example.com")) == 1 })

	if got := corp.Messages(); len(got) != 1 || got[0].From != "app@example.com" || strings.Join(got[0].To, " ") != "a@corp.example.com" {
		t.Errorf("corp got %+v, want the message to a@corp.example.com alone", got)
	}
	var toSES []string
	for _, m := range ses.Messages() {
		toSES = append(toSES, m.From+" -> "+strings.Join(m.To, " "))
	}
	if strings.Join(toSES, ", ") != "app@example.com -> b@gmail.test,  -> app@example.com" {
		t.Errorf("ses got %q, want the message to b@gmail.test and then the DSN", toSES)
	}
	dsn := dsnsTo(ses.Messages(), "app@example.com")[0].Data
	for _, want := range []string{
		"Final-Recipient: rfc822; gone@corp.example.com",
		"Status: 5.1.1",
		"Diagnostic-Code: smtp; 550 5.1.1 no such mailbox at corp",
	} {
		if !bytes.Contains(dsn, []byte(want)) {
			t.Errorf("DSN lacks %q:\n%s", want, dsn)
		}
	}
	for _, other := range []string{"a@corp.example.com", "b@gmail.test"} {
		if bytes.Contains(dsn, []byte("Final-Recipient: rfc822; "+other)) {
			t.Errorf("the DSN reports %s, which was delivered", other)
		}
	}
}

// TestRouteByRecipientRefusesAtRcpt: with a to_domain route, a sender
// whose domain has no route of its own may write to that domain only;
// its other recipients are refused at RCPT, and the message goes on
// without them.
func TestRouteByRecipientRefusesAtRcpt(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	path := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), AllowedFrom: []string{"*"}, Extra: `
[[route]]
to_domain = "corp.example.com"
upstreams = ["up"]
`})
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	routed := bytes.Replace(data, []byte(`from_domain = "*"`), []byte(`from_domain = "example.com"`), 1)
	if bytes.Equal(routed, data) {
		t.Fatal(`no from_domain = "*" route in the configuration`)
	}
	if err := os.WriteFile(path, routed, 0o600); err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, path)
	s := connect(t, r.addr, pki)
	defer s.close()

	if err := s.c.Mail("app@other.example", nil); err != nil {
		t.Fatalf("MAIL from a sender a to_domain route may carry: %v", err)
	}
	if err := s.c.Rcpt("a@corp.example.com", nil); err != nil {
		t.Fatalf("RCPT to the to_domain route: %v", err)
	}
	var se *smtp.SMTPError
	if err := s.c.Rcpt("b@gmail.test", nil); !errors.As(err, &se) || se.Code != 553 || se.EnhancedCode != (smtp.EnhancedCode{5, 7, 1}) {
		t.Fatalf("RCPT that no route takes: %v, want 553 5.7.1", err)
	}
	r.waitLog("rejected", map[string]string{"reason": "no_route", "from": "app@other.example", "to": "b@gmail.test"}, 5*time.Second)
	w, err := s.c.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(testMsg)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// A sender routed by its own domain reaches every recipient.
	if _, err := s.send("app@example.com", []string{"b@gmail.test"}, testMsg); err != nil {
		t.Fatal(err)
	}
	msgs := up.WaitMessages(t, 2, 20*time.Second)
	var got []string
	for _, m := range msgs {
		got = append(got, m.From+" -> "+strings.Join(m.To, " "))
	}
	sort.Strings(got) // two deliveries, in whichever order the workers took them
	if strings.Join(got, ", ") != "app@example.com -> b@gmail.test, app@other.example -> a@corp.example.com" {
		t.Errorf("upstream got %q", got)
	}
}
