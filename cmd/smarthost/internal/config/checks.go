package config

import (
	"fmt"
	"net"

	"smarthost/internal/mailproto"
	"smarthost/relay"
	"smarthost/relay/upstream"
)

// checkAuthUsers reports every listener that requires AUTH when no
// [[user]] is configured: nobody could submit through it.
func (p *parser) checkAuthUsers(ls []relay.Listener, users []relay.User) {
	if len(users) > 0 {
		return
	}
	for i, l := range ls {
		if l.AuthRequired {
			p.errorf(fmt.Sprintf("listen[%d].auth", i),
				`"required", and no [[user]] is configured: nobody can submit; add a [[user]] (smarthost passwd makes its hash), or set auth = "none" with trusted_networks [listen %q]`, l.Name)
		}
	}
}

// tlsPortWarnings are the listeners and upstreams whose TLS mode is not
// the one their port is known for: implicit TLS on 587, STARTTLS on 465.
// Both can work, against a server set up so; usually one is a typo, and
// the session then hangs until a timeout.
func tlsPortWarnings(ls []relay.Listener, ups []upstream.Upstream) []Error {
	var out []Error
	check := func(key, what, address string, mode mailproto.TLSMode) {
		_, port, err := net.SplitHostPort(address)
		if err != nil {
			return
		}
		switch {
		case mode == mailproto.TLSImplicit && port == "587":
			out = append(out, Error{Key: key, Msg: fmt.Sprintf(`tls = "implicit" on port 587, where clients and servers start in plain text and use STARTTLS; implicit TLS is usually port 465 [%s]`, what)})
		case mode == mailproto.TLSStartTLS && port == "465":
			out = append(out, Error{Key: key, Msg: fmt.Sprintf(`tls = "starttls" on port 465, where TLS starts at once (implicit); STARTTLS is usually port 587 [%s]`, what)})
		}
	}
	for i, l := range ls {
		check(fmt.Sprintf("listen[%d].tls", i), fmt.Sprintf("listen %q", l.Name), l.Address, l.TLS)
	}
	for i, u := range ups {
		check(fmt.Sprintf("upstream[%d].tls", i), fmt.Sprintf("upstream %q", u.Name), u.Address, u.TLS)
	}
	return out
}
