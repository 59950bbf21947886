package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/dkim"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

func startUpstream(t *testing.T, pki *testpki.PKI, opts smtptest.Options) *smtptest.Server {
	t.Helper()
	opts.TLS, opts.TLSConfig, opts.Username, opts.Password = smtptest.TLSImplicit, pki.ServerTLS(), upUser, upPassword
	return smtptest.Start(t, opts)
}

// dsnsTo returns the DSNs (null sender, one recipient) the upstream got for addr.
func dsnsTo(msgs []smtptest.Message, addr string) []smtptest.Message {
	var out []smtptest.Message
	for _, m := range msgs {
		if m.From == "" && len(m.To) == 1 && m.To[0] == addr {
			out = append(out, m)
		}
	}
	return out
}

// TestPerRecipientResultsAndBounce: one message to four recipients; the
// upstream refuses one for good and one for now. Two are delivered once,
// the refused one gets a DSN back to the sender through the route's
// upstream, and the retry goes only to the deferred one.
func TestPerRecipientResultsAndBounce(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	var mu sync.Mutex
	deferOnce := true
	up := startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		switch to {
		case "gone@example.net":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "gone@example.net: no such mailbox here"}
		case "later@example.net":
			mu.Lock()
			defer mu.Unlock()
			if deferOnce {
				deferOnce = false
				return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "mailbox busy"}
			}
		}
		return nil
	}})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()}))
	s := connect(t, r.addr, pki)
	defer s.close()
	if _, err := s.send("app@example.com", []string{"a@example.net", "gone@example.net", "later@example.net", "b@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 30*time.Second, "the DSN and the retry", func() bool {
		msgs := up.Messages()
		return len(dsnsTo(msgs, "app@example.com")) == 1 && len(msgs) >= 3
	})
	msgs := up.Messages()
	got := map[string]int{}
	for _, m := range msgs {
		if m.From == "app@example.com" {
			for _, to := range m.To {
				got[to]++
			}
		}
	}
	if got["a@example.net"] != 1 || got["b@example.net"] != 1 || got["later@example.net"] != 1 || got["gone@example.net"] != 0 {
		t.Errorf("deliveries per recipient: %v", got)
	}
	dsn := dsnsTo(msgs, "app@example.com")[0].Data
	for _, want := range []string{
		"Content-Type: multipart/report; report-type=delivery-status",
		"Final-Recipient: rfc822; gone@example.net",
		"Action: failed",
		"Status: 5.1.1",
		"Diagnostic-Code: smtp; 550 5.1.1 gone@example.net: no such mailbox here",
		"Content-Type: text/rfc822-headers",
		"Subject: invoice 42",
	} {
		if !bytes.Contains(dsn, []byte(want)) {
			t.Errorf("DSN lacks %q:\n%s", want, dsn)
		}
	}
	if bytes.Contains(dsn, []byte("Final-Recipient: rfc822; later@example.net")) {
		t.Error("the deferred recipient is reported as failed")
	}
	// Nothing else arrives: a marker message after everything settles.
	if _, err := s.send("app@example.com", []string{"marker@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 20*time.Second, "the marker", func() bool {
		for _, m := range up.Messages() {
			if len(m.To) == 1 && m.To[0] == "marker@example.net" {
				return true
			}
		}
		return false
	})
	if n := len(up.Messages()); n != 4 {
		t.Errorf("upstream got %d messages, want 4 (first, DSN, retry, marker)", n)
	}
}

