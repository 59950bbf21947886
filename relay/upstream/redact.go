package upstream

import (
	"cmp"
	"encoding/base64"
	"net/url"
	"slices"
	"strings"
)

// redacted stands for a secret removed from a text.
const redacted = "[redacted]"

// An upstream's replies and its token endpoint's errors are texts from
// outside that the relay logs, stores as recipients' replies, shows in the
// admin API and mails back in DSNs. A server may repeat in them what it
// was sent: a password, a token, or the whole request. Each such text is
// redacted where it enters the relay: tokenError for a token endpoint's
// answer, and for an upstream's replies Deliverer.try, which every result,
// health report and log line of a delivery passes, and Check for
// its report.

// redactor returns the replacer that removes from a text every form of
// the secrets a text may repeat; the longest first, so that a secret
// that holds another is removed whole.
func redactor(secrets []string) *strings.Replacer {
	var forms []string
	for _, s := range secrets {
		if s == "" {
			continue
		}
		// As sent, with its whitespace folded as replies are
		// (oneLine), and form-encoded as a token request sends it.
		forms = append(forms, s, oneLine(s), url.QueryEscape(s))
	}
	slices.SortFunc(forms, func(a, b string) int { return cmp.Or(cmp.Compare(len(b), len(a)), strings.Compare(a, b)) })
	forms = slices.Compact(forms)
	pairs := make([]string, 0, 2*len(forms))
	for _, f := range forms {
		if f != "" {
			pairs = append(pairs, f, redacted)
		}
	}
	return strings.NewReplacer(pairs...)
}

// upstreamSecrets lists the secrets of up's configuration: its password
// with the base64 forms in which PLAIN and LOGIN send it (RFC 4954 section
// 4), and its OAuth2 secrets.
func upstreamSecrets(up *Upstream) []string {
	var out []string
	if up.Password != "" {
		out = append(out, up.Password,
			base64.StdEncoding.EncodeToString([]byte(up.Password)),
			base64.StdEncoding.EncodeToString([]byte("\x00"+up.Username+"\x00"+up.Password)))
	}
	return append(out, oauthSecrets(up.OAuth)...)
}

// oauthSecrets lists the configured secrets of o: the client secret, the
// refresh token, and a service account's private key, whole and line by
// line, since a text may hold it folded or JSON-escaped.
func oauthSecrets(o *OAuth) []string {
	if o == nil {
		return nil
	}
	out := []string{o.ClientSecret, o.RefreshToken}
	if sa := o.ServiceAccount; sa != nil {
		key := strings.TrimSpace(string(sa.PrivateKey))
		out = append(out, key)
		for line := range strings.Lines(key) {
			// The base64 lines of the PEM body, not its BEGIN and END
			// lines nor a short last line, which say nothing.
			if line = strings.TrimSpace(line); len(line) >= 16 && !strings.HasPrefix(line, "-----") {
				out = append(out, line)
			}
		}
	}
	return out
}

// redactorFor returns the replacer for texts from up and its token
// endpoint: the secrets of up's configuration and the tokens that its
// token cache (nil for none) holds now.
func redactorFor(up *Upstream, tokens *tokenCache) *strings.Replacer {
	secrets := upstreamSecrets(up)
	if tokens != nil {
		secrets = append(secrets, tokens.tokens()...)
	}
	return redactor(secrets)
}
