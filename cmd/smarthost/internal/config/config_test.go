package config_test

import (
	"crypto/x509"
	"encoding/base64"
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
			Backend: config.QueueBbolt, Lease: 30 * time.Second,
			Path: "/var/lib/smarthost/queue.db", RetryMin: time.Minute, RetryMax: time.Hour,
			MaxAge: 120 * time.Hour, Bounce: true, Workers: 16,
			UpstreamCommandTimeout: 2 * time.Minute, UpstreamDataTimeout: 10 * time.Minute,
		},
		HistoryRetention: 168 * time.Hour,
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
backend = "bbolt"
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
rate_limit = "100/1m"

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
allowed_recipients = ["*@Corp.Example.com", "ops@example.net"]
rate_limit = "500/1h"
recipient_limit = "2000/24h"
allow_null_sender = true

[[user]]
name = "cron"
password_hash = "{{HASH}}"
allowed_from = ["cron@example.com"]

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
	wantQueue := config.Queue{Backend: config.QueueBbolt, Lease: 30 * time.Second, Path: "/tmp/q.db", RetryMin: time.Second, RetryMax: 90 * time.Minute, MaxAge: 2 * time.Hour, Bounce: false, Workers: 3,
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
		}, RateLimit: upstream.Rate{N: 100, Per: time.Minute}},
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
		AllowedFrom:       []string{"Billing@example.com", "*@notify.example.com", "*"},
		AllowedRecipients: []string{"*@corp.example.com", "ops@example.net"},
		RateLimit:         upstream.Rate{N: 500, Per: time.Hour},
		RecipientLimit:    upstream.Rate{N: 2000, Per: 24 * time.Hour},
		AllowNullSender:   true,
	}, {Name: "cron", PasswordHash: []byte(f.Hash), AllowedFrom: []string{"cron@example.com"}}}
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

		{"upstream name of a user's window", map[string]string{
			"upstream": "[[upstream]]\nname = \"user:app\"\naddress = \"127.0.0.1:2525\"\ntls = \"none\"",
			"route":    "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"user:app\"]"},
			"upstream[0].name", `"user:app" is reserved: user: names a user's or client's rate window`},

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
		{"listener rate_limit with auth", map[string]string{"listen": configtest.Base("listen") + "\nrate_limit = \"10/1m\""}, "listen[0].rate_limit", `only for auth = "none"`},
		{"listener rate_limit junk", map[string]string{"listen": "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.1\"]\nrate_limit = \"ten\""}, "listen[0].rate_limit", "want N/duration"},
		{"allowed_recipients empty", map[string]string{"user": configtest.Base("user") + "\nallowed_recipients = []"}, "user[0].allowed_recipients", "no recipient would be allowed"},
		{"allowed_recipients bad", map[string]string{"user": configtest.Base("user") + "\nallowed_recipients = [\"*@example.net\", \"example.org\"]"}, "user[0].allowed_recipients[1]", "want"},
		{"user rate_limit junk", map[string]string{"user": configtest.Base("user") + "\nrate_limit = \"500 per hour\""}, "user[0].rate_limit", "want N/duration"},
		{"user recipient_limit zero", map[string]string{"user": configtest.Base("user") + "\nrecipient_limit = \"0/1h\""}, "user[0].recipient_limit", "not a positive whole number"},
		{"allow_null_sender not bool", map[string]string{"user": configtest.Base("user") + "\nallow_null_sender = \"yes\""}, "user[0].allow_null_sender", "true or false"},
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
	t.Setenv("BILLING_WEBHOOK_SECRET", "whsec_"+base64.StdEncoding.EncodeToString([]byte("a key of twenty-four or more bytes")))
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
			len(cfg.DKIM) != 2 || len(cfg.Upstreams) != 2 || len(cfg.Routes) != 3 {
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
		if cfg.Queue.Backend != config.QueueBbolt || cfg.Queue.DSN != "" {
			t.Errorf("queue backend %q: want bbolt, without a DSN", cfg.Queue.Backend)
		}
		if cfg.Queue.DelayWarning != 0 || !cfg.Queue.Bounce || cfg.Upstreams[0].DSNFrom != "" {
			t.Errorf("delay warning %v, bounce %v, dsn_from %q: want the defaults", cfg.Queue.DelayWarning, cfg.Queue.Bounce, cfg.Upstreams[0].DSNFrom)
		}
		if len(cfg.Webhooks) != 1 || cfg.Webhooks[0].Name != "billing" || string(cfg.Webhooks[0].Key) != "a key of twenty-four or more bytes" ||
			len(cfg.Webhooks[0].Events) != 2 || cfg.Webhooks[0].Users != nil {
			t.Errorf("webhooks %+v", cfg.Webhooks)
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
			cfg.Upstreams[0].EnvelopeFrom == "" || !slices.Equal(cfg.Webhooks[0].Users, []string{"billing-app"}) {
			t.Errorf("commented keys not applied: %+v", cfg)
		}
		if k := cfg.DKIM[0]; k.Headers == nil || k.Expiration == 0 || !k.Subdomains {
			t.Errorf("commented [[dkim]] keys not applied: %+v", k)
		}
	})

	// The postgres keys are shown indented, as an alternative: switched
	// on with backend = "postgres", they must be valid, with either source
	// of the connection string.
	t.Run("postgres keys enabled", func(t *testing.T) {
		const dsn = "postgres://smarthost:pw@db.internal:5432/mail?sslmode=verify-full"
		t.Setenv("SMARTHOST_QUEUE_DSN", dsn)
		dsnFile := configtest.WriteFile(t, t.TempDir(), "queue-dsn", dsn+"\n")
		pg := strings.Replace(text, "\nbackend = \"bbolt\" ", "\nbackend = \"postgres\" ", 1)
		if pg == text {
			t.Fatal(`no backend = "bbolt" line`)
		}
		for _, source := range []string{"dsn_env", "dsn_file"} {
			re := regexp.MustCompile(`(?m)^#   ((?:` + source + `|lease) *= )`)
			enabled := re.ReplaceAllString(pg, "$1")
			enabled = strings.ReplaceAll(enabled, "/run/secrets/queue-dsn", dsnFile)
			if n := len(re.FindAllString(pg, -1)); n != 2 {
				t.Fatalf("%d lines of %s and lease, want 2", n, source)
			}
			q := configtest.MustParse(t, enabled).Queue
			if q.Backend != config.QueuePostgres || string(q.DSN) != dsn || q.Lease != 30*time.Second {
				t.Errorf("%s: backend %q, DSN %q, lease %v", source, q.Backend, string(q.DSN), q.Lease)
			}
		}
		// The keys carry the words of the product's specification.
		for _, line := range []string{
			`backend = "bbolt"                     # "bbolt" (default: the file at path) | "postgres"`,
			`#   dsn_env = "SMARTHOST_QUEUE_DSN"      # postgres: a libpq connection string or URL, from this env var`,
			`#   dsn_file = "/run/secrets/queue-dsn"  # or from the first line of a file`,
		} {
			if !slices.Contains(strings.Split(text, "\n"), line) {
				t.Errorf("config.toml.example has no line %q", line)
			}
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
			"backend", "path", "retry_min", "retry_max", "max_age", "bounce", "delay_warning", "workers",
			"upstream_command_timeout", "upstream_data_timeout", "dsn_env", "dsn_file", "lease",
			"cert_file", "key_file",
			"name", "address", "tls", "auth", "trusted_networks", "allow_public_networks",
			"max_message_size", "max_recipients", "max_connections", "max_connections_per_ip", "auth_timeout",
			"auth_failures_per_ip", "read_timeout", "data_timeout",
			"message_memory",
			"password_hash", "allowed_from",
			"domain", "selector", "headers", "canonicalization", "expiration", "subdomains",
			"username", "password_env", "password_file", "ca_file", "rate_limit", "dsn_from",
			"provider", "region", "envelope_from", "header_from_rewrite",
			"from_domain", "to_domain", "upstreams",
			"admin_token_env",
			"shutdown_timeout", "proxy_protocol", "proxy_trusted",
			"url", "events", "secret_env", "secret_file", "users",
		}
		for _, k := range keys {
			if !regexp.MustCompile(`(?m)^(#\s+)?`+k+` *= `).MatchString(text) && !strings.Contains(text, "or "+k+" = ") {
				t.Errorf("config.toml.example does not document %s", k)
			}
		}
		for _, section := range []string{"[queue]", "[tls]", "[[listen]]", "[limits]", "[[user]]", "[[dkim]]", "[[upstream]]", "[[route]]", "[http]", "[[webhook]]"} {
			if !slices.Contains(strings.Split(text, "\n"), section) && !strings.Contains(text, "\n"+section+" ") {
				t.Errorf("config.toml.example has no %s", section)
			}
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
