package config

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/relay"
	"smarthost/relay/upstream"
)

// DefaultUpstreamConnections is the default max_connections of an
// [[upstream]].
const DefaultUpstreamConnections = 4

// upstreams reads the [[upstream]] tables. A table with provider = "…"
// starts from that profile's address, TLS mode and rate limit; any of
// those keys given explicitly wins. dkimKeys decide whether the header
// From: may be rewritten. providers maps the names of the upstreams
// configured from a profile to the profile's name.
func (p *parser) upstreams(root *table, dkimKeys []dkim.Key) (out []upstream.Upstream, providers map[string]string, secrets map[string]SecretFiles) {
	tables := root.tables("upstream")
	if len(tables) == 0 && !root.has("upstream") {
		p.errorf("upstream", "at least one [[upstream]] is required")
	}
	seen := map[string]string{}
	for _, t := range tables {
		prof, region, hasProf := upstreamProvider(t)
		// A provider key, known or not, means the operator did not mean to
		// spell out the address and TLS mode.
		named := t.has("provider")
		u := upstream.Upstream{}
		if hasProf {
			u = prof.Upstream("", region)
		}
		u.Name = t.uniqueName(seen)
		if i := strings.IndexByte(u.Name, ':'); i >= 0 && slices.Contains(relay.RateWindowKinds, u.Name[:i]) {
			// A cluster keeps the upstreams' rate windows beside the
			// users' and clients', by name.
			t.errorf("name", "%q is reserved: %s: names a user's or client's rate window", u.Name, u.Name[:i])
		}
		addrOK := false
		if a, ok := t.str("address"); ok {
			if err := checkHostPort(a, true); err != nil {
				t.errorf("address", "%v", err)
			} else {
				addrOK = true
			}
			u.Address = a
		} else if !t.has("address") {
			switch {
			case hasProf && u.Address == "" && !t.has("region"):
				t.errorf("region", `provider %q needs region (e.g. "us-east-1") or address`, prof.Name)
			case !named:
				t.errorf("address", "required (host:port)")
			}
			addrOK = u.Address != "" // the profile's
		}
		if mode, ok := t.str("tls"); ok {
			switch mailproto.TLSMode(mode) {
			case mailproto.TLSImplicit, mailproto.TLSStartTLS:
				u.TLS = mailproto.TLSMode(mode)
			case mailproto.TLSNone:
				u.TLS = mailproto.TLSNone
				// Plain text would expose the upstream password and the
				// mail; allow it only to a server on this machine.
				if addrOK && !isLoopbackHost(u.Address) {
					t.errorf("tls", `"none" (loopback/test only) sends mail and password in plain text; %s is not a loopback address`, u.Address)
				}
			default:
				t.errorf("tls", `must be "implicit", "starttls" or "none", not %q`, mode)
			}
		} else if !t.has("tls") && !named {
			t.errorf("tls", `required: "implicit" (port 465), "starttls" (port 587) or "none" (loopback only)`)
		}

		if t.has("password") {
			t.errorf("password", "secrets never live in the config file; use password_env or password_file")
		}
		username, _ := t.str("username")
		u.Username = username
		reads := t.readsSecret("upstream " + u.Name)
		env, hasEnv := t.str("password_env")
		file, hasFile := t.str("password_file")
		switch {
		case username == "" && (hasEnv || hasFile):
			key := "password_env"
			if !hasEnv {
				key = "password_file"
			}
			t.errorf(key, "set without username")
		case username == "":
		case hasEnv && hasFile:
			t.errorf("password_file", "set only one of password_env and password_file")
		case hasEnv && !reads:
			t.secretNamed("password_env", env)
		case hasFile && !reads:
			t.secretNamed("password_file", file)
		case hasEnv:
			if env == "" {
				t.errorf("password_env", "must name an environment variable")
			} else if u.Password = os.Getenv(env); u.Password == "" {
				t.errorf("password_env", "environment variable %s is not set or empty", env)
			}
		case hasFile:
			if data := t.readFile("password_file", file); data != nil {
				u.Password = passwordValue(data)
				if u.Password == "" {
					t.errorf("password_file", "%s is empty", file)
				}
			}
		case !t.has("password_env") && !t.has("password_file") && !usesOAuth(t):
			t.errorf("password_env", "username is set: give password_env or password_file")
		}
		var files SecretFiles
		if hasFile && username != "" && !usesOAuth(t) {
			files.Password = file
		}
		upstreamOAuth(t, &u, &files)
		if files != (SecretFiles{}) {
			if secrets == nil {
				secrets = map[string]SecretFiles{}
			}
			secrets[u.Name] = files
		}

		if f, ok := t.str("ca_file"); ok {
			u.RootCAs = t.caPool("ca_file", f)
		}
		u.MaxConnections = t.integer("max_connections", DefaultUpstreamConnections, 1)
		if s, ok := t.str("rate_limit"); ok {
			if s == "none" {
				// Lifts a provider profile's default.
				u.RateLimit = upstream.Rate{}
			} else if r, err := ParseRate(s); err != nil {
				t.errorf("rate_limit", "%v", err)
			} else {
				u.RateLimit = r
			}
		}
		if a, ok := t.str("dsn_from"); ok {
			if err := CheckMailbox(a); err != nil {
				t.errorf("dsn_from", "%v", err)
			} else {
				u.DSNFrom = a
			}
		}
		p.senderRewrite(t, &u, dkimKeys)
		if hasProf {
			checkProviderRules(t, prof, u)
			// With OAuth credentials and no mechanism chosen, take the
			// provider's (Microsoft 365: XOAUTH2) rather than probing.
			if u.Auth == "" && u.OAuth != nil && prof.Auth != "" && prof.Auth != upstream.AuthPassword {
				u.Auth = prof.Auth
			}
			if providers == nil {
				providers = map[string]string{}
			}
			providers[u.Name] = prof.Name
		}
		t.done()
		out = append(out, u)
	}
	return out, providers, secrets
}

