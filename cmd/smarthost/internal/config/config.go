// Package config reads smarthost's TOML configuration into the typed
// pieces the binary builds from: it checks every key, reads the secrets
// and files the keys name, and reports every problem at once, each
// naming its key.
package config

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"net/mail"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/crypto/bcrypt"

	"smarthost/dkim"
	"smarthost/internal/bytesize"
	"smarthost/internal/mailproto"
	"smarthost/metrics"
	"smarthost/relay"
	"smarthost/relay/upstream"
)

// Config is a validated configuration: every part the binary builds gets
// its typed piece from here, and nothing outside this package sees TOML.
type Config struct {
	Path      string     // file the configuration was read from
	Hostname  string     // banner and EHLO name; default os.Hostname()
	LogFormat string     // "text" (default) or "json"
	LogLevel  slog.Level // default slog.LevelInfo
	Queue     Queue

	// TLSCertFile and TLSKeyFile hold the serving certificate ([tls]).
	// They are checked to load as a pair; the server re-reads them itself.
	TLSCertFile, TLSKeyFile string

	Listeners []relay.Listener
	Limits    relay.Limits
	Users     []relay.User
	DKIM      []dkim.Key          // loaded and checked; one Key per [[dkim]]
	Upstreams []upstream.Upstream // with rate_limit and dsn_from
	Routes    []upstream.Route

	// UpstreamProviders maps the name of each upstream configured from a
	// provider profile to that profile's name, for check-upstream's
	// provider-specific hints; nil when no upstream names a provider.
	UpstreamProviders map[string]string

	HTTPAddress   string // [http] address, default "127.0.0.1:9090"
	AdminTokenEnv string // env var holding the /api bearer token; "" for none
	// HTTPMaxConnections caps the [http] listener's open connections;
	// default metrics.DefaultMaxConnections (256).
	HTTPMaxConnections int

	// ShutdownTimeout bounds a graceful stop: transactions in progress
	// and deliveries in flight get this long to finish. Default 25s, under
	// Kubernetes' 30 s grace period.
	ShutdownTimeout time.Duration
}

// Queue is the [queue] table.
type Queue struct {
	Path     string        // bbolt file, default /var/lib/smarthost/queue.db
	RetryMin time.Duration // first retry delay, default 1m
	RetryMax time.Duration // cap of the doubling delay, default 1h
	MaxAge   time.Duration // then the message bounces, default 120h
	Bounce   bool          // send DSNs to the envelope sender, default true
	// DelayWarning is the queue time after which the sender is warned
	// that a message is delayed (once); 0, the default, sends none.
	DelayWarning time.Duration
	Workers      int // concurrent deliveries, default 16
	// UpstreamCommandTimeout bounds connecting to an upstream, the TLS
	// handshake and the reply to each command; default 2m.
	UpstreamCommandTimeout time.Duration
	// UpstreamDataTimeout bounds sending a message and waiting for the
	// reply after the final dot; default 10m.
	UpstreamDataTimeout time.Duration
}

// Error is one problem in a configuration, naming its key, e.g.
// Key "listen[0].tls".
type Error struct {
	Key string // "" for a problem with the file as a whole
	Msg string
}

// Error returns the problem as "key: message", or the message alone for
// a problem with the file as a whole.
func (e Error) Error() string {
	if e.Key == "" {
		return e.Msg
	}
	return e.Key + ": " + e.Msg
}

// Errors is every problem found in one configuration.
type Errors []Error

// Error joins the problems, one "key: message" line each.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Defaults for keys that may be left out.
const (
	// DefaultShutdownTimeout is the default of shutdown_timeout, which
	// bounds a graceful stop: under Kubernetes' 30 s grace period.
	DefaultShutdownTimeout     = 25 * time.Second
	defaultQueuePath           = "/var/lib/smarthost/queue.db"
	DefaultHTTPAddress         = "127.0.0.1:9090"
	defaultWorkers             = 16
	defaultMaxMessage          = 25 << 20
	defaultMaxRecipients       = 100
	defaultMaxConnections      = 1000
	defaultAuthFailures        = 5
	DefaultUpstreamConnections = 4
	// Twenty connections are more than one client needs, and an address
	// cannot hold a listener's places; Postfix's own default is 50.
	DefaultMaxConnectionsPerIP = 20
	DefaultAuthTimeout         = time.Minute
	// DefaultMessageMemory lets 16 messages of 1 MiB, or some 150 of
	// 100 KB, be received into memory at once and stored in one commit;
	// past it, messages spool to disk. 1,000 sessions sending 900 KB at
	// once then peak at 150-180 MiB, where 32 MB peaked at 220-280 MiB
	// (bench/MEMORY.md). See README, "Memory".
	DefaultMessageMemory = 16 << 20
)

