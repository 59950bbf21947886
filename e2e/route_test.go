package e2e

import (
	"bytes"
	"fmt"
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
