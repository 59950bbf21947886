package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

const testMsg = "From: App <app@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: invoice 42\r\nMessage-ID: <inv42@example.com>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\n.leading dot line\r\n\r\nyour invoice is attached. Привет.\r\n"

// addedFields matches what the relay may put in front of a message: its
// Received: field (three lines) and the Message-ID:/Date: it adds when
// they are missing.
var addedFields = regexp.MustCompile(`^Received: from [^\r\n]+\r\n\tby relay\.e2e \(smarthost\) with ESMTPSA id [0-9a-f]+;\r\n\t[^\r\n]+\r\n(Message-ID: [^\r\n]+\r\n)?(Date: [^\r\n]+\r\n)?$`)

func TestDeliveryThroughUpstream(t *testing.T) {
	t.Parallel()
	for _, mode := range []smtptest.TLSMode{smtptest.TLSImplicit, smtptest.TLSStartTLS} {
		t.Run(string(mode), func(t *testing.T) {
			pki := testpki.New(t)
			up := smtptest.Start(t, smtptest.Options{TLS: mode, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
			cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), UpstreamTLS: string(mode)})
			r := startRelay(t, cfg)

			s := connect(t, r.addr, pki)
			defer s.close()
			id, err := s.send("app@example.com", []string{"bob@example.net", "carol@example.org"}, testMsg)
			if err != nil {
				t.Fatal(err)
			}
			got := up.WaitMessages(t, 1, 20*time.Second)[0]
			if got.From != "app@example.com" || strings.Join(got.To, ",") != "bob@example.net,carol@example.org" {
				t.Errorf("envelope: from %q to %v", got.From, got.To)
			}
			if got.AuthUser != upUser || !got.TLS {
				t.Errorf("upstream saw auth %q tls %v", got.AuthUser, got.TLS)
			}
			if !bytes.HasSuffix(got.Data, []byte(testMsg)) {
				t.Fatalf("body not byte-identical:\n%q", got.Data)
			}
			prefix := got.Data[:len(got.Data)-len(testMsg)]
			if !addedFields.Match(prefix) {
				t.Errorf("unexpected fields added in front:\n%q", prefix)
			}
			if queueIDOf(got.Data) != id {
				t.Errorf("Received: id %q, 250 reply id %q", queueIDOf(got.Data), id)
			}
			r.waitLog("delivered", map[string]string{"queue_id": id}, 10*time.Second)
		})
	}
}

