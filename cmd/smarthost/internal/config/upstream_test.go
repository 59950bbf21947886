package config_test

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/internal/mailproto"
	"smarthost/relay/upstream"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		in   string
		want upstream.Rate
		ok   bool
	}{
		{"2000/24h", upstream.Rate{N: 2000, Per: 24 * time.Hour}, true},
		{"10/1s", upstream.Rate{N: 10, Per: time.Second}, true},
		{"300/1h", upstream.Rate{N: 300, Per: time.Hour}, true},
		{"300/h", upstream.Rate{N: 300, Per: time.Hour}, true},
		{"5/90m", upstream.Rate{N: 5, Per: 90 * time.Minute}, true},
		{" 1 / 1m ", upstream.Rate{N: 1, Per: time.Minute}, true},
		{"", upstream.Rate{}, false},
		{"100", upstream.Rate{}, false},
		{"/1h", upstream.Rate{}, false},
		{"0/1h", upstream.Rate{}, false},
		{"-1/1h", upstream.Rate{}, false},
		{"1.5/1h", upstream.Rate{}, false},
		{"10/", upstream.Rate{}, false},
		{"10/0s", upstream.Rate{}, false},
		{"10/-1s", upstream.Rate{}, false},
		{"10/day", upstream.Rate{}, false},
		{"10/1h/2", upstream.Rate{}, false},
		{"ten/1h", upstream.Rate{}, false},
	}
	for _, tt := range tests {
		got, err := config.ParseRate(tt.in)
		if tt.ok && (err != nil || got != tt.want) {
			t.Errorf("ParseRate(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
		}
		if !tt.ok && err == nil {
			t.Errorf("ParseRate(%q) = %+v, want an error", tt.in, got)
		}
	}
}

// providerUpstream is an [[upstream]] named "up" with the given lines.
func providerUpstream(lines ...string) string {
	return "[[upstream]]\nname = \"up\"\n" + strings.Join(lines, "\n")
}

// TestParseConfigProviderFill: provider = "…" fills the address, TLS mode
// and rate limit of every profile, and the configuration may leave them out.
func TestParseConfigProviderFill(t *testing.T) {
	f := configtest.NewFiles(t)
	for _, name := range upstream.ProviderNames() {
		t.Run(name, func(t *testing.T) {
			prof, _ := upstream.LookupProvider(name)
			region := ""
			lines := []string{
				`provider = "` + name + `"`,
				`username = "relay@example.com"`,
				`password_file = "{{PWFILE}}"`,
				`envelope_from = "relay@example.com"`,
			}
			if prof.Regional() {
				region = "eu-central-1"
				lines = append(lines, `region = "`+region+`"`)
			}
			cfg := configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(lines...)}))
			u := cfg.Upstreams[0]
			want := prof.Upstream("up", region)
			if u.Name != "up" || u.Address != want.Address || u.Address == "" || u.TLS != want.TLS || u.RateLimit != want.RateLimit {
				t.Errorf("upstream %+v, want the profile's %+v", u, want)
			}
			if u.Username != "relay@example.com" || u.Password != "s3cret" || u.EnvelopeFrom != "relay@example.com" ||
				u.DSNFrom != "" || u.HeaderFromRewrite || u.MaxConnections != config.DefaultUpstreamConnections {
				t.Errorf("upstream %+v", u)
			}
		})
	}

	// The documented figures, spelled out for the acceptance case.
	cfg := configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "yandex"`, `username = "relay@example.ru"`, `password_file = "{{PWFILE}}"`, `dsn_from = "relay@example.ru"`)}))
	u := cfg.Upstreams[0]
	if u.Address != "smtp.yandex.ru:465" || u.TLS != mailproto.TLSImplicit || u.RateLimit != (upstream.Rate{N: 500, Per: 24 * time.Hour}) ||
		u.DSNFrom != "relay@example.ru" || u.EnvelopeFrom != "" {
		t.Errorf("yandex upstream %+v", u)
	}
	cfg = configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "ses"`, `region = "us-east-1"`, `username = "AKIAEXAMPLE"`, `password_file = "{{PWFILE}}"`)}))
	if got := cfg.Upstreams[0].Address; got != "email-smtp.us-east-1.amazonaws.com:587" {
		t.Errorf("ses address %q", got)
	}
}

