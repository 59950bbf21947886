package relay

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	msgauthdkim "github.com/emersion/go-msgauth/dkim"
	"golang.org/x/crypto/bcrypt"

	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

// memQueue records what the submission side queues; fail makes Put and
// PutSpooled fail. Spools are real files of a real queue.Store in dir,
// opened at the first NewSpool; spoolFail makes NewSpool fail, and
// brokenSpool hands out spools whose every Write fails, like on a full
// disk.
type memQueue struct {
	mu          sync.Mutex
	msgs        []queuedMsg
	fail        error
	spoolFail   error
	brokenSpool bool
	dir         string
	spools      *queue.Store
}

type queuedMsg struct {
	m       queue.Message
	body    []byte
	spooled bool
}

func (q *memQueue) Put(_ context.Context, m *queue.Message, body []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fail != nil {
		return q.fail
	}
	q.msgs = append(q.msgs, queuedMsg{m: *m, body: bytes.Clone(body)})
	return nil
}

func (q *memQueue) NewSpool() (*queue.Spool, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.spoolFail != nil {
		return nil, q.spoolFail
	}
	if q.spools == nil {
		st, err := queue.Open(filepath.Join(q.dir, "queue.db"), queue.Options{})
		if err != nil {
			return nil, err
		}
		q.spools = st
	}
	sp, err := q.spools.NewSpool()
	if err != nil {
		return nil, err
	}
	if q.brokenSpool {
		sp.Abort() // its Writes fail from now on
	}
	return sp, nil
}

// PutSpooled stores the message in the real store, records its body as
// the store gives it back, and deletes it there.
func (q *memQueue) PutSpooled(ctx context.Context, m *queue.Message, head []byte, sp *queue.Spool) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fail != nil {
		sp.Abort()
		return q.fail
	}
	if err := q.spools.PutSpooled(ctx, m, head, sp); err != nil {
		return err
	}
	body, err := q.spools.Body(m.ID)
	if err != nil {
		return err
	}
	if err := q.spools.Delete(m.ID); err != nil {
		return err
	}
	q.msgs = append(q.msgs, queuedMsg{m: *m, body: body, spooled: true})
	return nil
}

// spoolFiles returns the names left in the spool directory: none once
// every spooled message was stored and deleted, or aborted.
func (q *memQueue) spoolFiles(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(q.dir, "queue.db.spool"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func (q *memQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.spools != nil {
		q.spools.Close()
	}
}

func (q *memQueue) all() []queuedMsg {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]queuedMsg(nil), q.msgs...)
}

const testPassword = "correct horse battery staple"

func testUsers(t testing.TB) []User {
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return []User{{Name: "app", PasswordHash: hash, AllowedFrom: []string{"app@example.com", "*@notify.example.com"}}}
}

type testEnv struct {
	srv   *Server
	q     *memQueue
	pki   *testpki.PKI
	addrs []string
}

// startServer runs a Server with the given listeners (default: one
// starttls listener requiring AUTH) and returns their addresses.
func startServer(t *testing.T, tweak func(*Server)) *testEnv {
	t.Helper()
	pki := testpki.New(t)
	q := &memQueue{dir: t.TempDir()}
	t.Cleanup(q.close)
	srv := NewServer(q)
	srv.Hostname = "relay.test"
	srv.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSStartTLS, AuthRequired: true}}
	srv.TLSConfig = pki.ServerTLS()
	srv.Users = testUsers(t)
	srv.Limits = Limits{
		MaxMessageBytes:   1 << 20,
		MaxRecipients:     5,
		MaxConnections:    50,
		AuthFailuresPerIP: 5,
		ReadTimeout:       10 * time.Second,
		DataTimeout:       30 * time.Second,
		MessageMemory:     16 << 20, // the configuration's default
	}
	if tweak != nil {
		tweak(srv)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	env := &testEnv{srv: srv, q: q, pki: pki}
	for _, a := range srv.Addrs() {
		env.addrs = append(env.addrs, a.String())
	}
	return env
}

// client is a raw SMTP client that shows every reply exactly.
type client struct {
	t    *testing.T
	conn net.Conn
	tp   *textproto.Conn
}

func dialFrom(t *testing.T, addr, localIP string) *client {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if localIP != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(localIP)}
	}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{t: t, conn: conn, tp: textproto.NewConn(conn)}
}

