package upstream

import (
	"bufio"
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/mailproto"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

// stallServer is a scripted upstream that answers up to a point of the
// plain-text dialogue before STARTTLS and then goes silent, holding the
// connection open until the test ends.
type stallServer struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

func startStallServer(t *testing.T, at string) *stallServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &stallServer{ln: ln}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
			s.wg.Go(func() { s.script(c, at) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

// script answers until the step at, then reads and discards whatever
// comes, answering nothing.
func (s *stallServer) script(c net.Conn, at string) {
	r := bufio.NewReader(c)
	steps := []struct{ name, reply string }{
		{"greeting", "220 stall.test ESMTP\r\n"},
		{"ehlo", "250-stall.test\r\n250 STARTTLS\r\n"},
		{"starttls", "220 2.0.0 Ready to start TLS\r\n"},
	}
	for i, step := range steps {
		if step.name == at {
			break
		}
		if i > 0 {
			if _, err := r.ReadString('\n'); err != nil {
				return
			}
		}
		if _, err := io.WriteString(c, step.reply); err != nil {
			return
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

// TestDeliverStartTLSStallBounded: an upstream that goes silent before TLS
// (at the greeting, the first EHLO or the STARTTLS reply) ends the attempt
// after CommandTimeout, not after go-smtp's own five-minute default, and
// leaves the recipient pending.
func TestDeliverStartTLSStallBounded(t *testing.T) {
	t.Parallel() // it waits out timeouts
	pki := testpki.New(t)
	for _, at := range []string{"greeting", "ehlo", "starttls"} {
		t.Run(at, func(t *testing.T) {
			t.Parallel()
			s := startStallServer(t, at)
			env := newDeliverer(t, Upstream{Name: "a", Address: s.ln.Addr().String(), TLS: mailproto.TLSStartTLS, RootCAs: pki.CAPool})
			cfg := env.d.Config()
			cfg.CommandTimeout = 500 * time.Millisecond
			env.d.SetConfig(cfg)
			done := make(chan []queue.Result, 1)
			start := time.Now()
			go func() {
				done <- env.d.Deliver(context.Background(), testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
			}()
			select {
			case res := <-done:
				took := time.Since(start)
				checkResult(t, res[0], "x@example.net", queue.Pending, "starttls: ", "a")
				if !strings.Contains(res[0].Reply, "timeout") && !strings.Contains(res[0].Reply, "deadline") {
					t.Errorf("reply %q does not say the upstream timed out", res[0].Reply)
				}
				t.Logf("stalled at %s: gave up after %s: %s", at, took.Round(time.Millisecond), res[0].Reply)
			case <-time.After(15 * time.Second):
				t.Fatalf("Deliver still waiting 15s after a stall at the %s with CommandTimeout 500ms", at)
			}
		})
	}
}
