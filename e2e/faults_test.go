package e2e

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// TestFaults runs the relay against upstreams that misbehave in scripted
// ways. For each fault: the message stays queued (listed by GET
// /api/queue) while the fault lasts, nothing reaches the upstream that must
// not, no bounce is sent, and once the fault is cleared the upstream holds
// the exact message.
func TestFaults(t *testing.T) {
	t.Parallel()
	t.Run("reset in DATA", func(t *testing.T) {
		t.Parallel()
		e := newFaultEnv(t, "implicit", relayConfig{})
		e.proxy.set(fault{kind: faultResetInData, n: 600})
		id := e.submit()
		line := e.deferred(id, 0)
		e.requireHit()
		t.Logf("reset after 600 bytes of the message: %v", line["reply"])
		// The upstream never saw the final dot, so it kept nothing: the
		// retry is the only copy.
		if n := e.clearAndDeliver(id); n != 1 {
			t.Errorf("upstream holds %d copies, want 1", n)
		}
	})

	t.Run("timeout after DATA", func(t *testing.T) {
		t.Parallel()
		// One attempt during the fault (retry_min 1m), so that the count of
		// copies below is a fixed figure.
		e := newFaultEnv(t, "implicit", relayConfig{RetryMin: "1m", RetryMax: "2m", QueueExtra: `upstream_data_timeout = "2s"`})
		e.proxy.set(fault{kind: faultHangAfterDot})
		id := e.submit()
		// The upstream took the message; only its answer was lost.
		e.deferred(id, 1)
		e.requireHit()
		attempt := e.r.waitLog("delivery attempt", map[string]string{"queue_id": id}, 5*time.Second)
		took := logDuration(attempt)
		if attempt["stage"] != "end of data" || took < 2*time.Second || took > 15*time.Second {
			t.Errorf("attempt: stage %v after %s (%v), want end of data after the 2s data timeout", attempt["stage"], took, attempt["reply"])
		}
		n := e.clearAndDeliver(id)
		t.Logf("timeout after DATA: the upstream holds %d copies (one whose reply was lost, one from the retry)", n)
		if n != 2 {
			t.Errorf("upstream holds %d copies, want 2", n)
		}
	})

	t.Run("421", func(t *testing.T) {
		t.Parallel()
		reply421 := func(stage string) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "fault injected at " + stage + ", closing"}
		}
		stages := []struct {
			name string
			set  func(e *faultEnv, on bool)
		}{
			{"greeting", func(e *faultEnv, on bool) {
				e.up.SetGreetReply(nil)
				if on {
					e.up.SetGreetReply(reply421("greeting"))
				}
			}},
			{"EHLO", proxyStage("EHLO")},
			{"AUTH", proxyStage("AUTH")},
			{"MAIL", func(e *faultEnv, on bool) {
				e.up.SetMailReply(nil)
				if on {
					e.up.SetMailReply(func(string) *smtp.SMTPError { return reply421("MAIL") })
				}
			}},
			{"RCPT", func(e *faultEnv, on bool) {
				e.up.SetRcptReply(nil)
				if on {
					e.up.SetRcptReply(func(string) *smtp.SMTPError { return reply421("RCPT") })
				}
			}},
			{"DATA", proxyStage("DATA")},
			{"final dot", func(e *faultEnv, on bool) {
				e.up.SetDataReply(nil)
				if on {
					e.up.SetDataReply(func(string, []string, []byte) *smtp.SMTPError { return reply421("final dot") })
				}
			}},
		}
		for _, st := range stages {
			t.Run(st.name, func(t *testing.T) {
				t.Parallel()
				e := newFaultEnv(t, "implicit", relayConfig{})
				st.set(e, true)
				id := e.submit()
				line := e.deferred(id, 0)
				if reply := fmt.Sprint(line["reply"]); !strings.HasPrefix(reply, "421 4.3.2 fault injected at ") {
					t.Errorf("deferred with %q, want the injected 421", reply)
				}
				if n := e.clearAndDeliver(id, func() { st.set(e, false) }); n != 1 {
					t.Errorf("upstream holds %d copies, want 1", n)
				}
			})
		}
	})

	t.Run("TLS handshake failure", func(t *testing.T) {
		t.Parallel()
		pki := testpki.New(t)
		tls10 := pki.ServerTLS()
		tls10.MinVersion, tls10.MaxVersion = tls.VersionTLS10, tls.VersionTLS10
		for _, tt := range []struct {
			name string
			f    fault
		}{
			{"peer closes", fault{kind: faultHandshakeClose}},
			{"garbage", fault{kind: faultHandshakeGarbage}},
			{"TLS 1.0 only", fault{kind: faultBadTLS, tls: tls10}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				e := newFaultEnv(t, "implicit", relayConfig{})
				e.proxy.set(tt.f)
				id := e.submit()
				line := e.deferred(id, 0)
				e.requireHit()
				if reply := fmt.Sprint(line["reply"]); !strings.HasPrefix(reply, "tls: ") {
					t.Errorf("deferred with %q, want a tls: failure", reply)
				}
				e.requireUntouched()
				if n := e.clearAndDeliver(id); n != 1 {
					t.Errorf("upstream holds %d copies, want 1", n)
				}
			})
		}
	})

	t.Run("never downgrade", func(t *testing.T) {
		t.Parallel()
		t.Run("untrusted certificate", func(t *testing.T) {
			t.Parallel()
			e := newFaultEnv(t, "implicit", relayConfig{})
			other := testpki.New(t) // a CA that ca_file does not name
			e.proxy.set(fault{kind: faultBadTLS, tls: other.ServerTLS()})
			id := e.submit()
			line := e.deferred(id, 0)
			e.requireHit()
			if reply := fmt.Sprint(line["reply"]); !strings.HasPrefix(reply, "tls: ") || !strings.Contains(reply, "certificate") {
				t.Errorf("deferred with %q, want a certificate failure", reply)
			}
			e.requireUntouched()
			if n := e.clearAndDeliver(id); n != 1 {
				t.Errorf("upstream holds %d copies, want 1", n)
			}
		})
		for _, tt := range []struct {
			name  string
			f     fault
			reply string // the deferral's reply contains it
		}{
			{"STARTTLS stripped", fault{kind: faultStripStartTLS}, "starttls: server doesn't support STARTTLS"},
			{"STARTTLS refused", fault{kind: faultRefuse, verb: "STARTTLS"}, "454 4.7.0 fault injected at STARTTLS"},
		} {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				e := newFaultEnv(t, "starttls", relayConfig{})
				e.proxy.set(tt.f)
				id := e.submit()
				line := e.deferred(id, 0)
				e.requireHit()
				if reply := fmt.Sprint(line["reply"]); !strings.Contains(reply, tt.reply) {
					t.Errorf("deferred with %q, want %q", reply, tt.reply)
				}
				// Nothing but the introduction, the request for TLS and the
				// goodbye went out in clear.
				for _, verb := range e.proxy.sent() {
					if verb != "EHLO" && verb != "STARTTLS" && verb != "QUIT" {
						t.Errorf("the relay sent %s in clear: %v", verb, e.proxy.sent())
					}
				}
				if a := e.up.AuthAttempts(); len(a) != 0 {
					t.Errorf("upstream saw AUTH: %v", a)
				}
				if n := e.clearAndDeliver(id); n != 1 {
					t.Errorf("upstream holds %d copies, want 1", n)
				}
				if msgs := e.up.Messages(); !msgs[len(msgs)-1].TLS {
					t.Error("delivered without TLS after the fault cleared")
				}
			})
		}
	})

	t.Run("slow upstream", func(t *testing.T) {
		t.Parallel()
		for _, mode := range []string{"implicit", "starttls"} {
			t.Run(mode, func(t *testing.T) {
				t.Parallel()
				e := newFaultEnv(t, mode, relayConfig{QueueExtra: "upstream_command_timeout = \"2s\"\nupstream_data_timeout = \"3s\""})
				e.proxy.set(fault{kind: faultSlow})
				id := e.submit()
				e.deferred(id, 0)
				attempt := e.r.waitLog("delivery attempt", map[string]string{"queue_id": id}, 5*time.Second)
				took := logDuration(attempt)
				t.Logf("%s at 1 byte/s: gave up after %s: %v", mode, took.Round(time.Millisecond), attempt["reply"])
				// Stuck at the greeting: one command timeout, with room for
				// a loaded machine, and far from go-smtp's five minutes.
				if took < 2*time.Second || took > 12*time.Second {
					t.Errorf("attempt took %s with a 2s command timeout", took)
				}
				if n := e.clearAndDeliver(id); n != 1 {
					t.Errorf("upstream holds %d copies, want 1", n)
				}
			})
		}
	})
}

