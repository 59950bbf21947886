package config

import (
	"fmt"
	"net/mail"
	"strings"

	"golang.org/x/crypto/bcrypt"

	"smarthost/relay"
	"smarthost/relay/upstream"
)

// allowedFrom is one valid allowed_from entry and where it came from.
type allowedFrom struct {
	t       *table
	index   int
	pattern string // normalised
}

// users reads the [[user]] tables; it returns their allowed_from entries
// too, for checkRoutable.
func (p *parser) users(root *table) ([]relay.User, []allowedFrom) {
	tables := root.tables("user")
	var out []relay.User
	var froms []allowedFrom
	seen := map[string]string{}
	for _, t := range tables {
		var u relay.User
		u.Name = t.uniqueName(seen)
		if t.has("password") {
			t.errorf("password", "plaintext passwords are not accepted; store a bcrypt hash from `smarthost passwd` in password_hash")
		}
		if h, ok := t.str("password_hash"); ok {
			if _, err := bcrypt.Cost([]byte(h)); err != nil {
				t.errorf("password_hash", "not a bcrypt hash; make one with `smarthost passwd`")
			}
			u.PasswordHash = []byte(h)
		} else if !t.has("password_hash") {
			t.errorf("password_hash", "required; make one with `smarthost passwd`")
		}
		from, _ := t.strings("allowed_from")
		if t.missingList("allowed_from") {
			t.errorf("allowed_from", `required: the sender addresses this user may use ("user@domain", "*@domain" or "*")`)
		}
		for i, pat := range from {
			norm, err := normalizeSenderPattern(pat)
			if err != nil {
				t.errorf(fmt.Sprintf("allowed_from[%d]", i), "%v", err)
				continue
			}
			u.AllowedFrom = append(u.AllowedFrom, norm)
			froms = append(froms, allowedFrom{t: t, index: i, pattern: norm})
		}
		if rcpts, ok := t.strings("allowed_recipients"); ok && len(rcpts) == 0 {
			t.errorf("allowed_recipients", `empty: no recipient would be allowed; leave it out, or ["*"], to allow any`)
		} else {
			for i, pat := range rcpts {
				norm, err := normalizeSenderPattern(pat)
				if err != nil {
					t.errorf(fmt.Sprintf("allowed_recipients[%d]", i), "%v", err)
					continue
				}
				u.AllowedRecipients = append(u.AllowedRecipients, norm)
			}
		}
		u.RateLimit = t.rate("rate_limit")
		u.RecipientLimit = t.rate("recipient_limit")
		u.AllowNullSender = t.boolean("allow_null_sender", false)
		t.done()
		out = append(out, u)
	}
	return out, froms
}

// rate reads an optional "N/duration" key; absent means no limit.
func (t *table) rate(k string) upstream.Rate {
	s, ok := t.str(k)
	if !ok {
		return upstream.Rate{}
	}
	r, err := ParseRate(s)
	if err != nil {
		t.errorf(k, "%v", err)
	}
	return r
}

// normalizeSenderPattern checks an allowed_from entry and lower-cases its
// domain; local parts keep their case (RFC 5321 section 2.4).
func normalizeSenderPattern(pat string) (string, error) {
	if pat == "*" {
		return pat, nil
	}
	at := strings.LastIndexByte(pat, '@')
	if at < 0 {
		return "", fmt.Errorf(`%q: want "user@domain", "*@domain" or "*"`, pat)
	}
	local, domain := pat[:at], strings.ToLower(pat[at+1:])
	if !ValidDomain(domain) {
		return "", fmt.Errorf("%q: %q is not a domain name", pat, domain)
	}
	if local != "*" {
		a, err := mail.ParseAddress(pat)
		if err != nil || a.Address != pat {
			return "", fmt.Errorf("%q is not a valid email address", pat)
		}
	}
	return local + "@" + domain, nil
}
