package relay

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/mailproto"

	"golang.org/x/crypto/bcrypt"
)

// Hostile clients: each test plays one attack over a real socket and
// checks what the client got, what was queued, and that the server still
// serves an honest client afterwards.

const smuggledTx = "MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo@example.com\r\n\r\nsmuggled\r\n"

// loggedIn dials env's first listener and logs in over STARTTLS.
func loggedIn(t *testing.T, env *testEnv) *client {
	t.Helper()
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	return c
}

// stillServes checks that a fresh client is greeted and answered.
func stillServes(t *testing.T, env *testEnv) {
	t.Helper()
	c := dial(t, env.addrs[0])
	c.expect(250, "EHLO fresh.test")
	c.expect(221, "QUIT")
}

// bareCRLF reports whether b has a CR or LF outside a CRLF pair.
func bareCRLF(b []byte) bool {
	rest := bytes.ReplaceAll(b, []byte("\r\n"), nil)
	return bytes.ContainsAny(rest, "\r\n")
}

// readClosed reports whether the server closed c, reading at most until
// the deadline.
func readClosed(c *client, within time.Duration) bool {
	c.conn.SetReadDeadline(time.Now().Add(within))
	_, err := io.Copy(io.Discard, c.conn)
	var ne net.Error
	// EOF, or a reset when the server closed with input unread.
	return err == nil || !(errors.As(err, &ne) && ne.Timeout())
}

func TestHostileSmugglingVariants(t *testing.T) {
	env := startServer(t, nil)
	for _, v := range []struct{ name, end string }{
		{"LF.LF", "\n.\n"},
		{"LF.CRLF", "\n.\r\n"},
		{"CR.CR", "\r.\r"},
		{"CRLF.CR", "\r\n.\r"},
		{"CR.CRLF", "\r.\r\n"},
		{"CRLF.LF", "\r\n.\n"},
		{"CRLF-NUL.CRLF", "\r\n\x00.\r\n"},
	} {
		t.Run(v.name, func(t *testing.T) {
			before := len(env.q.all())
			c := loggedIn(t, env)
			c.expect(250, "MAIL FROM:<app@example.com>")
			c.expect(250, "RCPT TO:<bob@example.net>")
			c.expect(354, "DATA")
			// The fake end, a whole smuggled transaction, the real end, and
			// commands pipelined after it, in one write.
			raw := plainMsg + "one" + v.end + smuggledTx + "two\r\n.\r\nRSET\r\nNOOP\r\n"
			if _, err := io.WriteString(c.conn, raw); err != nil {
				t.Fatal(err)
			}
			for _, want := range []int{250, 250, 250} { // DATA, RSET, NOOP
				if code, msg := c.read(); code != want {
					t.Fatalf("got %d %s, want %d", code, msg, want)
				}
			}
			got := env.q.all()
			if len(got) != before+1 {
				t.Fatalf("queued %d messages, want exactly 1", len(got)-before)
			}
			m := got[before]
			if m.m.From != "app@example.com" || len(m.m.Recipients) != 1 || m.m.Recipients[0].Addr != "bob@example.net" {
				t.Errorf("envelope: %+v", m.m)
			}
			if bareCRLF(m.body) {
				t.Errorf("bare CR or LF in the stored message: %q", m.body)
			}
			if bytes.IndexByte(m.body, 0) >= 0 {
				t.Errorf("NUL in the stored message: %q", m.body)
			}
			if !bytes.Contains(m.body, []byte("\r\nsmuggled\r\ntwo\r\n")) {
				t.Errorf("smuggled text is not plain body text: %q", m.body)
			}
		})
	}
	stillServes(t, env)
}

func TestHostilePipelinedTransaction(t *testing.T) {
	env := startServer(t, nil)
	c := loggedIn(t, env)
	// RFC 2920: a client may send the whole transaction without waiting.
	raw := "MAIL FROM:<app@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n" + plainMsg + ".\r\nQUIT\r\n"
	if _, err := io.WriteString(c.conn, raw); err != nil {
		t.Fatal(err)
	}
	for _, want := range []int{250, 250, 354, 250, 221} {
		if code, msg := c.read(); code != want {
			t.Fatalf("got %d %s, want %d", code, msg, want)
		}
	}
	if got := env.q.all(); len(got) != 1 || !bytes.HasSuffix(got[0].body, []byte(plainMsg)) {
		t.Fatalf("queued %+v", got)
	}
}