// dial connects and reads the greeting.
func dial(t *testing.T, addr string) *client {
	t.Helper()
	c := dialFrom(t, addr, "")
	if code, msg := c.read(); code != 220 {
		t.Fatalf("greeting: %d %s", code, msg)
	}
	return c
}

func (c *client) read() (int, string) {
	c.t.Helper()
	code, msg, err := c.tp.ReadResponse(0)
	if err != nil && code == 0 {
		return 0, err.Error()
	}
	return code, msg
}

func (c *client) cmd(format string, args ...any) (int, string) {
	c.t.Helper()
	if err := c.tp.PrintfLine(format, args...); err != nil {
		return 0, err.Error()
	}
	return c.read()
}

func (c *client) expect(want int, format string, args ...any) string {
	c.t.Helper()
	code, msg := c.cmd(format, args...)
	if code != want {
		c.t.Fatalf("%s: got %d %s, want %d", fmt.Sprintf(format, args...), code, msg, want)
	}
	return msg
}

func (c *client) startTLS(cfg *tls.Config) {
	c.t.Helper()
	c.expect(220, "STARTTLS")
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		c.t.Fatal(err)
	}
	c.conn = tc
	c.tp = textproto.NewConn(tc)
}

func (c *client) authPlain(user, pass string) (int, string) {
	c.t.Helper()
	ir := base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
	return c.cmd("AUTH PLAIN %s", ir)
}

// login does EHLO, STARTTLS, EHLO and AUTH PLAIN.
func (c *client) login(pki *testpki.PKI) {
	c.t.Helper()
	c.expect(250, "EHLO client.test")
	c.startTLS(pki.ClientTLS())
	c.expect(250, "EHLO client.test")
	if code, msg := c.authPlain("app", testPassword); code != 235 {
		c.t.Fatalf("AUTH: %d %s", code, msg)
	}
}

// data sends DATA and the message as raw bytes (the caller ends it with
// CRLF.CRLF) and returns the final reply.
func (c *client) data(raw string) (int, string) {
	c.t.Helper()
	c.expect(354, "DATA")
	if _, err := io.WriteString(c.conn, raw); err != nil {
		c.t.Fatal(err)
	}
	return c.read()
}

func (c *client) send(from string, rcpts []string, msg string) (int, string) {
	c.t.Helper()
	if code, text := c.cmd("MAIL FROM:<%s>", from); code != 250 {
		return code, text
	}
	for _, r := range rcpts {
		if code, text := c.cmd("RCPT TO:<%s>", r); code != 250 {
			return code, text
		}
	}
	return c.data(msg + ".\r\n")
}

const plainMsg = "From: App <app@example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nHello Bob.\r\n"

func TestSubmitStartTLSAuthPlain(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	ehlo := c.expect(250, "EHLO client.test")
	if strings.Contains(ehlo, "AUTH") {
		t.Errorf("AUTH advertised before STARTTLS:\n%s", ehlo)
	}
	// SIZE without a number (RFC 1870 section 4): see newSMTPServer.
	if !strings.Contains(ehlo, "STARTTLS") || !regexp.MustCompile(`(?m)^SIZE$`).MatchString(ehlo) {
		t.Errorf("EHLO lacks STARTTLS or SIZE:\n%s", ehlo)
	}
	c.startTLS(env.pki.ClientTLS())
	ehlo = c.expect(250, "EHLO client.test")
	if !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Errorf("AUTH not advertised after STARTTLS:\n%s", ehlo)
	}
	c.expect(235, "AUTH PLAIN %s", base64.StdEncoding.EncodeToString([]byte("\x00app\x00"+testPassword)))
	code, msg := c.send("app@example.com", []string{"bob@example.net", "carol@example.org"}, plainMsg)
	if code != 250 || !strings.HasPrefix(msg, "2.0.0 OK queued as ") {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	id := strings.TrimPrefix(msg, "2.0.0 OK queued as ")

	got := env.q.all()
	if len(got) != 1 {
		t.Fatalf("queued %d messages, want 1", len(got))
	}
	m := got[0]
	if m.m.ID != id || m.m.From != "app@example.com" || m.m.User != "app" || len(m.m.Recipients) != 2 ||
		m.m.Recipients[0].Addr != "bob@example.net" || m.m.Recipients[1].Addr != "carol@example.org" {
		t.Errorf("envelope: %+v", m.m)
	}
	body := string(m.body)
	if !strings.HasSuffix(body, plainMsg) {
		t.Errorf("original message not intact at the end:\n%s", body)
	}
	added := strings.TrimSuffix(body, plainMsg)
	for _, want := range []string{"Received: from client.test ([127.0.0.1])\r\n\tby relay.test (smarthost) with ESMTPSA id " + id + ";", "Message-ID: <" + id + "@relay.test>\r\n", "Date: "} {
		if !strings.Contains(added, want) {
			t.Errorf("added header lacks %q:\n%s", want, added)
		}
	}
	if m.m.Size != int64(len(m.body)) {
		t.Errorf("size %d, body %d", m.m.Size, len(m.body))
	}
}

