package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
)

// Counter follows smtp-sink's -c output: one record, ended by '\r', each
// time a session ends, a QUIT is read or a message's final "." is read:
// "sess=3 quit=3 mesg=7". It records when each new message count was read.
type Counter struct {
	mu      sync.Mutex
	count   int
	at      time.Time     // when count was read
	changed chan struct{} // closed and replaced on every change
	err     error         // set when the stream ends
	ended   bool
}

// NewCounter returns a Counter at zero.
func NewCounter() *Counter {
	return &Counter{changed: make(chan struct{})}
}

// Run reads records from r until it ends, with now as the clock.
func (c *Counter) Run(r io.Reader, now func() time.Time) {
	sc := bufio.NewScanner(r)
	sc.Split(splitRecords)
	for sc.Scan() {
		n, ok := parseMesg(sc.Bytes())
		if !ok {
			continue
		}
		c.set(n, now())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ended = true
	c.err = sc.Err()
	if c.err == nil {
		c.err = io.EOF
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *Counter) set(n int, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n == c.count {
		return
	}
	c.count, c.at = n, at
	close(c.changed)
	c.changed = make(chan struct{})
}

// Count returns the number of messages received so far.
func (c *Counter) Count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.count
}

// errSinkEnded reports that smtp-sink stopped writing its counter.
var errSinkEnded = errors.New("smtp-sink ended")

// WaitFor waits until at least n messages have arrived and returns the
// time the n-th (or a later) count was read. It gives up at ctx's end,
// returning the count reached.
func (c *Counter) WaitFor(ctx context.Context, n int) (time.Time, error) {
	for {
		c.mu.Lock()
		count, at, ch, ended := c.count, c.at, c.changed, c.ended
		c.mu.Unlock()
		if count >= n {
			return at, nil
		}
		if ended {
			return time.Time{}, fmt.Errorf("%w with %d of %d messages", errSinkEnded, count, n)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return time.Time{}, fmt.Errorf("%d of %d messages arrived: %w", count, n, ctx.Err())
		}
	}
}

// splitRecords splits smtp-sink's output at '\r' or '\n'.
func splitRecords(data []byte, atEOF bool) (advance int, token []byte, err error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// parseMesg returns the "mesg=" count of one smtp-sink record.
func parseMesg(rec []byte) (int, bool) {
	for f := range bytes.FieldsSeq(rec) {
		if v, ok := bytes.CutPrefix(f, []byte("mesg=")); ok {
			n, err := strconv.Atoi(string(v))
			return n, err == nil
		}
	}
	return 0, false
}

// Sink is a running smtp-sink, the upstream of every relay under test:
// it accepts each message and throws it away, counting.
type Sink struct {
	Addr    string
	Counter *Counter
	Proc    *Process
}

// startSink starts smtp-sink on addr. As root it must drop privileges
// (-u); it keeps no file, so any unprivileged user serves.
func startSink(sup *Supervisor, bin, addr string, logFile *os.File) (*Sink, error) {
	args := []string{"-c"}
	if os.Geteuid() == 0 {
		args = append(args, "-u", "nobody")
	}
	args = append(args, addr, "1024")
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout = pw
	cmd.Stderr = logFile
	p, err := sup.Start("smtp-sink", cmd)
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, err
	}
	s := &Sink{Addr: addr, Counter: NewCounter(), Proc: p}
	go func() {
		defer pr.Close()
		s.Counter.Run(pr, time.Now)
	}()
	return s, nil
}

// Discard is an in-process SMTP server that reads each message to its
// end, throws it away and counts it: an upstream for the memory
// measurements that needs no Postfix and keeps nothing.
type Discard struct {
	Addr    string
	Counter *Counter
	srv     *smtp.Server
	mu      sync.Mutex
	count   int
}

// startDiscard listens on a loopback port.
func startDiscard() (*Discard, error) {
	return startDiscardTLS(nil)
}

// startDiscardTLS listens on a loopback port, with implicit TLS (as on
// port 465) when conf is not nil.
func startDiscardTLS(conf *tls.Config) (*Discard, error) {
	d := &Discard{Counter: NewCounter()}
	var err error
	d.srv, d.Addr, err = serveSMTPTLS("discard.bench.invalid", conf, func() smtp.Session { return &discardSession{d: d} })
	if err != nil {
		return nil, err
	}
	return d, nil
}

// serveSMTP starts an in-process SMTP server for messages of up to 64 MB
// on a loopback port, with a session from newSession for each
// connection, and returns it and its address.
func serveSMTP(domain string, newSession func() smtp.Session) (*smtp.Server, string, error) {
	return serveSMTPTLS(domain, nil, newSession)
}

// serveSMTPTLS is serveSMTP, with implicit TLS when conf is not nil.
func serveSMTPTLS(domain string, conf *tls.Config, newSession func() smtp.Session) (*smtp.Server, string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	addr := l.Addr().String()
	if conf != nil {
		l = tls.NewListener(l, conf)
	}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return newSession(), nil }))
	srv.Domain = domain
	srv.MaxMessageBytes = 64 << 20
	srv.ReadTimeout = time.Minute
	srv.WriteTimeout = time.Minute
	go func() { _ = srv.Serve(l) }()
	return srv, addr, nil
}

// Close stops the server.
func (d *Discard) Close() { _ = d.srv.Close() }

type discardSession struct{ d *Discard }

func (s *discardSession) Reset()        {}
func (s *discardSession) Logout() error { return nil }
func (s *discardSession) Mail(string, *smtp.MailOptions) error {
	return nil
}
func (s *discardSession) Rcpt(string, *smtp.RcptOptions) error {
	return nil
}
func (s *discardSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	s.d.mu.Lock()
	s.d.count++
	n := s.d.count
	s.d.mu.Unlock()
	s.d.Counter.set(n, time.Now())
	return nil
}

// Capture is a small in-process SMTP server that keeps the messages it
// receives, used once per relay to check what the relay delivers (intact,
// and DKIM-signed where it should be) before any timing.
type Capture struct {
	Addr     string
	Messages chan []byte
	srv      *smtp.Server
}

// startCapture listens on a loopback port.
func startCapture() (*Capture, error) {
	return startCaptureTLS(nil)
}

// startCaptureTLS listens on a loopback port, with implicit TLS when
// conf is not nil.
func startCaptureTLS(conf *tls.Config) (*Capture, error) {
	c := &Capture{Messages: make(chan []byte, 16)}
	var err error
	c.srv, c.Addr, err = serveSMTPTLS("capture.bench.invalid", conf, func() smtp.Session { return &captureSession{out: c.Messages} })
	if err != nil {
		return nil, err
	}
	return c, nil
}

// Close stops the server.
func (c *Capture) Close() { _ = c.srv.Close() }

type captureSession struct{ out chan<- []byte }

func (s *captureSession) Reset()        {}
func (s *captureSession) Logout() error { return nil }
func (s *captureSession) Mail(string, *smtp.MailOptions) error {
	return nil
}
func (s *captureSession) Rcpt(string, *smtp.RcptOptions) error {
	return nil
}
func (s *captureSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	select {
	case s.out <- b:
		return nil
	default:
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "capture full"}
	}
}
