package config_test

import (
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/relay"
	"smarthost/relay/upstream"
)

func parseErrors(t *testing.T, text string) config.Errors {
	t.Helper()
	cfg, err := config.Parse([]byte(text), "test.toml")
	if err == nil {
		t.Fatalf("Parse accepted:\n%s\ngot %+v", text, cfg)
	}
	if cfg != nil {
		t.Errorf("Parse returned a Config with an error")
	}
	var errs config.Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error is %T, not config.Errors: %v", err, err)
	}
	return errs
}

// requireError fails unless errs holds an error for key whose message
// contains msg.
func requireError(t *testing.T, errs config.Errors, key, msg string) {
	t.Helper()
	for _, e := range errs {
		if e.Key == key && strings.Contains(e.Msg, msg) {
			return
		}
	}
	t.Errorf("no error for key %q containing %q; got:\n%v", key, msg, errs)
}

func TestParseConfigMinimalDefaults(t *testing.T) {
	f := configtest.NewFiles(t)
	text := f.Expand(`
[[listen]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[[upstream]]
name = "local"
address = "localhost:2525"
tls = "none"

[[route]]
from_domain = "*"
upstreams = ["local"]
`)
	cfg := configtest.MustParse(t, text)
	host, err := os.Hostname()
	if err != nil {
		t.Skip("no system host name")
	}
	want := &config.Config{
		Path:      "test.toml",
		Hostname:  host,
		LogFormat: "text",
		LogLevel:  slog.LevelInfo,
		Queue: config.Queue{
			Path: "/var/lib/smarthost/queue.db", RetryMin: time.Minute, RetryMax: time.Hour,
			MaxAge: 120 * time.Hour, Bounce: true, Workers: 16,
			UpstreamCommandTimeout: 2 * time.Minute, UpstreamDataTimeout: 10 * time.Minute,
		},
		Listeners: []relay.Listener{{
			Name: "127.0.0.1:0", Address: "127.0.0.1:0", TLS: mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		}},
		Limits: relay.Limits{
			MaxMessageBytes: 25 << 20, MaxRecipients: 100, MaxConnections: 1000,
			MaxConnectionsPerIP: 20, AuthTimeout: time.Minute,
			AuthFailuresPerIP: 5, AuthFailureWindow: time.Minute,
			ReadTimeout: 5 * time.Minute, DataTimeout: 10 * time.Minute, MessageMemory: 16 << 20,
		},
		Upstreams:          []upstream.Upstream{{Name: "local", Address: "localhost:2525", TLS: mailproto.TLSNone, MaxConnections: 4}},
		Routes:             []upstream.Route{{FromDomain: "*", Upstreams: []string{"local"}}},
		HTTPAddress:        "127.0.0.1:9090",
		HTTPMaxConnections: 256,
		ShutdownTimeout:    25 * time.Second,
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got  %+v\nwant %+v", cfg, want)
	}
}