// TestParseConfigProviderOverrides: every key given explicitly wins over
// the profile.
func TestParseConfigProviderOverrides(t *testing.T) {
	f := configtest.NewFiles(t)
	cfg := configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "gmail"`,
		`address = "smtp.gmail.com:587"`,
		`tls = "starttls"`,
		`rate_limit = "2000/24h"`,
		`username = "relay@example.com"`,
		`password_file = "{{PWFILE}}"`,
		`max_connections = 2`,
	)}))
	u := cfg.Upstreams[0]
	if u.Address != "smtp.gmail.com:587" || u.TLS != mailproto.TLSStartTLS || u.RateLimit != (upstream.Rate{N: 2000, Per: 24 * time.Hour}) || u.MaxConnections != 2 {
		t.Errorf("overrides not applied: %+v", u)
	}

	// "none" lifts the profile's rate limit; an address replaces a region.
	cfg = configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "ses"`,
		`address = "email-smtp.us-gov-west-1.amazonaws.com:465"`,
		`tls = "implicit"`,
		`rate_limit = "none"`,
		`username = "AKIAEXAMPLE"`,
		`password_file = "{{PWFILE}}"`,
	)}))
	u = cfg.Upstreams[0]
	if u.Address != "email-smtp.us-gov-west-1.amazonaws.com:465" || u.TLS != mailproto.TLSImplicit || u.RateLimit != (upstream.Rate{}) {
		t.Errorf("ses overrides not applied: %+v", u)
	}

	// A loopback test server may stand in for a provider.
	cfg = configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "yandex"`,
		`address = "127.0.0.1:2525"`,
		`tls = "none"`,
		`username = "relay@example.ru"`,
		`password_file = "{{PWFILE}}"`,
		`envelope_from = "relay@example.ru"`,
		`header_from_rewrite = true`,
	)}))
	u = cfg.Upstreams[0]
	if u.Address != "127.0.0.1:2525" || u.TLS != mailproto.TLSNone || u.EnvelopeFrom != "relay@example.ru" || !u.HeaderFromRewrite ||
		u.RateLimit != (upstream.Rate{N: 500, Per: 24 * time.Hour}) {
		t.Errorf("yandex on loopback: %+v", u)
	}

	// Without a provider, envelope_from works on any upstream; and the
	// Workspace relay may authorise by IP address, without a username.
	cfg = configtest.MustParse(t, f.Config(map[string]string{"upstream": configtest.Base("upstream") + "\nenvelope_from = \"relay@example.com\""}))
	if u := cfg.Upstreams[0]; u.EnvelopeFrom != "relay@example.com" || u.HeaderFromRewrite || u.RateLimit != (upstream.Rate{}) {
		t.Errorf("plain upstream with envelope_from: %+v", u)
	}
	cfg = configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(`provider = "google-workspace-relay"`)}))
	if u := cfg.Upstreams[0]; u.Address != "smtp-relay.gmail.com:587" || u.Username != "" {
		t.Errorf("workspace relay: %+v", u)
	}
}

func TestParseConfigProviderRules(t *testing.T) {
	f := configtest.NewFiles(t)
	t.Setenv("SMARTHOST_TEST_PW", "x")
	const login = `username = "relay@example.ru"` + "\n" + `password_env = "SMARTHOST_TEST_PW"`
	tests := []struct {
		name     string
		upstream string
		key, msg string
	}{
		{"unknown provider", providerUpstream(`provider = "gmial"`, login), "upstream[0].provider",
			`unknown provider "gmial"; known: gmail, google-workspace-relay, mailgun, mailru, outlook365, ses, yahoo, yandex`},
		{"provider wrong type", providerUpstream(`provider = 1`, login), "upstream[0].provider", "must be a string"},
		{"yandex without envelope_from or dsn_from", providerUpstream(`provider = "yandex"`, login), "upstream[0].envelope_from",
			`provider "yandex" accepts only the login's own address as MAIL FROM, and refuses <>: set envelope_from = "relay@example.ru"`},
		{"mailru without envelope_from or dsn_from", providerUpstream(`provider = "mailru"`, login), "upstream[0].envelope_from",
			`or at least dsn_from = "relay@example.ru"`},
		{"provider without username", providerUpstream(`provider = "gmail"`), "upstream[0].username", `provider "gmail" needs SMTP AUTH`},
		{"ses without region or address", providerUpstream(`provider = "ses"`, login), "upstream[0].region", `needs region (e.g. "us-east-1") or address`},
		{"ses bad region", providerUpstream(`provider = "ses"`, `region = "us-east-1.evil.example"`, login), "upstream[0].region", "not a region name"},
		{"region on a fixed provider", providerUpstream(`provider = "gmail"`, `region = "us-east-1"`, login), "upstream[0].region", "leave region out"},
		{"region without provider", configtest.Base("upstream") + "\nregion = \"us-east-1\"", "upstream[0].region", "set without provider"},
		{"provider address plain text", providerUpstream(`provider = "gmail"`, `tls = "none"`, login), "upstream[0].tls", "smtp.gmail.com:465 is not a loopback address"},
		{"bad override", providerUpstream(`provider = "gmail"`, `address = "smtp.gmail.com"`, login), "upstream[0].address", "host:port"},
		{"rate_limit junk with provider", providerUpstream(`provider = "gmail"`, `rate_limit = "lots"`, login), "upstream[0].rate_limit", "N/duration"},
		{"envelope_from no at", configtest.Base("upstream") + "\nenvelope_from = \"relay\"", "upstream[0].envelope_from", "not an address"},
		{"envelope_from pattern", configtest.Base("upstream") + "\nenvelope_from = \"*@example.com\"", "upstream[0].envelope_from", "is a pattern"},
		{"envelope_from display name", configtest.Base("upstream") + "\nenvelope_from = \"Relay <relay@example.com>\"", "upstream[0].envelope_from", "not a domain name"},
		{"envelope_from wrong type", configtest.Base("upstream") + "\nenvelope_from = true", "upstream[0].envelope_from", "must be a string"},
		{"header_from_rewrite without envelope_from", configtest.Base("upstream") + "\nheader_from_rewrite = true", "upstream[0].header_from_rewrite", "needs envelope_from"},
		{"header_from_rewrite wrong type", configtest.Base("upstream") + "\nheader_from_rewrite = \"yes\"", "upstream[0].header_from_rewrite", "true or false"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errs := parseErrors(t, f.Config(map[string]string{"upstream": tt.upstream}))
			requireError(t, errs, tt.key, tt.msg)
		})
	}

	// An unknown provider is reported once, not as a missing address and
	// TLS mode too.
	errs := parseErrors(t, f.Config(map[string]string{"upstream": providerUpstream(`provider = "gmial"`, login)}))
	if len(errs) != 1 {
		t.Errorf("want only the provider error, got:\n%v", errs)
	}

	// Rewriting From: would break the signature made at the door.
	errs = parseErrors(t, f.Config(map[string]string{
		"dkim":     dkimEntry(""),
		"upstream": configtest.Base("upstream") + "\nenvelope_from = \"relay@example.com\"\nheader_from_rewrite = true",
	}))
	requireError(t, errs, "upstream[0].header_from_rewrite", "refused while [[dkim]] keys are configured")
	requireError(t, errs, "upstream[0].header_from_rewrite", "use envelope_from alone")
}