func TestUpstreamDownThenUp(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	upAddr, freeUp := reserveAddr(t)
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: upAddr})
	r := startRelay(t, cfg)

	s := connect(t, r.addr, pki)
	id, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg)
	s.close()
	if err != nil {
		t.Fatalf("submission while the upstream is down: %v", err)
	}
	// It is tried, fails, and is deferred with backoff.
	r.waitLog("deferred", map[string]string{"queue_id": id, "attempt": "1"}, 20*time.Second)
	r.waitLog("deferred", map[string]string{"queue_id": id, "attempt": "2"}, 20*time.Second)

	freeUp()
	up := smtptest.Start(t, smtptest.Options{Addr: upAddr, TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	got := up.WaitMessages(t, 1, 30*time.Second)
	if queueIDOf(got[0].Data) != id {
		t.Fatalf("delivered %q, want %s", queueIDOf(got[0].Data), id)
	}
}

// TestCrashDurability submits messages while the upstream is down, kills
// the relay with SIGKILL right after the last 250, restarts it with the
// upstream up, and checks that every accepted message is delivered.
func TestCrashDurability(t *testing.T) {
	t.Parallel()
	const clients, perClient = 6, 50
	pki := testpki.New(t)
	upAddr, freeUp := reserveAddr(t)
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: upAddr})
	r := startRelay(t, cfg)

	var mu sync.Mutex
	accepted := map[string]bool{}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := connect(t, r.addr, pki)
			defer s.close()
			for i := range perClient {
				msg := fmt.Sprintf("From: app@example.com\r\nTo: bob@example.net\r\nSubject: crash test %d/%d\r\n\r\nbody %d/%d\r\n", c, i, c, i)
				id, err := s.send("app@example.com", []string{"bob@example.net"}, msg)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				accepted[id] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	r.kill() // right after the last 250
	close(errs)
	for err := range errs {
		t.Fatalf("submission: %v", err)
	}
	if len(accepted) != clients*perClient {
		t.Fatalf("%d accepted, want %d", len(accepted), clients*perClient)
	}

	freeUp()
	up := smtptest.Start(t, smtptest.Options{Addr: upAddr, TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	startRelay(t, cfg)
	deadline := time.Now().Add(90 * time.Second)
	var delivered map[string]int
	for {
		delivered = map[string]int{}
		for _, m := range up.Messages() {
			delivered[queueIDOf(m.Data)]++
		}
		missing := 0
		for id := range accepted {
			if delivered[id] == 0 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d accepted messages never delivered", missing, len(accepted))
		}
		time.Sleep(100 * time.Millisecond)
	}
	dups := 0
	for id, n := range delivered {
		if !accepted[id] {
			t.Errorf("delivered a message that was never accepted: %q", id)
		}
		dups += n - 1
	}
	t.Logf("accepted %d, delivered all, duplicates %d", len(accepted), dups)
	if dups > 5 {
		t.Errorf("%d duplicates", dups)
	}
}

// TestSmugglingEndToEnd sends a message whose body holds end-of-data
// look-alikes followed by a second transaction: the upstream must get
// exactly one message from it.
func TestSmugglingEndToEnd(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()}))

	smuggled := "MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nFrom: ceo@example.com\r\nSubject: smuggled\r\n\r\nwire money\r\n"
	body := "From: app@example.com\r\nSubject: carrier\r\n\r\none\n.\n" + smuggled + "two\r\n.\n" + smuggled + "three\n.\r\n" + smuggled + "end\r\n"

	// Write the raw bytes: the client library would fix the line endings.
	c := dialRaw(t, r.addr, pki)
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	c.expect(354, "DATA")
	c.write(body + ".\r\n")
	if code, msg := c.read(); code != 250 {
		t.Fatalf("DATA: %d %s", code, msg)
	}
	// A marker message after it: once it has arrived and the queue is
	// empty, anything the first one could have produced has arrived too.
	// The queue's workers deliver at once, so the marker may come first.
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	c.expect(354, "DATA")
	c.write("From: app@example.com\r\nSubject: marker\r\n\r\nmarker\r\n.\r\n")
	if code, msg := c.read(); code != 250 {
		t.Fatalf("marker: %d %s", code, msg)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		msgs := up.Messages()
		marker := false
		for _, m := range msgs {
			marker = marker || bytes.Contains(m.Data, []byte("Subject: marker"))
		}
		if marker && len(queueByID(t, r)) == 0 {
			msgs = up.Messages()
			if len(msgs) != 2 {
				t.Fatalf("upstream got %d messages, want 2 (carrier and marker)", len(msgs))
			}
			for _, m := range msgs {
				if m.From != "app@example.com" || strings.Join(m.To, ",") != "bob@example.net" {
					t.Errorf("smuggled envelope reached the upstream: %s -> %v", m.From, m.To)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("marker not delivered; upstream has %d messages", len(msgs))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestCheckConfig(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	good := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: "127.0.0.1:2525"})
	out, err := runBinary(t, "check-config", "-config", good)
	if err != nil {
		t.Fatalf("valid config refused: %v\n%s", err, out)
	}

	openRelay := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: "127.0.0.1:2525", Extra: `
[[listen]]
address = "0.0.0.0:25"
tls = "none"
auth = "none"
`})
	out, err = runBinary(t, "check-config", "-config", openRelay)
	if err == nil || !strings.Contains(out, "listen[1]") {
		t.Fatalf("open relay accepted (err %v):\n%s", err, out)
	}

	badKey := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: "127.0.0.1:2525", RetryMin: "soon", Extra: `
[[route]]
from_domain = "other.example"
upstream = ["up"]
`})
	out, err = runBinary(t, "check-config", "-config", badKey)
	if err == nil || !strings.Contains(out, "queue.retry_min") || !strings.Contains(out, "route[1].upstream: unknown key; did you mean upstreams?") {
		t.Fatalf("bad keys not both named (err %v):\n%s", err, out)
	}

	// Implicit TLS to 587 can work, against a server set up so: exit 0,
	// and a warning naming the usual port.
	port587 := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: "127.0.0.1:587", UpstreamTLS: "implicit"})
	out, err = runBinary(t, "check-config", "-config", port587)
	if err != nil || !strings.Contains(out, ": OK (") ||
		!strings.Contains(out, `warning: upstream[0].tls: tls = "implicit" on port 587`) || !strings.Contains(out, "usually port 465") {
		t.Fatalf("implicit TLS to 587 (err %v):\n%s", err, out)
	}
}

func runBinary(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), upPassEnv+"="+upPassword, adminEnv+"="+adminToken)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestGracefulStop(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	dir := t.TempDir()
	r := startRelay(t, writeConfig(t, relayConfig{Dir: dir, PKI: pki, UpstreamAddr: up.Addr()}))
	s := connect(t, r.addr, pki)
	if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	up.WaitMessages(t, 1, 20*time.Second)
	start := time.Now()
	r.stop() // an idle client is connected: it must not hold the exit up
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stop took %s", d)
	}
	if _, err := os.Stat(filepath.Join(dir, "queue.db")); err != nil {
		t.Fatal(err)
	}
}