func TestParseConfigFull(t *testing.T) {
	f := configtest.NewFiles(t)
	t.Setenv("SMARTHOST_TEST_UP_PW", "from-env")
	t.Setenv("SMARTHOST_TEST_ADMIN", "token")
	text := f.Expand(`
hostname = "Relay.Example.com"
log_format = "json"
log_level = "DEBUG"

[queue]
path = "/tmp/q.db"
retry_min = "1s"
retry_max = "90m"
max_age = "2h"
bounce = false
workers = 3
upstream_command_timeout = "45s"
upstream_data_timeout = "5m"

[tls]
cert_file = "{{CERT}}"
key_file = "{{KEY}}"

[[listen]]
name = "sub"
address = ":465"
tls = "implicit"

[[listen]]
address = "[::1]:2525"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.1", "::ffff:10.0.0.0/104", "192.168.1.7/24", "203.0.113.0/24"]
allow_public_networks = true

[limits]
max_message_size = "512KB"
max_recipients = 7
max_connections = 9
max_connections_per_ip = 3
auth_timeout = "20s"
auth_failures_per_ip = 2
read_timeout = "30s"
data_timeout = "1m"
message_memory = "16MB"

[[user]]
name = "billing"
password_hash = "{{HASH}}"
allowed_from = ["Billing@Example.COM", "*@Notify.example.com", "*"]

[[dkim]]
domain = "Example.com"
selector = "s2026"
key_file = "{{DKIMRSA}}"

[[dkim]]
domain = "example.com."
selector = "Ed2026"
key_file = "{{DKIM}}"
headers = ["From", "To", "Subject", "list-unsubscribe"]
canonicalization = "simple"
expiration = "168h"
subdomains = true

[[dkim]]
domain = "example.org"
selector = "old.keys"
key_file = "{{DKIMPKCS1}}"
canonicalization = "simple/relaxed"

[[upstream]]
name = "primary"
address = "smtp.example.net:465"
tls = "implicit"
username = "relay@example.com"
password_env = "SMARTHOST_TEST_UP_PW"
ca_file = "{{CA}}"
max_connections = 2
rate_limit = "10/1s"
dsn_from = "Bounces@Example.com"

[[upstream]]
name = "backup"
address = "smtp.example.org:587"
tls = "starttls"
username = "relay"
password_file = "{{PWFILE}}"

[[route]]
from_domain = "EXAMPLE.com"
upstreams = ["primary", "backup"]

[[route]]
from_domain = "*"
upstreams = ["backup"]

[http]
address = ":9091"
admin_token_env = "SMARTHOST_TEST_ADMIN"
max_connections = 64
`)
	cfg := configtest.MustParse(t, text)

	if cfg.Hostname != "Relay.Example.com" || cfg.LogFormat != "json" || cfg.LogLevel != slog.LevelDebug {
		t.Errorf("top level: %q %q %v", cfg.Hostname, cfg.LogFormat, cfg.LogLevel)
	}
	wantQueue := config.Queue{Path: "/tmp/q.db", RetryMin: time.Second, RetryMax: 90 * time.Minute, MaxAge: 2 * time.Hour, Bounce: false, Workers: 3,
		UpstreamCommandTimeout: 45 * time.Second, UpstreamDataTimeout: 5 * time.Minute}
	if cfg.Queue != wantQueue {
		t.Errorf("queue = %+v, want %+v", cfg.Queue, wantQueue)
	}
	if cfg.TLSCertFile != f.PKI.CertFile || cfg.TLSKeyFile != f.PKI.KeyFile {
		t.Errorf("tls files = %q %q", cfg.TLSCertFile, cfg.TLSKeyFile)
	}
	wantListeners := []relay.Listener{
		{Name: "sub", Address: ":465", TLS: mailproto.TLSImplicit, AuthRequired: true},
		{Name: "[::1]:2525", Address: "[::1]:2525", TLS: mailproto.TLSNone, TrustedNetworks: []netip.Prefix{
			netip.MustParsePrefix("127.0.0.1/32"),
			netip.MustParsePrefix("10.0.0.0/8"),
			netip.MustParsePrefix("192.168.1.0/24"),
			netip.MustParsePrefix("203.0.113.0/24"),
		}},
	}
	if !reflect.DeepEqual(cfg.Listeners, wantListeners) {
		t.Errorf("listeners = %+v\nwant %+v", cfg.Listeners, wantListeners)
	}
	wantLimits := relay.Limits{MaxMessageBytes: 512 << 10, MaxRecipients: 7, MaxConnections: 9,
		MaxConnectionsPerIP: 3, AuthTimeout: 20 * time.Second, AuthFailuresPerIP: 2, AuthFailureWindow: time.Minute, ReadTimeout: 30 * time.Second, DataTimeout: time.Minute,
		MessageMemory: 16 << 20}
	if cfg.Limits != wantLimits {
		t.Errorf("limits = %+v, want %+v", cfg.Limits, wantLimits)
	}
	wantUsers := []relay.User{{Name: "billing", PasswordHash: []byte(f.Hash),
		AllowedFrom: []string{"Billing@example.com", "*@notify.example.com", "*"}}}
	if !reflect.DeepEqual(cfg.Users, wantUsers) {
		t.Errorf("users = %+v, want %+v", cfg.Users, wantUsers)
	}
	wantDKIM := []dkim.Key{
		{Domain: "example.com", Selector: "s2026", Signer: loadKey(t, f.DKIMRSA),
			HeaderCanonicalization: "relaxed", BodyCanonicalization: "relaxed"},
		{Domain: "example.com", Selector: "Ed2026", Signer: loadKey(t, f.DKIMKey),
			Headers:                []string{"From", "To", "Subject", "list-unsubscribe"},
			HeaderCanonicalization: "simple", BodyCanonicalization: "simple",
			Expiration: 168 * time.Hour, Subdomains: true},
		{Domain: "example.org", Selector: "old.keys", Signer: loadKey(t, f.DKIMPKCS1),
			HeaderCanonicalization: "simple", BodyCanonicalization: "relaxed"},
	}
	requireKeys(t, cfg.DKIM, wantDKIM)

	if len(cfg.Upstreams) != 2 {
		t.Fatalf("upstreams = %+v", cfg.Upstreams)
	}
	p, b := cfg.Upstreams[0], cfg.Upstreams[1]
	if p.Name != "primary" || p.Address != "smtp.example.net:465" || p.TLS != mailproto.TLSImplicit ||
		p.Username != "relay@example.com" || p.Password != "from-env" || p.MaxConnections != 2 {
		t.Errorf("primary = %+v", p)
	}
	if p.RootCAs == nil {
		t.Fatal("primary.RootCAs is nil with ca_file set")
	}
	// The pool must trust the test CA, so the test server certificate
	// verifies against it.
	leaf, err := x509.ParseCertificate(f.PKI.Cert.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.RootCAs, DNSName: "localhost"}); err != nil {
		t.Errorf("RootCAs does not trust ca_file: %v", err)
	}
	if b.Password != "s3cret" || b.RootCAs != nil || b.MaxConnections != 4 || b.TLS != mailproto.TLSStartTLS {
		t.Errorf("backup = %+v", b)
	}
	if p.RateLimit != (upstream.Rate{N: 10, Per: time.Second}) || p.DSNFrom != "Bounces@Example.com" {
		t.Errorf("primary rate_limit, dsn_from = %+v, %q", p.RateLimit, p.DSNFrom)
	}
	if b.RateLimit != (upstream.Rate{}) || b.DSNFrom != "" {
		t.Errorf("backup rate_limit, dsn_from = %+v, %q; want none", b.RateLimit, b.DSNFrom)
	}
	wantRoutes := []upstream.Route{
		{FromDomain: "example.com", Upstreams: []string{"primary", "backup"}},
		{FromDomain: "*", Upstreams: []string{"backup"}},
	}
	if !reflect.DeepEqual(cfg.Routes, wantRoutes) {
		t.Errorf("routes = %+v", cfg.Routes)
	}
	if cfg.HTTPAddress != ":9091" || cfg.AdminTokenEnv != "SMARTHOST_TEST_ADMIN" || cfg.HTTPMaxConnections != 64 {
		t.Errorf("http = %q %q %d", cfg.HTTPAddress, cfg.AdminTokenEnv, cfg.HTTPMaxConnections)
	}
}

func loadKey(t *testing.T, path string) crypto.Signer {
	t.Helper()
	k, err := dkim.LoadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// requireKeys compares keys field by field, the private keys with Equal.
func requireKeys(t *testing.T, got, want []dkim.Key) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d DKIM keys, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		g, w := got[i], want[i]
		eq, ok := g.Signer.(interface{ Equal(crypto.PrivateKey) bool })
		if g.Signer == nil || !ok || !eq.Equal(w.Signer) {
			t.Errorf("dkim[%d].Signer is not the key of the file", i)
		}
		g.Signer, w.Signer = nil, nil
		if !reflect.DeepEqual(g, w) {
			t.Errorf("dkim[%d] = %+v\nwant    %+v", i, g, w)
		}
	}
}

func TestParseConfigDelayWarning(t *testing.T) {
	f := configtest.NewFiles(t)
	if cfg := configtest.MustParse(t, f.Config(nil)); cfg.Queue.DelayWarning != 0 {
		t.Errorf("default delay_warning = %v, want 0 (off)", cfg.Queue.DelayWarning)
	}
	cfg := configtest.MustParse(t, f.Config(map[string]string{"queue": "[queue]\nmax_age = \"6h\"\ndelay_warning = \"4h\""}))
	if cfg.Queue.DelayWarning != 4*time.Hour || !cfg.Queue.Bounce {
		t.Errorf("queue = %+v, want a 4h delay warning with bounces on", cfg.Queue)
	}
}

func TestParseConfigBaseIsValid(t *testing.T) {
	f := configtest.NewFiles(t)
	configtest.MustParse(t, f.Config(nil))
}

