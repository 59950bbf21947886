package upstream

import (
	"bufio"
	"bytes"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"smarthost/queue"
)

const original = "Received: from app ([127.0.0.1])\r\n\tby relay.test (smarthost) with ESMTPSA id 0123456789abcdef;\r\n\tSun, 22 Nov 2026 10:00:00 +0000\r\nFrom: app@example.com\r\nTo: a@example.net, b@example.net\r\nSubject: invoice\r\n\r\nsecret body text\r\n"

// dsnParts parses a DSN into its report parameters and its three parts.
func dsnParts(t *testing.T, data []byte) (*mail.Message, map[string]string, [][]byte, []string) {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" {
		t.Fatalf("content type %q: %v", mt, err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	var parts [][]byte
	var types []string
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(p)
		parts = append(parts, b)
		types = append(types, p.Header.Get("Content-Type"))
	}
	return msg, params, parts, types
}

// statusGroups splits a message/delivery-status body into its
// per-message group and per-recipient groups (RFC 3464 section 2.1).
func statusGroups(t *testing.T, body []byte) []textproto.MIMEHeader {
	t.Helper()
	r := textproto.NewReader(bufio.NewReader(bytes.NewReader(body)))
	var groups []textproto.MIMEHeader
	for {
		h, err := r.ReadMIMEHeader()
		if len(h) > 0 {
			groups = append(groups, h)
		}
		if err != nil {
			break
		}
	}
	return groups
}

func TestBounceFailed(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	b := &Bouncer{Hostname: "relay.test", Now: func() time.Time { return now }}
	m := queue.Message{ID: "0123456789abcdef", From: "app@example.com", Received: now.Add(-time.Hour), LastAttempt: now,
		Recipients: []queue.Recipient{{Addr: "a@example.net", State: queue.Delivered}, {Addr: "b@example.net", State: queue.Failed}}}
	failed := []queue.Recipient{
		{Addr: "b@example.net", State: queue.Failed, Reply: "550 5.1.1 <b@example.net>: Recipient address rejected: User unknown"},
		{Addr: "c@example.net", State: queue.Failed, Reply: "expired after 120h0m0s in queue; last reply: 451 4.3.0 Try again later"},
		{Addr: "d@example.net", State: queue.Failed, Reply: "expired after 120h0m0s in queue; last reply: connect: connection refused"},
	}
	dm, body := b.Bounce(queue.BounceFailed, m, failed, queue.NewBody([]byte(original)))
	if dm == nil {
		t.Fatal("no DSN")
	}
	if dm.From != "" || !dm.DSN || len(dm.Recipients) != 1 || dm.Recipients[0].Addr != "app@example.com" {
		t.Errorf("DSN envelope: %+v", dm)
	}
	msg, params, parts, types := dsnParts(t, body)
	if params["report-type"] != "delivery-status" || len(parts) != 3 {
		t.Fatalf("report-type %q, %d parts", params["report-type"], len(parts))
	}
	if !strings.HasPrefix(types[0], "text/plain") || types[1] != "message/delivery-status" || types[2] != "text/rfc822-headers" {
		t.Errorf("part types %v", types)
	}
	if msg.Header.Get("To") != "<app@example.com>" || msg.Header.Get("Auto-Submitted") != "auto-replied" ||
		msg.Header.Get("Message-Id") != dm.MessageID || !strings.HasPrefix(msg.Header.Get("From"), "Mail Delivery System <MAILER-DAEMON@relay.test>") {
		t.Errorf("header: %v", msg.Header)
	}
	if !bytes.Contains(parts[0], []byte("<b@example.net>: 550 5.1.1")) {
		t.Errorf("human-readable part:\n%s", parts[0])
	}
	groups := statusGroups(t, parts[1])
	if len(groups) != 4 {
		t.Fatalf("%d status groups, want 1 + 3:\n%s", len(groups), parts[1])
	}
	if groups[0].Get("Reporting-MTA") != "dns; relay.test" || groups[0].Get("Arrival-Date") == "" {
		t.Errorf("per-message fields: %v", groups[0])
	}
	want := []struct{ rcpt, status, diag string }{
		{"b@example.net", "5.1.1", "smtp; 550 5.1.1 <b@example.net>: Recipient address rejected: User unknown"},
		{"c@example.net", "5.4.7", "smtp; 451 4.3.0 Try again later"},
		{"d@example.net", "5.4.7", "X-Smarthost; expired after 120h0m0s in queue; last reply: connect: connection refused"},
	}
	for i, w := range want {
		g := groups[i+1]
		if g.Get("Final-Recipient") != "rfc822; "+w.rcpt || g.Get("Action") != "failed" || g.Get("Status") != w.status || g.Get("Diagnostic-Code") != w.diag {
			t.Errorf("recipient %d: %v", i, g)
		}
	}
	if string(parts[2]) != original[:strings.Index(original, "\r\n\r\n")+2] {
		t.Errorf("original headers part:\n%q", parts[2])
	}
	if bytes.Contains(body, []byte("secret body text")) {
		t.Error("the original body is in the DSN")
	}
}

func TestBounceDelayed(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	b := &Bouncer{Hostname: "relay.test", MaxAge: 120 * time.Hour, Now: func() time.Time { return now }}
	m := queue.Message{ID: "x", From: "app@example.com", Received: now.Add(-4 * time.Hour)}
	_, body := b.Bounce(queue.BounceDelayed, m, []queue.Recipient{{Addr: "a@example.net", Reply: "421 4.7.0 Try again later"}}, queue.NewBody([]byte(original)))
	_, _, parts, _ := dsnParts(t, body)
	g := statusGroups(t, parts[1])
	if len(g) != 2 || g[1].Get("Action") != "delayed" || g[1].Get("Status") != "4.7.0" || g[1].Get("Will-Retry-Until") == "" {
		t.Fatalf("delayed status: %v", g)
	}
}

func TestNoBounceForNullSenderOrDSN(t *testing.T) {
	b := &Bouncer{Hostname: "relay.test"}
	rcpts := []queue.Recipient{{Addr: "a@example.net", Reply: "550 no"}}
	if m, body := b.Bounce(queue.BounceFailed, queue.Message{From: ""}, rcpts, queue.NewBody([]byte(original))); m != nil || body != nil {
		t.Error("DSN for the null sender")
	}
	if m, _ := b.Bounce(queue.BounceFailed, queue.Message{From: "postmaster@example.com", DSN: true}, rcpts, queue.NewBody([]byte(original))); m != nil {
		t.Error("DSN for a DSN")
	}
}

func TestDSNStatus(t *testing.T) {
	for _, tc := range []struct {
		reply string
		kind  queue.BounceKind
		want  string
	}{
		{"550 5.1.1 No such user", queue.BounceFailed, "5.1.1"},
		{"554 Transaction failed", queue.BounceFailed, "5.0.0"},
		{"550 5.7.1", queue.BounceFailed, "5.7.1"},
		{"expired after 5s in queue; last reply: 451 4.3.0 later", queue.BounceFailed, "5.4.7"},
		{"connect: connection refused", queue.BounceFailed, "5.0.0"},
		{"451 4.3.0 later", queue.BounceDelayed, "4.3.0"},
		{"connect: connection refused", queue.BounceDelayed, "4.0.0"},
		{"5501 5.1.1 odd", queue.BounceFailed, "5.0.0"},
	} {
		if got := dsnStatus(tc.reply, tc.kind); got != tc.want {
			t.Errorf("dsnStatus(%q) = %s, want %s", tc.reply, got, tc.want)
		}
	}
}