// TestExpiryBounceAndNullSender: an upstream that answers 451 forever
// makes the message expire at max_age into a DSN; a failing message from
// the null sender produces none.
func TestExpiryBounceAndNullSender(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		switch to {
		case "slow@example.net":
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try again later"}
		case "gone@example.net":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such mailbox"}
		}
		return nil
	}})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), MaxAge: "3s", Extra: `
[[listen]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.1/32"]
`}))
	s := connect(t, r.addr, pki)
	defer s.close()
	start := time.Now()
	id, err := s.send("app@example.com", []string{"slow@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	// The null sender, from the trusted listener.
	c, err := smtp.Dial(r.addrs[1])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail("", []string{"gone@example.net"}, strings.NewReader("From: cron@example.com\r\nSubject: null sender\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	r.waitLog("expired", map[string]string{"queue_id": id}, 30*time.Second)
	testwait.For(t, 30*time.Second, "the expiry DSN", func() bool { return len(dsnsTo(up.Messages(), "app@example.com")) == 1 })
	if age := time.Since(start); age < 3*time.Second {
		t.Errorf("expired after %s, before max_age", age)
	}
	dsn := dsnsTo(up.Messages(), "app@example.com")[0].Data
	for _, want := range []string{"Final-Recipient: rfc822; slow@example.net", "Action: failed", "Status: 5.4.7", "Diagnostic-Code: smtp; 451 4.3.0 try again later"} {
		if !bytes.Contains(dsn, []byte(want)) {
			t.Errorf("DSN lacks %q:\n%s", want, dsn)
		}
	}
	// A marker after the null-sender failure: once it is through, any DSN
	// for the null-sender message would have been queued before it.
	if err := c.SendMail("", []string{"marker@example.net"}, strings.NewReader("From: cron@example.com\r\nSubject: marker\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 20*time.Second, "the marker", func() bool {
		for _, m := range up.Messages() {
			if len(m.To) == 1 && m.To[0] == "marker@example.net" {
				return true
			}
		}
		return false
	})
	for _, m := range up.Messages() {
		if m.From == "" && !(len(m.To) == 1 && (m.To[0] == "app@example.com" || m.To[0] == "marker@example.net")) {
			t.Errorf("unexpected message from <>: to %v", m.To)
		}
	}
}

// TestConnectionReuse: 200 messages to an upstream with max_connections
// = 2 travel over at most 2 connections at a time, and few in all.
func TestConnectionReuse(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), MaxConns: 2}))
	const clients, each = 8, 25
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := connect(t, r.addr, pki)
			defer s.close()
			for range each {
				if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	up.WaitMessages(t, clients*each, 60*time.Second)
	if n := up.MaxConcurrent(); n > 2 {
		t.Errorf("upstream saw %d concurrent connections, limit 2", n)
	}
	n := up.Connections()
	t.Logf("200 messages over %d upstream connections", n)
	if n > 20 {
		t.Errorf("%d connections for 200 messages", n)
	}
}

// TestRateLimit: rate_limit = "10/1s" paces 30 messages into at least
// three windows, and none is bounced. It runs alone, not in parallel:
// arrival times are taken in this process, where a late one, on a busy
// machine, would make two windows look closer than the relay sent them.
func TestRateLimit(t *testing.T) {
	pki := testpki.New(t)
	var mu sync.Mutex
	var arrivals []time.Time
	up := startUpstream(t, pki, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		mu.Lock()
		arrivals = append(arrivals, time.Now())
		mu.Unlock()
		return nil
	}})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), UpExtra: `rate_limit = "10/1s"`}))
	s := connect(t, r.addr, pki)
	defer s.close()
	for range 30 {
		if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
			t.Fatal(err)
		}
	}
	up.WaitMessages(t, 30, 60*time.Second)
	mu.Lock()
	defer mu.Unlock()
	sort.Slice(arrivals, func(i, j int) bool { return arrivals[i].Before(arrivals[j]) })
	for i := 10; i < len(arrivals); i++ {
		if d := arrivals[i].Sub(arrivals[i-10]); d < 990*time.Millisecond {
			t.Errorf("messages %d and %d arrived %s apart: more than 10 in one second", i-10, i, d)
		}
	}
	span := arrivals[len(arrivals)-1].Sub(arrivals[0])
	t.Logf("30 messages at 10/1s took %s from first to last arrival", span)
	if span < 1900*time.Millisecond {
		t.Errorf("30 messages in %s at 10/1s", span)
	}
	for _, m := range up.Messages() {
		if m.From == "" {
			t.Error("a DSN was sent: rate-limited mail must wait, never bounce")
		}
	}
}

