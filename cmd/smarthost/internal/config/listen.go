package config

import (
	"fmt"
	"net/netip"
	"strings"

	"smarthost/internal/mailproto"
	"smarthost/relay"
)

// privateRanges are the networks that may be trusted without
// allow_public_networks: loopback, RFC 1918, RFC 6598 shared address
// space, link-local, and their IPv6 counterparts (RFC 4193 ULA).
var privateRanges = []netip.Prefix{
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
}

func isPrivate(p netip.Prefix) bool {
	for _, r := range privateRanges {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// listeners reads the [[listen]] tables and refuses every combination
// that would make an open relay or send passwords in plain text.
func (p *parser) listeners(root *table) []relay.Listener {
	tables := root.tables("listen")
	if len(tables) == 0 && !root.has("listen") {
		p.errorf("listen", "at least one [[listen]] is required")
	}
	var out []relay.Listener
	names := map[string]string{}
	addrs := map[string]string{}
	for _, t := range tables {
		l := relay.Listener{AuthRequired: true}
		if a, ok := t.str("address"); ok {
			if err := checkHostPort(a, false); err != nil {
				t.errorf("address", "%v", err)
			} else if prev, dup := addrs[a]; dup {
				t.errorf("address", "%q is already used by %s", a, prev)
			} else if !strings.HasSuffix(a, ":0") {
				// Port 0 picks a free port, so it may repeat.
				addrs[a] = t.path
			}
			l.Address = a
		} else if !t.has("address") {
			t.errorf("address", "required")
		}
		l.Name = t.strDefault("name", l.Address)
		if l.Name != "" {
			if prev, dup := names[l.Name]; dup && t.has("name") {
				t.errorf("name", "%q is already used by %s", l.Name, prev)
			} else {
				names[l.Name] = t.path
			}
		}

		tlsOK := true
		switch mode := t.strDefault("tls", string(mailproto.TLSStartTLS)); mailproto.TLSMode(mode) {
		case mailproto.TLSStartTLS, mailproto.TLSImplicit, mailproto.TLSNone:
			l.TLS = mailproto.TLSMode(mode)
		default:
			t.errorf("tls", `must be "starttls", "implicit" or "none", not %q`, mode)
			tlsOK = false
		}
		authOK := true
		switch auth := t.strDefault("auth", "required"); auth {
		case "required":
			l.AuthRequired = true
		case "none":
			l.AuthRequired = false
		default:
			t.errorf("auth", `must be "required" or "none", not %q`, auth)
			authOK = false
		}

		allowPublic := t.boolean("allow_public_networks", false)
		nets, _ := t.strings("trusted_networks")
		for i, s := range nets {
			key := fmt.Sprintf("trusted_networks[%d]", i)
			pfx, ok := t.network(key, s, "and would make an open relay")
			if !ok {
				continue
			}
			if !allowPublic && !isPrivate(pfx) {
				t.errorf(key, "%s is not a private or loopback network; set allow_public_networks = true if you really mean it", pfx)
				continue
			}
			l.TrustedNetworks = append(l.TrustedNetworks, pfx)
		}
		trusted := len(nets) > 0
		l.ProxyProtocol, l.ProxyTrusted = p.proxy(t)

		// Never an open relay: without AUTH, only trusted networks submit.
		if authOK && !l.AuthRequired && !trusted {
			t.errorf("auth", `"none" without trusted_networks would make an open relay; set trusted_networks or auth = "required"`)
		}
		// AUTH PLAIN/LOGIN over plain text exposes passwords on the wire
		// (RFC 4954 section 4); accept it only from trusted networks.
		if tlsOK && authOK && l.TLS == mailproto.TLSNone && l.AuthRequired && !trusted {
			t.errorf("tls", `"none" with auth = "required" sends passwords in plain text; use "starttls" or "implicit", or restrict the listener with trusted_networks`)
		}
		if t.has("rate_limit") {
			l.RateLimit = t.rate("rate_limit")
			if authOK && l.AuthRequired {
				t.errorf("rate_limit", `only for auth = "none" listeners, per client address; limit a logged-in client with its [[user]] rate_limit`)
			}
		}
		t.done()
		out = append(out, l)
	}
	return out
}

// proxy reads a listener's proxy_protocol and proxy_trusted. Any range may
// be trusted, since these are the operator's load balancers, but not every
// address: then any client could claim to be any other.
func (p *parser) proxy(t *table) (bool, []netip.Prefix) {
	on := t.boolean("proxy_protocol", false)
	nets, listed := t.strings("proxy_trusted")
	var out []netip.Prefix
	for i, s := range nets {
		key := fmt.Sprintf("proxy_trusted[%d]", i)
		if pfx, ok := t.network(key, s, "to send a PROXY header: any client could claim any address"); ok {
			out = append(out, pfx)
		}
	}
	switch {
	case on && t.missingList("proxy_trusted"):
		t.errorf("proxy_trusted", "required with proxy_protocol = true: the addresses of the load balancers that send PROXY headers")
	case !on && listed:
		t.errorf("proxy_trusted", "set without proxy_protocol = true")
	}
	return on, out
}

// network reads s, the entry at key of a list of networks, or reports why
// it cannot be used: not a network, or every address, which would allow
// what everyone says.
func (t *table) network(key, s, everyone string) (netip.Prefix, bool) {
	pfx, err := parseNetwork(s)
	if err != nil {
		t.errorf(key, "%v", err)
		return pfx, false
	}
	if pfx.Bits() == 0 {
		t.errorf(key, "%s trusts every address %s", pfx, everyone)
		return pfx, false
	}
	return pfx, true
}

// parseNetwork accepts a CIDR prefix or a bare IP address (a one-address
// network). IPv4-mapped IPv6 forms are unmapped so that they compare with
// the addresses clients connect from.
func parseNetwork(s string) (netip.Prefix, error) {
	var pfx netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		pfx, err = netip.ParsePrefix(s)
		if err != nil {
			return pfx, fmt.Errorf("%q is not a CIDR network or IP address", s)
		}
	} else {
		addr, err := netip.ParseAddr(s)
		if err != nil {
			return pfx, fmt.Errorf("%q is not a CIDR network or IP address", s)
		}
		if addr.Zone() != "" {
			return pfx, fmt.Errorf("%q: IPv6 zones are not allowed", s)
		}
		pfx = netip.PrefixFrom(addr, addr.BitLen())
	}
	if pfx.Addr().Is4In6() && pfx.Bits() >= 96 {
		pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
	}
	return pfx.Masked(), nil
}