// TestParseConfigRules breaks one rule per case and checks that the error
// names the exact key.
func TestParseConfigRules(t *testing.T) {
	f := configtest.NewFiles(t)
	t.Setenv("SMARTHOST_TEST_EMPTY", "")
	t.Setenv("SMARTHOST_TEST_PW", "x")
	tests := []struct {
		name      string
		overrides map[string]string
		key, msg  string
	}{
		// top level
		{"hostname not a domain", map[string]string{"top": `hostname = "bad host"`}, "hostname", "not a domain"},
		{"hostname wrong type", map[string]string{"top": `hostname = 5`}, "hostname", "must be a string, not an integer"},
		{"log_format", map[string]string{"top": `log_format = "xml"`}, "log_format", `"xml"`},
		{"log_level", map[string]string{"top": `log_level = "loud"`}, "log_level", `"loud"`},
		{"unknown top-level key", map[string]string{"top": `hostnmae = "x"`}, "hostnmae", "unknown key"},
		{"section not a table", map[string]string{"queue": `queue = "fast"`}, "queue", "must be a table"},

		// queue
		{"bad duration", map[string]string{"queue": "[queue]\nretry_min = \"5 minutes\""}, "queue.retry_min", "not a duration"},
		{"zero duration", map[string]string{"queue": "[queue]\nretry_max = \"0s\""}, "queue.retry_max", "positive"},
		{"negative duration", map[string]string{"queue": "[queue]\nmax_age = \"-1h\""}, "queue.max_age", "positive"},
		{"duration as number", map[string]string{"queue": "[queue]\nmax_age = 5"}, "queue.max_age", "duration string"},
		{"retry_min over retry_max", map[string]string{"queue": "[queue]\nretry_min = \"2h\"\nretry_max = \"1h\""}, "queue.retry_min", "longer than retry_max"},
		{"workers zero", map[string]string{"queue": "[queue]\nworkers = 0"}, "queue.workers", "out of range"},
		{"delay_warning junk", map[string]string{"queue": "[queue]\ndelay_warning = \"4 hours\""}, "queue.delay_warning", "not a duration"},
		{"upstream_command_timeout zero", map[string]string{"queue": "[queue]\nupstream_command_timeout = \"0s\""}, "queue.upstream_command_timeout", "positive"},
		{"upstream_command_timeout number", map[string]string{"queue": "[queue]\nupstream_command_timeout = 30"}, "queue.upstream_command_timeout", "duration string"},
		{"upstream_data_timeout negative", map[string]string{"queue": "[queue]\nupstream_data_timeout = \"-1m\""}, "queue.upstream_data_timeout", "positive"},
		{"upstream_data_timeout junk", map[string]string{"queue": "[queue]\nupstream_data_timeout = \"ten minutes\""}, "queue.upstream_data_timeout", "not a duration"},
		{"delay_warning zero", map[string]string{"queue": "[queue]\ndelay_warning = \"0s\""}, "queue.delay_warning", "positive"},
		{"delay_warning at max_age", map[string]string{"queue": "[queue]\nmax_age = \"4h\"\ndelay_warning = \"4h\""}, "queue.delay_warning", "shorter than max_age 4h0m0s"},
		{"delay_warning over default max_age", map[string]string{"queue": "[queue]\ndelay_warning = \"200h\""}, "queue.delay_warning", "shorter than max_age 120h0m0s"},
		{"delay_warning without bounce", map[string]string{"queue": "[queue]\nbounce = false\ndelay_warning = \"4h\""}, "queue.delay_warning", "needs bounce = true"},
		{"bounce not bool", map[string]string{"queue": "[queue]\nbounce = \"yes\""}, "queue.bounce", "true or false"},
		{"queue path empty", map[string]string{"queue": "[queue]\npath = \"\""}, "queue.path", "empty"},
		{"unknown queue key", map[string]string{"queue": "[queue]\nretries = 3"}, "queue.retries", "unknown key"},

		// listeners
		{"no listener", map[string]string{"listen": ""}, "listen", "at least one"},
		{"listen not an array", map[string]string{"listen": "[listen]\naddress = \":25\""}, "listen", "array of tables"},
		{"listen address missing", map[string]string{"listen": "[[listen]]\ntls = \"starttls\""}, "listen[0].address", "required"},
		{"listen address no port", map[string]string{"listen": "[[listen]]\naddress = \"587\""}, "listen[0].address", "host:port"},
		{"listen port junk", map[string]string{"listen": "[[listen]]\naddress = \":smtp\""}, "listen[0].address", "port"},
		{"listen tls junk", map[string]string{"listen": "[[listen]]\naddress = \":587\"\ntls = \"ssl\""}, "listen[0].tls", `"ssl"`},
		{"listen auth junk", map[string]string{"listen": "[[listen]]\naddress = \":587\"\nauth = \"optional\""}, "listen[0].auth", `"optional"`},
		{"listen unknown key", map[string]string{"listen": "[[listen]]\naddress = \":587\"\ntrusted_network = [\"10.0.0.0/8\"]"}, "listen[0].trusted_network", "unknown key"},
		{"plain-text AUTH", map[string]string{"listen": "[[listen]]\naddress = \":25\"\ntls = \"none\""}, "listen[0].tls", "plain text"},
		{"duplicate listener address", map[string]string{"listen": "[[listen]]\naddress = \":587\"\n[[listen]]\naddress = \":587\""}, "listen[1].address", "already used by listen[0]"},
		{"duplicate listener name", map[string]string{"listen": "[[listen]]\nname = \"a\"\naddress = \":587\"\n[[listen]]\nname = \"a\"\naddress = \":465\""}, "listen[1].name", "already used"},
		{"bad network", map[string]string{"listen": "[[listen]]\naddress = \":25\"\ntrusted_networks = [\"10.0.0.0/8\", \"10.0.0.0/33\"]"}, "listen[0].trusted_networks[1]", "not a CIDR"},
		{"network not a string", map[string]string{"listen": "[[listen]]\naddress = \":25\"\ntrusted_networks = [\"10.0.0.0/8\", 10]"}, "listen[0].trusted_networks[1]", "must be a string"},
		{"network host name", map[string]string{"listen": "[[listen]]\naddress = \":25\"\ntrusted_networks = [\"localhost\"]"}, "listen[0].trusted_networks[0]", "not a CIDR"},
		{"network zone", map[string]string{"listen": "[[listen]]\naddress = \":25\"\ntrusted_networks = [\"fe80::1%eth0\"]"}, "listen[0].trusted_networks[0]", "zone"},

		// [tls]
		{"tls missing for starttls", map[string]string{"tls": ""}, "tls.cert_file", `listen[0] uses tls = "starttls"`},
		{"tls key missing for starttls", map[string]string{"tls": "[tls]\ncert_file = \"{{CERT}}\""}, "tls.key_file", "required"},
		{"tls cert unreadable", map[string]string{"tls": "[tls]\ncert_file = \"{{MISSING}}\"\nkey_file = \"{{KEY}}\""}, "tls.cert_file", "no such file"},
		{"tls key unreadable", map[string]string{"tls": "[tls]\ncert_file = \"{{CERT}}\"\nkey_file = \"{{MISSING}}\""}, "tls.key_file", "no such file"},
		{"tls pair mismatch", map[string]string{"tls": "[tls]\ncert_file = \"{{CERT}}\"\nkey_file = \"{{OTHERKEY}}\""}, "tls.cert_file", "does not load with key_file"},
		{"tls cert not PEM", map[string]string{"tls": "[tls]\ncert_file = \"{{PWFILE}}\"\nkey_file = \"{{KEY}}\""}, "tls.cert_file", "does not load"},
		{"tls unknown key", map[string]string{"tls": "[tls]\ncert_file = \"{{CERT}}\"\nkey_file = \"{{KEY}}\"\nca_file = \"x\""}, "tls.ca_file", "unknown key"},

		// limits
		{"size junk", map[string]string{"limits": "[limits]\nmax_message_size = \"25XB\""}, "limits.max_message_size", "unknown unit"},
		{"size zero", map[string]string{"limits": "[limits]\nmax_message_size = 0"}, "limits.max_message_size", "positive"},
		{"size float", map[string]string{"limits": "[limits]\nmax_message_size = 2.5"}, "limits.max_message_size", "not a float"},
		{"recipients zero", map[string]string{"limits": "[limits]\nmax_recipients = 0"}, "limits.max_recipients", "out of range"},
		{"connections negative", map[string]string{"limits": "[limits]\nmax_connections = -1"}, "limits.max_connections", "out of range"},
		{"auth failures zero", map[string]string{"limits": "[limits]\nauth_failures_per_ip = 0"}, "limits.auth_failures_per_ip", "out of range"},
		{"connections per ip negative", map[string]string{"limits": "[limits]\nmax_connections_per_ip = -1"}, "limits.max_connections_per_ip", "out of range"},
		{"auth timeout zero", map[string]string{"limits": "[limits]\nauth_timeout = \"0s\""}, "limits.auth_timeout", "must be positive"},
		{"read timeout zero", map[string]string{"limits": "[limits]\nread_timeout = \"0\""}, "limits.read_timeout", "positive"},
		{"data timeout junk", map[string]string{"limits": "[limits]\ndata_timeout = \"ten minutes\""}, "limits.data_timeout", "not a duration"},
		{"message memory zero", map[string]string{"limits": "[limits]\nmessage_memory = \"0\""}, "limits.message_memory", "positive"},
		{"message memory junk", map[string]string{"limits": "[limits]\nmessage_memory = \"lots\""}, "limits.message_memory", "want a whole number"},

		// users
		{"user name empty", map[string]string{"user": "[[user]]\nname = \"\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"*@example.com\"]"}, "user[0].name", "empty"},
		{"user name missing", map[string]string{"user": "[[user]]\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"*@example.com\"]"}, "user[0].name", "required"},
		{"user name duplicate", map[string]string{"user": configtest.Base("user") + "\n" + configtest.Base("user")}, "user[1].name", `"app" is already used by user[0]`},
		{"plaintext password", map[string]string{"user": configtest.Base("user") + "\npassword = \"hunter2\""}, "user[0].password", "smarthost passwd"},
		{"hash not bcrypt", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"$2a$10$…\"\nallowed_from = [\"*@example.com\"]"}, "user[0].password_hash", "not a bcrypt hash"},
		{"hash missing", map[string]string{"user": "[[user]]\nname = \"a\"\nallowed_from = [\"*@example.com\"]"}, "user[0].password_hash", "required"},
		{"allowed_from missing", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\""}, "user[0].allowed_from", "required"},
		{"allowed_from empty", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = []"}, "user[0].allowed_from", "required"},
		{"allowed_from no at", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"example.com\"]"}, "user[0].allowed_from[0]", "want"},
		{"allowed_from bad local", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"*@example.com\", \"a b@example.com\"]"}, "user[0].allowed_from[1]", "not a valid email address"},
		{"allowed_from bad domain", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"a@-x-.com\"]"}, "user[0].allowed_from[0]", "not a domain"},
		{"allowed_from empty domain", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"*@\"]"}, "user[0].allowed_from[0]", "not a domain"},
		{"allowed_from unroutable", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"a@example.com\", \"*@Other.com\"]"}, "user[0].allowed_from[1]", `add a [[route]] with from_domain = "other.com" or "*"`},
		{"allowed_from star unroutable", map[string]string{"user": "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"*\"]"}, "user[0].allowed_from[0]", `from_domain = "*"`},

		// upstreams
		{"no upstream", map[string]string{"upstream": "", "route": "", "user": ""}, "upstream", "at least one"},
		{"upstream name duplicate", map[string]string{"upstream": configtest.Base("upstream") + "\n" + configtest.Base("upstream")}, "upstream[1].name", "already used"},
		{"upstream address no port", map[string]string{"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com\"\ntls = \"implicit\""}, "upstream[0].address", "host:port"},
		{"upstream address port zero", map[string]string{"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com:0\"\ntls = \"implicit\""}, "upstream[0].address", "port"},
		{"upstream tls missing", map[string]string{"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com:465\""}, "upstream[0].tls", "required"},
		{"upstream tls none remote", map[string]string{"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com:25\"\ntls = \"none\""}, "upstream[0].tls", "loopback/test only"},
		{"upstream tls none private IP", map[string]string{"upstream": "[[upstream]]\nname = \"up\"\naddress = \"10.0.0.1:25\"\ntls = \"none\""}, "upstream[0].tls", "loopback/test only"},
		{"upstream password in TOML", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword = \"p\"\npassword_env = \"SMARTHOST_TEST_PW\""}, "upstream[0].password", "never"},
		{"username without secret", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\""}, "upstream[0].password_env", "password_env or password_file"},
		{"both secrets", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword_env = \"SMARTHOST_TEST_PW\"\npassword_file = \"{{PWFILE}}\""}, "upstream[0].password_file", "only one"},
		{"password_env unset", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword_env = \"SMARTHOST_TEST_UNSET_VARIABLE\""}, "upstream[0].password_env", "SMARTHOST_TEST_UNSET_VARIABLE is not set"},
		{"password_env empty", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword_env = \"SMARTHOST_TEST_EMPTY\""}, "upstream[0].password_env", "not set or empty"},
		{"password_env without username", map[string]string{"upstream": configtest.Base("upstream") + "\npassword_env = \"SMARTHOST_TEST_PW\""}, "upstream[0].password_env", "without username"},
		{"password_file unreadable", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword_file = \"{{MISSING}}\""}, "upstream[0].password_file", "no such file"},
		{"password_file empty", map[string]string{"upstream": configtest.Base("upstream") + "\nusername = \"u\"\npassword_file = \"{{EMPTY}}\""}, "upstream[0].password_file", "empty"},
		{"ca_file without certificates", map[string]string{"upstream": configtest.Base("upstream") + "\nca_file = \"{{KEY}}\""}, "upstream[0].ca_file", "no PEM certificate"},
		{"ca_file unreadable", map[string]string{"upstream": configtest.Base("upstream") + "\nca_file = \"{{MISSING}}\""}, "upstream[0].ca_file", "no such file"},
		{"max_connections zero", map[string]string{"upstream": configtest.Base("upstream") + "\nmax_connections = 0"}, "upstream[0].max_connections", "out of range"},
		{"dsn_from no at", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"bounces\""}, "upstream[0].dsn_from", "not an address"},
		{"dsn_from display name", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"Bounces <b@example.com>\""}, "upstream[0].dsn_from", "not a domain name"},
		{"dsn_from angle brackets", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"<b@example.com>\""}, "upstream[0].dsn_from", "not a domain name"},
		{"dsn_from bad local", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"a b@example.com\""}, "upstream[0].dsn_from", "not a valid email address"},
		{"dsn_from bad domain", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"b@example..com\""}, "upstream[0].dsn_from", "not a domain name"},
		{"dsn_from wildcard", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"*@example.com\""}, "upstream[0].dsn_from", "is a pattern"},
		{"dsn_from non-ASCII", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"bücher@example.com\""}, "upstream[0].dsn_from", "not an ASCII address"},
		{"dsn_from empty", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = \"\""}, "upstream[0].dsn_from", "not an address"},
		{"dsn_from wrong type", map[string]string{"upstream": configtest.Base("upstream") + "\ndsn_from = true"}, "upstream[0].dsn_from", "must be a string"},
		{"rate_limit junk", map[string]string{"upstream": configtest.Base("upstream") + "\nrate_limit = \"fast\""}, "upstream[0].rate_limit", "N/duration"},

		// routes
		{"no route", map[string]string{"route": ""}, "route", "at least one"},
		{"route unknown upstream", map[string]string{"route": "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"up\", \"nope\"]"}, "route[0].upstreams[1]", `no [[upstream]] is named "nope"`},
		{"route upstream twice", map[string]string{"route": "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"up\", \"up\"]"}, "route[0].upstreams[1]", "twice"},
		{"route upstreams empty", map[string]string{"route": "[[route]]\nfrom_domain = \"example.com\"\nupstreams = []"}, "route[0].upstreams", "required"},
		{"route from_domain missing", map[string]string{"route": "[[route]]\nupstreams = [\"up\"]\n[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"up\"]"}, "route[0].from_domain", "required"},
		{"route from_domain bad", map[string]string{"route": "[[route]]\nfrom_domain = \"*.example.com\"\nupstreams = [\"up\"]"}, "route[0].from_domain", "neither"},
		{"route from_domain duplicate", map[string]string{"route": configtest.Base("route") + "\n[[route]]\nfrom_domain = \"Example.COM\"\nupstreams = [\"up\"]"}, "route[1].from_domain", "already routed by route[0]"},

		// http
		{"http address", map[string]string{"http": "[http]\naddress = \"9090\""}, "http.address", "host:port"},
		{"admin token unset", map[string]string{"http": "[http]\nadmin_token_env = \"SMARTHOST_TEST_UNSET_VARIABLE\""}, "http.admin_token_env", "not set"},
		{"http unknown key", map[string]string{"http": "[http]\nlisten = \":9090\""}, "http.listen", "unknown key"},
		{"http max_connections zero", map[string]string{"http": "[http]\nmax_connections = 0"}, "http.max_connections", "out of range (1 to"},
		{"http max_connections negative", map[string]string{"http": "[http]\nmax_connections = -5"}, "http.max_connections", "out of range"},
		{"http max_connections string", map[string]string{"http": "[http]\nmax_connections = \"256\""}, "http.max_connections", "must be an integer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errs := parseErrors(t, f.Config(tt.overrides))
			requireError(t, errs, tt.key, tt.msg)
		})
	}
}