// Load reads the file at path and validates it with Parse.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data, path)
}

// AdminEndpoint is where a client finds the admin API of a running
// relay: the [http] address and admin_token_env of its configuration
// file; a key that is not set is "".
type AdminEndpoint struct {
	Address       string `toml:"address"`
	AdminTokenEnv string `toml:"admin_token_env"`
}

// ReadAdminEndpoint reads the [http] table of the file at path, and only
// it, leniently: the rest may need secrets that an administrator's shell
// does not have. A file that does not exist gives the zero AdminEndpoint.
func ReadAdminEndpoint(path string) (AdminEndpoint, error) {
	var file struct {
		HTTP AdminEndpoint `toml:"http"`
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return AdminEndpoint{}, fmt.Errorf("read config: %w", err)
	default:
		if _, err := toml.Decode(string(data), &file); err != nil {
			return AdminEndpoint{}, fmt.Errorf("config %s: [http]: %w", path, err)
		}
	}
	return file.HTTP, nil
}

// Parse decodes and validates a configuration. When anything is
// wrong the error is an Errors listing every problem found, each
// naming its key; a TOML syntax error stops the parse and is reported
// alone, with its line and column.
func Parse(data []byte, path string) (*Config, error) {
	var root map[string]any
	if _, err := toml.Decode(string(data), &root); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, Errors{{Msg: fmt.Sprintf("TOML syntax error at line %d, column %d: %s",
				pe.Position.Line, pe.Position.Col, pe.Message)}}
		}
		return nil, Errors{{Msg: fmt.Sprintf("TOML: %v", err)}}
	}
	p := &parser{}
	cfg := p.config(newTable(&p.errs, "", root))
	cfg.Path = path
	if len(p.errs) > 0 {
		return nil, p.errs
	}
	return cfg, nil
}

// parser collects problems while it builds a Config.
type parser struct {
	errs Errors
}

