package config

import (
	"fmt"
	"slices"
	"strings"

	"smarthost/relay/upstream"
)

// routes reads the [[route]] tables; each names upstreams of ups.
func (p *parser) routes(root *table, ups []upstream.Upstream) []upstream.Route {
	tables := root.tables("route")
	if len(tables) == 0 && !root.has("route") {
		p.errorf("route", `at least one [[route]] is required (from_domain = "*" routes every sender)`)
	}
	known := map[string]bool{}
	for _, u := range ups {
		known[u.Name] = true
	}
	var out []upstream.Route
	seen := map[string]string{}   // from_domain -> the route that has it
	seenTo := map[string]string{} // to_domain -> the route that has it
	for _, t := range tables {
		var r upstream.Route
		hasFrom, hasTo := t.has("from_domain"), t.has("to_domain")
		switch {
		case hasFrom && hasTo:
			t.errorf("to_domain", "a route has from_domain or to_domain, not both")
		case !hasFrom && !hasTo:
			t.errorf("from_domain", `required: a sender domain or "*" (or to_domain, a recipient domain)`)
		}
		if d, ok := t.str("from_domain"); ok {
			r.FromDomain = strings.ToLower(d)
			if r.FromDomain != "*" && !ValidDomain(r.FromDomain) {
				t.errorf("from_domain", `%q is neither "*" nor a domain name`, d)
			} else if prev, dup := seen[r.FromDomain]; dup {
				t.errorf("from_domain", "%q is already routed by %s", r.FromDomain, prev)
			} else {
				seen[r.FromDomain] = t.path
			}
		}
		if d, ok := t.str("to_domain"); ok {
			r.ToDomain = strings.ToLower(d)
			if !ValidDomain(r.ToDomain) {
				t.errorf("to_domain", "%q is not a domain name", d)
			} else if prev, dup := seenTo[r.ToDomain]; dup {
				t.errorf("to_domain", "%q is already routed by %s", r.ToDomain, prev)
			} else {
				seenTo[r.ToDomain] = t.path
			}
		}
		names, _ := t.strings("upstreams")
		if t.missingList("upstreams") {
			t.errorf("upstreams", "required: the upstream names to try, in order")
		}
		for i, n := range names {
			key := fmt.Sprintf("upstreams[%d]", i)
			switch {
			case !known[n]:
				t.errorf(key, "no [[upstream]] is named %q", n)
			case slices.Contains(r.Upstreams, n):
				t.errorf(key, "%q is listed twice", n)
			default:
				r.Upstreams = append(r.Upstreams, n)
			}
		}
		t.done()
		out = append(out, r)
	}
	return out
}