// TestParseConfigReportsEveryProblem checks that one call reports all the
// problems of a file, not only the first.
func TestParseConfigReportsEveryProblem(t *testing.T) {
	f := configtest.NewFiles(t)
	text := f.Config(map[string]string{
		"queue":  "[queue]\nretry_min = \"soon\"\nworkerz = 4",
		"listen": "[[listen]]\naddress = \":25\"\ntls = \"none\"\nauth = \"none\"",
		"route":  "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"up\", \"missing\"]",
	})
	errs := parseErrors(t, text)
	requireError(t, errs, "queue.retry_min", "not a duration")
	requireError(t, errs, "queue.workerz", "unknown key")
	requireError(t, errs, "listen[0].auth", "open relay")
	requireError(t, errs, "route[0].upstreams[1]", `"missing"`)
	if len(errs) != 4 {
		t.Errorf("got %d errors, want 4:\n%v", len(errs), errs)
	}
	// Error joins one "key: message" line per problem.
	lines := strings.Split(errs.Error(), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "queue.retry_min: ") {
		t.Errorf("Error() = %q", errs.Error())
	}
}

func TestParseConfigSyntaxError(t *testing.T) {
	errs := parseErrors(t, "hostname = \"a\"\n\nretry_min = 1m\nhostnmae = 1\n")
	if len(errs) != 1 || errs[0].Key != "" || !strings.Contains(errs[0].Msg, "line 3") {
		t.Errorf("errors = %v, want one syntax error on line 3", errs)
	}
}