// oauthKeys are the [[upstream]] keys of an OAuth2 login.
var oauthKeys = []string{
	"oauth_token_url", "oauth_client_id", "oauth_client_secret_file", "oauth_refresh_token_file",
	"oauth_scopes", "oauth_service_account_file", "oauth_subject", "oauth_client_credentials",
}

// usesOAuth reports whether an [[upstream]] logs in with OAuth2: auth
// names an OAuth2 mechanism, or auth is left out and an oauth_* key is
// set. It reads the table without reporting anything.
func usesOAuth(t *table) bool {
	if v, ok := t.m["auth"]; ok {
		mode, _ := v.(string)
		return upstream.AuthMode(mode) == upstream.AuthXOAUTH2 || upstream.AuthMode(mode) == upstream.AuthOAuthBearer
	}
	for _, k := range oauthKeys {
		if _, ok := t.m[k]; ok {
			return true
		}
	}
	return false
}

// upstreamOAuth reads an [[upstream]]'s auth key and, for an OAuth2 login,
// where its tokens come from: a refresh token, a Google service account,
// or Microsoft's client credentials. Secrets come from files only.
func upstreamOAuth(t *table, u *upstream.Upstream, files *SecretFiles) {
	reads := t.readsSecret("upstream " + u.Name)
	var present []string
	for _, k := range oauthKeys {
		if t.has(k) {
			present = append(present, k)
		}
	}
	for _, k := range []string{"oauth_client_secret", "oauth_refresh_token"} {
		if t.has(k) {
			t.errorf(k, "secrets never live in the config file; use %s_file", k)
		}
	}
	if mode, ok := t.str("auth"); ok {
		switch upstream.AuthMode(mode) {
		case upstream.AuthPassword:
			u.Auth = upstream.AuthPassword
			for _, k := range present {
				t.errorf(k, `not used with auth = "password"`)
			}
			return
		case upstream.AuthXOAUTH2, upstream.AuthOAuthBearer:
			u.Auth = upstream.AuthMode(mode)
		default:
			t.errorf("auth", `must be "password", "xoauth2" or "oauthbearer", not %q`, mode)
			return
		}
	} else if !usesOAuth(t) {
		return
	}
	// Left out, auth stays "": OAUTHBEARER where offered, else XOAUTH2
	// (or the provider profile's choice).

	for _, k := range []string{"password_env", "password_file"} {
		if t.has(k) {
			t.errorf(k, "not used with OAuth2 (oauth_* keys, auth = \"xoauth2\" or \"oauthbearer\"); remove it")
		}
	}
	u.Password = ""
	if u.Username == "" {
		t.errorf("username", "required with OAuth2: the mailbox the token is for")
	}

	refreshFile, hasRefresh := t.str("oauth_refresh_token_file")
	saFile, hasSA := t.str("oauth_service_account_file")
	clientCreds := t.boolean("oauth_client_credentials", false)
	var flows []string
	for _, f := range []struct {
		key string
		set bool
	}{{"oauth_refresh_token_file", hasRefresh}, {"oauth_service_account_file", hasSA}, {"oauth_client_credentials", clientCreds}} {
		if f.set {
			flows = append(flows, f.key)
		}
	}
	switch len(flows) {
	case 0:
		t.errorf("oauth_refresh_token_file", "OAuth2 needs one source of tokens: oauth_refresh_token_file, oauth_service_account_file or oauth_client_credentials = true")
		return
	case 1:
	default:
		t.errorf(flows[1], "set only one of oauth_refresh_token_file, oauth_service_account_file and oauth_client_credentials = true")
		return
	}

	o := &upstream.OAuth{}
	tokenURL, hasURL := t.str("oauth_token_url")
	if hasURL {
		if err := checkTokenURL(tokenURL); err != nil {
			t.errorf("oauth_token_url", "%v", err)
		}
		o.TokenURL = tokenURL
	}
	clientID, hasID := t.str("oauth_client_id")
	if hasID && clientID == "" {
		t.errorf("oauth_client_id", "must not be empty")
	}
	o.ClientID = clientID
	secretFile, hasSecret := t.str("oauth_client_secret_file")
	if hasSecret {
		o.ClientSecret = t.secretFile("oauth_client_secret_file", secretFile, reads)
		files.OAuthClientSecret = secretFile
	}
	if scopes, ok := t.strings("oauth_scopes"); ok {
		for i, s := range scopes {
			if s == "" || strings.ContainsAny(s, " \t\"\\") {
				// RFC 6749 section 3.3: scope tokens are separated by spaces.
				t.errorf(fmt.Sprintf("oauth_scopes[%d]", i), "%q is not a scope", s)
			}
		}
		o.Scopes = scopes
	}
	subject, hasSubject := t.str("oauth_subject")
	if hasSubject && !hasSA {
		t.errorf("oauth_subject", "only used with oauth_service_account_file (domain-wide delegation)")
	}

	switch {
	case hasSA:
		if !reads {
			t.secretNamed("oauth_service_account_file", saFile)
		} else if data := t.readFile("oauth_service_account_file", saFile); data != nil {
			sa, err := upstream.ParseServiceAccount(data)
			if err != nil {
				t.errorf("oauth_service_account_file", "%s: %v", saFile, err)
			} else if !hasURL {
				if err := checkTokenURL(sa.TokenURI); err != nil {
					t.errorf("oauth_service_account_file", "%s: token_uri: %v", saFile, err)
				}
			}
			o.ServiceAccount = sa
		}
		files.OAuthServiceAccount = saFile
		for _, k := range []string{"oauth_client_id", "oauth_client_secret_file"} {
			if t.has(k) {
				t.errorf(k, "not used with oauth_service_account_file: the key identifies the client")
			}
		}
		// The service account acts for a mailbox, by default the login.
		o.Subject = u.Username
		if hasSubject {
			if err := CheckMailbox(subject); err != nil {
				t.errorf("oauth_subject", "%v", err)
			}
			o.Subject = subject
		}
	case clientCreds:
		o.ClientCredentials = true
		for _, k := range []string{"oauth_token_url", "oauth_client_id", "oauth_client_secret_file"} {
			if !t.has(k) {
				t.errorf(k, "required with oauth_client_credentials")
			}
		}
	case hasRefresh:
		o.RefreshToken = t.secretFile("oauth_refresh_token_file", refreshFile, reads)
		files.OAuthRefreshToken = refreshFile
		// The client secret may be left out for a public client.
		for _, k := range []string{"oauth_token_url", "oauth_client_id"} {
			if !t.has(k) {
				t.errorf(k, "required with oauth_refresh_token_file")
			}
		}
		if t.has("oauth_scopes") {
			t.errorf("oauth_scopes", "not used with oauth_refresh_token_file: a refresh token keeps the scopes it was granted")
		}
	}
	u.OAuth = o
}

