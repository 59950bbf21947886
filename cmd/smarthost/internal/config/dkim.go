package config

import (
	"crypto"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"smarthost/dkim"
)

// dkim reads the [[dkim]] tables and loads their keys; maxAge is the
// queue's, which a signature must outlive.
func (p *parser) dkim(root *table, maxAge time.Duration) []dkim.Key {
	var out []dkim.Key
	// Several keys may sign for one domain (RSA beside Ed25519, or the old
	// and the new selector during a rotation), but a (domain, selector)
	// pair names one DNS record, so it names one key.
	seen := map[string]string{}
	for _, t := range root.tables("dkim") {
		var k dkim.Key
		domainOK := false
		if dom, ok := t.str("domain"); ok {
			k.Domain = strings.ToLower(strings.TrimSuffix(dom, "."))
			if ValidDomain(k.Domain) {
				domainOK = true
			} else {
				t.errorf("domain", "%q is not a domain name", dom)
			}
		} else if !t.has("domain") {
			t.errorf("domain", "required")
		}
		if sel, ok := t.str("selector"); ok {
			// The selector is one or more labels under _domainkey (RFC
			// 6376 section 3.1); DNS names compare case-insensitively.
			k.Selector = sel
			if !ValidDomain(strings.ToLower(sel)) {
				t.errorf("selector", "%q is not a valid DNS label sequence", sel)
			} else if domainOK {
				name := dkim.RecordName(k.Domain, strings.ToLower(sel))
				if prev, dup := seen[name]; dup {
					t.errorf("selector", "%q for %s is already used by %s", k.Selector, k.Domain, prev)
				} else {
					seen[name] = t.path
				}
			}
		} else if !t.has("selector") {
			t.errorf("selector", "required")
		}
		if f, ok := t.str("key_file"); ok && !t.readsSecret("dkim") {
			t.secretNamed("key_file", f)
		} else if ok {
			k.Signer = t.dkimKey("key_file", f)
		} else if !t.has("key_file") {
			t.errorf("key_file", "required: an RSA or Ed25519 private key in PEM; make one with `smarthost dkim keygen`")
		}
		if hs, ok := t.strings("headers"); ok {
			k.Headers = dkimHeaders(t, hs)
		}
		k.HeaderCanonicalization, k.BodyCanonicalization = "relaxed", "relaxed"
		if c, ok := t.str("canonicalization"); ok {
			h, b, err := parseCanonicalization(c)
			if err != nil {
				t.errorf("canonicalization", "%v", err)
			} else {
				k.HeaderCanonicalization, k.BodyCanonicalization = h, b
			}
		}
		k.Expiration = t.duration("expiration", 0)
		if k.Expiration > 0 && k.Expiration <= maxAge {
			// Mail is signed once, at the door: a message retried near the
			// end of its queue life would leave with an expired signature.
			t.errorf("expiration", "%s must be longer than queue.max_age (%s)", k.Expiration, maxAge)
		}
		k.Subdomains = t.boolean("subdomains", false)
		t.done()
		out = append(out, k)
	}
	return out
}

// dkimKey loads a DKIM private key, or records why it cannot be used:
// unreadable, not PEM, not RSA or Ed25519, or RSA under 1024 bits.
func (t *table) dkimKey(k, path string) crypto.Signer {
	if path == "" {
		t.errorf(k, "must not be empty")
		return nil
	}
	key, err := dkim.LoadKey(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			t.errorf(k, "%v", err) // already names the file
		} else {
			t.errorf(k, "%s: %v", path, err)
		}
		return nil
	}
	return key
}

// dkimHeaders checks a headers list: field names (RFC 5322 section 3.6.8)
// that include From, since From is what DKIM aligns with (RFC 6376
// section 5.4).
func dkimHeaders(t *table, names []string) []string {
	hasFrom := false
	out := make([]string, 0, len(names))
	for i, h := range names {
		if !validFieldName(h) {
			t.errorf(fmt.Sprintf("headers[%d]", i), "%q is not a header field name", h)
			continue
		}
		if strings.EqualFold(h, "From") {
			hasFrom = true
		}
		out = append(out, h)
	}
	if !hasFrom {
		t.errorf("headers", "must include From (the field DKIM aligns with); leave headers out for the default set")
	}
	return out
}

// validFieldName reports whether s is a header field name: printable
// US-ASCII except the colon (RFC 5322 section 3.6.8).
func validFieldName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if c < 33 || c > 126 || c == ':' {
			return false
		}
	}
	return true
}

// parseCanonicalization reads a canonicalization setting as the c= tag
// does (RFC 6376 section 3.5): "header/body", or one name for the header
// with "simple" for the body.
func parseCanonicalization(c string) (header, body string, err error) {
	header, body, split := strings.Cut(c, "/")
	if !split {
		body = "simple"
	}
	for _, v := range []string{header, body} {
		if v != "relaxed" && v != "simple" {
			return "", "", fmt.Errorf(`%q: want "relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple", "relaxed" or "simple"`, c)
		}
	}
	return header, body, nil
}