func TestLoadConfig(t *testing.T) {
	f := configtest.NewFiles(t)
	path := configtest.WriteFile(t, t.TempDir(), "config.toml", f.Config(nil))
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Path != path {
		t.Errorf("Path = %q, want %q", cfg.Path, path)
	}
	if _, err := config.Load(f.Missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("config.Load(missing) = %v, want ErrNotExist", err)
	}
}

// TestOpenRelayRefused covers the listener combinations that could relay
// for anyone, and the ones that are safe.
func TestOpenRelayRefused(t *testing.T) {
	f := configtest.NewFiles(t)
	tests := []struct {
		name     string
		listen   string
		key, msg string // "" when the listener is accepted
	}{
		{"auth none without trusted_networks", `auth = "none"`, "listen[0].auth", "open relay"},
		{"auth none with empty trusted_networks", "auth = \"none\"\ntrusted_networks = []", "listen[0].auth", "open relay"},
		{"everything IPv4", "auth = \"none\"\ntrusted_networks = [\"0.0.0.0/0\"]", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv4 despite override", "auth = \"none\"\ntrusted_networks = [\"0.0.0.0/0\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv6 despite override", "auth = \"none\"\ntrusted_networks = [\"::/0\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv4-mapped", "auth = \"none\"\ntrusted_networks = [\"::ffff:0.0.0.0/96\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"public CIDR", "auth = \"none\"\ntrusted_networks = [\"10.0.0.0/8\", \"198.51.100.0/24\"]", "listen[0].trusted_networks[1]", "allow_public_networks"},
		{"public IP", "auth = \"none\"\ntrusted_networks = [\"8.8.8.8\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"private range too wide", "auth = \"none\"\ntrusted_networks = [\"10.0.0.0/7\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"public IPv6", "auth = \"none\"\ntrusted_networks = [\"2001:db8::/32\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"plain-text AUTH", `auth = "required"`, "listen[0].tls", "plain text"},

		{"public CIDR with override", "auth = \"none\"\ntrusted_networks = [\"198.51.100.0/24\"]\nallow_public_networks = true", "", ""},
		{"private ranges", "auth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\", \"10.1.0.0/16\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\", \"169.254.0.0/16\", \"::1\", \"fd00::/8\", \"fe80::/10\"]", "", ""},
		{"plain-text AUTH from trusted networks", "auth = \"required\"\ntrusted_networks = [\"10.0.0.0/8\"]", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := f.Config(map[string]string{
				"listen": "[[listen]]\naddress = \":25\"\ntls = \"none\"\n" + tt.listen,
			})
			if tt.key == "" {
				configtest.MustParse(t, text)
				return
			}
			requireError(t, parseErrors(t, text), tt.key, tt.msg)
		})
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"25MB", 25 << 20, true},
		{"512KB", 512 << 10, true},
		{"1GB", 1 << 30, true},
		{"1048576", 1048576, true},
		{"0", 0, true},
		{"10B", 10, true},
		{"4KiB", 4096, true},
		{"2MiB", 2 << 20, true},
		{"3GiB", 3 << 30, true},
		{"25mb", 25 << 20, true},
		{" 25 MB ", 25 << 20, true},
		{"8G", 8 << 30, true},
		{"", 0, false},
		{"MB", 0, false},
		{"-1", 0, false},
		{"-5MB", 0, false},
		{"+5MB", 0, false},
		{"1.5MB", 0, false},
		{"25XB", 0, false},
		{"25 M B", 0, false},
		{"0x10", 0, false},
		{"twenty", 0, false},
		{"9223372036854775807", 9223372036854775807, true},
		{"9223372036854775808", 0, false},
		{"8589934592GB", 0, false},
		{"9007199254740992KB", 0, false},
	}
	for _, tt := range tests {
		got, err := config.ParseSize(tt.in)
		if tt.ok && (err != nil || got != tt.want) {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
		if !tt.ok && err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", tt.in, got)
		}
	}
}

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