func TestSubmitImplicitTLSAuthLogin(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSImplicit, AuthRequired: true}}
	})
	conn, err := tls.Dial("tcp", env.addrs[0], env.pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := &client{t: t, conn: conn, tp: textproto.NewConn(conn)}
	if code, _ := c.read(); code != 220 {
		t.Fatal("no greeting")
	}
	ehlo := c.expect(250, "EHLO client.test")
	if strings.Contains(ehlo, "STARTTLS") || !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Errorf("EHLO over implicit TLS:\n%s", ehlo)
	}
	c.expect(334, "AUTH LOGIN")
	c.expect(334, "%s", base64.StdEncoding.EncodeToString([]byte("app")))
	c.expect(235, "%s", base64.StdEncoding.EncodeToString([]byte(testPassword)))
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	if n := len(env.q.all()); n != 1 {
		t.Fatalf("queued %d", n)
	}
}

func TestRefusals(t *testing.T) {
	env := startServer(t, nil)
	t.Run("auth before starttls", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		code, msg := c.authPlain("app", testPassword)
		if code/100 != 5 || !strings.HasPrefix(msg, "5.7.") {
			t.Fatalf("AUTH in plain text: %d %s", code, msg)
		}
	})
	t.Run("mail without auth", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		if msg := c.expect(530, "MAIL FROM:<app@example.com>"); msg != "5.7.0 Authentication required" {
			t.Fatalf("got %q", msg)
		}
	})
	t.Run("wrong password", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		code, msg := c.authPlain("app", "wrong")
		if code != 535 || msg != "5.7.8 Authentication credentials invalid" {
			t.Fatalf("got %d %s", code, msg)
		}
		code, msg = c.authPlain("nobody", testPassword)
		if code != 535 {
			t.Fatalf("unknown user: %d %s", code, msg)
		}
	})
	t.Run("envelope sender", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.login(env.pki)
		if msg := c.expect(553, "MAIL FROM:<ceo@example.com>"); msg != "5.7.1 Sender address not allowed" {
			t.Fatalf("got %q", msg)
		}
		c.expect(553, "MAIL FROM:<>")
		c.expect(250, "MAIL FROM:<alerts@notify.example.com>")
	})
	t.Run("header sender", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.login(env.pki)
		for _, from := range []string{
			"From: ceo@example.com\r\n",
			"From: app@example.com, ceo@example.com\r\n",
			"From: =?koi8-r?B?8NLP18XSy8E=?= <ceo@example.com>\r\n",
		} {
			code, msg := c.send("app@example.com", []string{"bob@example.net"}, from+"Subject: x\r\n\r\nbody\r\n")
			if code != 553 || msg != "5.7.1 Sender address not allowed: ceo@example.com in From:" {
				t.Errorf("%q: got %d %s", from, code, msg)
			}
		}
		code, _ := c.send("app@example.com", []string{"bob@example.net"}, "From: a@notify.example.com\r\nFrom: ceo@example.com\r\n\r\nbody\r\n")
		if code != 550 {
			t.Errorf("two From: fields: got %d", code)
		}
		code, msg := c.send("app@example.com", []string{"bob@example.net"}, "From: =?koi8-r?B?8NLP18XSy8E=?= <x@notify.example.com>\r\n\r\nbody\r\n")
		if code != 250 {
			t.Errorf("allowed header From in koi8-r: %d %s", code, msg)
		}
	})
	t.Run("too many recipients", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.login(env.pki)
		c.expect(250, "MAIL FROM:<app@example.com>")
		for i := range 5 {
			c.expect(250, "RCPT TO:<r%d@example.net>", i)
		}
		code, msg := c.cmd("RCPT TO:<r5@example.net>")
		if code != 452 || !strings.HasPrefix(msg, "4.5.3") {
			t.Fatalf("6th RCPT: %d %s", code, msg)
		}
	})
	t.Run("size", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.login(env.pki)
		code, msg := c.cmd("MAIL FROM:<app@example.com> SIZE=%d", 2<<20)
		if code != 552 || !strings.HasPrefix(msg, "5.3.4") {
			t.Fatalf("SIZE: %d %s", code, msg)
		}
		// A client that lies about SIZE is stopped by the actual count.
		c.expect(250, "MAIL FROM:<app@example.com> SIZE=1000")
		c.expect(250, "RCPT TO:<bob@example.net>")
		big := plainMsg + strings.Repeat(strings.Repeat("x", 998)+"\r\n", 1100)
		code, msg = c.data(big + ".\r\n")
		if code != 552 || !strings.HasPrefix(msg, "5.3.4") {
			t.Fatalf("oversized DATA: %d %s", code, msg)
		}
	})
	t.Run("bad addresses", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.login(env.pki)
		c.expect(250, "MAIL FROM:<app@example.com>")
		for _, rcpt := range []string{"bob", "bob@", "\xff\xfe@example.net", "bob\x01@example.net", "josé@example.net"} {
			if code, msg := c.cmd("RCPT TO:<%s>", rcpt); code/100 != 5 {
				t.Errorf("RCPT %q: %d %s", rcpt, code, msg)
			}
		}
	})
	if n := len(env.q.all()); n != 1 { // only the koi8-r one above
		t.Errorf("queued %d messages, want 1", n)
	}
}

