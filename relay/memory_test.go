package relay

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/testwait"
)

func TestMemoryBudget(t *testing.T) {
	b := newMemoryBudget(100)
	if !b.take(60) || !b.take(40) {
		t.Fatal("could not take the whole budget")
	}
	if b.take(1) {
		t.Error("took past the limit")
	}
	b.give(40)
	if b.take(41) || !b.take(40) || b.inUse() != 100 {
		t.Errorf("after giving 40 back: in use %d", b.inUse())
	}
	b.give(100)
	if b.inUse() != 0 || newMemoryBudget(-5).take(1) || !newMemoryBudget(0).take(0) {
		t.Errorf("in use %d, or a negative or zero budget lends", b.inUse())
	}

	// Many borrowers at once never pass the limit together.
	b = newMemoryBudget(1000)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		peak int64
	)
	for range 8 {
		wg.Go(func() {
			for range 1000 {
				if b.take(300) {
					mu.Lock()
					peak = max(peak, b.inUse())
					mu.Unlock()
					b.give(300)
				}
			}
		})
	}
	wg.Wait()
	if peak > 1000 || b.inUse() != 0 {
		t.Errorf("peak %d of a budget of 1000, %d left in use", peak, b.inUse())
	}
}

// pausedMessage is a client that has sent DATA and a message, but not the
// final dot yet.
type pausedMessage struct {
	c   *client
	msg string
}

// sendPaused starts a transaction and writes msg after DATA, without the
// end of data.
func sendPaused(t *testing.T, env *testEnv, msg string) *pausedMessage {
	t.Helper()
	c := dialPlain(t, env)
	c.expect(250, "MAIL FROM:<app@example.com>")
	c.expect(250, "RCPT TO:<bob@example.net>")
	c.expect(354, "DATA")
	if _, err := io.WriteString(c.conn, msg); err != nil {
		t.Fatal(err)
	}
	return &pausedMessage{c: c, msg: msg}
}

// finish sends the end of data and returns the reply.
func (p *pausedMessage) finish() (int, string) {
	if _, err := io.WriteString(p.c.conn, ".\r\n"); err != nil {
		return 0, err.Error()
	}
	return p.c.read()
}

// tmpSpools counts the spool files being written in env's queue.
func tmpSpools(t *testing.T, env *testEnv) int {
	t.Helper()
	n := 0
	for _, name := range env.q.spoolFiles(t) {
		if strings.HasPrefix(name, ".tmp-") {
			n++
		}
	}
	return n
}

// largeBody is a message of about n bytes that the door keeps as it is.
func largeBody(tag string, n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "From: App <app@example.com>\r\nSubject: %s\r\n\r\n", tag)
	line := strings.Repeat("m", 76) + "\r\n"
	for b.Len() < n {
		b.WriteString(line)
	}
	return b.String()
}

// TestMessageMemoryShared: eight sessions send 900 KB each at once with a
// budget of 3 MiB. At most three hold their message in memory, the others
// spool theirs; every message is stored intact, and once all are stored
// the budget is whole again.
func TestMessageMemoryShared(t *testing.T) {
	const (
		sessions = 8
		budget   = 3 << 20
	)
	env := startPlain(t, 0, func(s *Server) { s.Limits.MessageMemory = budget })
	var paused []*pausedMessage
	for i := range sessions {
		paused = append(paused, sendPaused(t, env, largeBody(fmt.Sprint(i), 900<<10)))
	}
	// Each borrows about 1 MiB to hold its message: three fit.
	testwait.For(t, 20*time.Second, "five sessions to spool", func() bool { return tmpSpools(t, env) >= sessions-3 })
	if n := env.srv.memory.inUse(); n == 0 || n > budget {
		t.Errorf("%d bytes lent while the messages are read, want some and at most %d", n, budget)
	}
	for i, p := range paused {
		if code, msg := p.finish(); code != 250 {
			t.Errorf("session %d: %d %s", i, code, msg)
		}
	}
	spooled := 0
	for _, q := range env.q.all() {
		if q.spooled {
			spooled++
		}
		tag := q.body[bytes.Index(q.body, []byte("Subject: "))+9:][:1]
		var want string
		for _, p := range paused {
			if strings.Contains(p.msg, "Subject: "+string(tag)+"\r\n") {
				want = p.msg
			}
		}
		if want == "" || !bytes.HasSuffix(q.body, []byte(want)) {
			t.Errorf("message %s (subject %s) not stored intact", q.m.ID, tag)
		}
	}
	if n := len(env.q.all()); n != sessions || spooled < sessions-3 || spooled == sessions {
		t.Errorf("%d messages stored, %d of them spooled; want %d, at least %d and not all spooled", n, spooled, sessions, sessions-3)
	}
	if n := env.srv.memory.inUse(); n != 0 {
		t.Errorf("%d bytes still lent after every message was stored", n)
	}
}

