package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// TestRecipientLogLines: three recipients, of which the upstream refuses
// one with 550 and defers one once with 451: the log has exactly one line
// per recipient outcome, each with that recipient's own address and
// reply, and its durations in keys that name their unit. Every e2e log
// line is also checked for duplicate keys, by logLines: here a refusal
// after AUTH, whose line carries the session's user.
func TestRecipientLogLines(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	var mu sync.Mutex
	deferredOnce := false
	up := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword,
		RcptReply: func(to string) *smtp.SMTPError {
			mu.Lock()
			defer mu.Unlock()
			switch {
			case to == "gone@example.net":
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user gone"}
			case to == "later@example.net" && !deferredOnce:
				deferredOnce = true
				return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "Mailbox busy, try later"}
			}
			return nil
		},
	})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()}))
	s := connect(t, r.addr, pki)
	defer s.close()
	id, err := s.send("app@example.com", []string{"bob@example.net", "gone@example.net", "later@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	// A refusal after AUTH: its line names the user once.
	if err := s.c.Mail("boss@elsewhere.example", nil); err == nil {
		t.Fatal("MAIL FROM a sender the user may not use was accepted")
	}
	r.waitLog("rejected", map[string]string{"user": "e2e", "reason": "sender_not_allowed"}, 5*time.Second)
	r.waitLog("delivered", map[string]string{"queue_id": id, "rcpt": "later@example.net"}, 20*time.Second)

	type want struct {
		msg, rcpt, reply string
		attempt          int
	}
	wants := []want{
		{"delivered", "bob@example.net", "250 ", 1},
		{"bounced", "gone@example.net", "550 5.1.1 No such user gone", 1},
		{"deferred", "later@example.net", "451 4.2.0 Mailbox busy, try later", 1},
		{"delivered", "later@example.net", "250 ", 2},
	}
	var got []map[string]any
	for _, l := range r.logLines() {
		switch l["msg"] {
		case "delivered", "deferred", "bounced", "expired":
			if l["queue_id"] == id {
				got = append(got, l)
			}
		}
	}
	if len(got) != len(wants) {
		t.Fatalf("%d recipient outcome lines for %s, want %d: %v", len(got), id, len(wants), got)
	}
	for _, w := range wants {
		var line map[string]any
		for _, l := range got {
			if l["msg"] == w.msg && l["rcpt"] == w.rcpt && fmt.Sprint(l["attempt"]) == fmt.Sprint(w.attempt) {
				line = l
			}
		}
		if line == nil {
			t.Errorf("no %s line for %s on attempt %d: %v", w.msg, w.rcpt, w.attempt, got)
			continue
		}
		if reply := fmt.Sprint(line["reply"]); !strings.HasPrefix(reply, w.reply) {
			t.Errorf("%s %s: reply %q, want its own, %q…", w.msg, w.rcpt, reply, w.reply)
		}
		delay, ok := line["delay_ms"].(float64)
		if line["queue_id"] != id || line["msg_id"] != "<inv42@example.com>" || line["user"] != "e2e" ||
			line["from"] != "app@example.com" || line["upstream"] != "up" || line["relay"] != up.Addr() ||
			!ok || delay < 0 || delay > 60_000 {
			t.Errorf("%s %s: %v", w.msg, w.rcpt, line)
		}
	}
	// The first attempt's transaction: a duration in milliseconds.
	attempt := r.waitLog("delivery attempt", map[string]string{"queue_id": id}, time.Second)
	if ms, ok := attempt["duration_ms"].(float64); !ok || ms < 0 || ms > 60_000 {
		t.Errorf("delivery attempt without a duration_ms: %v", attempt)
	}
	for _, l := range r.logLines() {
		for _, k := range []string{"duration", "delay", "took", "elapsed"} {
			if _, ok := l[k]; ok {
				t.Errorf("key %q names no unit: %v", k, l)
			}
		}
	}
}
