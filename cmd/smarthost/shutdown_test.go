package main

import (
	"context"
	"log/slog"
	"net/textproto"
	"strings"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// TestShutdownDeadline: a client that stalls in DATA is cut off when the
// deadline passes; that is no failure of the shutdown, and the queue is
// closed cleanly.
func TestShutdownDeadline(t *testing.T) {
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	up := smtptest.Start(t, smtptest.Options{})
	cfg, err := config.Load(serveConfig(t, up.Addr(), ""))
	if err != nil {
		t.Fatal(err)
	}
	var logs logBuffer
	inst, err := start(cfg, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	c, err := textproto.Dial("tcp", inst.addrs()[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	step := func(want int, cmd string) {
		t.Helper()
		if cmd != "" {
			c.PrintfLine("%s", cmd)
		}
		if _, _, err := c.ReadResponse(want); err != nil {
			t.Fatalf("%q: %v", cmd, err)
		}
	}
	step(220, "")
	step(250, "EHLO stall.test")
	step(250, "MAIL FROM:<app@example.com>")
	step(250, "RCPT TO:<bob@example.net>")
	step(354, "DATA")
	c.PrintfLine("Subject: never finished")

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	began := time.Now()
	if err := inst.shutdown(ctx); err != nil {
		t.Fatalf("shutdown at the deadline: %v", err)
	}
	if d := time.Since(began); d > 5*time.Second {
		t.Errorf("shutdown took %v", d)
	}
	if inst.ready.Load() {
		t.Error("still ready after shutdown")
	}
	if !strings.Contains(logs.String(), "shutdown_timeout reached: closed the SMTP connections still open") {
		t.Errorf("deadline not logged:\n%s", logs.String())
	}
	store, err := queue.Open(cfg.Queue.Path, queue.Options{LockTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("queue not closed: %v", err)
	}
	defer store.Close()
	if n, _ := store.Len(); n != 0 {
		t.Errorf("%d messages queued from an unfinished transaction", n)
	}
}