// secretFile reads a secret from the file named by key k: its content
// without surrounding white space, which must not be empty. Unless reads,
// the file is only checked to be named.
func (t *table) secretFile(k, path string, reads bool) string {
	if !reads {
		t.secretNamed(k, path)
		return ""
	}
	data := t.readFile(k, path)
	if data == nil {
		return ""
	}
	s := strings.TrimSpace(string(data))
	if s == "" {
		t.errorf(k, "%s is empty", path)
	}
	return s
}

// checkTokenURL accepts an OAuth2 token endpoint: https, or http to a
// loopback address (tests), since the request carries the client's
// secrets (RFC 6749 section 3.2).
func checkTokenURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.User != nil {
		return fmt.Errorf("%q is not a URL such as \"https://oauth2.googleapis.com/token\"", s)
	}
	switch {
	case u.Scheme == "https":
		return nil
	case u.Scheme == "http" && isLoopbackHost(net.JoinHostPort(u.Hostname(), "0")):
		return nil
	}
	return fmt.Errorf("%q: want https:// (http:// only to a loopback address)", s)
}

// upstreamProvider reads an upstream's provider and region keys. ok is
// false without a provider, or with one that is not known (reported).
func upstreamProvider(t *table) (prof upstream.Provider, region string, ok bool) {
	name, named := t.str("provider")
	region, hasRegion := t.str("region")
	if !named {
		if hasRegion {
			t.errorf("region", `set without provider; only provider = "ses" takes a region`)
		}
		return upstream.Provider{}, "", false
	}
	prof, ok = upstream.LookupProvider(name)
	if !ok {
		t.errorf("provider", "unknown provider %q; known: %s", name, strings.Join(upstream.ProviderNames(), ", "))
		return upstream.Provider{}, "", false
	}
	if hasRegion {
		switch {
		case !prof.Regional():
			t.errorf("region", "provider %q has one address for every region; leave region out", name)
			region = ""
		case strings.Contains(region, ".") || !ValidDomain(region):
			// It becomes one label of the host name.
			t.errorf("region", `%q is not a region name such as "us-east-1"`, region)
			region = ""
		}
	}
	return prof, region, true
}

