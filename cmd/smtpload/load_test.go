package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/mail"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// testConfig is a small run against addr.
func testConfig(addr string, n, c int) Config {
	cfg := DefaultConfig()
	cfg.Addr = addr
	cfg.Messages = n
	cfg.Concurrency = c
	cfg.Size = 4 << 10
	cfg.Timeout = 10 * time.Second
	cfg.From = "load@example.com"
	cfg.To = []string{"sink@example.net"}
	return cfg
}

// runLoad runs cfg to the end and checks that every message is counted
// once.
func runLoad(t *testing.T, cfg Config) (Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := Run(ctx, cfg)
	checkAccounting(t, res, cfg.Messages)
	return res, err
}

func checkAccounting(t *testing.T, res Result, n int) {
	t.Helper()
	if got := res.Sent + res.failedTotal() + res.ConnErrors + res.NotSent; got != n || res.Messages != n {
		t.Errorf("sent %d + failed %v + connection errors %d + not sent %d = %d, messages %d; want %d",
			res.Sent, res.Failed, res.ConnErrors, res.NotSent, got, res.Messages, n)
	}
	if len(res.Latencies) != res.Sent || len(res.Setups) != res.Connections {
		t.Errorf("%d latencies for %d sent, %d setup times for %d connections",
			len(res.Latencies), res.Sent, len(res.Setups), res.Connections)
	}
}

// seqOf is the sequence number in a received message.
func seqOf(data []byte) (int, error) {
	m, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(m.Header.Get(SeqHeader))
}

// checkReceived checks that the server got exactly the messages with the
// given sequence numbers, once each, each of size bytes, with unique
// Message-IDs.
func checkReceived(t *testing.T, got []smtptest.Message, seqs []int, size int64) {
	t.Helper()
	if len(got) != len(seqs) {
		t.Errorf("server received %d messages, want %d", len(got), len(seqs))
	}
	want := map[int]bool{}
	for _, s := range seqs {
		want[s] = true
	}
	ids := map[string]bool{}
	seen := map[int]bool{}
	for _, m := range got {
		if int64(len(m.Data)) != size {
			t.Errorf("message of %d bytes, want %d", len(m.Data), size)
		}
		msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
		if err != nil {
			t.Fatalf("received message does not parse: %v", err)
		}
		id := msg.Header.Get("Message-ID")
		if id == "" || ids[id] {
			t.Errorf("Message-ID %q missing or repeated", id)
		}
		ids[id] = true
		seq, err := seqOf(m.Data)
		if err != nil {
			t.Fatalf("%s: %v", SeqHeader, err)
		}
		if !want[seq] || seen[seq] {
			t.Errorf("sequence number %d unexpected or repeated", seq)
		}
		seen[seq] = true
	}
}

func oneToN(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i + 1
	}
	return s
}

