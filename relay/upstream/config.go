package upstream

import (
	"crypto/x509"
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

// Route sends mail from a sender domain through upstreams, in order.
type Route struct {
	FromDomain string // "*" matches every other sender
	Upstreams  []string
}