func TestAuthFailureLimit(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	env := startServer(t, func(s *Server) {
		s.Limits.AuthFailuresPerIP = 3
		s.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	})
	tlsLogin := func(ip, pass string) (*client, int, string) {
		c := dialFrom(t, env.addrs[0], ip)
		c.read()
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		code, msg := c.authPlain("app", pass)
		return c, code, msg
	}
	c, _, _ := tlsLogin("127.0.0.1", "wrong")
	for range 2 {
		if code, _ := c.authPlain("app", "wrong"); code != 535 {
			t.Fatalf("failure: got %d", code)
		}
	}
	// The limit is reached: even the right password is refused with 421,
	// and the connection closes.
	code, msg := c.authPlain("app", testPassword)
	if code != 421 || !strings.HasPrefix(msg, "4.7.0") {
		t.Fatalf("after limit: %d %s", code, msg)
	}
	if _, err := c.tp.ReadLine(); err == nil {
		t.Fatal("connection still open after 421")
	}
	if _, code, _ := tlsLogin("127.0.0.1", testPassword); code != 421 {
		t.Fatalf("new connection from the blocked address: %d", code)
	}
	if _, code, msg := tlsLogin("127.0.0.2", testPassword); code != 235 {
		t.Fatalf("other address: %d %s", code, msg)
	}
	mu.Lock()
	now = now.Add(61 * time.Second)
	mu.Unlock()
	if _, code, msg := tlsLogin("127.0.0.1", testPassword); code != 235 {
		t.Fatalf("after the window: %d %s", code, msg)
	}
}

func TestTrustedNetworks(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSNone, TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.2/32")}}}
		s.TLSConfig = nil
	})
	out := dialFrom(t, env.addrs[0], "127.0.0.1")
	if code, msg := out.read(); code != 554 || !strings.Contains(msg, "5.7.1") {
		t.Fatalf("untrusted client: %d %s", code, msg)
	}
	in := dialFrom(t, env.addrs[0], "127.0.0.2")
	in.read()
	ehlo := in.expect(250, "EHLO client.test")
	if strings.Contains(ehlo, "AUTH") {
		t.Errorf("AUTH offered on an auth-none listener")
	}
	if code, msg := in.send("anyone@anywhere.example", []string{"bob@example.net"}, "Subject: cron\r\n\r\nok\r\n"); code != 250 {
		t.Fatalf("trusted submit: %d %s", code, msg)
	}
	got := env.q.all()
	if len(got) != 1 || !strings.Contains(string(got[0].body), "From: <anyone@anywhere.example>\r\n") {
		t.Fatalf("missing From: not added: %+v", got)
	}
}