// exampleConfig returns config.toml.example with its file paths pointed at
// test files and the environment variables it names set.
func exampleConfig(t *testing.T, f *configtest.Files) string {
	t.Helper()
	data, err := os.ReadFile("../../../../config.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("GMAIL_APP_PASSWORD", "app-password")
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "admin-token")
	text := strings.NewReplacer(
		"/etc/smarthost/tls.crt", f.PKI.CertFile,
		"/etc/smarthost/tls.key", f.PKI.KeyFile,
		"/etc/smarthost/dkim/example.com.key", f.DKIMRSA,
		"/etc/smarthost/dkim/example.com.ed25519.key", f.DKIMKey,
		"/run/secrets/yandex", f.PasswordFile,
		"/etc/ssl/private-ca.pem", f.PKI.CAFile,
	).Replace(string(data))
	return text
}

// TestExampleConfig keeps config.toml.example in step with the parser.
func TestExampleConfig(t *testing.T) {
	f := configtest.NewFiles(t)
	text := exampleConfig(t, f)

	t.Run("as shipped", func(t *testing.T) {
		cfg := configtest.MustParse(t, text)
		if cfg.Hostname != "relay.example.com" || len(cfg.Listeners) != 2 || len(cfg.Users) != 1 ||
			len(cfg.DKIM) != 2 || len(cfg.Upstreams) != 2 || len(cfg.Routes) != 2 {
			t.Errorf("unexpected shape: %+v", cfg)
		}
		if cfg.Upstreams[0].Password != "app-password" || cfg.Upstreams[1].Password != "s3cret" {
			t.Errorf("upstream passwords not loaded")
		}
		if cfg.Upstreams[0].RateLimit != (upstream.Rate{N: 2000, Per: 24 * time.Hour}) ||
			cfg.Upstreams[1].RateLimit != (upstream.Rate{N: 500, Per: 24 * time.Hour}) {
			t.Errorf("rate limits = %+v, %+v", cfg.Upstreams[0].RateLimit, cfg.Upstreams[1].RateLimit)
		}
		// The yandex upstream is all profile but its login and sender.
		if y := cfg.Upstreams[1]; y.Address != "smtp.yandex.ru:465" || y.TLS != mailproto.TLSImplicit ||
			y.EnvelopeFrom != "relay@example.com" || y.HeaderFromRewrite || cfg.Upstreams[0].EnvelopeFrom != "" {
			t.Errorf("provider upstreams: %+v", cfg.Upstreams)
		}
		if cfg.Queue.DelayWarning != 0 || !cfg.Queue.Bounce || cfg.Upstreams[0].DSNFrom != "" {
			t.Errorf("delay warning %v, bounce %v, dsn_from %q: want the defaults", cfg.Queue.DelayWarning, cfg.Queue.Bounce, cfg.Upstreams[0].DSNFrom)
		}
		if cfg.Limits.MaxMessageBytes != 25<<20 || cfg.Limits.MessageMemory != config.DefaultMessageMemory {
			t.Errorf("max message = %d, message memory = %d", cfg.Limits.MaxMessageBytes, cfg.Limits.MessageMemory)
		}
	})

	// The commented-out keys are documentation too: switched on, they
	// must still be valid.
	t.Run("commented keys enabled", func(t *testing.T) {
		re := regexp.MustCompile(`(?m)^# ([a-z_]+ *= )`)
		enabled := re.ReplaceAllString(text, "$1")
		if enabled == text {
			t.Fatal("no commented-out keys found")
		}
		cfg := configtest.MustParse(t, enabled)
		if cfg.AdminTokenEnv != "SMARTHOST_ADMIN_TOKEN" || cfg.Upstreams[0].RootCAs == nil ||
			len(cfg.Listeners[0].TrustedNetworks) != 1 || cfg.Queue.DelayWarning == 0 || cfg.Upstreams[0].DSNFrom == "" ||
			cfg.Upstreams[0].EnvelopeFrom == "" {
			t.Errorf("commented keys not applied: %+v", cfg)
		}
		if k := cfg.DKIM[0]; k.Headers == nil || k.Expiration == 0 || !k.Subdomains {
			t.Errorf("commented [[dkim]] keys not applied: %+v", k)
		}
	})

	t.Run("as shipped dkim", func(t *testing.T) {
		cfg := configtest.MustParse(t, text)
		want := []dkim.Key{
			{Domain: "example.com", Selector: "s2026", Signer: loadKey(t, f.DKIMRSA),
				HeaderCanonicalization: "relaxed", BodyCanonicalization: "relaxed"},
			{Domain: "example.com", Selector: "ed2026", Signer: loadKey(t, f.DKIMKey),
				HeaderCanonicalization: "relaxed", BodyCanonicalization: "relaxed"},
		}
		requireKeys(t, cfg.DKIM, want)
	})

	// The default header set is documented field by field.
	t.Run("documents the default headers", func(t *testing.T) {
		var comments []string
		for _, line := range strings.Split(text, "\n") {
			if _, c, ok := strings.Cut(line, "#"); ok {
				comments = append(comments, strings.TrimSpace(c))
			}
		}
		if !strings.Contains(strings.Join(comments, " "), "The default set is "+strings.Join(dkim.DefaultHeaders, ", ")+".") {
			t.Errorf("config.toml.example does not list the default headers %q", dkim.DefaultHeaders)
		}
	})

	t.Run("documents every key", func(t *testing.T) {
		keys := []string{
			"hostname", "log_format", "log_level",
			"path", "retry_min", "retry_max", "max_age", "bounce", "delay_warning", "workers",
			"upstream_command_timeout", "upstream_data_timeout",
			"cert_file", "key_file",
			"name", "address", "tls", "auth", "trusted_networks", "allow_public_networks",
			"max_message_size", "max_recipients", "max_connections", "max_connections_per_ip", "auth_timeout",
			"auth_failures_per_ip", "read_timeout", "data_timeout",
			"message_memory",
			"password_hash", "allowed_from",
			"domain", "selector", "headers", "canonicalization", "expiration", "subdomains",
			"username", "password_env", "password_file", "ca_file", "rate_limit", "dsn_from",
			"provider", "region", "envelope_from", "header_from_rewrite",
			"from_domain", "upstreams",
			"admin_token_env",
			"shutdown_timeout", "proxy_protocol", "proxy_trusted",
		}
		for _, k := range keys {
			if !regexp.MustCompile(`(?m)^(# )?`+k+` *= `).MatchString(text) && !strings.Contains(text, "or "+k+" = ") {
				t.Errorf("config.toml.example does not document %s", k)
			}
		}
		for _, section := range []string{"[queue]", "[tls]", "[[listen]]", "[limits]", "[[user]]", "[[dkim]]", "[[upstream]]", "[[route]]", "[http]"} {
			if !slices.Contains(strings.Split(text, "\n"), section) && !strings.Contains(text, "\n"+section+" ") {
				t.Errorf("config.toml.example has no %s", section)
			}
		}
	})
}

