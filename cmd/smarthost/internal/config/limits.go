package config

import (
	"time"

	"smarthost/relay"
)

// Defaults of [limits].
const (
	defaultMaxMessage     = 25 << 20
	defaultMaxRecipients  = 100
	defaultMaxConnections = 1000
	defaultAuthFailures   = 5
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

// limits reads the [limits] table.
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