func TestMaxConnections(t *testing.T) {
	env := startServer(t, func(s *Server) { s.Limits.MaxConnections = 2 })
	a, b := dial(t, env.addrs[0]), dial(t, env.addrs[0])
	c := dialFrom(t, env.addrs[0], "")
	if code, msg := c.read(); code != 421 || msg != "4.7.0 relay.test Too many connections, try again later" {
		t.Fatalf("third connection: %d %s", code, msg)
	}
	a.expect(221, "QUIT")
	// The slot frees once the first connection has gone.
	deadline := time.Now().Add(5 * time.Second)
	for {
		d := dialFrom(t, env.addrs[0], "")
		if code, _ := d.read(); code == 220 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("slot not released")
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.expect(250, "NOOP")
}

func TestSmuggling(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	smuggled := "MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo@example.com\r\n\r\nsmuggled\r\n"
	body := plainMsg +
		"line one\n.\n" + smuggled +
		"line two\r\n.\n" + smuggled +
		"line three\n.\r\n" + smuggled +
		"line four\r.\r" + smuggled
	code, msg := c.send("app@example.com", []string{"bob@example.net"}, body)
	if code != 250 {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	c.expect(250, "NOOP") // the session is in step: nothing was taken as a command
	got := env.q.all()
	if len(got) != 1 {
		t.Fatalf("queued %d messages, want exactly 1", len(got))
	}
	stored := got[0].body
	if bytes.Contains(bytes.ReplaceAll(stored, []byte("\r\n"), nil), []byte("\n")) ||
		bytes.Contains(bytes.ReplaceAll(stored, []byte("\r\n"), nil), []byte("\r")) {
		t.Errorf("bare CR or LF left in the stored message")
	}
	if n := bytes.Count(stored, []byte("smuggled\r\n")); n != 4 {
		t.Errorf("smuggled text appears %d times in the body, want 4", n)
	}
}

func TestNormalisation(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	msg := "From: app@example.com\nMessage-ID: <keep@example.com>\nDate: Mon, 2 Nov 2026 10:00:00 +0000\n\nbare\nline\rend"
	code, reply := c.send("app@example.com", []string{"bob@example.net"}, msg+"\r\n")
	if code != 250 {
		t.Fatalf("%d %s", code, reply)
	}
	body := string(env.q.all()[0].body)
	want := "From: app@example.com\r\nMessage-ID: <keep@example.com>\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n\r\nbare\r\nline\r\nend\r\n"
	if !strings.HasSuffix(body, want) {
		t.Errorf("stored message:\n%q", body)
	}
	if strings.Count(body, "Message-ID:") != 1 || strings.Count(body, "Date:") != 1 {
		t.Errorf("Message-ID or Date added although present:\n%s", body)
	}
	if env.q.all()[0].m.MessageID != "<keep@example.com>" {
		t.Errorf("MessageID %q", env.q.all()[0].m.MessageID)
	}
	// A body line directly after the fields gets a separating empty line.
	code, _ = c.send("app@example.com", []string{"bob@example.net"}, "From: app@example.com\r\nthis is body text\r\n")
	if code != 250 {
		t.Fatal(code)
	}
	if body := string(env.q.all()[1].body); !strings.HasSuffix(body, "From: app@example.com\r\n\r\nthis is body text\r\n") {
		t.Errorf("no separator inserted:\n%q", body)
	}
}

func TestHeloInjection(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	c.expect(250, "EHLO evil.test;X-Injected:(yes)")
	c.startTLS(env.pki.ClientTLS())
	c.expect(250, "EHLO evil.test;X-Injected:(yes)")
	c.authPlain("app", testPassword)
	if code, _ := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatal(code)
	}
	body := string(env.q.all()[0].body)
	if !strings.Contains(body, "Received: from evil.test_X-Injected:_yes_ ([127.0.0.1])") {
		t.Errorf("HELO not sanitised:\n%s", body)
	}
}

func TestLoopRefused(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	hops := strings.Repeat("Received: from a by b; Mon, 2 Nov 2026 10:00:00 +0000\r\n", 51)
	code, msg := c.send("app@example.com", []string{"bob@example.net"}, hops+plainMsg)
	if code != 554 || !strings.HasPrefix(msg, "5.4.6") {
		t.Fatalf("%d %s", code, msg)
	}
}

func TestStorageFailureNever250(t *testing.T) {
	env := startServer(t, nil)
	env.q.fail = fmt.Errorf("queue: put: %w", syscall.ENOSPC)
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg)
	if code != 452 || msg != "4.3.1 Insufficient system storage, try again later" {
		t.Fatalf("%d %s", code, msg)
	}
	env.q.mu.Lock()
	env.q.fail = errors.New("disk on fire: /var/lib/smarthost/queue.db")
	env.q.mu.Unlock()
	code, msg = c.send("app@example.com", []string{"bob@example.net"}, plainMsg)
	if code != 452 || strings.Contains(msg, "/var/lib") {
		t.Fatalf("%d %s", code, msg)
	}
	env.q.mu.Lock()
	env.q.fail = nil
	env.q.mu.Unlock()
	if code, msg = c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("after recovery: %d %s", code, msg)
	}
}