// dkimEntry is a valid [[dkim]] table with extra lines appended.
func dkimEntry(extra string) string {
	return "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"\n" + extra
}

// TestParseConfigDKIMRules breaks one [[dkim]] rule per case and checks
// that the error names the exact key and, for key files, the problem.
func TestParseConfigDKIMRules(t *testing.T) {
	f := configtest.NewFiles(t)
	keyFile := func(path string) string {
		return "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"" + path + "\""
	}
	tests := []struct {
		name     string
		dkim     string
		key, msg string // msg may hold {{…}} placeholders
	}{
		{"domain missing", "[[dkim]]\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "required"},
		{"domain invalid", "[[dkim]]\ndomain = \"exa mple.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "not a domain name"},
		{"domain wildcard", "[[dkim]]\ndomain = \"*.example.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "not a domain name"},
		{"domain wrong type", "[[dkim]]\ndomain = 1\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "must be a string"},
		{"selector missing", "[[dkim]]\ndomain = \"example.com\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "required"},
		{"selector underscore", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s_1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "not a valid DNS label"},
		{"selector empty label", "[[dkim]]\ndomain = \"example.com\"\nselector = \"a..b\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "not a valid DNS label"},
		{"domain and selector duplicate", dkimEntry("") + "[[dkim]]\ndomain = \"EXAMPLE.com\"\nselector = \"S1\"\nkey_file = \"{{DKIM}}\"", "dkim[1].selector", "already used by dkim[0]"},

		{"key_file missing", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"", "dkim[0].key_file", "required"},
		{"key_file empty path", keyFile(""), "dkim[0].key_file", "must not be empty"},
		{"key_file does not exist", keyFile("{{MISSING}}"), "dkim[0].key_file", "{{MISSING}}: no such file"},
		{"key_file unreadable", keyFile("{{DIR}}"), "dkim[0].key_file", "is a directory"},
		{"key_file empty", keyFile("{{EMPTY}}"), "dkim[0].key_file", "{{EMPTY}}: no PEM block"},
		{"key_file not PEM", keyFile("{{PWFILE}}"), "dkim[0].key_file", "{{PWFILE}}: no PEM block"},
		{"key_file a certificate", keyFile("{{CERT}}"), "dkim[0].key_file", `"CERTIFICATE" is not a private key`},
		{"key_file ECDSA", keyFile("{{DKIMECDSA}}"), "dkim[0].key_file", "{{DKIMECDSA}}: unsupported key type *ecdsa.PublicKey"},
		{"key_file RSA under 1024 bits", keyFile("{{DKIMSMALL}}"), "dkim[0].key_file", "{{DKIMSMALL}}: RSA key has 768 bits, at least 1024"},

		{"headers without From", dkimEntry(`headers = ["To", "Subject"]`), "dkim[0].headers", "must include From"},
		{"headers empty", dkimEntry(`headers = []`), "dkim[0].headers", "must include From"},
		{"headers bad name", dkimEntry(`headers = ["From", "X Bad"]`), "dkim[0].headers[1]", `"X Bad" is not a header field name`},
		{"headers colon", dkimEntry(`headers = ["From:"]`), "dkim[0].headers[0]", "not a header field name"},
		{"headers not an array", dkimEntry(`headers = "From"`), "dkim[0].headers", "must be an array of strings"},
		{"headers element type", dkimEntry(`headers = ["From", 3]`), "dkim[0].headers[1]", "must be a string"},
		{"canonicalization unknown", dkimEntry(`canonicalization = "relaxed/strict"`), "dkim[0].canonicalization", `"relaxed/strict": want`},
		{"canonicalization empty", dkimEntry(`canonicalization = ""`), "dkim[0].canonicalization", "want"},
		{"canonicalization half", dkimEntry(`canonicalization = "relaxed/"`), "dkim[0].canonicalization", "want"},
		{"canonicalization upper case", dkimEntry(`canonicalization = "Relaxed"`), "dkim[0].canonicalization", "want"},
		{"expiration zero", dkimEntry(`expiration = "0s"`), "dkim[0].expiration", "must be positive"},
		{"expiration negative", dkimEntry(`expiration = "-1h"`), "dkim[0].expiration", "must be positive"},
		{"expiration junk", dkimEntry(`expiration = "a week"`), "dkim[0].expiration", "not a duration"},
		{"expiration within max_age", dkimEntry(`expiration = "24h"`), "dkim[0].expiration", "must be longer than queue.max_age (120h0m0s)"},
		{"subdomains wrong type", dkimEntry(`subdomains = "yes"`), "dkim[0].subdomains", "true or false"},
		{"unknown key", dkimEntry(`algorithm = "rsa"`), "dkim[0].algorithm", "unknown key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := strings.ReplaceAll(f.Config(map[string]string{"dkim": tt.dkim}), "{{DIR}}", t.TempDir())
			errs := parseErrors(t, text)
			requireError(t, errs, tt.key, f.Expand(tt.msg))
		})
	}
}

// TestParseConfigDKIMAccepted covers the [[dkim]] forms that must load:
// both key encodings and types, every canonicalization, and several keys
// for one domain.
func TestParseConfigDKIMAccepted(t *testing.T) {
	f := configtest.NewFiles(t)
	for _, tt := range []struct {
		value        string
		header, body string
	}{
		{"relaxed/relaxed", "relaxed", "relaxed"},
		{"relaxed/simple", "relaxed", "simple"},
		{"simple/relaxed", "simple", "relaxed"},
		{"simple/simple", "simple", "simple"},
		// One name is the header algorithm; the body is simple (RFC 6376
		// section 3.5, c= tag).
		{"relaxed", "relaxed", "simple"},
		{"simple", "simple", "simple"},
	} {
		t.Run("canonicalization "+tt.value, func(t *testing.T) {
			cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": dkimEntry(`canonicalization = "` + tt.value + `"`)}))
			if k := cfg.DKIM[0]; k.HeaderCanonicalization != tt.header || k.BodyCanonicalization != tt.body {
				t.Errorf("%q gave %s/%s, want %s/%s", tt.value, k.HeaderCanonicalization, k.BodyCanonicalization, tt.header, tt.body)
			}
		})
	}

	t.Run("defaults", func(t *testing.T) {
		cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": dkimEntry("")}))
		want := []dkim.Key{{Domain: "example.com", Selector: "s1", Signer: loadKey(t, f.DKIMRSA),
			HeaderCanonicalization: "relaxed", BodyCanonicalization: "relaxed"}}
		requireKeys(t, cfg.DKIM, want)
	})

	// RSA beside Ed25519, and an old and a new selector during a
	// rotation: four keys, one domain.
	t.Run("several keys for one domain", func(t *testing.T) {
		var entries strings.Builder
		for _, e := range []struct{ sel, file string }{
			{"rsa2025", "{{DKIMPKCS1}}"}, {"ed2025", "{{DKIM}}"}, {"rsa2026", "{{DKIMRSA}}"}, {"ed2026", "{{DKIM}}"},
		} {
			entries.WriteString("[[dkim]]\ndomain = \"example.com\"\nselector = \"" + e.sel + "\"\nkey_file = \"" + e.file + "\"\n")
		}
		cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": entries.String()}))
		if len(cfg.DKIM) != 4 {
			t.Fatalf("got %d keys, want 4", len(cfg.DKIM))
		}
		// The set must build a signer that signs with all four.
		s, err := dkim.New(cfg.DKIM, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(s.KeysFor("example.com")); got != 4 {
			t.Errorf("signer has %d keys for example.com, want 4", got)
		}
	})

	t.Run("same selector in two domains", func(t *testing.T) {
		text := f.Config(map[string]string{"dkim": dkimEntry("") +
			"[[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nkey_file = \"{{DKIM}}\""})
		if cfg := configtest.MustParse(t, text); len(cfg.DKIM) != 2 {
			t.Errorf("got %d keys, want 2", len(cfg.DKIM))
		}
	})
}

// TestParseConfigOperations covers shutdown_timeout and the PROXY
// protocol keys of a listener.
func TestParseConfigOperations(t *testing.T) {
	f := configtest.NewFiles(t)
	cfg := configtest.MustParse(t, f.Config(map[string]string{
		"top": "hostname = \"relay.test\"\nshutdown_timeout = \"5s\"",
		"listen": `[[listen]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["10.1.2.0/24"]
proxy_protocol = true
proxy_trusted = ["127.0.0.1", "203.0.113.0/24", "2001:db8::/32"]`,
	}))
	if cfg.ShutdownTimeout != 5*time.Second {
		t.Errorf("shutdown_timeout = %v", cfg.ShutdownTimeout)
	}
	l := cfg.Listeners[0]
	want := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32"), netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("2001:db8::/32")}
	if !l.ProxyProtocol || !reflect.DeepEqual(l.ProxyTrusted, want) {
		t.Errorf("listener: proxy_protocol %v, proxy_trusted %v", l.ProxyProtocol, l.ProxyTrusted)
	}

	base := configtest.MustParse(t, f.Config(nil))
	if base.ShutdownTimeout != 25*time.Second || base.Listeners[0].ProxyProtocol || base.Listeners[0].ProxyTrusted != nil {
		t.Errorf("defaults: shutdown_timeout %v, listener %+v", base.ShutdownTimeout, base.Listeners[0])
	}

	listen := func(extra string) map[string]string {
		return map[string]string{"listen": "[[listen]]\naddress = \"127.0.0.1:0\"\n" + extra}
	}
	for _, tt := range []struct {
		name      string
		overrides map[string]string
		key, msg  string
	}{
		{"shutdown_timeout zero", map[string]string{"top": "shutdown_timeout = \"0s\""}, "shutdown_timeout", "positive"},
		{"shutdown_timeout junk", map[string]string{"top": "shutdown_timeout = \"soon\""}, "shutdown_timeout", "not a duration"},
		{"shutdown_timeout number", map[string]string{"top": "shutdown_timeout = 25"}, "shutdown_timeout", "duration string"},
		{"proxy_protocol without proxy_trusted", listen("proxy_protocol = true"), "listen[0].proxy_trusted", "required with proxy_protocol"},
		{"proxy_protocol with empty proxy_trusted", listen("proxy_protocol = true\nproxy_trusted = []"), "listen[0].proxy_trusted", "required with proxy_protocol"},
		{"proxy_trusted without proxy_protocol", listen("proxy_trusted = [\"10.0.0.1\"]"), "listen[0].proxy_trusted", "without proxy_protocol = true"},
		{"proxy_trusted everything", listen("proxy_protocol = true\nproxy_trusted = [\"0.0.0.0/0\"]"), "listen[0].proxy_trusted[0]", "trusts every address"},
		{"proxy_trusted everything v6", listen("proxy_protocol = true\nproxy_trusted = [\"10.0.0.1\", \"::/0\"]"), "listen[0].proxy_trusted[1]", "trusts every address"},
		{"proxy_trusted junk", listen("proxy_protocol = true\nproxy_trusted = [\"balancer\"]"), "listen[0].proxy_trusted[0]", "not a CIDR"},
		{"proxy_trusted not a list", listen("proxy_protocol = true\nproxy_trusted = \"10.0.0.1\""), "listen[0].proxy_trusted", "array of strings"},
		{"proxy_protocol not bool", listen("proxy_protocol = \"v2\""), "listen[0].proxy_protocol", "true or false"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			requireError(t, parseErrors(t, f.Config(tt.overrides)), tt.key, tt.msg)
		})
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
