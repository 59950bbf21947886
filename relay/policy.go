package relay

import (
	"strings"

	"smarthost/internal/mailproto"
)

// SenderAllowed reports whether addr matches one of the allowed_from
// patterns: an exact address, "*@domain" for a whole domain, or "*" for any
// sender. Matching ignores ASCII case only; the null sender matches only
// "*".
func SenderAllowed(patterns []string, addr string) bool {
	addr = mailproto.LowerASCII(addr)
	domain := ""
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		domain = addr[i+1:]
	}
	for _, p := range patterns {
		p = mailproto.LowerASCII(p)
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
