package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"smarthost/internal/bytesize"
)

// TLS modes of the -tls flag.
const (
	TLSNone     = "none"
	TLSStartTLS = "starttls"
	TLSImplicit = "implicit"
)

// Size bounds of -size. The lower bound leaves room for the headers; the
// upper one keeps the shared body (held once in memory) reasonable.
const (
	minSize = 512
	maxSize = 256 << 20
)

// Config is one load run, as given on the command line.
type Config struct {
	Addr        string        // host:port of the SMTP server
	Concurrency int           // sessions running at once (-c)
	Messages    int           // messages to send in total (-n)
	Size        int64         // bytes of each message, headers included (-size)
	PerConn     int           // messages per connection; 0: one connection per session (-per-conn)
	TLS         string        // TLSNone, TLSStartTLS or TLSImplicit
	CAFile      string        // PEM certificates trusted besides the system roots (-ca)
	Insecure    bool          // skip certificate verification (-insecure)
	User        string        // AUTH username; empty: no AUTH
	Password    string        // from -pass-env or -pass-file, never a flag value
	From        string        // envelope sender and header From:
	To          []string      // recipients of every message
	Helo        string        // EHLO name
	Timeout     time.Duration // limit for each command, and for connection setup as a whole
	Rate        float64       // messages per second over all sessions; 0: no cap
	JSON        bool          // print the result as JSON
}

// Defaults of the flags.
const (
	defaultAddr    = "127.0.0.1:587"
	defaultFrom    = "smtpload@example.com"
	defaultTo      = "sink@example.com"
	defaultHelo    = "localhost"
	defaultPassEnv = "SMTPLOAD_PASSWORD"
)

// DefaultConfig is the configuration with every flag at its default.
func DefaultConfig() Config {
	return Config{
		Addr:        defaultAddr,
		Concurrency: 10,
		Messages:    1000,
		Size:        10 << 10,
		TLS:         TLSNone,
		From:        defaultFrom,
		To:          []string{defaultTo},
		Helo:        defaultHelo,
		Timeout:     30 * time.Second,
	}
}

// flagError is a command-line problem: the caller prints it on one line
// and exits with status 2.
type flagError struct {
	flag string // without the dash; empty for problems not tied to one flag
	msg  string
}

func (e *flagError) Error() string {
	if e.flag == "" {
		return e.msg
	}
	return "-" + e.flag + ": " + e.msg
}

func badFlag(name, format string, args ...any) error {
	return &flagError{flag: name, msg: fmt.Sprintf(format, args...)}
}

// passwordSource holds the flags that say where the password comes from.
type passwordSource struct {
	env  string
	file string
}

// newFlagSet binds every flag to cfg and pw. Parse errors are returned,
// not printed: the caller reports them on one line.
func newFlagSet(cfg *Config, pw *passwordSource) *flag.FlagSet {
	fs := flag.NewFlagSet("smtpload", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&cfg.Addr, "addr", cfg.Addr, "server host:port")
	fs.IntVar(&cfg.Concurrency, "c", cfg.Concurrency, "concurrent sessions")
	fs.IntVar(&cfg.Messages, "n", cfg.Messages, "messages in total")
	fs.Var((*sizeValue)(&cfg.Size), "size", "message size, headers included (B, KB, MB)")
	fs.IntVar(&cfg.PerConn, "per-conn", cfg.PerConn, "messages per connection; 0: one connection per session")
	fs.StringVar(&cfg.TLS, "tls", cfg.TLS, "none, starttls or implicit")
	fs.StringVar(&cfg.CAFile, "ca", cfg.CAFile, "PEM file of extra trusted certificates")
	fs.BoolVar(&cfg.Insecure, "insecure", cfg.Insecure, "do not verify the server certificate")
	fs.StringVar(&cfg.User, "user", cfg.User, "AUTH username")
	fs.StringVar(&pw.env, "pass-env", pw.env, "environment variable holding the password")
	fs.StringVar(&pw.file, "pass-file", pw.file, "file holding the password")
	fs.StringVar(&cfg.From, "from", cfg.From, "envelope sender and From: header")
	fs.Var(&recipientsValue{list: &cfg.To}, "to", "recipient; repeatable or comma-separated")
	fs.StringVar(&cfg.Helo, "helo", cfg.Helo, "EHLO name")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "limit for each command")
	fs.Float64Var(&cfg.Rate, "rate", cfg.Rate, "messages per second cap; 0: none")
	fs.BoolVar(&cfg.JSON, "json", cfg.JSON, "print the result as JSON")
	return fs
}