// oauthFiles are the secret files of OAuth2 upstream configurations.
type oauthFiles struct {
	secret, refresh, sa, saHTTP, saBad string
}

func newOAuthFiles(t *testing.T, f *configtest.Files) oauthFiles {
	t.Helper()
	dir := t.TempDir()
	key, err := os.ReadFile(f.DKIMRSA) // any RSA key will do
	if err != nil {
		t.Fatal(err)
	}
	saKey := func(tokenURI string) string {
		data, err := json.Marshal(map[string]string{
			"type": "service_account", "client_email": "relay@project.iam.gserviceaccount.com",
			"private_key": string(key), "private_key_id": "k1", "token_uri": tokenURI,
		})
		if err != nil {
			t.Fatal(err)
		}
		return string(data)
	}
	return oauthFiles{
		secret:  configtest.WriteFile(t, dir, "client-secret", "GOCSPX-secret\n"),
		refresh: configtest.WriteFile(t, dir, "refresh-token", "1//refresh\r\n"),
		sa:      configtest.WriteFile(t, dir, "sa.json", saKey("https://oauth2.googleapis.com/token")),
		saHTTP:  configtest.WriteFile(t, dir, "sa-http.json", saKey("http://oauth2.example.com/token")),
		saBad:   configtest.WriteFile(t, dir, "sa-bad.json", `{"type": "authorized_user"}`),
	}
}

