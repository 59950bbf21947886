package relay

import (
	"net/netip"
	"time"

	"smarthost/internal/mailproto"
	"smarthost/relay/upstream"
)

// Listener describes one submission listener.
type Listener struct {
	Name    string // for logs; defaults to the address
	Address string
	TLS     mailproto.TLSMode
	// AuthRequired demands AUTH before MAIL. Without it, only clients in
	// TrustedNetworks may submit, under any sender address.
	AuthRequired    bool
	TrustedNetworks []netip.Prefix
	// ProxyProtocol makes the listener read a PROXY protocol header (v1
	// or v2) from connections whose source is in ProxyTrusted: a load
	// balancer's, which must send one. Such a client is then seen with the
	// address the header gives, by TrustedNetworks, the auth-failure limit,
	// logs and Received:. Connections from other sources are served as
	// themselves, and refused if they send a header.
	ProxyProtocol bool
	ProxyTrusted  []netip.Prefix
	// RateLimit bounds the messages of each client address (an IPv6 /64)
	// that submits without logging in; zero means none.
	RateLimit upstream.Rate
}

// User is a submitter allowed to AUTH.
type User struct {
	Name         string
	PasswordHash []byte   // bcrypt
	AllowedFrom  []string // "user@domain", "*@domain" or "*"
	// AllowedRecipients are the recipients this user may send to, in the
	// same patterns; empty means any.
	AllowedRecipients []string
	// RateLimit bounds the user's accepted messages, and RecipientLimit
	// their recipients, in any sliding window; zero means none.
	RateLimit      upstream.Rate
	RecipientLimit upstream.Rate
	// AllowNullSender admits MAIL FROM:<> (an application MTA's own
	// bounces) without allowing every sender.
	AllowNullSender bool
}

// Limits bound what one client may make the relay do.
type Limits struct {
	MaxMessageBytes int64
	MaxRecipients   int
	// MaxConnections bounds the connections of each listener, so that the
	// clients of one (the public port) cannot take the places of another's
	// (a trusted network's).
	MaxConnections int
	// MaxConnectionsPerIP bounds the connections of one client address
	// (an IPv6 /64) over all listeners; 0 means no bound.
	MaxConnectionsPerIP int
	// AuthTimeout is how long a connection to a listener that requires
	// AUTH may stay without logging in, whatever it sends; 0 means no
	// bound.
	AuthTimeout       time.Duration
	AuthFailuresPerIP int           // per AuthFailureWindow, per client address (an IPv6 /64)
	AuthFailureWindow time.Duration // one minute unless a test shortens it
	ReadTimeout       time.Duration // per command line and per read in DATA
	DataTimeout       time.Duration // a whole DATA or BDAT transfer
	// MessageMemory bounds the bytes of messages that sessions in DATA
	// hold in memory past what each holds on its own (its header section,
	// at least 16 KiB), all sessions together; a session that cannot have
	// more spools the rest of its message to disk. 0 spools every message
	// past that.
	MessageMemory int64
}
