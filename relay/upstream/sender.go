package upstream

import (
	"bytes"
	"net/mail"
	"strings"

	"smarthost/internal/mailproto"
	"smarthost/queue"
)

// MailFrom is the envelope sender to give this upstream for m. A DSN, or
// any other message from the null sender, leaves from DSNFrom, else from
// EnvelopeFrom, else from <> (RFC 3461 section 6.2, RFC 5321 section
// 4.5.5): an upstream that refuses <> needs an address of its own there.
// Any other message leaves from EnvelopeFrom when set, else from its own
// sender. Only the wire changes: the queue keeps m.From, so bounces still
// go to the original sender.
func (u *Upstream) MailFrom(m queue.Message) string {
	if m.DSN || m.From == "" {
		if u.DSNFrom != "" {
			return u.DSNFrom
		}
		return u.EnvelopeFrom
	}
	if u.EnvelopeFrom != "" {
		return u.EnvelopeFrom
	}
	return m.From
}

// rewriteHeaderFrom returns a copy of msg (CRLF-normalised) whose From:
// field names addr instead of the author, keeping the first author's
// display name where it decodes. The original field is kept as a
// Reply-To: unless the message has one, so that replies still reach the
// author (RFC 5322 section 3.6.2); further From: fields are dropped, and a
// message without one gets one.
func rewriteHeaderFrom(msg []byte, addr string) []byte {
	type span struct{ start, colon, stop int }
	end, _ := mailproto.HeaderEnd(msg)
	var froms []span
	hasReplyTo := false
	for pos := 0; pos < end; {
		f := span{start: pos}
		// HeaderEnd stops at a line end, so every line below end has one.
		pos += bytes.Index(msg[pos:end], []byte("\r\n")) + 2
		for pos < end && (msg[pos] == ' ' || msg[pos] == '\t') {
			pos += bytes.Index(msg[pos:end], []byte("\r\n")) + 2
		}
		f.stop = pos
		f.colon = f.start + bytes.IndexByte(msg[f.start:f.stop], ':')
		switch name := msg[f.start:f.colon]; {
		case bytes.EqualFold(name, []byte("From")):
			froms = append(froms, f)
		case bytes.EqualFold(name, []byte("Reply-To")):
			hasReplyTo = true
		}
	}

	var orig []byte // the first From: field's value as it came, folding and CRLF included
	name := ""
	if len(froms) > 0 {
		orig = msg[froms[0].colon+1 : froms[0].stop]
		unfolded := strings.TrimSpace(strings.ReplaceAll(string(orig), "\r\n", ""))
		if list, err := mail.ParseAddressList(unfolded); err == nil && len(list) > 0 {
			name = list[0].Name
		}
	}
	// Address.String encodes a non-ASCII display name (RFC 2047).
	field := "From: " + (&mail.Address{Name: name, Address: addr}).String() + "\r\n"

	out := make([]byte, 0, len(msg)+len(field)+len(orig)+len("Reply-To:"))
	if len(froms) == 0 {
		out = append(out, field...)
		return append(out, msg...)
	}
	at := 0
	for i, f := range froms {
		out = append(out, msg[at:f.start]...)
		if i == 0 {
			out = append(out, field...)
			if !hasReplyTo {
				out = append(out, "Reply-To:"...)
				out = append(out, orig...)
			}
		}
		at = f.stop
	}
	return append(out, msg[at:]...)
}