func TestRunReusesOneConnectionPerSession(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	cfg := testConfig(srv.Addr(), 200, 4)
	cfg.Size = 10 << 10
	res, err := runLoad(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() || res.Sent != 200 || res.Bytes != 200*10<<10 {
		t.Errorf("result %+v", res)
	}
	checkReceived(t, srv.Messages(), oneToN(200), 10<<10)
	if got := srv.Connections(); got != 4 || res.Connections != 4 {
		t.Errorf("%d connections (reported %d), want 4", got, res.Connections)
	}
	if got := srv.MaxConcurrent(); got > 4 {
		t.Errorf("%d connections at once, want at most 4", got)
	}
	for _, m := range srv.Messages() {
		if m.From != "load@example.com" || len(m.To) != 1 || m.To[0] != "sink@example.net" || m.TLS {
			t.Fatalf("envelope %q → %q, TLS %v", m.From, m.To, m.TLS)
		}
	}
}

func TestRunPerConn(t *testing.T) {
	tests := []struct {
		perConn, n, c, wantConns int
	}{
		{perConn: 1, n: 30, c: 3, wantConns: 30},
		// 10 messages per session in connections of 4, 4 and 2.
		{perConn: 4, n: 30, c: 3, wantConns: 9},
		// More sessions than messages: only one per message.
		{perConn: 0, n: 3, c: 8, wantConns: 3},
	}
	for _, tt := range tests {
		t.Run(strconv.Itoa(tt.perConn), func(t *testing.T) {
			srv := smtptest.Start(t, smtptest.Options{})
			cfg := testConfig(srv.Addr(), tt.n, tt.c)
			cfg.PerConn = tt.perConn
			res, err := runLoad(t, cfg)
			if err != nil || !res.OK() {
				t.Fatalf("result %+v, %v", res, err)
			}
			checkReceived(t, srv.Messages(), oneToN(tt.n), cfg.Size)
			if got := srv.Connections(); got != tt.wantConns || res.Connections != tt.wantConns {
				t.Errorf("%d connections (reported %d), want %d", got, res.Connections, tt.wantConns)
			}
			if got := srv.MaxConcurrent(); got > tt.c {
				t.Errorf("%d connections at once, want at most %d", got, tt.c)
			}
		})
	}
}

func TestRunStartTLSWithAuth(t *testing.T) {
	pki := testpki.New(t)
	srv := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSStartTLS, TLSConfig: pki.ServerTLS(),
		Username: "app", Password: "s3cret",
	})
	cfg := testConfig(srv.Addr(), 60, 3)
	cfg.Size = 20 << 10
	cfg.TLS = TLSStartTLS
	cfg.CAFile = pki.CAFile
	cfg.User, cfg.Password = "app", "s3cret"
	cfg.To = []string{"a@example.net", "b@example.net"}
	res, err := runLoad(t, cfg)
	if err != nil || !res.OK() {
		t.Fatalf("result %+v, %v", res, err)
	}
	got := srv.Messages()
	checkReceived(t, got, oneToN(60), 20<<10)
	for _, m := range got {
		if !m.TLS || m.AuthUser != "app" || len(m.To) != 2 {
			t.Fatalf("message over TLS %v as %q to %q", m.TLS, m.AuthUser, m.To)
		}
	}
	if n := len(srv.AuthAttempts()); n != 3 || srv.Connections() != 3 {
		t.Errorf("%d logins over %d connections, want 3 and 3", n, srv.Connections())
	}
}

func TestRunImplicitTLS(t *testing.T) {
	pki := testpki.New(t)
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})

	t.Run("ca", func(t *testing.T) {
		before := len(srv.Messages())
		cfg := testConfig(srv.Addr(), 20, 2)
		cfg.TLS = TLSImplicit
		cfg.CAFile = pki.CAFile
		res, err := runLoad(t, cfg)
		if err != nil || !res.OK() {
			t.Fatalf("result %+v, %v", res, err)
		}
		checkReceived(t, srv.Messages()[before:], oneToN(20), cfg.Size)
	})
	t.Run("insecure", func(t *testing.T) {
		before := len(srv.Messages())
		cfg := testConfig(srv.Addr(), 20, 2)
		cfg.TLS = TLSImplicit
		cfg.Insecure = true
		res, err := runLoad(t, cfg)
		if err != nil || !res.OK() {
			t.Fatalf("result %+v, %v", res, err)
		}
		checkReceived(t, srv.Messages()[before:], oneToN(20), cfg.Size)
	})
	t.Run("untrusted", func(t *testing.T) {
		before, conns := len(srv.Messages()), srv.Connections()
		cfg := testConfig(srv.Addr(), 100, 2)
		cfg.TLS = TLSImplicit
		res, err := runLoad(t, cfg)
		var ve *tls.CertificateVerificationError
		if !errors.As(err, &ve) {
			t.Fatalf("error %v, want a certificate verification error", err)
		}
		if res.Sent != 0 || res.Stopped == "" || res.NotSent < 90 {
			t.Errorf("result %+v: want a stop after the first failures", res)
		}
		if n := srv.Connections() - conns; n > 2 {
			t.Errorf("%d connections after the certificate failed, want at most one per session", n)
		}
		if len(srv.Messages()) != before {
			t.Errorf("a message got through")
		}
	})
}

