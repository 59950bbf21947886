package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// startMixedUpstream is an upstream that refuses gone@example.net for
// good (550 5.1.1), defers later@example.net once (451 4.2.0) and takes
// every other recipient: the three outcomes of one message.
func startMixedUpstream(t *testing.T, pki *testpki.PKI) *smtptest.Server {
	t.Helper()
	var deferredOnce atomic.Bool
	return startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		switch {
		case to == "gone@example.net":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user gone"}
		case to == "later@example.net" && deferredOnce.CompareAndSwap(false, true):
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "Mailbox busy, try later"}
		}
		return nil
	}})
}

// TestRecipientLogLines: three recipients, of which the upstream refuses
// one with 550 and defers one once with 451: the log has exactly one line
// per recipient outcome, each with that recipient's own address and
// reply, and its durations in keys that name their unit. Every e2e log
// line is also checked for duplicate keys, by logLines: here a refusal
// after AUTH, whose line carries the session's user.
func TestRecipientLogLines(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startMixedUpstream(t, pki)
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

// TestMessageHistory: after delivery and after a bounce, `queue history`
// and GET /api/messages/ID show every event in order; `queue find -to`
// finds the message; once [history] retention has passed, it is gone.
func TestMessageHistory(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startMixedUpstream(t, pki)
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), Extra: "[history]\nretention = \"6s\"\n"}))
	s := connect(t, r.addr, pki)
	defer s.close()
	bounced, err := s.send("app@example.com", []string{"bob@example.net", "gone@example.net", "later@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	delivered, err := s.send("app@example.com", []string{"carol@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	r.waitLog("delivered", map[string]string{"queue_id": bounced, "rcpt": "later@example.net"}, 20*time.Second)
	r.waitLog("delivered", map[string]string{"queue_id": delivered}, 20*time.Second)
	dsnID := fmt.Sprint(r.waitLog("queue: dsn queued", map[string]string{"for_queue_id": bounced}, time.Second)["queue_id"])

	type event struct {
		Type, Rcpt, Upstream, Relay, Reply, DSNID string
		Attempt                                   int
	}
	var h struct {
		ID, State string
		Left      time.Time
		Events    []struct {
			Type     string `json:"type"`
			Rcpt     string `json:"rcpt"`
			Upstream string `json:"upstream"`
			Relay    string `json:"relay"`
			Reply    string `json:"reply"`
			DSNID    string `json:"dsn_id"`
			Attempt  int    `json:"attempt"`
		}
	}
	out, err := queueCLI(t, r, adminToken, "-json", "history", bounced)
	if err != nil {
		t.Fatalf("queue -json history: %v\n%s", err, out)
	}
	if err := json.Unmarshal([]byte(out), &h); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var got []event
	for _, ev := range h.Events {
		e := event{ev.Type, ev.Rcpt, ev.Upstream, ev.Relay, ev.Reply, ev.DSNID, ev.Attempt}
		if i := strings.IndexByte(e.Reply, ' '); i > 0 {
			e.Reply = e.Reply[:i] // the code: the rest is the upstream's text
		}
		got = append(got, e)
	}
	want := []event{
		{Type: "accepted"},
		{"delivered", "bob@example.net", "up", up.Addr(), "250", "", 1},
		{"bounced", "gone@example.net", "up", up.Addr(), "550", "", 1},
		{"deferred", "later@example.net", "up", up.Addr(), "451", "", 1},
		{Type: "dsn", DSNID: dsnID, Attempt: 1},
		{"delivered", "later@example.net", "up", up.Addr(), "250", "", 2},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || h.ID != bounced || h.State != "bounced" || h.Left.IsZero() {
		t.Errorf("history of %s: state %q left %v\n got %v\nwant %v", bounced, h.State, h.Left, got, want)
	}
	// The same through the API, and the text the command prints.
	var d struct {
		State  string
		Events []struct{ Type string }
	}
	api(t, r, "GET", "/api/messages/"+delivered, &d)
	if d.State != "delivered" || len(d.Events) != 2 || d.Events[0].Type != "accepted" || d.Events[1].Type != "delivered" {
		t.Errorf("GET /api/messages/%s: %+v", delivered, d)
	}
	text, err := queueCLI(t, r, adminToken, "history", bounced)
	t.Logf("queue history %s:\n%s", bounced, text)
	if err != nil || !strings.Contains(text, "550 5.1.1 No such user gone") || !strings.Contains(text, "DSN "+dsnID) {
		t.Errorf("queue history: %v\n%s", err, text)
	}

	found, err := queueCLI(t, r, adminToken, "find", "-to", "Gone@example.net")
	if err != nil || !strings.Contains(found, bounced) || strings.Contains(found, delivered) || !strings.Contains(found, "bounced") {
		t.Errorf("queue find -to: %v\n%s", err, found)
	}
	if found, err := queueCLI(t, r, adminToken, "find", "-to", "nobody@example.net"); err != nil || !strings.Contains(found, "no message found") {
		t.Errorf("queue find -to nobody: %v\n%s", err, found)
	}

	// Past the retention, the histories of the messages that left go.
	testwait.For(t, 30*time.Second, "the histories removed after the retention", func() bool {
		out, err := queueCLI(t, r, adminToken, "history", bounced)
		return err != nil && strings.Contains(out, "HTTP 404")
	})
	if out, err := queueCLI(t, r, adminToken, "history", delivered); err == nil || !strings.Contains(out, "HTTP 404") {
		t.Errorf("history of %s after the retention: %v\n%s", delivered, err, out)
	}
}