// proxyStage makes the fault proxy answer verb with 421.
func proxyStage(verb string) func(e *faultEnv, on bool) {
	return func(e *faultEnv, on bool) {
		if on {
			e.proxy.set(fault{kind: faultReply421, verb: verb})
		} else {
			e.proxy.set(fault{})
		}
	}
}

// faultEnv is a relay whose one upstream is an smtptest server behind a
// fault proxy.
type faultEnv struct {
	t      *testing.T
	pki    *testpki.PKI
	up     *smtptest.Server
	proxy  *faultProxy
	r      *relay
	marker string // in the body of the message submitted
}

// newFaultEnv starts the upstream, the proxy and the relay. With
// tlsMode "implicit" the proxy is the relay's TLS peer and sees the SMTP
// dialogue; with "starttls" the upstream offers STARTTLS and TLS runs
// end to end through the proxy.
func newFaultEnv(t *testing.T, tlsMode string, rc relayConfig) *faultEnv {
	t.Helper()
	pki := testpki.New(t)
	e := &faultEnv{t: t, pki: pki, marker: fmt.Sprintf("fault-marker-%d", time.Now().UnixNano())}
	opts := smtptest.Options{Username: upUser, Password: upPassword}
	var proxyTLS *tls.Config
	switch tlsMode {
	case "implicit":
		proxyTLS = pki.ServerTLS()
	case "starttls":
		opts.TLS, opts.TLSConfig = smtptest.TLSStartTLS, pki.ServerTLS()
	default:
		t.Fatalf("tls mode %q", tlsMode)
	}
	e.up = smtptest.Start(t, opts)
	e.proxy = startFaultProxy(t, e.up.Addr(), proxyTLS)
	rc.PKI, rc.UpstreamAddr, rc.UpstreamTLS = pki, e.proxy.addr(), tlsMode
	e.r = startRelay(t, writeConfig(t, rc))
	return e
}

