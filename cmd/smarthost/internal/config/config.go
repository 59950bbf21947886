// Package config reads smarthost's TOML configuration into the typed
// pieces the binary builds from: it checks every key, reads the secrets
// and files the keys name, and reports every problem at once, each
// naming its key.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"smarthost/dkim"
	"smarthost/relay"
	"smarthost/relay/upstream"
	"smarthost/webhook"
)

// Config is a validated configuration: every part the binary builds gets
// its typed piece from here, and nothing outside this package sees TOML.
type Config struct {
	Path      string     // file the configuration was read from
	Hostname  string     // banner and EHLO name; default os.Hostname()
	LogFormat string     // "text" (default) or "json"
	LogLevel  slog.Level // default slog.LevelInfo
	Queue     Queue
	// Warnings are what may be a mistake and still works: check-config
	// prints them, serve logs them.
	Warnings []Error
	// HistoryRetention is how long a message's history is kept after it
	// left the queue ([history] retention); 0 keeps none.
	HistoryRetention time.Duration

	// TLSCertFile and TLSKeyFile hold the serving certificate ([tls]).
	// They are checked to load as a pair; the server re-reads them itself.
	TLSCertFile, TLSKeyFile string

	Listeners []relay.Listener
	Limits    relay.Limits
	Users     []relay.User
	DKIM      []dkim.Key          // loaded and checked; one Key per [[dkim]]
	Upstreams []upstream.Upstream // with rate_limit and dsn_from
	Routes    []upstream.Route
	// Webhooks are the [[webhook]] endpoints, their keys decoded.
	Webhooks []webhook.Endpoint

	// UpstreamProviders maps the name of each upstream configured from a
	// provider profile to that profile's name, for check-upstream's
	// provider-specific hints; nil when no upstream names a provider.
	UpstreamProviders map[string]string
	// UpstreamSecrets names, by upstream, the files its secrets were read
	// from, which ReadSecrets reads again; nil when none has any.
	UpstreamSecrets map[string]SecretFiles

	HTTPAddress   string // [http] address, default "127.0.0.1:9090"
	AdminTokenEnv string // env var holding the /api bearer token; "" for none
	// HTTPMaxConnections caps the [http] listener's open connections;
	// default metrics.DefaultMaxConnections (256).
	HTTPMaxConnections int

	// SecretsSkipped is set when some secrets were left unread
	// (LoadFiltered): the Config is fit for checks only.
	SecretsSkipped bool

	// ShutdownTimeout bounds a graceful stop: transactions in progress
	// and deliveries in flight get this long to finish. Default 25s, under
	// Kubernetes' 30 s grace period.
	ShutdownTimeout time.Duration
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

// DefaultShutdownTimeout is the default of shutdown_timeout, which bounds
// a graceful stop: under Kubernetes' 30 s grace period.
const DefaultShutdownTimeout = 25 * time.Second

// Load reads the file at path and validates it with Parse.
func Load(path string) (*Config, error) { return LoadFiltered(path, nil) }

// LoadFiltered is Load reading only the secrets that read chooses (nil
// reads all). A Config with secrets left unread has SecretsSkipped set and
// can be checked but not served.
func LoadFiltered(path string, read SecretFilter) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return parse(data, path, read)
}

// Parse decodes and validates a configuration. When anything is
// wrong the error is an Errors listing every problem found, each
// naming its key; a TOML syntax error stops the parse and is reported
// alone, with its line and column.
func Parse(data []byte, path string) (*Config, error) { return parse(data, path, nil) }

func parse(data []byte, path string, read SecretFilter) (*Config, error) {
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
	cfg := p.config(newTable(&p.errs, read, "", root))
	cfg.Path = path
	cfg.SecretsSkipped = read != nil
	if len(p.errs) > 0 {
		return nil, p.errs
	}
	return cfg, nil
}

// parser collects problems while it builds a Config.
type parser struct {
	errs Errors
}

// errorf records a problem with a key of the file as a whole.
func (p *parser) errorf(key, format string, args ...any) {
	p.errs = append(p.errs, Error{Key: key, Msg: fmt.Sprintf(format, args...)})
}

// config reads the top-level keys and every table, in the order in
// which later tables depend on earlier ones, then the rules that join
// tables.
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
	cfg.HistoryRetention = p.history(root.sub("history"))
	cfg.Listeners = p.listeners(root)
	cfg.TLSCertFile, cfg.TLSKeyFile = p.servingTLS(root.sub("tls"), cfg.Listeners)
	cfg.Limits = p.limits(root.sub("limits"))
	cfg.DKIM = p.dkim(root, cfg.Queue.MaxAge)
	cfg.Upstreams, cfg.UpstreamProviders, cfg.UpstreamSecrets = p.upstreams(root, cfg.DKIM)
	cfg.Routes = p.routes(root, cfg.Upstreams)
	users, froms := p.users(root)
	cfg.Users = users
	p.checkRoutable(froms, cfg.Routes)
	p.checkAuthUsers(cfg.Listeners, cfg.Users)
	cfg.Warnings = tlsPortWarnings(cfg.Listeners, cfg.Upstreams)
	cfg.Webhooks = p.webhooks(root, cfg.Users)

	cfg.HTTPAddress, cfg.AdminTokenEnv, cfg.HTTPMaxConnections = p.http(root.sub("http"))
	root.done()
	return cfg
}

// checkRoutable reports every allowed_from entry whose mail no route
// would carry: such a user could submit mail that can never leave. A
// route by recipient domain carries mail from every sender.
func (p *parser) checkRoutable(froms []allowedFrom, routes []upstream.Route) {
	routed := map[string]bool{}
	for _, r := range routes {
		if r.ToDomain != "" {
			return
		}
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