func TestHostileRecipientFlood(t *testing.T) {
	env := startServer(t, nil)
	c := loggedIn(t, env)
	const n = 10000
	var raw strings.Builder
	raw.WriteString("MAIL FROM:<app@example.com>\r\n")
	for i := range n {
		fmt.Fprintf(&raw, "RCPT TO:<r%d@example.net>\r\n", i)
	}
	raw.WriteString("DATA\r\n" + plainMsg + ".\r\n")
	// Write while reading: the replies would otherwise fill the socket
	// buffers and stall both sides.
	werr := make(chan error, 1)
	go func() {
		_, err := io.WriteString(c.conn, raw.String())
		werr <- err
	}()
	if code, msg := c.read(); code != 250 {
		t.Fatalf("MAIL: %d %s", code, msg)
	}
	max := env.srv.Limits.MaxRecipients
	for i := range n {
		code, msg := c.read()
		want := 250
		if i >= max {
			want = 452
		}
		if code != want {
			t.Fatalf("RCPT %d: got %d %s, want %d", i, code, msg, want)
		}
	}
	if err := <-werr; err != nil {
		t.Fatal(err)
	}
	if code, msg := c.read(); code != 354 {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	if code, msg := c.read(); code != 250 {
		t.Fatalf("end of DATA: %d %s", code, msg)
	}
	got := env.q.all()
	if len(got) != 1 || len(got[0].m.Recipients) != max {
		t.Fatalf("queued %d messages, recipients %v", len(got), got)
	}
	c.expect(250, "NOOP")
	stillServes(t, env)
}

func TestHostileLongCommandLine(t *testing.T) {
	env := startServer(t, nil)
	c := dial(t, env.addrs[0])
	werr := make(chan error, 1)
	go func() {
		_, err := io.WriteString(c.conn, "EHLO "+strings.Repeat("a", 1<<20)+"\r\n")
		werr <- err
	}()
	code, msg := c.read()
	if code != 500 || !strings.HasPrefix(msg, "5.4.0") {
		t.Fatalf("1 MB line: %d %s", code, msg)
	}
	if !readClosed(c, 5*time.Second) {
		t.Fatal("connection not closed after the long line")
	}
	<-werr // a write error is expected: the server hung up
	stillServes(t, env)
}

func TestHostileNULAndInvalidBytes(t *testing.T) {
	env := startServer(t, nil)
	c := loggedIn(t, env)
	for _, cmd := range []string{
		"MAIL FROM:<app@example.com\x00>",
		"MAIL FROM:<app\x00@example.com>",
		"MAIL FROM:<\xff\xfe@example.com>",
		"MAIL FROM:<app@ex\xc3\x28ample.com>",
		"MAIL FROM:<app@example.com\rBcc: x@evil.test>",
		"MAIL FROM:<app@example.com\x00\rBcc: x@evil.test>",
		"MAIL\x00 FROM:<app@example.com>",
	} {
		if code, msg := c.cmd("%s", cmd); code/100 != 5 {
			t.Errorf("%q: %d %s", cmd, code, msg)
		}
	}
	c.expect(250, "MAIL FROM:<app@example.com>")
	for _, rcpt := range []string{
		"bob@example.net\x00",
		"\x00bob@example.net",
		"b\xffob@example.net",
		"bob@example.net\rBcc: x@evil.test",
		"bob@example.net\r\x00Bcc: x@evil.test",
	} {
		if code, msg := c.cmd("RCPT TO:<%s>", rcpt); code/100 != 5 {
			t.Errorf("RCPT %q: %d %s", rcpt, code, msg)
		}
	}
	c.expect(250, "NOOP") // still in step after every refusal
	if n := len(env.q.all()); n != 0 {
		t.Fatalf("queued %d", n)
	}
	stillServes(t, env)
}

func TestHostileHeloInjection(t *testing.T) {
	env := startServer(t, nil)
	for _, helo := range []string{
		"evil.test\rBcc: x@evil.test",
		"evil.test\x00\rBcc: x@evil.test",
		"evil.test\x00Bcc: x@evil.test",
		"evil.test\xff\xfe",
	} {
		t.Run(fmt.Sprintf("%q", helo), func(t *testing.T) {
			before := len(env.q.all())
			c := dial(t, env.addrs[0])
			c.expect(250, "EHLO client.test")
			c.startTLS(env.pki.ClientTLS())
			code, msg := c.cmd("EHLO %s", helo)
			if code/100 == 5 {
				return // refused outright: nothing can be injected
			}
			if code != 250 {
				t.Fatalf("EHLO: %d %s", code, msg)
			}
			if code, msg := c.authPlain("app", testPassword); code != 235 {
				t.Fatalf("AUTH: %d %s", code, msg)
			}
			if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
				t.Fatalf("send: %d %s", code, msg)
			}
			body := env.q.all()[before].body
			if bareCRLF(body) || bytes.IndexByte(body, 0) >= 0 || bytes.Contains(body, []byte("\r\nBcc:")) {
				t.Errorf("HELO reached the stored header: %q", body)
			}
		})
	}
}