func TestRunWrongPasswordStops(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{Username: "app", Password: "right"})
	cfg := testConfig(srv.Addr(), 100, 4)
	cfg.User, cfg.Password = "app", "wrong"
	res, err := runLoad(t, cfg)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 535 {
		t.Fatalf("error %v, want the 535 reply", err)
	}
	// Each session tries at most once before it sees the stop.
	if n := len(srv.AuthAttempts()); n < 1 || n > 4 {
		t.Errorf("%d login attempts, want 1 to 4", n)
	}
	if f := res.Failed["535 5.7.8"]; f < 1 || f > 4 || res.Sent != 0 || res.NotSent < 96 {
		t.Errorf("result %+v", res)
	}
}

func TestRunNoAuthOffered(t *testing.T) {
	pki := testpki.New(t)
	// Over STARTTLS the server offers AUTH only after TLS; -tls none never
	// sees it.
	srv := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSStartTLS, TLSConfig: pki.ServerTLS(), Username: "app", Password: "pw",
	})
	cfg := testConfig(srv.Addr(), 10, 2)
	cfg.User, cfg.Password = "app", "pw"
	res, err := runLoad(t, cfg)
	if err == nil || !strings.Contains(err.Error(), "-tls starttls") {
		t.Fatalf("error %v, want a hint at -tls starttls", err)
	}
	if res.Sent != 0 || res.ConnErrors < 1 || res.ConnErrors > 2 {
		t.Errorf("result %+v", res)
	}
}

func TestRunCountsRefusalsByCode(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	srv.SetDataReply(func(_ string, _ []string, data []byte) *smtp.SMTPError {
		seq, err := seqOf(data)
		if err != nil {
			t.Errorf("%s: %v", SeqHeader, err)
			return &smtp.SMTPError{Code: 554, Message: "no sequence number"}
		}
		if seq%5 == 0 {
			return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Insufficient system storage"}
		}
		return nil
	})
	cfg := testConfig(srv.Addr(), 100, 4)
	res, err := runLoad(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.OK() || res.Sent != 80 || res.Failed["452 4.3.1"] != 20 || len(res.Failed) != 1 || res.ConnErrors != 0 {
		t.Errorf("result %+v, want 80 sent and 20 refused with 452 4.3.1", res)
	}
	if res.Replies["452 4.3.1"] != "Insufficient system storage" {
		t.Errorf("reply text %q", res.Replies["452 4.3.1"])
	}
	var accepted []int
	for i := 1; i <= 100; i++ {
		if i%5 != 0 {
			accepted = append(accepted, i)
		}
	}
	checkReceived(t, srv.Messages(), accepted, cfg.Size)
	// A refused message does not cost the connection.
	if srv.Connections() != 4 {
		t.Errorf("%d connections, want 4", srv.Connections())
	}

	var out bytes.Buffer
	if err := res.WriteText(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "  452 4.3.1: 20  (Insufficient system storage)\n") {
		t.Errorf("text result lacks the count by code:\n%s", out.String())
	}
}

func TestRunRefusalsInTransaction(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	var mails, rcpts atomic.Int64
	srv.SetMailReply(func(string) *smtp.SMTPError {
		if mails.Add(1) == 7 {
			// RFC 5321 section 3.8: the client must drop the connection.
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Shutting down"}
		}
		return nil
	})
	srv.SetRcptReply(func(to string) *smtp.SMTPError {
		// The second recipient: the first one of the refused transaction
		// was accepted, and must not linger into the next one.
		if to == "b@example.net" && rcpts.Add(1)%4 == 0 {
			return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "Too many recipients"}
		}
		return nil
	})
	cfg := testConfig(srv.Addr(), 41, 2)
	cfg.To = []string{"a@example.net", "b@example.net"}
	res, err := runLoad(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	// 41 MAIL commands, one refused; 40 transactions reach the second
	// RCPT, 10 of which are refused.
	if res.Failed["421 4.3.2"] != 1 || res.Failed["452 4.5.3"] != 10 || res.Sent != 30 {
		t.Errorf("result %+v", res)
	}
	if mails.Load() != 41 || rcpts.Load() != 40 {
		t.Errorf("%d MAIL and %d RCPT commands, want 41 and 40", mails.Load(), rcpts.Load())
	}
	got := srv.Messages()
	if len(got) != 30 {
		t.Errorf("server received %d messages, want 30", len(got))
	}
	for _, m := range got {
		if !slices.Equal(m.To, cfg.To) {
			t.Fatalf("message to %q, want %q: the refused transaction was not reset", m.To, cfg.To)
		}
	}
	// RSET keeps the connection after a refused RCPT; the 421 costs one.
	if srv.Connections() != 3 || res.Connections != 3 {
		t.Errorf("%d connections (reported %d), want 3", srv.Connections(), res.Connections)
	}
}

func TestRunConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	res, err := runLoad(t, testConfig(addr, 10, 2))
	if err != nil {
		t.Fatalf("error %v: a refused connection does not stop the run", err)
	}
	if res.ConnErrors != 10 || res.Connections != 0 || res.FirstConnError == "" {
		t.Errorf("result %+v", res)
	}
}