// ParseFlags builds a Config from the command line and checks it. getenv
// reads the environment (os.Getenv outside tests). It returns
// flag.ErrHelp for -h; every other error is one line naming its flag.
func ParseFlags(args []string, getenv func(string) string) (Config, error) {
	cfg := DefaultConfig()
	pw := passwordSource{env: defaultPassEnv}
	fs := newFlagSet(&cfg, &pw)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return Config{}, err
		}
		return Config{}, &flagError{msg: err.Error()}
	}
	if fs.NArg() > 0 {
		return Config{}, &flagError{msg: fmt.Sprintf("unexpected argument %q (every option is a flag)", fs.Arg(0))}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	if set["pass-env"] && set["pass-file"] {
		return Config{}, badFlag("pass-file", "give either -pass-env or -pass-file, not both")
	}
	switch {
	case cfg.User == "" && set["pass-file"]:
		return Config{}, badFlag("pass-file", "needs -user")
	case cfg.User == "" && set["pass-env"]:
		return Config{}, badFlag("pass-env", "needs -user")
	case cfg.User != "" && pw.file != "":
		b, err := os.ReadFile(pw.file)
		if err != nil {
			return Config{}, badFlag("pass-file", "%v", err)
		}
		// A file written by echo or an editor ends with a newline that is
		// not part of the password.
		cfg.Password = strings.TrimRight(string(b), "\r\n")
		if cfg.Password == "" {
			return Config{}, badFlag("pass-file", "%s is empty", pw.file)
		}
	case cfg.User != "":
		if pw.env == "" {
			return Config{}, badFlag("pass-env", "empty variable name")
		}
		cfg.Password = getenv(pw.env)
		if cfg.Password == "" {
			return Config{}, badFlag("user", "no password: set $%s or give -pass-file", pw.env)
		}
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	if _, err := cfg.TLSConfig(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// Validate checks every field and names the flag of the first problem.
func (c Config) Validate() error {
	host, port, err := net.SplitHostPort(c.Addr)
	if err != nil || host == "" || port == "" {
		return badFlag("addr", "want host:port, got %q", c.Addr)
	}
	switch {
	case c.Concurrency < 1:
		return badFlag("c", "must be at least 1, got %d", c.Concurrency)
	case c.Messages < 1:
		return badFlag("n", "must be at least 1, got %d", c.Messages)
	case c.Size < minSize || c.Size > maxSize:
		return badFlag("size", "must be between %s and %s, got %s", formatSize(minSize), formatSize(maxSize), formatSize(c.Size))
	case c.PerConn < 0:
		return badFlag("per-conn", "must be 0 (keep the connection) or more, got %d", c.PerConn)
	case c.Timeout <= 0:
		return badFlag("timeout", "must be positive, got %v", c.Timeout)
	case c.Rate < 0 || math.IsNaN(c.Rate) || math.IsInf(c.Rate, 0):
		return badFlag("rate", "must be 0 (no cap) or a positive number of messages per second, got %v", c.Rate)
	}
	switch c.TLS {
	case TLSNone:
		if c.CAFile != "" {
			return badFlag("ca", "needs -tls starttls or -tls implicit")
		}
		if c.Insecure {
			return badFlag("insecure", "needs -tls starttls or -tls implicit")
		}
	case TLSStartTLS, TLSImplicit:
		if c.CAFile != "" && c.Insecure {
			return badFlag("insecure", "verification is off, so -ca would not be used; give one of them")
		}
	default:
		return badFlag("tls", "want none, starttls or implicit, got %q", c.TLS)
	}
	if c.User != "" && c.Password == "" {
		return badFlag("user", "no password")
	}
	if err := checkAddress(c.From); err != nil {
		return badFlag("from", "%v", err)
	}
	if len(c.To) == 0 {
		return badFlag("to", "at least one recipient is needed")
	}
	for _, to := range c.To {
		if err := checkAddress(to); err != nil {
			return badFlag("to", "%v", err)
		}
	}
	if c.Helo == "" || strings.ContainsAny(c.Helo, " \t\r\n<>") {
		return badFlag("helo", "want a host name, got %q", c.Helo)
	}
	return nil
}

// checkAddress accepts local@domain without characters that would break
// the SMTP command line or the From: header.
func checkAddress(a string) error {
	local, domain, ok := strings.Cut(a, "@")
	if !ok || local == "" || domain == "" || strings.ContainsAny(a, " \t\r\n<>,;\"") {
		return fmt.Errorf("want an address such as user@example.com, got %q", a)
	}
	return nil
}

// TLSConfig is the client TLS configuration for the server, nil with
// TLSNone. The server name is the host of Addr, so an IP address is
// checked against the certificate's IP SANs.
func (c Config) TLSConfig() (*tls.Config, error) {
	if c.TLS == TLSNone {
		return nil, nil
	}
	host, _, err := net.SplitHostPort(c.Addr)
	if err != nil {
		return nil, badFlag("addr", "want host:port, got %q", c.Addr)
	}
	conf := &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12, InsecureSkipVerify: c.Insecure}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, badFlag("ca", "%v", err)
		}
		// Extra trust: the system roots stay trusted.
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, badFlag("ca", "no PEM certificate in %s", c.CAFile)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}

// ParseSize parses a byte size such as "25MB" (see bytesize.Parse).
func ParseSize(s string) (int64, error) { return bytesize.Parse(s) }

// formatSize writes n the way -size reads it, in the largest unit that
// divides it.
func formatSize(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "MB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "KB"
	}
	return strconv.FormatInt(n, 10) + "B"
}

// sizeValue is the flag.Value of -size.
type sizeValue int64

func (v *sizeValue) String() string { return formatSize(int64(*v)) }

func (v *sizeValue) Set(s string) error {
	n, err := ParseSize(s)
	if err != nil {
		return err
	}
	*v = sizeValue(n)
	return nil
}

// recipientsValue is the flag.Value of -to: the first use replaces the
// default, later uses and commas add recipients.
type recipientsValue struct {
	list *[]string
	set  bool
}

func (v *recipientsValue) String() string {
	if v.list == nil {
		return ""
	}
	return strings.Join(*v.list, ",")
}

func (v *recipientsValue) Set(s string) error {
	if !v.set {
		*v.list = nil
		v.set = true
	}
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			*v.list = append(*v.list, a)
		}
	}
	return nil
}