func (o oauthFiles) expand(s string) string {
	return strings.NewReplacer("{{SECRET}}", o.secret, "{{REFRESH}}", o.refresh,
		"{{SA}}", o.sa, "{{SAHTTP}}", o.saHTTP, "{{SABAD}}", o.saBad).Replace(s)
}

func TestParseConfigUpstreamOAuth(t *testing.T) {
	f := configtest.NewFiles(t)
	of := newOAuthFiles(t, f)
	t.Setenv("SMARTHOST_TEST_PW", "x")
	base := configtest.Base("upstream") + "\nusername = \"relay@example.com\"\n"
	refresh := base + `oauth_token_url = "https://oauth2.googleapis.com/token"
oauth_client_id = "id.apps.googleusercontent.com"
oauth_client_secret_file = "{{SECRET}}"
oauth_refresh_token_file = "{{REFRESH}}"
`
	clientCreds := base + `oauth_client_credentials = true
oauth_token_url = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"
oauth_client_id = "app-id"
oauth_client_secret_file = "{{SECRET}}"
`
	parse := func(t *testing.T, upstream string) upstream.Upstream {
		t.Helper()
		return configtest.MustParse(t, of.expand(f.Config(map[string]string{"upstream": upstream}))).Upstreams[0]
	}

	t.Run("refresh token", func(t *testing.T) {
		u := parse(t, refresh)
		want := &upstream.OAuth{TokenURL: "https://oauth2.googleapis.com/token", ClientID: "id.apps.googleusercontent.com",
			ClientSecret: "GOCSPX-secret", RefreshToken: "1//refresh"}
		if u.Auth != "" || u.Password != "" || !reflect.DeepEqual(u.OAuth, want) {
			t.Errorf("auth %q, password %q, OAuth %+v; want OAuth %+v", u.Auth, u.Password, u.OAuth, want)
		}
	})
	t.Run("public client, mechanism named", func(t *testing.T) {
		u := parse(t, strings.Replace(refresh, "oauth_client_secret_file = \"{{SECRET}}\"\n", "auth = \"oauthbearer\"\n", 1))
		if u.Auth != upstream.AuthOAuthBearer || u.OAuth == nil || u.OAuth.ClientSecret != "" || u.OAuth.RefreshToken != "1//refresh" {
			t.Errorf("auth %q, OAuth %+v", u.Auth, u.OAuth)
		}
	})
	t.Run("service account", func(t *testing.T) {
		u := parse(t, base+"auth = \"xoauth2\"\noauth_service_account_file = \"{{SA}}\"\n")
		o := u.OAuth
		if u.Auth != upstream.AuthXOAUTH2 || o == nil || o.ServiceAccount == nil || o.Subject != "relay@example.com" ||
			o.ServiceAccount.TokenURI != "https://oauth2.googleapis.com/token" || o.TokenURL != "" {
			t.Errorf("auth %q, OAuth %+v", u.Auth, o)
		}
		u = parse(t, base+"oauth_service_account_file = \"{{SAHTTP}}\"\noauth_subject = \"other@example.com\"\n"+
			"oauth_token_url = \"https://oauth2.googleapis.com/token\"\noauth_scopes = [\"https://mail.google.com/\"]\n")
		if o := u.OAuth; o.Subject != "other@example.com" || o.TokenURL != "https://oauth2.googleapis.com/token" || !slices.Equal(o.Scopes, []string{"https://mail.google.com/"}) {
			t.Errorf("OAuth %+v", o)
		}
	})
	t.Run("client credentials", func(t *testing.T) {
		u := parse(t, clientCreds)
		o := u.OAuth
		if o == nil || !o.ClientCredentials || o.ClientID != "app-id" || o.ClientSecret != "GOCSPX-secret" || o.Scopes != nil {
			t.Errorf("OAuth %+v", o)
		}
	})
	t.Run("password", func(t *testing.T) {
		u := parse(t, base+"auth = \"password\"\npassword_env = \"SMARTHOST_TEST_PW\"\n")
		if u.Auth != upstream.AuthPassword || u.Password != "x" || u.OAuth != nil {
			t.Errorf("auth %q, password %q, OAuth %+v", u.Auth, u.Password, u.OAuth)
		}
	})

	tests := []struct {
		name, upstream, key, msg string
	}{
		{"client secret inline", refresh + "oauth_client_secret = \"s\"\n", "oauth_client_secret", "use oauth_client_secret_file"},
		{"refresh token inline", base + "oauth_refresh_token = \"r\"\n", "oauth_refresh_token", "use oauth_refresh_token_file"},
		{"with a password", refresh + "password_env = \"SMARTHOST_TEST_PW\"\n", "password_env", "not used with OAuth2"},
		{"with a password file", refresh + "password_file = \"{{PWFILE}}\"\n", "password_file", "not used with OAuth2"},
		{"no username", strings.Replace(refresh, "username = \"relay@example.com\"\n", "", 1), "username", "required with OAuth2"},
		{"mechanism without tokens", base + "auth = \"xoauth2\"\n", "oauth_refresh_token_file", "one source of tokens"},
		{"two flows", refresh + "oauth_service_account_file = \"{{SA}}\"\n", "oauth_service_account_file", "only one"},
		{"refresh and client credentials", clientCreds + "oauth_refresh_token_file = \"{{REFRESH}}\"\n", "oauth_client_credentials", "only one"},
		{"refresh without token URL", strings.Replace(refresh, "oauth_token_url", "# ", 1), "oauth_token_url", "required with oauth_refresh_token_file"},
		{"refresh without client", strings.Replace(refresh, "oauth_client_id", "# ", 1), "oauth_client_id", "required with oauth_refresh_token_file"},
		{"refresh token missing", strings.Replace(refresh, "{{REFRESH}}", "{{MISSING}}", 1), "oauth_refresh_token_file", "no such file"},
		{"refresh token empty", strings.Replace(refresh, "{{REFRESH}}", "{{EMPTY}}", 1), "oauth_refresh_token_file", "is empty"},
		{"client secret missing", strings.Replace(refresh, "{{SECRET}}", "{{MISSING}}", 1), "oauth_client_secret_file", "no such file"},
		{"refresh with scopes", refresh + "oauth_scopes = [\"x\"]\n", "oauth_scopes", "keeps the scopes"},
		{"client credentials without secret", strings.Replace(clientCreds, "oauth_client_secret_file", "# ", 1), "oauth_client_secret_file", "required with oauth_client_credentials"},
		{"client credentials without token URL", strings.Replace(clientCreds, "oauth_token_url", "# ", 1), "oauth_token_url", "required with oauth_client_credentials"},
		{"client credentials not bool", base + "oauth_client_credentials = \"yes\"\n", "oauth_client_credentials", "true or false"},
		{"service account with client", base + "oauth_service_account_file = \"{{SA}}\"\noauth_client_id = \"x\"\n", "oauth_client_id", "not used with oauth_service_account_file"},
		{"service account not a key", base + "oauth_service_account_file = \"{{SABAD}}\"\n", "upstream[0].oauth_service_account_file", `"authorized_user"`},
		{"service account missing", base + "oauth_service_account_file = \"{{MISSING}}\"\n", "oauth_service_account_file", "no such file"},
		{"service account plain-text token_uri", base + "oauth_service_account_file = \"{{SAHTTP}}\"\n", "oauth_service_account_file", "token_uri"},
		{"subject without service account", refresh + "oauth_subject = \"a@example.com\"\n", "oauth_subject", "only used with oauth_service_account_file"},
		{"subject not an address", base + "oauth_service_account_file = \"{{SA}}\"\noauth_subject = \"relay\"\n", "oauth_subject", "not an address"},
		{"token URL plain text", strings.Replace(refresh, "https://oauth2", "http://oauth2", 1), "oauth_token_url", "want https://"},
		{"token URL junk", strings.Replace(refresh, "https://oauth2.googleapis.com/token", "oauth2.googleapis.com", 1), "oauth_token_url", "not a URL"},
		{"bad scope", clientCreds + "oauth_scopes = [\"a b\"]\n", "oauth_scopes[0]", "not a scope"},
		{"unknown auth", base + "auth = \"cram-md5\"\npassword_env = \"SMARTHOST_TEST_PW\"\n", "auth", `not "cram-md5"`},
		{"password with oauth keys", refresh + "auth = \"password\"\n", "oauth_client_id", `not used with auth = "password"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errs := parseErrors(t, of.expand(f.Config(map[string]string{"upstream": tt.upstream})))
			key := tt.key
			if !strings.HasPrefix(key, "upstream[0].") {
				key = "upstream[0]." + key
			}
			requireError(t, errs, key, tt.msg)
			for _, e := range errs {
				if strings.Contains(e.Msg, "GOCSPX-secret") || strings.Contains(e.Msg, "1//refresh") || strings.Contains(e.Msg, "PRIVATE KEY") {
					t.Errorf("error shows a secret: %v", e)
				}
			}
		})
	}

	// The http scheme is allowed to a loopback token endpoint, for tests.
	u := parse(t, strings.Replace(refresh, "https://oauth2.googleapis.com/token", "http://127.0.0.1:8080/token", 1))
	if u.OAuth == nil || u.OAuth.TokenURL != "http://127.0.0.1:8080/token" {
		t.Errorf("loopback token URL: %+v", u.OAuth)
	}
}

// TestExampleConfigOAuth: each OAuth2 alternative that config.toml.example
// documents for the gmail upstream is valid when switched on in place of
// its password.
func TestExampleConfigOAuth(t *testing.T) {
	f := configtest.NewFiles(t)
	of := newOAuthFiles(t, f)
	text := strings.NewReplacer(
		"/run/secrets/gmail-client-secret", of.secret,
		"/run/secrets/gmail-refresh-token", of.refresh,
		"/run/secrets/gmail-sa.json", of.sa,
	).Replace(exampleConfig(t, f))
	for _, k := range config.OAuthKeys {
		if !regexp.MustCompile(`(?m)^#   ` + k + ` = `).MatchString(text) {
			t.Errorf("config.toml.example does not document %s", k)
		}
	}

	// enable drops the gmail upstream's password and uncomments the
	// documented lines that start with each of lines.
	enable := func(t *testing.T, lines ...string) *config.Config {
		t.Helper()
		const pw = "\npassword_env = \"GMAIL_APP_PASSWORD\""
		if !strings.Contains(text, pw) {
			t.Fatal("the gmail upstream has no password_env line")
		}
		out := strings.Replace(text, pw, "\n# password_env dropped:", 1)
		for _, l := range lines {
			i := strings.Index(out, "\n#   "+l)
			if i < 0 {
				t.Fatalf("config.toml.example has no line %q", "#   "+l)
			}
			out = out[:i+1] + out[i+5:]
		}
		return configtest.MustParse(t, out)
	}
	gmail := func(cfg *config.Config) upstream.Upstream { return cfg.Upstreams[0] }

	t.Run("refresh token", func(t *testing.T) {
		u := gmail(enable(t, `oauth_token_url = "https://oauth2`, "oauth_client_id", "oauth_client_secret_file", "oauth_refresh_token_file"))
		if u.Name != "gmail" || u.Password != "" || u.OAuth == nil || u.OAuth.RefreshToken == "" || u.OAuth.ClientSecret == "" || u.Auth != "" {
			t.Errorf("gmail upstream %+v, OAuth %+v", u, u.OAuth)
		}
		u = gmail(enable(t, "auth = ", `oauth_token_url = "https://oauth2`, "oauth_client_id", "oauth_refresh_token_file"))
		if u.Auth != upstream.AuthXOAUTH2 || u.OAuth == nil || u.OAuth.ClientSecret != "" {
			t.Errorf("gmail upstream %+v, OAuth %+v", u, u.OAuth)
		}
	})
	t.Run("service account", func(t *testing.T) {
		u := gmail(enable(t, "oauth_service_account_file", "oauth_subject", "oauth_scopes"))
		if u.OAuth == nil || u.OAuth.ServiceAccount == nil || u.OAuth.Subject != "relay@example.com" || len(u.OAuth.Scopes) != 1 {
			t.Errorf("OAuth %+v", u.OAuth)
		}
	})
	t.Run("client credentials", func(t *testing.T) {
		u := gmail(enable(t, "oauth_client_credentials", `oauth_token_url = "https://login`, "oauth_client_id", "oauth_client_secret_file"))
		if u.OAuth == nil || !u.OAuth.ClientCredentials || !strings.HasPrefix(u.OAuth.TokenURL, "https://login.microsoftonline.com/") {
			t.Errorf("OAuth %+v", u.OAuth)
		}
	})
}

