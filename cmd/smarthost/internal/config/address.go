package config

import (
	"fmt"
	"net"
	"net/mail"
	"net/netip"
	"strconv"
	"strings"
)

// CheckMailbox accepts a plain address "local@domain" such as an upstream
// login may send from: no display name, no angle brackets, an ASCII
// domain name.
func CheckMailbox(a string) error {
	at := strings.LastIndexByte(a, '@')
	if at <= 0 {
		return fmt.Errorf("%q is not an address such as \"bounces@example.com\"", a)
	}
	if a[:at] == "*" {
		return fmt.Errorf("%q is a pattern; give one address", a)
	}
	if domain := strings.ToLower(a[at+1:]); !ValidDomain(domain) {
		return fmt.Errorf("%q: %q is not a domain name", a, domain)
	}
	if pa, err := mail.ParseAddress(a); err != nil || pa.Address != a {
		return fmt.Errorf("%q is not a valid email address", a)
	}
	// It goes out in MAIL FROM, and the relay does not speak SMTPUTF8
	// (RFC 6531).
	for _, c := range []byte(a) {
		if c >= 0x80 {
			return fmt.Errorf("%q is not an ASCII address", a)
		}
	}
	return nil
}

// checkHostPort accepts "host:port" with a numeric port; the host may be
// empty (all interfaces) unless needHost.
func checkHostPort(s string, needHost bool) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if needHost && host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || needHost && n == 0 {
		return fmt.Errorf("%q: port %q is not a number from 1 to 65535", s, port)
	}
	return nil
}

// isLoopbackHost reports whether the host of "host:port" is localhost or
// a loopback address.
func isLoopbackHost(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// ValidDomain reports whether d is a lower-case ASCII domain name:
// dot-separated labels of letters, digits and hyphens (RFC 1035 section
// 2.3.1, relaxed by RFC 1123 to allow a leading digit).
func ValidDomain(d string) bool {
	if d == "" || len(d) > 253 {
		return false
	}
	for label := range strings.SplitSeq(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
