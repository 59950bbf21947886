package config

import (
	"time"

	"smarthost/relay"
)

// Defaults of the [limits] keys, applied by the parser to a key left out.
const (
	DefaultMaxMessageSize    = 25 << 20         // max_message_size
	DefaultMaxRecipients     = 100              // max_recipients
	DefaultMaxConnections    = 1000             // max_connections
	DefaultAuthFailuresPerIP = 5                // auth_failures_per_ip, in AuthFailureWindow
	DefaultReadTimeout       = 5 * time.Minute  // read_timeout
	DefaultDataTimeout       = 10 * time.Minute // data_timeout
	// DefaultMaxConnectionsPerIP is the default max_connections_per_ip.
	// Twenty connections are more than one client needs, and an address
	// cannot hold a listener's places; Postfix's own default is 50.
	DefaultMaxConnectionsPerIP = 20
	DefaultAuthTimeout         = time.Minute // auth_timeout
	// DefaultMessageMemory lets 16 messages of 1 MiB, or some 150 of
	// 100 KB, be received into memory at once and stored in one commit;
	// past it, messages spool to disk. 1,000 sessions sending 900 KB at
	// once then peak at 150-180 MiB, where 32 MB peaked at 220-280 MiB
	// (bench/MEMORY.md). See README, "Memory".
	DefaultMessageMemory = 16 << 20
)

// AuthFailureWindow is the window in which auth_failures_per_ip counts
// failures. It is not a key: the documented limit is per minute.
const AuthFailureWindow = time.Minute

// limits reads the [limits] table.
func (p *parser) limits(t *table) relay.Limits {
	l := relay.Limits{
		MaxMessageBytes:     t.size("max_message_size", DefaultMaxMessageSize),
		MaxRecipients:       t.integer("max_recipients", DefaultMaxRecipients, 1),
		MaxConnections:      t.integer("max_connections", DefaultMaxConnections, 1),
		MaxConnectionsPerIP: t.integer("max_connections_per_ip", DefaultMaxConnectionsPerIP, 0),
		AuthTimeout:         t.duration("auth_timeout", DefaultAuthTimeout),
		AuthFailuresPerIP:   t.integer("auth_failures_per_ip", DefaultAuthFailuresPerIP, 1),
		AuthFailureWindow:   AuthFailureWindow,
		ReadTimeout:         t.duration("read_timeout", DefaultReadTimeout),
		DataTimeout:         t.duration("data_timeout", DefaultDataTimeout),
		MessageMemory:       t.size("message_memory", DefaultMessageMemory),
	}
	t.done()
	return l
}
