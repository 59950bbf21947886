package relay

import "strings"

// SenderAllowed reports whether addr matches one of the allowed_from
// patterns: an exact address, "*@domain" for a whole domain, or "*" for any
// sender. Matching ignores case; the null sender matches only "*".
func SenderAllowed(patterns []string, addr string) bool {
	addr = strings.ToLower(addr)
	domain := ""
	if i := strings.LastIndexByte(addr, '@'); i >= 0 {
		domain = addr[i+1:]
	}
	for _, p := range patterns {
		p = strings.ToLower(p)
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
	return strings.ToLower(addr[i+1:])
}

// validPath reports whether an envelope address is safe to store and to
// copy into headers and upstream commands: printable ASCII (the relay does
// not offer SMTPUTF8, so RFC 6531 addresses cannot be passed on), no angle
// brackets or spaces, and a non-empty local part and domain.
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
	i := strings.LastIndexByte(addr, '@')
	return i > 0 && i < len(addr)-1
}