func (p *parser) errorf(key, format string, args ...any) {
	p.errs = append(p.errs, Error{Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (p *parser) config(root *table) *Config {
	cfg := &Config{}

	if h, ok := root.str("hostname"); ok {
		if !ValidDomain(strings.ToLower(h)) {
			root.errorf("hostname", "%q is not a domain name", h)
		}
		cfg.Hostname = h
	} else if !root.has("hostname") {
		h, err := os.Hostname()
		switch {
		case err != nil:
			p.errorf("hostname", "not set and the system host name is unknown (%v)", err)
		case !ValidDomain(strings.ToLower(h)):
			p.errorf("hostname", "not set and the system host name %q is not a domain name", h)
		}
		cfg.Hostname = h
	}

	cfg.LogFormat = root.strDefault("log_format", "text")
	if cfg.LogFormat != "text" && cfg.LogFormat != "json" {
		root.errorf("log_format", `must be "text" or "json", not %q`, cfg.LogFormat)
	}
	switch lvl := root.strDefault("log_level", "info"); strings.ToLower(lvl) {
	case "debug":
		cfg.LogLevel = slog.LevelDebug
	case "info":
		cfg.LogLevel = slog.LevelInfo
	case "warn":
		cfg.LogLevel = slog.LevelWarn
	case "error":
		cfg.LogLevel = slog.LevelError
	default:
		root.errorf("log_level", `must be "debug", "info", "warn" or "error", not %q`, lvl)
	}

	cfg.ShutdownTimeout = root.duration("shutdown_timeout", DefaultShutdownTimeout)
	cfg.Queue = p.queue(root.sub("queue"))
	cfg.Listeners = p.listeners(root)
	cfg.TLSCertFile, cfg.TLSKeyFile = p.servingTLS(root.sub("tls"), cfg.Listeners)
	cfg.Limits = p.limits(root.sub("limits"))
	cfg.DKIM = p.dkim(root, cfg.Queue.MaxAge)
	cfg.Upstreams, cfg.UpstreamProviders = p.upstreams(root, cfg.DKIM)
	cfg.Routes = p.routes(root, cfg.Upstreams)
	users, froms := p.users(root)
	cfg.Users = users
	p.checkRoutable(froms, cfg.Routes)

	http := root.sub("http")
	cfg.HTTPAddress = http.strDefault("address", DefaultHTTPAddress)
	if err := checkHostPort(cfg.HTTPAddress, false); err != nil {
		http.errorf("address", "%v", err)
	}
	cfg.HTTPMaxConnections = http.integer("max_connections", metrics.DefaultMaxConnections, 1)
	if env, ok := http.str("admin_token_env"); ok {
		// A named token that is missing would leave the admin API open or
		// unusable; either way the operator meant something else.
		if env == "" {
			http.errorf("admin_token_env", "must name an environment variable")
		} else if os.Getenv(env) == "" {
			http.errorf("admin_token_env", "environment variable %s is not set or empty", env)
		}
		cfg.AdminTokenEnv = env
	}
	http.done()

	root.done()
	return cfg
}

func (p *parser) queue(t *table) Queue {
	q := Queue{
		Path:     t.strDefault("path", defaultQueuePath),
		RetryMin: t.duration("retry_min", time.Minute),
		RetryMax: t.duration("retry_max", time.Hour),
		MaxAge:   t.duration("max_age", 120*time.Hour),
		Bounce:   t.boolean("bounce", true),
		// Off unless asked for: a warning is one more message the sender
		// did not expect.
		DelayWarning: t.duration("delay_warning", 0),
		Workers:      t.integer("workers", defaultWorkers, 1),
		// RFC 5321 section 4.5.3.2 recommends 2 to 5 minutes per command
		// and 10 for the reply to the final dot; a stuck upstream holds a
		// worker for that long.
		UpstreamCommandTimeout: t.duration("upstream_command_timeout", 2*time.Minute),
		UpstreamDataTimeout:    t.duration("upstream_data_timeout", 10*time.Minute),
	}
	if q.Path == "" {
		t.errorf("path", "must not be empty")
	}
	if q.RetryMin > 0 && q.RetryMax > 0 && q.RetryMin > q.RetryMax {
		t.errorf("retry_min", "%v is longer than retry_max %v", q.RetryMin, q.RetryMax)
	}
	if q.DelayWarning > 0 && q.MaxAge > 0 && q.DelayWarning >= q.MaxAge {
		// The message would expire into a bounce before the warning.
		t.errorf("delay_warning", "%v must be shorter than max_age %v", q.DelayWarning, q.MaxAge)
	}
	if q.DelayWarning > 0 && !q.Bounce {
		// The warning is a DSN too; saying nothing would hide that it is off.
		t.errorf("delay_warning", "needs bounce = true: delay warnings are DSNs")
	}
	t.done()
	return q
}

func (p *parser) limits(t *table) relay.Limits {
	l := relay.Limits{
		MaxMessageBytes:     t.size("max_message_size", defaultMaxMessage),
		MaxRecipients:       t.integer("max_recipients", defaultMaxRecipients, 1),
		MaxConnections:      t.integer("max_connections", defaultMaxConnections, 1),
		MaxConnectionsPerIP: t.integer("max_connections_per_ip", DefaultMaxConnectionsPerIP, 0),
		AuthTimeout:         t.duration("auth_timeout", DefaultAuthTimeout),
		AuthFailuresPerIP:   t.integer("auth_failures_per_ip", defaultAuthFailures, 1),
		AuthFailureWindow:   time.Minute,
		ReadTimeout:         t.duration("read_timeout", 5*time.Minute),
		DataTimeout:         t.duration("data_timeout", 10*time.Minute),
		MessageMemory:       t.size("message_memory", DefaultMessageMemory),
	}
	t.done()
	return l
}

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
			pfx, err := parseNetwork(s)
			if err != nil {
				t.errorf(key, "%v", err)
				continue
			}
			if pfx.Bits() == 0 {
				t.errorf(key, "%s trusts every address and would make an open relay", pfx)
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
		pfx, err := parseNetwork(s)
		if err != nil {
			t.errorf(key, "%v", err)
			continue
		}
		if pfx.Bits() == 0 {
			t.errorf(key, "%s trusts every address to send a PROXY header: any client could claim any address", pfx)
			continue
		}
		out = append(out, pfx)
	}
	switch {
	case on && t.missingList("proxy_trusted"):
		t.errorf("proxy_trusted", "required with proxy_protocol = true: the addresses of the load balancers that send PROXY headers")
	case !on && listed:
		t.errorf("proxy_trusted", "set without proxy_protocol = true")
	}
	return on, out
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

// servingTLS checks [tls]; the pair is required when a listener speaks TLS.
func (p *parser) servingTLS(t *table, listeners []relay.Listener) (certFile, keyFile string) {
	var user string // first listener that needs the certificate
	for i, l := range listeners {
		if l.TLS == mailproto.TLSStartTLS || l.TLS == mailproto.TLSImplicit {
			user = fmt.Sprintf("listen[%d] uses tls = %q", i, l.TLS)
			break
		}
	}
	certFile, certOK := t.str("cert_file")
	keyFile, keyOK := t.str("key_file")
	var certPEM, keyPEM []byte
	if certOK {
		certPEM = t.readFile("cert_file", certFile)
	} else if user != "" && !t.has("cert_file") {
		t.errorf("cert_file", "required: %s", user)
	}
	if keyOK {
		keyPEM = t.readFile("key_file", keyFile)
	} else if user != "" && !t.has("key_file") {
		t.errorf("key_file", "required: %s", user)
	}
	if certPEM != nil && keyPEM != nil {
		if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
			t.errorf("cert_file", "does not load with key_file: %v", err)
		}
	}
	t.done()
	return certFile, keyFile
}

// allowedFrom is one valid allowed_from entry and where it came from.
type allowedFrom struct {
	t       *table
	index   int
	pattern string // normalised
}

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
		t.done()
		out = append(out, u)
	}
	return out, froms
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
		if f, ok := t.str("key_file"); ok {
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

// upstreams reads the [[upstream]] tables. A table with provider = "…"
// starts from that profile's address, TLS mode and rate limit; any of
// those keys given explicitly wins. dkimKeys decide whether the header
// From: may be rewritten. providers maps the names of the upstreams
// configured from a profile to the profile's name.
func (p *parser) upstreams(root *table, dkimKeys []dkim.Key) (out []upstream.Upstream, providers map[string]string) {
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
		case hasEnv:
			if env == "" {
				t.errorf("password_env", "must name an environment variable")
			} else if u.Password = os.Getenv(env); u.Password == "" {
				t.errorf("password_env", "environment variable %s is not set or empty", env)
			}
		case hasFile:
			if data := t.readFile("password_file", file); data != nil {
				u.Password = strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
				if u.Password == "" {
					t.errorf("password_file", "%s is empty", file)
				}
			}
		case !t.has("password_env") && !t.has("password_file") && !usesOAuth(t):
			t.errorf("password_env", "username is set: give password_env or password_file")
		}
		upstreamOAuth(t, &u)

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
	return out, providers
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
func upstreamOAuth(t *table, u *upstream.Upstream) {
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
		o.ClientSecret = t.secretFile("oauth_client_secret_file", secretFile)
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
		if data := t.readFile("oauth_service_account_file", saFile); data != nil {
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
		o.RefreshToken = t.secretFile("oauth_refresh_token_file", refreshFile)
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
// without surrounding white space, which must not be empty.
func (t *table) secretFile(k, path string) string {
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

// CheckMailbox accepts a plain address "local@domain" such as an upstream
// login may send from: no display name, no angle brackets, an ASCII
// domain name.
func CheckMailbox(a string) error {
	at := strings.LastIndexByte(a, '@')
	if at <= 0 {
		return fmt.Errorf("%q is not an address such as \"bounces@example.com\"", a)
	}
	if a[:at] == "*" {
		return fmt.Errorf("%q is a pattern; give one address", a)
	}
	if domain := strings.ToLower(a[at+1:]); !ValidDomain(domain) {
		return fmt.Errorf("%q: %q is not a domain name", a, domain)
	}
	if pa, err := mail.ParseAddress(a); err != nil || pa.Address != a {
		return fmt.Errorf("%q is not a valid email address", a)
	}
	// It goes out in MAIL FROM, and the relay does not speak SMTPUTF8
	// (RFC 6531).
	for _, c := range []byte(a) {
		if c >= 0x80 {
			return fmt.Errorf("%q is not an ASCII address", a)
		}
	}
	return nil
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
	seen := map[string]string{}
	for _, t := range tables {
		var r upstream.Route
		if d, ok := t.str("from_domain"); ok {
			r.FromDomain = strings.ToLower(d)
			if r.FromDomain != "*" && !ValidDomain(r.FromDomain) {
				t.errorf("from_domain", `%q is neither "*" nor a domain name`, d)
			} else if prev, dup := seen[r.FromDomain]; dup {
				t.errorf("from_domain", "%q is already routed by %s", r.FromDomain, prev)
			} else {
				seen[r.FromDomain] = t.path
			}
		} else if !t.has("from_domain") {
			t.errorf("from_domain", `required: a sender domain or "*"`)
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

// checkRoutable reports every allowed_from entry whose mail no route
// would carry: such a user could submit mail that can never leave.
func (p *parser) checkRoutable(froms []allowedFrom, routes []upstream.Route) {
	routed := map[string]bool{}
	for _, r := range routes {
		routed[r.FromDomain] = true
	}
	if routed["*"] {
		return
	}
	for _, f := range froms {
		key := fmt.Sprintf("allowed_from[%d]", f.index)
		if f.pattern == "*" {
			f.t.errorf(key, `"*" needs a [[route]] with from_domain = "*"`)
			continue
		}
		domain := f.pattern[strings.LastIndexByte(f.pattern, '@')+1:]
		if !routed[domain] {
			f.t.errorf(key, `no route for %s; add a [[route]] with from_domain = %q or "*"`, domain, domain)
		}
	}
}

// checkHostPort accepts "host:port" with a numeric port; the host may be
// empty (all interfaces) unless needHost.
func checkHostPort(s string, needHost bool) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	if needHost && host == "" {
		return fmt.Errorf("%q has no host", s)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || needHost && n == 0 {
		return fmt.Errorf("%q: port %q is not a number from 1 to 65535", s, port)
	}
	return nil
}

func isLoopbackHost(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Unmap().IsLoopback()
}

// ValidDomain reports whether d is a lower-case ASCII domain name:
// dot-separated labels of letters, digits and hyphens (RFC 1035 section
// 2.3.1, relaxed by RFC 1123 to allow a leading digit).
func ValidDomain(d string) bool {
	if d == "" || len(d) > 253 {
		return false
	}
	for label := range strings.SplitSeq(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// ParseSize parses a byte size such as "25MB" (see bytesize.Parse).
func ParseSize(s string) (int64, error) { return bytesize.Parse(s) }

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

// table reads one TOML table. Each accessor marks its key as known and
// records an Error for a value of the wrong type or range, so one
// pass reports every problem; done reports the keys nobody asked for.
type table struct {
	errs *Errors
	path string // "listen[0]"; "" for the root table
	m    map[string]any
	used map[string]bool
}

func newTable(errs *Errors, path string, m map[string]any) *table {
	return &table{errs: errs, path: path, m: m, used: map[string]bool{}}
}

// key is the full name of a key of this table, as shown in errors.
func (t *table) key(k string) string {
	if t.path == "" {
		return k
	}
	return t.path + "." + k
}

func (t *table) errorf(k, format string, args ...any) {
	*t.errs = append(*t.errs, Error{Key: t.key(k), Msg: fmt.Sprintf(format, args...)})
}

func (t *table) get(k string) (any, bool) {
	t.used[k] = true
	v, ok := t.m[k]
	return v, ok
}

// has reports whether k is present, whatever its type.
func (t *table) has(k string) bool {
	_, ok := t.get(k)
	return ok
}

func (t *table) typeError(k, want string, v any) {
	t.errorf(k, "must be %s, not %s", want, tomlType(v))
}

// uniqueName reads the required "name" key and checks it against the names
// of the earlier tables of the same kind in seen.
func (t *table) uniqueName(seen map[string]string) string {
	name, ok := t.str("name")
	switch {
	case !ok:
		if !t.has("name") {
			t.errorf("name", "required")
		}
	case name == "":
		t.errorf("name", "must not be empty")
	default:
		if prev, dup := seen[name]; dup {
			t.errorf("name", "%q is already used by %s", name, prev)
		} else {
			seen[name] = t.path
		}
	}
	return name
}

// str returns the string at k; ok is false when k is absent or not a
// string (the latter is recorded).
func (t *table) str(k string) (string, bool) {
	v, present := t.get(k)
	if !present {
		return "", false
	}
	s, ok := v.(string)
	if !ok {
		t.typeError(k, "a string", v)
	}
	return s, ok
}

func (t *table) strDefault(k, def string) string {
	if s, ok := t.str(k); ok {
		return s
	}
	return def
}

func (t *table) boolean(k string, def bool) bool {
	v, present := t.get(k)
	if !present {
		return def
	}
	b, ok := v.(bool)
	if !ok {
		t.typeError(k, "true or false", v)
		return def
	}
	return b
}

func (t *table) integer(k string, def, minimum int) int {
	v, present := t.get(k)
	if !present {
		return def
	}
	n, ok := v.(int64)
	if !ok {
		t.typeError(k, "an integer", v)
		return def
	}
	if n < int64(minimum) || n > math.MaxInt32 {
		t.errorf(k, "%d is out of range (%d to %d)", n, minimum, math.MaxInt32)
		return def
	}
	return int(n)
}

// duration reads a Go duration string ("90s", "1m", "120h"); it must be
// positive.
func (t *table) duration(k string, def time.Duration) time.Duration {
	v, present := t.get(k)
	if !present {
		return def
	}
	s, ok := v.(string)
	if !ok {
		t.typeError(k, `a duration string such as "90s", "1m" or "120h"`, v)
		return 0
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.errorf(k, `%q is not a duration such as "90s", "1m" or "120h"`, s)
		return 0
	}
	if d <= 0 {
		t.errorf(k, "%q must be positive", s)
		return 0
	}
	return d
}

// size reads a byte size: a string for ParseSize or a plain integer.
func (t *table) size(k string, def int64) int64 {
	v, present := t.get(k)
	if !present {
		return def
	}
	var n int64
	switch v := v.(type) {
	case int64:
		n = v
	case string:
		var err error
		if n, err = ParseSize(v); err != nil {
			t.errorf(k, "%v", err)
			return 0
		}
	default:
		t.typeError(k, `a size such as "25MB"`, v)
		return 0
	}
	if n <= 0 {
		t.errorf(k, "must be positive")
		return 0
	}
	return n
}

// strings reads an array of strings; each bad element is reported under
// its index and left out. ok is false when k is absent or not an array.
func (t *table) strings(k string) ([]string, bool) {
	v, present := t.get(k)
	if !present {
		return nil, false
	}
	arr, ok := v.([]any)
	if !ok {
		t.typeError(k, "an array of strings", v)
		return nil, false
	}
	out := make([]string, 0, len(arr))
	for i, e := range arr {
		s, ok := e.(string)
		if !ok {
			t.errorf(fmt.Sprintf("%s[%d]", k, i), "must be a string, not %s", tomlType(e))
			continue
		}
		out = append(out, s)
	}
	return out, true
}

// missingList reports whether k is absent or an empty array; a value of
// another type has already been reported by the accessor.
func (t *table) missingList(k string) bool {
	v, present := t.get(k)
	arr, isArr := v.([]any)
	return !present || isArr && len(arr) == 0
}

// sub returns the table at k, empty when absent or of the wrong type.
func (t *table) sub(k string) *table {
	v, present := t.get(k)
	m, ok := v.(map[string]any)
	if present && !ok {
		t.typeError(k, "a table", v)
	}
	return newTable(t.errs, t.key(k), m)
}

// tables returns the array of tables at k ([[k]] or k = [{...}]).
func (t *table) tables(k string) []*table {
	v, present := t.get(k)
	if !present {
		return nil
	}
	var elems []any
	switch v := v.(type) {
	case []map[string]any:
		for _, m := range v {
			elems = append(elems, m)
		}
	case []any:
		elems = v
	default:
		t.typeError(k, fmt.Sprintf("an array of tables ([[%s]])", k), v)
		return nil
	}
	var out []*table
	for i, e := range elems {
		key := fmt.Sprintf("%s[%d]", k, i)
		m, ok := e.(map[string]any)
		if !ok {
			t.errorf(key, "must be a table, not %s", tomlType(e))
			continue
		}
		out = append(out, newTable(t.errs, t.key(key), m))
	}
	return out
}

// readFile returns the contents of a file named by key k, or nil after
// recording why it cannot be read.
func (t *table) readFile(k, path string) []byte {
	if path == "" {
		t.errorf(k, "must not be empty")
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.errorf(k, "%v", err)
		return nil
	}
	if data == nil {
		data = []byte{}
	}
	return data
}

// done reports every key of the table that no accessor asked for, so
// that typos do not pass silently.
func (t *table) done() {
	var unknown []string
	for k := range t.m {
		if !t.used[k] {
			unknown = append(unknown, k)
		}
	}
	slices.Sort(unknown)
	for _, k := range unknown {
		t.errorf(k, "unknown key")
	}
}

// tomlType names the TOML type of a decoded value for error messages.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any:
		return "an array"
	case []map[string]any:
		return "an array of tables"
	case map[string]any:
		return "a table"
	case time.Time:
		return "a date/time"
	default:
		return fmt.Sprintf("%T", v)
	}
}
