package relay

import "strings"

// SenderAllowed reports whether addr matches one of the allowed_from
// patterns: an exact address, "*@domain" for a whole domain, or "*" for any
// sender. Matching ignores ASCII case only; the null sender matches only
// "*".
func SenderAllowed(patterns []string, addr string) bool {
	addr = lowerASCII(addr)
	domain := ""
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		domain = addr[i+1:]
	}
	for _, p := range patterns {
		p = lowerASCII(p)
		switch {
		case p == "*":
			return true
		case addr == "":
			// the null sender is never one of a user's addresses
		case strings.HasPrefix(p, "*@"):
			if domain != "" && domain == p[2:] {
				return true
			}
		case p == addr:
			return true
		}
	}
	return false
}

// DomainOf returns the lower-cased domain of an address, or "".
func DomainOf(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	return lowerASCII(addr[i+1:])
}

// lowerASCII lower-cases A-Z and nothing else. Unicode case mapping would
// let a different address pass for an allowed one: the Kelvin sign U+212A
// lower-cases to "k", so "*@kample.com" would admit a From: in another
// (IDN) domain, and the message would be signed with kample.com's key.
// Envelope addresses are ASCII (no SMTPUTF8), and domains compare
// case-insensitively in ASCII only (RFC 5321 section 2.4).
func lowerASCII(s string) string {
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

// validPath reports whether an envelope address is safe to store and to
// copy into headers and upstream commands: printable ASCII (the relay does
// not offer SMTPUTF8, so RFC 6531 addresses cannot be passed on), no angle
// brackets or spaces, a non-empty local part and domain, and one "@".
// go-smtp hands a quoted local part over unquoted, so in
// ceo@evil.com@notify.example.com nothing tells where the local part
// ends: the policy would judge the domain notify.example.com while a
// later hop may read evil.com.
func validPath(addr string) bool {
	if addr == "" || len(addr) > 320 {
		return false
	}
	for i := 0; i < len(addr); i++ {
		c := addr[i]
		if c <= 0x20 || c >= 0x7f || c == '<' || c == '>' {
			return false
		}
	}
	i := strings.IndexByte(addr, '@')
	return i > 0 && i < len(addr)-1 && strings.IndexByte(addr[i+1:], '@') < 0
}