func TestHostileIdleConnections(t *testing.T) {
	const limit = 500
	env := startServer(t, func(s *Server) { s.Limits.MaxConnections = limit })
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	goroutines := runtime.NumGoroutine()

	open := make([]*client, 0, limit)
	for range limit {
		open = append(open, dial(t, env.addrs[0]))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	perConn := grown / limit
	t.Logf("%d idle connections: heap in use %+d KiB (%d B per connection, client side included), goroutines %+d",
		limit, grown>>10, perConn, runtime.NumGoroutine()-goroutines)
	// Client and server sides are both in this process; 256 KiB a
	// connection is far above what either should hold.
	if perConn > 256<<10 {
		t.Errorf("%d B of heap per idle connection", perConn)
	}

	for i := range 50 {
		c := dialFrom(t, env.addrs[0], "")
		c.conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		code, msg := c.read()
		if code != 421 || !strings.HasPrefix(msg, "4.7.0") {
			t.Fatalf("excess connection %d: %d %s", i, code, msg)
		}
		if !readClosed(c, 2*time.Second) {
			t.Fatalf("excess connection %d left open", i)
		}
	}
	for _, c := range open[:10] {
		c.expect(221, "QUIT")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := dialFrom(t, env.addrs[0], "")
		code, _ := c.read()
		if code == 220 {
			c.expect(250, "EHLO fresh.test")
			break
		}
		c.conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("no slot freed after clients left")
		}
		time.Sleep(20 * time.Millisecond)
	}
	open[limit-1].expect(250, "NOOP") // the idle ones are still served
}

// trickle writes s one byte every gap until it is done or the peer hangs
// up; it returns when the write fails or s is sent.
func trickle(conn net.Conn, s string, gap time.Duration) {
	for i := 0; i < len(s); i++ {
		if _, err := conn.Write([]byte{s[i]}); err != nil {
			return
		}
		time.Sleep(gap) // the attack's pace, not a wait for an event
	}
}

func TestHostileSlowlorisCommand(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startServer(t, func(s *Server) { s.Limits.ReadTimeout = time.Second })
	c := dial(t, env.addrs[0])
	start := time.Now()
	go trickle(c.conn, "EHLO "+strings.Repeat("s", 100)+".test\r\n", 100*time.Millisecond)
	code, msg := c.read()
	took := time.Since(start)
	if code != 421 && code != 0 {
		t.Fatalf("slow command: %d %s", code, msg)
	}
	// The whole line would take 11s; slack for a loaded machine.
	if took > 5*time.Second {
		t.Fatalf("cut off after %v, want about 1s", took)
	}
	if !readClosed(c, 3*time.Second) {
		t.Fatal("connection left open")
	}
	t.Logf("slow command: %d %s after %v", code, msg, took.Round(time.Millisecond))
	stillServes(t, env)
}