// TestMessageMemoryReturned: whatever ends a transaction that borrowed
// memory (a client gone, a timeout, a refusal after reading, a storage
// failure, a message over the size limit), the loan goes back.
func TestMessageMemoryReturned(t *testing.T) {
	t.Parallel() // it waits out timeouts
	env := startPlain(t, 0, func(s *Server) {
		s.Limits.MessageMemory = 8 << 20
		s.Limits.MaxMessageBytes = 2 << 20
		s.Limits.DataTimeout = 5 * time.Second // 3 MB must arrive within it under the race detector on a busy machine
	})
	half := largeBody("half", 500<<10)
	loop := strings.Repeat("Received: from a by b; Sun, 22 Nov 2026 10:00:00 +0000\r\n", 60) + half
	borrowed := func(what string) {
		t.Helper()
		testwait.For(t, 20*time.Second, what+" to borrow", func() bool { return env.srv.memory.inUse() > 0 })
	}
	returned := func(what string) {
		t.Helper()
		testwait.For(t, 20*time.Second, what+": the loan back", func() bool { return env.srv.memory.inUse() == 0 })
	}

	p := sendPaused(t, env, half)
	borrowed("a client that disconnects")
	p.c.conn.Close()
	returned("client gone")

	p = sendPaused(t, env, half)
	borrowed("a client that stalls")
	if code, msg := p.c.read(); code != 421 {
		t.Errorf("stalled DATA: %d %s, want 421", code, msg)
	}
	returned("data_timeout")

	for _, tc := range []struct {
		name string
		msg  string
		set  func(q *memQueue)
		code int
	}{
		{"refused as a loop", loop, nil, 554},
		{"storage failure", half, func(q *memQueue) { q.fail = os.ErrPermission }, 452},
		{"over max_message_size", largeBody("big", 3<<20), nil, 552},
	} {
		env.q.mu.Lock()
		env.q.fail = nil
		if tc.set != nil {
			tc.set(env.q)
		}
		env.q.mu.Unlock()
		c := dialPlain(t, env)
		if code, msg := c.send("app@example.com", []string{"bob@example.net"}, tc.msg); code != tc.code {
			t.Errorf("%s: %d %s, want %d", tc.name, code, msg, tc.code)
		}
		returned(tc.name)
	}
}

// TestSpoolingSessionMemory: a session whose message goes on past the
// floor without a loan spools it and holds tens of KiB, not the message:
// 100 sessions paused in the middle of 300 KB messages grow the heap by
// under 64 KiB each (server and client side together).
func TestSpoolingSessionMemory(t *testing.T) {
	const sessions = 100
	env := startPlain(t, 0, func(s *Server) {
		s.Limits.MessageMemory = 0 // no loans: past 64 KiB, every message spools
		s.Limits.MaxConnections = sessions + 10
		// The first sessions wait, paused, while the others start: on a
		// busy machine that may take longer than the usual timeouts,
		// which would end them and remove their spool files.
		s.Limits.ReadTimeout, s.Limits.DataTimeout = 5*time.Minute, 5*time.Minute
	})
	msg := largeBody("paused", 300<<10)
	// One message first, so that the spool store is open before measuring.
	if code, text := dialPlain(t, env).send("app@example.com", []string{"bob@example.net"}, msg); code != 250 {
		t.Fatalf("first message: %d %s", code, text)
	}

	var before, during runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var conns []net.Conn
	for range sessions {
		p := sendPaused(t, env, msg)
		conns = append(conns, p.c.conn)
	}
	spoolDir := filepath.Join(env.q.dir, "queue.db.spool")
	// Every session has read its message: its spool file holds what is
	// past the head.
	testwait.For(t, 20*time.Second, "every session to spool its message", func() bool {
		entries, err := os.ReadDir(spoolDir)
		if err != nil {
			return false
		}
		n := 0
		for _, e := range entries {
			if fi, err := e.Info(); err == nil && strings.HasPrefix(e.Name(), ".tmp-") && fi.Size() >= int64(len(msg))-2*readChunk {
				n++
			}
		}
		return n == sessions
	})
	runtime.GC()
	runtime.ReadMemStats(&during)
	perSession := (int64(during.HeapAlloc) - int64(before.HeapAlloc)) / sessions
	t.Logf("%d sessions spooling 300 KB messages: %d KiB of heap each", sessions, perSession>>10)
	if perSession > 64<<10 {
		t.Errorf("%d KiB of heap per spooling session, want under 64", perSession>>10)
	}
	for _, c := range conns {
		c.Close()
	}
	testwait.For(t, 20*time.Second, "the sessions to end", func() bool { return tmpSpools(t, env) == 0 })
}

// TestSmallMessagesNeedNoLoan: with no memory to lend, a message within
// what a session holds on its own (16 KiB, or its header section) is
// still stored from memory, and a larger one is spooled, both intact.
func TestSmallMessagesNeedNoLoan(t *testing.T) {
	env := startPlain(t, 0, func(s *Server) { s.Limits.MessageMemory = 0 })
	c := dialPlain(t, env)
	small, large := largeBody("small", 12<<10), largeBody("large", 100<<10)
	for _, msg := range []string{small, large} {
		if code, text := c.send("app@example.com", []string{"bob@example.net"}, msg); code != 250 {
			t.Fatalf("%d %s", code, text)
		}
	}
	got := env.q.all()
	if len(got) != 2 || got[0].spooled || !got[1].spooled ||
		!bytes.HasSuffix(got[0].body, []byte(small)) || !bytes.HasSuffix(got[1].body, []byte(large)) {
		t.Errorf("want the 12 KB message stored from memory and the 100 KB one spooled, both intact: %d stored", len(got))
	}
}
