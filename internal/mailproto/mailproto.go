// Package mailproto holds the few rules of the mail protocols that both
// sides of the relay apply: the submission server in relay/ and the
// delivery side in relay/upstream/. How a connection is protected
// (RFC 8314), the domain of an address (RFC 5321) and where a message's
// header section ends (RFC 5322).
package mailproto

import (
	"bytes"
	"strings"
)

// TLSMode says how a connection is protected.
type TLSMode string

const (
	// TLSStartTLS upgrades a plain connection with STARTTLS (port 587).
	TLSStartTLS TLSMode = "starttls"
	// TLSImplicit speaks TLS from the first byte (port 465).
	TLSImplicit TLSMode = "implicit"
	// TLSNone is plain text: trusted networks and loopback only.
	TLSNone TLSMode = "none"
)

// DomainOf returns the lower-cased domain of an address, or "".
func DomainOf(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	return LowerASCII(addr[i+1:])
}

// LowerASCII lower-cases A-Z and nothing else. Unicode case mapping would
// let a different address pass for an allowed one: the Kelvin sign U+212A
// lower-cases to "k", so "*@kample.com" would admit a From: in another
// (IDN) domain, and the message would be signed with kample.com's key.
// Envelope addresses are ASCII (no SMTPUTF8), and domains compare
// case-insensitively in ASCII only (RFC 5321 section 2.4).
func LowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// HeaderEnd finds where the header section of msg (CRLF-normalised) ends.
// It returns the offset just after the last header field line, and whether
// a blank line follows there. A line that is neither a field nor a
// continuation ends the header section, as in Postfix: what follows is body.
func HeaderEnd(msg []byte) (end int, blank bool) {
	pos := 0
	for pos < len(msg) {
		eol := bytes.Index(msg[pos:], []byte("\r\n"))
		if eol < 0 {
			return pos, false
		}
		line := msg[pos : pos+eol]
		switch {
		case len(line) == 0:
			return pos, true
		case line[0] == ' ' || line[0] == '\t':
			if pos == 0 {
				return 0, false
			}
		case !isFieldLine(line):
			return pos, false
		}
		pos += eol + 2
	}
	return pos, false
}

// isFieldLine reports whether line starts with a field name and a colon
// (RFC 5322 section 2.2: printable ASCII except colon).
func isFieldLine(line []byte) bool {
	i := bytes.IndexByte(line, ':')
	if i <= 0 {
		return false
	}
	for _, c := range line[:i] {
		if c < 33 || c > 126 {
			return false
		}
	}
	return true
}