func TestHostileSlowlorisData(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startServer(t, func(s *Server) {
		s.Limits.ReadTimeout = time.Second
		s.Limits.DataTimeout = 2 * time.Second
	})
	c := loggedIn(t, env)
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	c.expect(354, "DATA")
	start := time.Now()
	// Each byte comes well within ReadTimeout; only the DATA cap stops it.
	go trickle(c.conn, plainMsg+strings.Repeat("x", 200)+"\r\n.\r\n", 100*time.Millisecond)
	code, msg := c.read()
	took := time.Since(start)
	if code != 421 || !strings.HasPrefix(msg, "4.4.2") {
		t.Fatalf("slow DATA: %d %s", code, msg)
	}
	// The whole message would take 29s; slack for a loaded machine.
	if took < 2*time.Second || took > 6*time.Second {
		t.Fatalf("cut off after %v, want about 2s", took)
	}
	if !readClosed(c, 3*time.Second) {
		t.Fatal("connection left open")
	}
	if n := len(env.q.all()); n != 0 {
		t.Fatalf("queued %d", n)
	}
	stillServes(t, env)
}

func TestHostileParallelAuthBruteForce(t *testing.T) {
	// A realistic bcrypt cost keeps each guess in flight long enough for
	// the parallel guesses to overlap.
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), 8)
	if err != nil {
		t.Fatal(err)
	}
	const limit, parallel = 3, 30
	env := startServer(t, func(s *Server) {
		s.Users = []User{{Name: "app", PasswordHash: hash, AllowedFrom: []string{"app@example.com"}}}
		s.Limits.AuthFailuresPerIP = limit
	})
	clients := make([]*client, parallel)
	for i := range clients {
		c := dialFrom(t, env.addrs[0], "127.0.0.1")
		c.read()
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		clients[i] = c
	}
	for _, c := range clients {
		c.conn.SetDeadline(time.Now().Add(30 * time.Second))
	}
	codes := make([]int, parallel)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			// Not authPlain: t.Fatal is not for other goroutines.
			ir := base64.StdEncoding.EncodeToString(fmt.Appendf(nil, "\x00app\x00wrong%d", i))
			if err := c.tp.PrintfLine("AUTH PLAIN %s", ir); err != nil {
				return
			}
			codes[i], _, _ = c.tp.ReadResponse(0)
		})
	}
	wg.Wait()
	tried, blocked := 0, 0
	for _, code := range codes {
		switch code {
		case 535:
			tried++
		case 421:
			blocked++
		default:
			t.Errorf("parallel guess: reply %d", code)
		}
	}
	t.Logf("%d parallel guesses: %d checked, %d refused unchecked", parallel, tried, blocked)
	if tried > limit {
		t.Errorf("%d passwords checked from one address, limit %d", tried, limit)
	}
	c := dialFrom(t, env.addrs[0], "127.0.0.1")
	c.read()
	c.expect(250, "EHLO client.test")
	c.startTLS(env.pki.ClientTLS())
	c.expect(250, "EHLO client.test")
	if code, msg := c.authPlain("app", testPassword); code != 421 {
		t.Fatalf("right password once blocked: %d %s", code, msg)
	}
	other := dialFrom(t, env.addrs[0], "127.0.0.2")
	other.read()
	other.login(env.pki)
}

