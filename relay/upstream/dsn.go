package upstream

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"time"

	"smarthost/internal/mailproto"
	"smarthost/queue"
)

// Bouncer writes delivery status notifications (RFC 3464) for messages
// that failed or are delayed, addressed to their envelope sender.
type Bouncer struct {
	Hostname string
	// MaxAge, when set, tells delay warnings until when the relay retries.
	MaxAge time.Duration
	Now    func() time.Time
}

// Bounce builds the DSN for m about rcpts; it matches queue.Scheduler's
// Bounce hook. It returns nil for a null sender or a DSN (RFC 3461
// section 6.2: never a DSN about a DSN).
func (b *Bouncer) Bounce(kind queue.BounceKind, m queue.Message, rcpts []queue.Recipient, body queue.Body) (*queue.Message, []byte) {
	if m.From == "" || m.DSN || len(rcpts) == 0 {
		return nil, nil
	}
	now := time.Now
	if b.Now != nil {
		now = b.Now
	}
	t := now()
	id := queue.NewID()
	msgID := fmt.Sprintf("<%s.dsn@%s>", id, b.Hostname)
	boundary := randomBoundary()
	action, subject, intro := "failed", "Undelivered Mail Returned to Sender",
		"your message could not be delivered to one or more recipients.\r\nIt is attached below (headers only)."
	if kind == queue.BounceDelayed {
		action, subject, intro = "delayed", "Delayed Mail (still being retried)",
			"your message has not yet been delivered to one or more recipients.\r\nThe relay keeps trying; no action is needed yet."
	}

	var buf bytes.Buffer
	w := func(format string, args ...any) { fmt.Fprintf(&buf, format, args...) }
	w("From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", b.Hostname)
	w("To: <%s>\r\n", m.From)
	w("Subject: %s\r\n", subject)
	w("Date: %s\r\n", t.Format(time.RFC1123Z))
	w("Message-ID: %s\r\n", msgID)
	// RFC 3834: a machine's answer, so that auto-responders stay quiet.
	w("Auto-Submitted: auto-replied\r\n")
	w("MIME-Version: 1.0\r\n")
	w("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"%s\"\r\n\r\n", boundary)
	w("This is a MIME-encapsulated message.\r\n\r\n")

	// The human-readable part.
	w("--%s\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n", boundary)
	w("This is the mail system at host %s.\r\n\r\nI'm sorry to have to inform you that %s\r\n\r\n", b.Hostname, intro)
	for _, r := range rcpts {
		w("<%s>: %s\r\n", r.Addr, ascii(r.Reply))
	}
	if kind == queue.BounceDelayed && b.MaxAge > 0 {
		w("\r\nThe relay will keep trying until %s.\r\n", m.Received.Add(b.MaxAge).Format(time.RFC1123Z))
	}
	w("\r\n")

	// The machine-readable part (RFC 3464 section 2).
	w("--%s\r\nContent-Type: message/delivery-status\r\n\r\n", boundary)
	w("Reporting-MTA: dns; %s\r\n", b.Hostname)
	w("X-Smarthost-Queue-ID: %s\r\n", m.ID)
	w("Arrival-Date: %s\r\n", m.Received.Format(time.RFC1123Z))
	for _, r := range rcpts {
		reply := ascii(r.Reply)
		w("\r\nFinal-Recipient: rfc822; %s\r\n", r.Addr)
		w("Action: %s\r\n", action)
		w("Status: %s\r\n", dsnStatus(reply, kind))
		if code := smtpReply(reply); code != "" {
			w("Diagnostic-Code: smtp; %s\r\n", code)
		} else if reply != "" {
			w("Diagnostic-Code: X-Smarthost; %s\r\n", reply)
		}
		if !m.LastAttempt.IsZero() {
			w("Last-Attempt-Date: %s\r\n", m.LastAttempt.Format(time.RFC1123Z))
		}
		if kind == queue.BounceDelayed && b.MaxAge > 0 {
			w("Will-Retry-Until: %s\r\n", m.Received.Add(b.MaxAge).Format(time.RFC1123Z))
		}
	}
	w("\r\n")

	// The original header section (RFC 6522 text/rfc822-headers), which
	// the head holds whole: the rest is never read.
	w("--%s\r\nContent-Type: text/rfc822-headers\r\n\r\n", boundary)
	head := body.Head()
	end, _ := mailproto.HeaderEnd(head)
	buf.Write(head[:end])
	w("\r\n--%s--\r\n", boundary)

	dsn := &queue.Message{
		ID:         id,
		From:       "",
		Recipients: []queue.Recipient{{Addr: m.From}},
		MessageID:  msgID,
		Received:   t,
		DSN:        true,
	}
	return dsn, buf.Bytes()
}

// replyPattern matches an SMTP reply as recorded per recipient:
// "550 5.1.1 No such user", or "421 Try later" without an enhanced code.
var replyPattern = regexp.MustCompile(`^[245]\d\d(?: ([245]\.\d{1,3}\.\d{1,3}))?(?: |$)`)

// smtpReply returns the upstream's SMTP reply within a recorded reply
// (also inside "expired …; last reply: 451 …"), or "" for a local error.
func smtpReply(reply string) string {
	if i := strings.LastIndex(reply, "last reply: "); i >= 0 {
		reply = reply[i+len("last reply: "):]
	}
	if replyPattern.MatchString(reply) {
		return reply
	}
	return ""
}

// dsnStatus is a recipient's Status field (RFC 3463). A failure carries
// the upstream's permanent enhanced code, or 5.4.7 (delivery time
// expired) when the queue gave up; a delay carries its temporary code.
func dsnStatus(reply string, kind queue.BounceKind) string {
	var enhanced string
	if m := replyPattern.FindStringSubmatch(smtpReply(reply)); m != nil {
		enhanced = m[1]
	}
	if kind == queue.BounceDelayed {
		if strings.HasPrefix(enhanced, "4.") {
			return enhanced
		}
		return "4.0.0"
	}
	switch {
	case strings.HasPrefix(reply, "expired"):
		return "5.4.7"
	case strings.HasPrefix(enhanced, "5."):
		return enhanced
	}
	return "5.0.0"
}

// ascii keeps a reply printable and on one line for a header field.
func ascii(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c < 0x20 || c > 0x7e {
			b[i] = '?'
		}
	}
	if len(b) > 900 {
		b = append(b[:900], "..."...)
	}
	return string(b)
}

func randomBoundary() string {
	b := make([]byte, 12)
	rand.Read(b)
	return "dsn-" + hex.EncodeToString(b)
}