// silentListener accepts connections and never writes to them.
func silentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func TestRunSetupTimeout(t *testing.T) {
	// A server that never greets: the setup, STARTTLS included, ends at
	// -timeout instead of go-smtp's five-minute default.
	for _, mode := range []string{TLSNone, TLSStartTLS, TLSImplicit} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			cfg := testConfig(silentListener(t), 1, 1)
			cfg.TLS = mode
			cfg.Insecure = mode != TLSNone
			cfg.Timeout = time.Second
			res, err := runLoad(t, cfg)
			if err != nil || res.ConnErrors != 1 {
				t.Fatalf("result %+v, %v; want one connection error", res, err)
			}
			if e := res.FirstConnError; !strings.Contains(e, "deadline exceeded") && !strings.Contains(e, "timeout") {
				t.Errorf("error %q, want a timeout", res.FirstConnError)
			}
			if res.Wall > 8*time.Second {
				t.Errorf("took %v with -timeout 1s", res.Wall)
			}
		})
	}
}

func TestRunCommandTimeout(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	release := make(chan struct{})
	t.Cleanup(func() { close(release) }) // before the server's Close
	srv.SetDataReply(func(string, []string, []byte) *smtp.SMTPError {
		<-release
		return nil
	})
	cfg := testConfig(srv.Addr(), 1, 1)
	cfg.Timeout = time.Second
	res, err := runLoad(t, cfg)
	if err != nil || res.ConnErrors != 1 || res.Sent != 0 {
		t.Fatalf("result %+v, %v; want one connection error", res, err)
	}
	if res.Wall < time.Second || res.Wall > 8*time.Second {
		t.Errorf("took %v with -timeout 1s", res.Wall)
	}
}

func TestRunInterrupted(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	cfg := testConfig(srv.Addr(), 200, 2)
	cfg.Rate = 40 // 5 s for all: the cancel comes well before
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type outcome struct {
		res Result
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		res, err := Run(ctx, cfg)
		done <- outcome{res, err}
	}()
	srv.WaitMessages(t, 3, 10*time.Second)
	cancel()
	var o outcome
	select {
	case o = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after the cancel")
	}
	if o.err != nil {
		t.Fatal(o.err)
	}
	res := o.res
	checkAccounting(t, res, 200)
	if !res.Interrupted || res.Sent < 3 || res.NotSent == 0 || res.ConnErrors != 0 || len(res.Failed) != 0 {
		t.Errorf("result %+v", res)
	}
	// No transaction was cut: what the server has is what was counted.
	if got := len(srv.Messages()); got != res.Sent {
		t.Errorf("server received %d messages, result says %d", got, res.Sent)
	}
	var out bytes.Buffer
	if err := res.WriteText(&out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "(interrupted)") {
		t.Errorf("text result does not say it was interrupted:\n%s", out.String())
	}
}

func TestRunRate(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	cfg := testConfig(srv.Addr(), 11, 3)
	cfg.Rate = 20
	res, err := runLoad(t, cfg)
	if err != nil || !res.OK() {
		t.Fatalf("result %+v, %v", res, err)
	}
	// 11 message starts 50 ms apart span 500 ms, whatever the sessions.
	if res.Wall < 500*time.Millisecond {
		t.Errorf("11 messages at 20/s took %v, want at least 500ms", res.Wall)
	}
}