func TestHostileProtocolAbuse(t *testing.T) {
	env := startServer(t, nil)
	t.Run("size lie", func(t *testing.T) {
		c := loggedIn(t, env)
		c.expect(250, "MAIL FROM:<app@example.com> SIZE=100")
		c.expect(250, "RCPT TO:<bob@example.net>")
		c.expect(354, "DATA")
		big := plainMsg + strings.Repeat(strings.Repeat("y", 998)+"\r\n", 2100) + ".\r\n"
		werr := make(chan error, 1)
		go func() { _, err := io.WriteString(c.conn, big); werr <- err }()
		code, msg := c.read()
		if code != 552 || !strings.HasPrefix(msg, "5.3.4") {
			t.Fatalf("2 MB after SIZE=100: %d %s", code, msg)
		}
		<-werr
	})
	t.Run("data before rcpt", func(t *testing.T) {
		c := loggedIn(t, env)
		if code, msg := c.cmd("DATA"); code/100 != 5 {
			t.Fatalf("DATA without MAIL: %d %s", code, msg)
		}
		c.expect(250, "MAIL FROM:<app@example.com>")
		if code, msg := c.cmd("DATA"); code/100 != 5 {
			t.Fatalf("DATA without RCPT: %d %s", code, msg)
		}
		// The refused DATA must not have opened a data phase.
		c.expect(250, "RCPT TO:<bob@example.net>")
		c.expect(221, "QUIT")
	})
	t.Run("rcpt before mail", func(t *testing.T) {
		c := loggedIn(t, env)
		if code, msg := c.cmd("RCPT TO:<bob@example.net>"); code/100 != 5 {
			t.Fatalf("RCPT without MAIL: %d %s", code, msg)
		}
		c.expect(250, "NOOP")
	})
	t.Run("starttls twice", func(t *testing.T) {
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		if code, msg := c.cmd("STARTTLS"); code/100 != 5 {
			t.Fatalf("second STARTTLS: %d %s", code, msg)
		}
		c.expect(250, "NOOP") // still the same TLS session
	})
	if n := len(env.q.all()); n != 0 {
		t.Errorf("queued %d", n)
	}
	stillServes(t, env)
}

func TestHostileStartTLSOnImplicit(t *testing.T) {
	env := startServer(t, func(s *Server) {
		s.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSImplicit, AuthRequired: true}}
	})
	conn, err := tls.Dial("tcp", env.addrs[0], env.pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := &client{t: t, conn: conn, tp: textproto.NewConn(conn)}
	c.read()
	c.expect(250, "EHLO client.test")
	if code, msg := c.cmd("STARTTLS"); code/100 != 5 {
		t.Fatalf("STARTTLS over implicit TLS: %d %s", code, msg)
	}
	c.expect(250, "NOOP")
}

func TestHostileOldTLSRefused(t *testing.T) {
	// The serving configuration sets no MinVersion: the relay's listeners
	// must refuse TLS 1.0 and 1.1 whatever the caller passes.
	env := startServer(t, func(s *Server) {
		s.TLSConfig = &tls.Config{Certificates: s.TLSConfig.Certificates}
		s.Listeners = []Listener{
			{Address: "127.0.0.1:0", TLS: mailproto.TLSStartTLS, AuthRequired: true},
			{Address: "127.0.0.1:0", TLS: mailproto.TLSImplicit, AuthRequired: true},
		}
	})
	for _, v := range []uint16{tls.VersionTLS10, tls.VersionTLS11} {
		cfg := env.pki.ClientTLS()
		cfg.MinVersion, cfg.MaxVersion = v, v
		name := tls.VersionName(v)

		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		c.expect(220, "STARTTLS")
		if err := tls.Client(c.conn, cfg).Handshake(); err == nil {
			t.Errorf("STARTTLS with %s: handshake succeeded", name)
		}

		raw, err := net.DialTimeout("tcp", env.addrs[1], 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		raw.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tls.Client(raw, cfg).Handshake(); err == nil {
			t.Errorf("implicit TLS with %s: handshake succeeded", name)
		}
		raw.Close()
	}
	stillServes(t, env)
}

func TestHostileStalledData(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startServer(t, func(s *Server) {
		s.Limits.ReadTimeout = time.Second
		s.Limits.DataTimeout = time.Minute
	})
	c := loggedIn(t, env)
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	c.expect(354, "DATA")
	start := time.Now()
	if _, err := io.WriteString(c.conn, plainMsg); err != nil { // then nothing
		t.Fatal(err)
	}
	code, msg := c.read()
	if took := time.Since(start); code != 421 || !strings.HasPrefix(msg, "4.4.2") || took > 5*time.Second {
		t.Fatalf("stalled DATA: %d %s after %v", code, msg, took)
	}
	if n := len(env.q.all()); n != 0 {
		t.Fatalf("queued %d", n)
	}
}