// senderRewrite reads envelope_from and header_from_rewrite into u.
func (p *parser) senderRewrite(t *table, u *upstream.Upstream, dkimKeys []dkim.Key) {
	if a, ok := t.str("envelope_from"); ok {
		if err := CheckMailbox(a); err != nil {
			t.errorf("envelope_from", "%v", err)
		} else {
			u.EnvelopeFrom = a
		}
	}
	u.HeaderFromRewrite = t.boolean("header_from_rewrite", false)
	if !u.HeaderFromRewrite {
		return
	}
	switch {
	case !t.has("envelope_from"):
		t.errorf("header_from_rewrite", "needs envelope_from: the address the header From: is rewritten to")
	case len(dkimKeys) > 0:
		// Signing happens once, at the door, over From:. Signing again
		// after the rewrite would need a key for envelope_from's domain
		// at delivery time; refusing is the choice that cannot leave
		// with a broken signature.
		t.errorf("header_from_rewrite", "refused while [[dkim]] keys are configured: messages are DKIM-signed at the door "+
			"over their From: field, and rewriting it afterwards would break the signature (and DMARC); "+
			"use envelope_from alone, which changes only MAIL FROM and keeps the signature valid")
	}
}

// checkProviderRules reports an upstream that its provider would refuse
// to carry mail for.
func checkProviderRules(t *table, prof upstream.Provider, u upstream.Upstream) {
	// An OAuth2 login reports its own missing username.
	if prof.Auth != "" && !t.has("username") && !usesOAuth(t) {
		t.errorf("username", "required: provider %q needs SMTP AUTH (%s)", prof.Name, prof.Auth)
	}
	if prof.SenderMustBeLogin && !t.has("envelope_from") && !t.has("dsn_from") {
		login := "the login's address"
		if strings.Contains(u.Username, "@") {
			login = strconv.Quote(u.Username)
		}
		t.errorf("envelope_from", "provider %q accepts only the login's own address as MAIL FROM, and refuses <>: "+
			"set envelope_from = %s to send every message from it (the header From: is kept), "+
			"or at least dsn_from = %s so that bounces can leave (users may then send only as the login)",
			prof.Name, login, login)
	}
}

// caPool is the system roots plus the certificates in file, so that a
// private CA adds trust without removing the public one.
func (t *table) caPool(key, file string) *x509.CertPool {
	data := t.readFile(key, file)
	if data == nil {
		return nil
	}
	var certs []*x509.Certificate
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.errorf(key, "%s: %v", file, err)
			return nil
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		t.errorf(key, "%s holds no PEM certificate", file)
		return nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool
}

// ParseRate parses "N/duration", e.g. "2000/24h" or "10/1s"; a bare unit
// ("300/h") means one of it. N and the duration must be positive.
func ParseRate(s string) (upstream.Rate, error) {
	num, per, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return upstream.Rate{}, fmt.Errorf(`rate %q: want N/duration, e.g. "2000/24h"`, s)
	}
	n, err := strconv.Atoi(strings.TrimSpace(num))
	if err != nil || n <= 0 {
		return upstream.Rate{}, fmt.Errorf("rate %q: %q is not a positive whole number", s, num)
	}
	per = strings.TrimSpace(per)
	if per != "" && (per[0] < '0' || per[0] > '9') && per[0] != '.' {
		per = "1" + per
	}
	d, err := time.ParseDuration(per)
	if err != nil || d <= 0 {
		return upstream.Rate{}, fmt.Errorf("rate %q: %q is not a positive duration such as 1s, 1h, 24h", s, per)
	}
	return upstream.Rate{N: n, Per: d}, nil
}