// TestParseConfigProviderAuth: with OAuth2 credentials and no auth key,
// an upstream takes its provider's mechanism; auth given explicitly wins.
func TestParseConfigProviderAuth(t *testing.T) {
	f := configtest.NewFiles(t)
	o365 := providerUpstream(
		`provider = "outlook365"`,
		`username = "relay@example.com"`,
		`envelope_from = "relay@example.com"`,
		`oauth_client_credentials = true`,
		`oauth_token_url = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"`,
		`oauth_client_id = "app-id"`,
		`oauth_client_secret_file = "{{PWFILE}}"`,
	)
	u := configtest.MustParse(t, f.Config(map[string]string{"upstream": o365})).Upstreams[0]
	if u.Auth != upstream.AuthXOAUTH2 || u.OAuth == nil || u.Address != "smtp.office365.com:587" || u.TLS != mailproto.TLSStartTLS {
		t.Errorf("outlook365 with OAuth2: %+v", u)
	}
	u = configtest.MustParse(t, f.Config(map[string]string{"upstream": o365 + "\nauth = \"oauthbearer\""})).Upstreams[0]
	if u.Auth != upstream.AuthOAuthBearer {
		t.Errorf("explicit auth: %q", u.Auth)
	}
	// A password login keeps the default mechanism choice.
	t.Setenv("SMARTHOST_TEST_PW", "x")
	u = configtest.MustParse(t, f.Config(map[string]string{"upstream": providerUpstream(
		`provider = "outlook365"`, `username = "relay@example.com"`, `password_env = "SMARTHOST_TEST_PW"`, `dsn_from = "relay@example.com"`,
	)})).Upstreams[0]
	if u.Auth != "" || u.OAuth != nil || u.Password != "x" {
		t.Errorf("outlook365 with a password: %+v", u)
	}
}
