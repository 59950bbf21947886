package upstream

import (
	"crypto/x509"
	"reflect"
	"slices"
	"time"

	"smarthost/internal/mailproto"
)

// Upstream is a provider that the relay hands messages to.
type Upstream struct {
	Name     string
	Address  string // host:port
	TLS      mailproto.TLSMode
	Username string // empty: no AUTH
	Password string
	// RootCAs verifies the upstream's certificate: system roots plus the
	// configured ca_file. Nil means system roots only.
	RootCAs        *x509.CertPool
	MaxConnections int
	// RateLimit paces messages through the upstream; zero means none.
	RateLimit Rate
	// DSNFrom is the envelope sender for bounces sent through this
	// upstream, for providers that refuse the null sender from an
	// authenticated login; "" sends them from EnvelopeFrom when that is
	// set, else from <>.
	DSNFrom string
	// EnvelopeFrom, when set, replaces the envelope sender (MAIL FROM) of
	// every message sent through this upstream, for providers that accept
	// only their login's own address. The header From: is left alone, so
	// a DKIM signature made at the door stays valid; the queue keeps the
	// original sender, to which bounces still go. See MailFrom.
	EnvelopeFrom string
	// HeaderFromRewrite also replaces the address of the header From:
	// with EnvelopeFrom, keeping the display name, and moves the original
	// From: to a Reply-To: unless the message has one. It breaks any
	// signature over From:, so the configuration refuses it where the
	// relay signs with DKIM.
	HeaderFromRewrite bool
	// Auth chooses how to log in when Username is set; "" means
	// AuthOAuth2 when OAuth is set, else AuthPassword.
	Auth AuthMode
	// OAuth obtains the access tokens of the OAuth2 modes, for Username.
	OAuth *OAuth
}

// Rate is at most N messages in any window of Per.
type Rate struct {
	N   int
	Per time.Duration
}

// Route sends mail from a sender domain, or to a recipient domain,
// through upstreams, in order. A route has one of FromDomain and ToDomain.
type Route struct {
	FromDomain string // "*" matches every other sender
	ToDomain   string // the recipients of this domain, whatever the sender
	Upstreams  []string
}

// Config is what a reload may change in a running Deliverer: its
// upstreams, its routes and its timeouts. See Deliverer.SetConfig.
type Config struct {
	Upstreams []Upstream
	// Routes choose upstreams by the recipient's domain (ToDomain), else
	// by the envelope sender's domain; FromDomain "*" takes every other
	// sender, the null sender <> included. A DSN is routed by its
	// recipient's domain only (see Deliverer.Deliver).
	Routes []Route
	// CommandTimeout bounds connecting and each command's reply; default
	// 2m. With STARTTLS, it bounds the greeting, EHLO and STARTTLS before
	// TLS together.
	CommandTimeout time.Duration
	// DataTimeout bounds sending the message and the reply after the final
	// dot; default 10m.
	DataTimeout time.Duration
}

func (c *Config) commandTimeout() time.Duration {
	if c.CommandTimeout <= 0 {
		return 2 * time.Minute
	}
	return c.CommandTimeout
}

func (c *Config) dataTimeout() time.Duration {
	if c.DataTimeout <= 0 {
		return 10 * time.Minute
	}
	return c.DataTimeout
}

// setup is one Config in effect and the endpoint of each of its
// upstreams. SetConfig replaces it whole and never changes it: a
// delivery goes on with the setup it started with.
type setup struct {
	Config
	endpoints map[string]*endpoint // by upstream name
}

// upstream returns the configuration and the endpoint of the upstream
// called name.
func (s *setup) upstream(name string) (*Upstream, *endpoint, bool) {
	for i := range s.Upstreams {
		if up := &s.Upstreams[i]; up.Name == name {
			return up, s.endpoints[name], true
		}
	}
	return nil, nil, false
}

// SetConfig puts cfg in effect for the deliveries that start from now
// on; those in flight finish under the configuration they started with.
// Call it once before the first Deliver, and again on every reload.
//
// What the Deliverer has learnt about an upstream that cfg keeps by name
// and that still reaches the same server with the same login
// (sameEndpoint) is kept: its health, its open connections, its OAuth2
// token and its counters. For an upstream that changed there, or that
// cfg removes, all of that is dropped: what was learnt about the old
// server does not hold for the new one; its idle connections are closed
// with QUIT and the busy ones when their deliveries end. The rate-limit
// window follows the upstream's name whatever changed, even its address
// or password: a provider counts its quota over a rolling window per
// account, and a reload must not start that window afresh.
func (d *Deliverer) SetConfig(cfg Config) {
	// The caller keeps its slices; a setup never changes.
	cfg.Upstreams = slices.Clone(cfg.Upstreams)
	cfg.Routes = slices.Clone(cfg.Routes)
	next := &setup{Config: cfg, endpoints: make(map[string]*endpoint, len(cfg.Upstreams))}

	d.mu.Lock()
	prev := d.cur
	for i := range next.Upstreams {
		up := &next.Upstreams[i]
		var (
			old   *Upstream
			oldEP *endpoint
		)
		if prev != nil {
			old, oldEP, _ = prev.upstream(up.Name)
		}
		switch {
		case oldEP != nil && sameEndpoint(*old, *up):
			oldEP.pool.setLimit(up.maxConnections())
			next.endpoints[up.Name] = oldEP
		case oldEP != nil:
			ep := d.newEndpoint(up, d.closed)
			ep.window = oldEP.window
			next.endpoints[up.Name] = ep
		default:
			next.endpoints[up.Name] = d.newEndpoint(up, d.closed)
		}
	}
	d.cur = next
	d.mu.Unlock()

	if prev != nil {
		var dropped []*endpoint
		for name, ep := range prev.endpoints {
			if next.endpoints[name] != ep {
				dropped = append(dropped, ep)
			}
		}
		closePools(dropped)
	}
}

// Config returns a copy of the configuration in effect.
func (d *Deliverer) Config() Config {
	cfg := d.current().Config
	cfg.Upstreams = slices.Clone(cfg.Upstreams)
	cfg.Routes = slices.Clone(cfg.Routes)
	return cfg
}

// current returns the setup in effect: the last SetConfig's, or one
// without upstreams or routes before the first.
func (d *Deliverer) current() *setup {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cur == nil {
		d.cur = &setup{}
	}
	return d.cur
}

// sameEndpoint reports whether two configurations of an upstream reach
// the same server in the same way with the same login, so that what was
// learnt about one (its health, its open connections, its OAuth2 token)
// holds for the other.
func sameEndpoint(a, b Upstream) bool {
	return a.Address == b.Address && a.TLS == b.TLS && a.RootCAs.Equal(b.RootCAs) &&
		a.Username == b.Username && a.Password == b.Password &&
		a.authMode() == b.authMode() && reflect.DeepEqual(a.OAuth, b.OAuth)
}