// message is what the test submits: a body of some size with the marker
// on every line, so that a reset can strike in its middle.
func (e *faultEnv) message() string {
	var b strings.Builder
	b.WriteString("From: App <app@example.com>\r\nTo: Bob <bob@example.net>\r\nSubject: fault\r\n")
	fmt.Fprintf(&b, "Message-ID: <%s@example.com>\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\n", e.marker)
	for i := range 30 {
		fmt.Fprintf(&b, "line %02d of %s\r\n", i, e.marker)
	}
	b.WriteString(".a line that starts with a dot\r\n")
	return b.String()
}

func (e *faultEnv) submit() string {
	e.t.Helper()
	s := connect(e.t, e.r.addr, e.pki)
	defer s.close()
	id, err := s.send("app@example.com", []string{"bob@example.net"}, e.message())
	if err != nil {
		e.t.Fatal(err)
	}
	return id
}

// copies returns the upstream's messages that carry the marker.
func (e *faultEnv) copies() []smtptest.Message {
	var out []smtptest.Message
	for _, m := range e.up.Messages() {
		if strings.Contains(string(m.Data), e.marker) {
			out = append(out, m)
		}
	}
	return out
}

// deferred waits until the relay defers the message, checks that it is
// still queued and that the upstream holds kept copies, and returns the
// log line.
func (e *faultEnv) deferred(id string, kept int) map[string]any {
	e.t.Helper()
	line := e.r.waitLog("deferred", map[string]string{"queue_id": id}, 30*time.Second)
	if _, ok := queueByID(e.t, e.r)[id]; !ok {
		e.t.Fatalf("%s not listed by GET /api/queue while the fault lasts", id)
	}
	if n := len(e.copies()); n != kept {
		e.t.Errorf("upstream holds %d copies during the fault, want %d", n, kept)
	}
	return line
}

func (e *faultEnv) requireHit() {
	e.t.Helper()
	if e.proxy.hitCount() == 0 {
		e.t.Fatal("the fault never struck")
	}
}

// requireUntouched checks that nothing went past the proxy to the
// upstream: no connection, so no AUTH, no MAIL and no message bytes.
func (e *faultEnv) requireUntouched() {
	e.t.Helper()
	if verbs := e.proxy.sent(); len(verbs) != 0 {
		e.t.Errorf("the relay sent %v through a failed handshake", verbs)
	}
	if n := e.up.Connections(); n != 0 {
		e.t.Errorf("the upstream saw %d connections", n)
	}
}

// clearAndDeliver lifts the fault (by clear, or by letting the proxy pass
// everything), flushes the queue, waits for the delivery and checks the
// copy that arrived last: envelope, the relay's Received: field naming the
// queue ID, then the message as submitted. It returns how many copies the
// upstream holds.
func (e *faultEnv) clearAndDeliver(id string, clear ...func()) int {
	e.t.Helper()
	e.proxy.set(fault{})
	for _, c := range clear {
		c()
	}
	api(e.t, e.r, http.MethodPost, "/api/queue/flush", nil)
	e.r.waitLog("delivered", map[string]string{"queue_id": id}, 30*time.Second)
	copies := e.copies()
	if len(copies) == 0 {
		e.t.Fatal("delivered, but the upstream holds no copy")
	}
	m := copies[len(copies)-1]
	if m.From != "app@example.com" || !slices.Equal(m.To, []string{"bob@example.net"}) || m.AuthUser != upUser {
		e.t.Errorf("envelope MAIL FROM %q RCPT TO %v, AUTH %q", m.From, m.To, m.AuthUser)
	}
	data, want := string(m.Data), e.message()
	if head, ok := strings.CutSuffix(data, want); !ok || !addedFields.MatchString(head) {
		e.t.Errorf("delivered message is not the submitted one:\n%s", data)
	}
	if got := queueIDOf(m.Data); got != id {
		e.t.Errorf("delivered copy names queue ID %q, want %q", got, id)
	}
	for _, m := range e.up.Messages() {
		if m.From == "" {
			e.t.Errorf("a bounce was sent to %v", m.To)
		}
	}
	if q := queueByID(e.t, e.r); len(q) != 0 {
		e.t.Errorf("queue after the delivery: %v", q)
	}
	return len(copies)
}

// logDuration reads the duration_ms of a delivery attempt line.
func logDuration(line map[string]any) time.Duration {
	ms, _ := line["duration_ms"].(float64)
	return time.Duration(ms) * time.Millisecond
}
