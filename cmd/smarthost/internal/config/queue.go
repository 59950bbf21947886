package config

import (
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// QueueBackend is where the queue is kept.
type QueueBackend string

// The values of [queue] backend.
const (
	QueueBbolt    QueueBackend = "bbolt"    // the file at path, one process
	QueuePostgres QueueBackend = "postgres" // a database shared by every replica
)

// Secret is a value read from an environment variable or a file that
// must never reach a log or a terminal: fmt, slog and encoding/json show
// it as "[redacted]"; string(s) is the value.
type Secret string

const redacted = "[redacted]"

// String hides the value from fmt's %v and %s.
func (Secret) String() string { return redacted }

// GoString hides the value from fmt's %#v.
func (Secret) GoString() string { return redacted }

// LogValue hides the value from slog.
func (Secret) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText hides the value from encoders, such as slog's JSON handler
// printing a struct that holds a Secret.
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// Queue is the [queue] table.
type Queue struct {
	Backend  QueueBackend  // default QueueBbolt
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
	// DSN is the PostgreSQL connection string (libpq key=value or URL)
	// of the postgres backend, from dsn_env or dsn_file; "" with bbolt.
	// It may hold a password.
	DSN Secret
	// Lease is how long a replica's claim on a message holds without
	// renewal; default 30s. Only the postgres backend has claims.
	Lease time.Duration
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
	DefaultLease                  = 30 * time.Second // lease
	// MinLease and MaxLease bound lease: shorter, a replica slowed by a
	// GC pause or a busy database loses claims it still works on; longer,
	// a dead replica's messages wait that long before another takes them.
	MinLease = 5 * time.Second
	MaxLease = 10 * time.Minute
)

// postgresKeys are the [queue] keys only the postgres backend reads.
var postgresKeys = []string{"dsn_env", "dsn_file", "lease"}

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
		Lease:                  DefaultLease,
	}
	if q.Path == "" {
		t.errorf("path", "must not be empty")
	}
	switch b := t.strDefault("backend", string(QueueBbolt)); QueueBackend(b) {
	case QueueBbolt:
		q.Backend = QueueBbolt
		for _, k := range postgresKeys {
			if t.has(k) {
				t.errorf(k, `only used with backend = "postgres"`)
			}
		}
	case QueuePostgres:
		// path is not an error here: a file moved to postgres needs no
		// other edit, and the bbolt file is left alone.
		q.Backend = QueuePostgres
		q.DSN = t.queueDSN()
		q.Lease = t.duration("lease", DefaultLease)
		if q.Lease != 0 && (q.Lease < MinLease || q.Lease > MaxLease) {
			t.errorf("lease", "%v is out of range (%v to %v)", q.Lease, MinLease, MaxLease)
		}
	default:
		t.errorf("backend", `must be "bbolt" or "postgres", not %q`, b)
		for _, k := range postgresKeys {
			t.has(k) // known keys, whichever backend was meant
		}
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

// queueDSN reads the connection string of the postgres backend from
// exactly one of dsn_env and dsn_file, and checks that it parses. No
// message shows the string: it may hold the database password.
func (t *table) queueDSN() Secret {
	env, hasEnv := t.str("dsn_env")
	file, hasFile := t.str("dsn_file")
	var dsn, key string
	switch {
	case hasEnv && hasFile:
		t.errorf("dsn_file", "set only one of dsn_env and dsn_file")
		return ""
	case !t.readsSecret("queue") && (hasEnv || hasFile):
		if hasEnv {
			t.secretNamed("dsn_env", env)
		} else {
			t.secretNamed("dsn_file", file)
		}
	case hasEnv:
		key = "dsn_env"
		if env == "" {
			t.errorf(key, "must name an environment variable")
		} else if dsn = strings.TrimSpace(os.Getenv(env)); dsn == "" {
			t.errorf(key, "environment variable %s is not set or empty", env)
		}
	case hasFile:
		key = "dsn_file"
		if data := t.readFile(key, file); data != nil {
			line, _, _ := strings.Cut(string(data), "\n")
			if dsn = strings.TrimSpace(line); dsn == "" {
				t.errorf(key, "the first line of %s is empty", file)
			}
		}
	case !t.has("dsn_env") && !t.has("dsn_file"):
		t.errorf("dsn_env", `required with backend = "postgres": give dsn_env or dsn_file`)
	}
	if dsn == "" {
		return ""
	}
	// pgx's error repeats the string with the password redacted only as
	// far as it can tell where the password is in a string that does not
	// parse, so none of it is shown.
	if _, err := pgx.ParseConfig(dsn); err != nil {
		t.errorf(key, "the connection string is neither libpq key=value pairs nor a postgres:// URL, or a file it names does not load (not shown: it may hold a password)")
		return ""
	}
	return Secret(dsn)
}