func TestShutdown(t *testing.T) {
	env := startServer(t, nil)
	idle := dial(t, env.addrs[0])
	idle.expect(250, "EHLO idle.test")
	busy := dial(t, env.addrs[0])
	busy.login(env.pki)
	busy.expect(250, "MAIL FROM:<app@example.com>")
	busy.expect(250, "RCPT TO:<bob@example.net>")
	busy.expect(354, "DATA")

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- env.srv.Shutdown(ctx)
	}()
	if code, msg := idle.read(); code != 421 || !strings.Contains(msg, "4.3.2") {
		t.Fatalf("idle client: %d %s", code, msg)
	}
	if _, err := net.DialTimeout("tcp", env.addrs[0], time.Second); err == nil {
		t.Error("still accepting connections during shutdown")
	}
	io.WriteString(busy.conn, plainMsg+".\r\n")
	if code, msg := busy.read(); code != 250 {
		t.Fatalf("transaction in progress: %d %s", code, msg)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if len(env.q.all()) != 1 {
		t.Fatal("message not queued")
	}
}

func TestSignedAtDoor(t *testing.T) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k := dkim.Key{Domain: "example.com", Selector: "door", Signer: key}
	signer, err := dkim.New([]dkim.Key{k}, nil)
	if err != nil {
		t.Fatal(err)
	}
	env := startServer(t, func(s *Server) { s.Signer = signer })
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	// Bare LFs in the body: signing happens after normalisation, so the
	// signature covers the bytes that will be sent.
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, "From: app@example.com\nSubject: signed\n\nbare\nlines\r\n"); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	if code, msg := c.send("x@notify.example.com", []string{"bob@example.net"}, "From: x@notify.example.com\r\n\r\nno key\r\n"); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	got := env.q.all()
	if !bytes.HasPrefix(got[0].body, []byte("DKIM-Signature: ")) {
		t.Fatalf("not signed first:\n%s", got[0].body)
	}
	record, _ := dkim.RecordValue(key.Public())
	vs, err := msgauthdkim.VerifyWithOptions(bytes.NewReader(got[0].body), &msgauthdkim.VerifyOptions{
		LookupTXT: func(string) ([]string, error) { return []string{record}, nil },
	})
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
		t.Fatalf("verification: %v %+v", err, vs)
	}
	if bytes.Contains(got[1].body, []byte("DKIM-Signature")) {
		t.Error("message without a key for its From: domain was signed")
	}
}

// TestListenRefusesIncompleteServer: Listen binds nothing for a Server
// that NewServer did not make or whose defaults were taken away.
func TestListenRefusesIncompleteServer(t *testing.T) {
	listeners := []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSNone, AuthRequired: true}}
	for _, tt := range []struct {
		name string
		srv  func() *Server
		msg  string
	}{
		{"not from NewServer", func() *Server { return &Server{Listeners: listeners, Queue: &memQueue{dir: t.TempDir()}} }, "not made by NewServer"},
		{"no queue", func() *Server { return NewServer(nil) }, "without Queue"},
		{"no logger", func() *Server { s := NewServer(&memQueue{dir: t.TempDir()}); s.Logger = nil; return s }, "without Logger"},
		{"no clock", func() *Server { s := NewServer(&memQueue{dir: t.TempDir()}); s.Now = nil; return s }, "or Now"},
		{"no PROXY header timeout", func() *Server {
			s := NewServer(&memQueue{dir: t.TempDir()})
			s.ProxyHeaderTimeout = 0
			return s
		}, "ProxyHeaderTimeout"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv := tt.srv()
			srv.Listeners = listeners
			err := srv.Listen()
			if err == nil {
				srv.Close()
				t.Fatal("Listen accepted the server")
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not say %q", err, tt.msg)
			}
			if len(srv.Addrs()) != 0 {
				t.Errorf("addresses bound: %v", srv.Addrs())
			}
		})
	}
}
