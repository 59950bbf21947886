package config

import (
	"time"
)

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

// Defaults of the [queue] keys, applied by the parser to a key left out.
const (
	DefaultQueuePath = "/var/lib/smarthost/queue.db" // path
	DefaultRetryMin  = time.Minute                   // retry_min
	DefaultRetryMax  = time.Hour                     // retry_max
	DefaultMaxAge    = 120 * time.Hour               // max_age
	DefaultWorkers   = 16                            // workers
	// DefaultUpstreamCommandTimeout and DefaultUpstreamDataTimeout are
	// what RFC 5321 section 4.5.3.2 recommends: 2 to 5 minutes per
	// command and 10 for the reply to the final dot; a stuck upstream
	// holds a worker for that long.
	DefaultUpstreamCommandTimeout = 2 * time.Minute
	DefaultUpstreamDataTimeout    = 10 * time.Minute
)

// queue reads the [queue] table.
func (p *parser) queue(t *table) Queue {
	q := Queue{
		Path:     t.strDefault("path", DefaultQueuePath),
		RetryMin: t.duration("retry_min", DefaultRetryMin),
		RetryMax: t.duration("retry_max", DefaultRetryMax),
		MaxAge:   t.duration("max_age", DefaultMaxAge),
		Bounce:   t.boolean("bounce", true),
		// Off unless asked for: a warning is one more message the sender
		// did not expect.
		DelayWarning:           t.duration("delay_warning", 0),
		Workers:                t.integer("workers", DefaultWorkers, 1),
		UpstreamCommandTimeout: t.duration("upstream_command_timeout", DefaultUpstreamCommandTimeout),
		UpstreamDataTimeout:    t.duration("upstream_data_timeout", DefaultUpstreamDataTimeout),
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