// queueCLI runs `smarthost queue` against the relay's admin API.
func queueCLI(t *testing.T, r *relay, token string, args ...string) (string, error) {
	t.Helper()
	// -config names no file, so that a config on this machine cannot
	// change which token is sent.
	cmd := exec.Command(binary, append([]string{"queue", "-config", filepath.Join(t.TempDir(), "none.toml"), "-server", r.http}, args...)...)
	cmd.Env = append(os.Environ(), "SMARTHOST_ADMIN_TOKEN="+token)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// listQueue is `smarthost queue -json list`, by queue ID.
func listQueue(t *testing.T, r *relay) map[string]queueEntry {
	t.Helper()
	out, err := queueCLI(t, r, adminToken, "-json", "list")
	if err != nil {
		t.Fatalf("queue -json list: %v\n%s", err, out)
	}
	var msgs []queueEntry
	if err := json.Unmarshal([]byte(out), &msgs); err != nil {
		t.Fatalf("queue -json list output: %v\n%s", err, out)
	}
	m := map[string]queueEntry{}
	for _, msg := range msgs {
		m[msg.ID] = msg
	}
	return m
}

// TestQueueCommands drives every `smarthost queue` command against a
// running relay whose upstream is down, and checks the token.
func TestQueueCommands(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	upAddr, freeUp := reserveAddr(t)
	key, err := dkim.GenerateKey("ed25519", 0)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := dkim.MarshalKey(key)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "dkim.key")
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	signing := fmt.Sprintf("\n[[dkim]]\ndomain = \"example.com\"\nselector = \"q1\"\nkey_file = %q\n", keyFile)
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: upAddr, RetryMin: "1h", RetryMax: "2h", Extra: signing}))
	if r.http == "" {
		t.Fatal("no http address in the start log")
	}
	s := connect(t, r.addr, pki)
	var ids []string
	for range 3 {
		id, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	s.close()
	for _, id := range ids {
		r.waitLog("deferred", map[string]string{"queue_id": id}, 20*time.Second)
	}

	if out, err := queueCLI(t, r, "wrong-token", "list"); err == nil || !strings.Contains(strings.ToLower(out), "unauthorized") {
		t.Fatalf("wrong token accepted (err %v):\n%s", err, out)
	}
	out, err := queueCLI(t, r, adminToken, "list")
	if err != nil {
		t.Fatalf("list: %v\n%s", err, out)
	}
	for _, id := range ids {
		if !strings.Contains(out, id) {
			t.Errorf("list lacks %s:\n%s", id, out)
		}
	}
	if out, err := queueCLI(t, r, adminToken, "show", ids[0]); err != nil || !strings.Contains(out, "bob@example.net") || !strings.Contains(out, "connect") {
		t.Errorf("show: %v\n%s", err, out)
	}
	if out, err := queueCLI(t, r, adminToken, "show", "0000000000000000"); err == nil {
		t.Errorf("show of a missing ID succeeded:\n%s", out)
	}
	// cat: the bytes that the flush below sends, signature included.
	stored, err := queueCLI(t, r, adminToken, "cat", ids[1])
	if err != nil || !strings.HasPrefix(stored, "DKIM-Signature: ") || !strings.HasSuffix(stored, testMsg) {
		t.Errorf("cat: %v\n%q", err, stored)
	}
	if out, err := queueCLI(t, r, adminToken, "cat", "-headers", ids[1]); err != nil || !strings.HasPrefix(stored, out) ||
		!strings.HasSuffix(out, "\r\n\r\n") || strings.Contains(out, "Hello Bob") {
		t.Errorf("cat -headers: %v\n%q", err, out)
	}
	if out, err := queueCLI(t, r, adminToken, "cat", "0000000000000000"); err == nil || !strings.Contains(out, "HTTP 404") {
		t.Errorf("cat of a missing ID: %v\n%s", err, out)
	}

	if out, err := queueCLI(t, r, adminToken, "hold", ids[0]); err != nil {
		t.Fatalf("hold: %v\n%s", err, out)
	}
	if !listQueue(t, r)[ids[0]].Held {
		t.Error("hold did not hold")
	}
	if out, err := queueCLI(t, r, adminToken, "release", ids[0]); err != nil {
		t.Fatalf("release: %v\n%s", err, out)
	}
	r.waitLog("deferred", map[string]string{"queue_id": ids[0], "attempt": "2"}, 20*time.Second)
	if listQueue(t, r)[ids[0]].Held {
		t.Error("release did not release")
	}

	if out, err := queueCLI(t, r, adminToken, "retry", ids[1]); err != nil {
		t.Fatalf("retry: %v\n%s", err, out)
	}
	r.waitLog("deferred", map[string]string{"queue_id": ids[1], "attempt": "2"}, 20*time.Second)

	if out, err := queueCLI(t, r, adminToken, "delete", ids[2]); err != nil {
		t.Fatalf("delete: %v\n%s", err, out)
	}
	if _, ok := listQueue(t, r)[ids[2]]; ok {
		t.Error("delete did not delete")
	}

	// With the upstream up, flush sends everything now, not in an hour.
	freeUp()
	up := startUpstream(t, pki, smtptest.Options{Addr: upAddr})
	if out, err := queueCLI(t, r, adminToken, "flush"); err != nil {
		t.Fatalf("flush: %v\n%s", err, out)
	}
	msgs := up.WaitMessages(t, 2, 20*time.Second)
	testwait.For(t, 20*time.Second, "an empty queue", func() bool { return len(listQueue(t, r)) == 0 })
	got := []string{queueIDOf(msgs[0].Data), queueIDOf(msgs[1].Data)}
	sort.Strings(got)
	want := []string{ids[0], ids[1]}
	sort.Strings(want)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("flushed %v, want %v (the deleted one must not go)", got, want)
	}
	for _, m := range msgs {
		if queueIDOf(m.Data) == ids[1] && string(m.Data) != stored {
			t.Errorf("cat printed %d bytes, the upstream received %d:\n%q\n%q", len(stored), len(m.Data), stored, m.Data)
		}
	}
}
