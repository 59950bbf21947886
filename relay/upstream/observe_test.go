package upstream

import (
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// recorder counts what an Observer is told, by "event upstream".
type recorder struct {
	mu      sync.Mutex
	events  map[string]int
	latency []time.Duration
}

func newRecorder() *recorder { return &recorder{events: map[string]int{}} }

func (r *recorder) add(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events[fmt.Sprintf(format, args...)]++
}

func (r *recorder) Transaction(up string, result queue.Outcome, took time.Duration) {
	r.add("transaction %s %s", up, result)
}
func (r *recorder) Skipped(up string) { r.add("skipped %s", up) }
func (r *recorder) Delivered(up string, since time.Duration) {
	r.add("delivered %s", up)
	r.mu.Lock()
	r.latency = append(r.latency, since)
	r.mu.Unlock()
}

func (r *recorder) snapshot() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.events)
}

// waitEvents waits until the recorded events are exactly want.
func (r *recorder) waitEvents(t *testing.T, want map[string]int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := r.snapshot()
		if maps.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("events:\n%v\nwant:\n%v", got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestDeliveryObserver(t *testing.T) {
	deferring := smtptest.Start(t, smtptest.Options{MailReply: reply(451, smtp.EnhancedCode{4, 3, 0}, "Try later")})
	ok := smtptest.Start(t, smtptest.Options{
		RcptReply: func(to string) *smtp.SMTPError {
			if strings.HasPrefix(to, "bad@") {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
			}
			return nil
		},
	})
	down := smtptest.Start(t, smtptest.Options{})
	down.Close()
	env := newDeliverer(t, plainUpstream("down", down), plainUpstream("deferring", deferring), plainUpstream("ok", ok))
	env.d.DownAfter = 1
	env.d.DownFor = time.Hour
	rec := newRecorder()
	env.d.Observer = rec

	// down fails to connect and goes down, deferring defers, ok takes one
	// recipient and refuses the other: delivered.
	m := testMessage("app@example.com", "x@example.net", "bad@example.net")
	m.Received = time.Now().Add(-time.Minute)
	deliver(t, env.d, m, deliverBody)
	rec.waitEvents(t, map[string]int{
		"transaction down deferred":      1,
		"transaction deferring deferred": 1,
		"transaction ok delivered":       1,
		"delivered ok":                   1,
	})
	rec.mu.Lock()
	latency := rec.latency
	rec.mu.Unlock()
	if len(latency) != 1 || latency[0] < time.Minute || latency[0] > time.Hour {
		t.Errorf("latency %v, want the minute since Received", latency)
	}

	// Now down is left out; ok refuses the only recipient: failed. A DSN
	// delivered counts as a transaction, not as a delivered message.
	deliver(t, env.d, testMessage("app@example.com", "bad@example.net"), deliverBody)
	dsn := testMessage("", "app@example.com")
	dsn.DSN = true
	deliver(t, env.d, dsn, deliverBody)
	rec.waitEvents(t, map[string]int{
		"transaction down deferred":      1,
		"transaction deferring deferred": 3,
		"transaction ok delivered":       2,
		"transaction ok failed":          1,
		"delivered ok":                   1,
		"skipped down":                   2,
	})
}
