// Package queuetest is the conformance suite of queue.Backend: Run checks
// that a backend keeps the contract that the Scheduler, the submission
// side, the admin API and the metrics rely on. Every backend's tests call
// it, as the bbolt Store's do:
//
//	func TestConformance(t *testing.T) {
//		queuetest.Run(t, func(t *testing.T) queuetest.Storage { return newStorage(t) })
//	}
//
// The suite drives the backend's clock, and every time it uses is a whole
// second, so that a storage that keeps microseconds compares exactly.
package queuetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/queue"
)

// Storage is one empty queue storage under test: a file, a database.
type Storage interface {
	// Open opens a backend over the storage whose clock is now, which
	// keeps a message's history for HistoryRetention after it left the
	// queue and stores webhook posts for Subscriptions. The suite closes each backend it opens before it opens the
	// next one, which must find everything that was committed before.
	Open(t *testing.T, now func() time.Time) queue.Backend
	// Damage makes the stored record of message id unreadable, as a bad
	// disk or a bug would. No backend is open on the storage meanwhile.
	Damage(t *testing.T, id string)
}

// HistoryRetention is the history retention of the backends under test.
const HistoryRetention = time.Hour

// Subscriptions are the webhook subscriptions of the backends under test.
var Subscriptions = []queue.Subscription{
	{Endpoint: "all", Events: queue.WebhookEvents()},
	{Endpoint: "billing", Events: []queue.EventType{queue.EventBounced, queue.EventExpired}, Users: []string{"billing-app"}},
	{Endpoint: "other", Events: queue.WebhookEvents(), Users: []string{"someone-else"}},
}

// Run runs the suite, each test on a new Storage from newStorage, in
// parallel.
func Run(t *testing.T, newStorage func(t *testing.T) Storage) {
	for _, tc := range []struct {
		name string
		test func(e *env)
	}{
		{"PutGet", testPutGet},
		{"Durable", testDurable},
		{"ClaimExclusive", testClaimExclusive},
		{"ClaimConcurrent", testClaimConcurrent},
		{"DueOrder", testDueOrder},
		{"FinishKeeps", testFinishKeeps},
		{"FinishWithDSNs", testFinishWithDSNs},
		{"FinishAllOrNothing", testFinishAllOrNothing},
		{"FinishClaimLost", testFinishClaimLost},
		{"DeleteDuringAttempt", testDeleteDuringAttempt},
		{"HeldNeverClaimed", testHeldNeverClaimed},
		{"RetryFlush", testRetryFlush},
		{"Counts", testCounts},
		{"Spooled", testSpooled},
		{"Content", testContent},
		{"History", testHistory},
		{"FindHistory", testFindHistory},
		{"Webhooks", testWebhooks},
		{"Import", testImport},
		{"Intake", testIntake},
		{"Unreadable", testUnreadable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each on a storage of its own
			e := &env{t: t, storage: newStorage(t), clock: &clock{now: t0}}
			e.open()
			tc.test(e)
		})
	}
}

// t0 is when every test starts.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// clock is the backend's clock, which the tests move.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// env is one test: its storage, clock and open backend.
type env struct {
	t       *testing.T
	storage Storage
	clock   *clock
	b       queue.Backend
}

func (e *env) open() {
	b := e.storage.Open(e.t, e.clock.Now)
	e.t.Cleanup(func() { b.Close() }) // a second Close does nothing
	e.b = b
}

// reopen closes the backend and opens the storage again.
func (e *env) reopen() {
	e.t.Helper()
	if err := e.b.Close(); err != nil {
		e.t.Fatalf("Close: %v", err)
	}
	e.open()
}

func newMessage(rcpts ...string) *queue.Message {
	m := &queue.Message{From: "app@example.com", User: "billing-app", MessageID: "<1@example.com>"}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, queue.Recipient{Addr: r})
	}
	return m
}

// put stores a message to rcpts received at received with body.
func (e *env) put(received time.Time, body string, rcpts ...string) *queue.Message {
	e.t.Helper()
	m := newMessage(rcpts...)
	m.Received = received
	if err := e.b.Put(context.Background(), m, []byte(body)); err != nil {
		e.t.Fatalf("Put: %v", err)
	}
	return m
}

// startAt is the Start of attempts made at now and retried at retry.
func startAt(now, retry time.Time) queue.Start {
	return queue.Start{Now: now, Retry: func(int) time.Time { return retry }}
}

// claim claims up to limit messages due at now, each retried at retry.
func (e *env) claim(now, retry time.Time, limit int) queue.Claimed {
	e.t.Helper()
	c, err := e.b.Claim(context.Background(), startAt(now, retry), limit, nil)
	if err != nil {
		e.t.Fatalf("Claim: %v", err)
	}
	return c
}

// claimOne claims the one message due at now and fails unless it is id.
func (e *env) claimOne(now, retry time.Time, id string) queue.Attempt {
	e.t.Helper()
	c := e.claim(now, retry, 10)
	if len(c.Attempts) != 1 || c.Attempts[0].Message.ID != id {
		e.t.Fatalf("claimed %v at %v, want only %s", ids(c.Attempts), now, id)
	}
	return c.Attempts[0]
}

// keep ends attempt a with the message kept, changed by change.
func (e *env) keep(a queue.Attempt, change func(m *queue.Message)) queue.Finished {
	e.t.Helper()
	f, err := e.b.Finish(context.Background(), a, nil, func(m *queue.Message) (bool, []queue.DSN) {
		change(m)
		return false, nil
	})
	if err != nil {
		e.t.Fatalf("Finish %s: %v", a.Message.ID, err)
	}
	return f
}

func ids(as []queue.Attempt) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.Message.ID)
	}
	return out
}

func (e *env) get(id string) *queue.Entry {
	e.t.Helper()
	m, err := e.b.Get(id)
	if err != nil {
		e.t.Fatalf("Get %s: %v", id, err)
	}
	return m
}

func (e *env) gone(id string) {
	e.t.Helper()
	if m, err := e.b.Get(id); !errors.Is(err, queue.ErrNotFound) {
		e.t.Errorf("Get %s: %+v, %v; want ErrNotFound", id, m, err)
	}
}

// read returns the whole content of a claimed message, as a delivery
// streams it.
func (e *env) read(a queue.Attempt) []byte {
	e.t.Helper()
	body, closeBody, err := e.b.OpenBody(a)
	if err != nil {
		e.t.Fatalf("OpenBody %s: %v", a.Message.ID, err)
	}
	defer closeBody()
	data, err := io.ReadAll(body.Reader())
	if err != nil {
		e.t.Fatalf("reading the body of %s: %v", a.Message.ID, err)
	}
	if int64(len(data)) != body.Size() {
		e.t.Errorf("body of %s: read %d bytes, Size %d", a.Message.ID, len(data), body.Size())
	}
	return data
}

// check fails unless Stats and Len report want.
func (e *env) check(step string, want queue.Stats) {
	e.t.Helper()
	got, err := e.b.Stats()
	if err != nil {
		e.t.Fatalf("%s: Stats: %v", step, err)
	}
	if got.Queued != want.Queued || got.Held != want.Held || got.InFlight != want.InFlight || !got.Oldest.Equal(want.Oldest) {
		e.t.Errorf("%s: Stats = %+v, want %+v", step, got, want)
	}
	if n, err := e.b.Len(); err != nil || n != want.Queued+want.Held+want.InFlight {
		e.t.Errorf("%s: Len = %d, %v; want %d", step, n, err, want.Queued+want.Held+want.InFlight)
	}
}

// woken reports whether Wake has a signal pending, and takes it.
func (e *env) woken() bool {
	select {
	case <-e.b.Wake():
		return true
	case <-time.After(time.Second):
		return false
	}
}

// drainWake takes a pending Wake signal, if any.
func (e *env) drainWake() {
	select {
	case <-e.b.Wake():
	default:
	}
}

// norm makes m comparable with reflect.DeepEqual: times as instants.
func norm(m queue.Message) queue.Message {
	m.Received = m.Received.Round(0).UTC()
	m.LastAttempt = m.LastAttempt.Round(0).UTC()
	m.NextAttempt = m.NextAttempt.Round(0).UTC()
	m.Recipients = slices.Clone(m.Recipients)
	return m
}

func (e *env) same(what string, got, want queue.Message) {
	e.t.Helper()
	if g, w := norm(got), norm(want); !reflect.DeepEqual(g, w) {
		e.t.Errorf("%s:\n got %+v\nwant %+v", what, g, w)
	}
}

// testPutGet: Put fills in what it promises and the message reads back.
func testPutGet(e *env) {
	m := newMessage("a@example.net", "b@example.net")
	m.Recipients[1].State, m.Recipients[1].Reply = queue.Delivered, "stale"
	body := "Subject: hi\r\n\r\n\x00binary\xff\r\n.\r\n"
	if err := e.b.Put(context.Background(), m, []byte(body)); err != nil {
		e.t.Fatal(err)
	}
	if m.ID == "" || !m.Received.Equal(t0) || !m.NextAttempt.Equal(t0) || m.Size != int64(len(body)) {
		e.t.Errorf("Put filled in ID %q, Received %v, NextAttempt %v, Size %d; want an ID, %v, %v, %d",
			m.ID, m.Received, m.NextAttempt, m.Size, t0, t0, len(body))
	}
	for _, r := range m.Recipients {
		if r.State != queue.Pending {
			e.t.Errorf("recipient %s is %v, want pending", r.Addr, r.State)
		}
	}
	got := e.get(m.ID)
	e.same("Get", got.Message, *m)
	if got.InFlight {
		e.t.Error("InFlight before any claim")
	}
	list, bad, err := e.b.List()
	if err != nil || len(bad) != 0 || len(list) != 1 {
		e.t.Fatalf("List = %+v, %v, %v; want the message", list, bad, err)
	}
	e.same("List", list[0].Message, *m)
	e.check("one put", queue.Stats{Queued: 1, Oldest: t0})
	if b := e.read(e.claimOne(t0, t0.Add(time.Hour), m.ID)); string(b) != body {
		e.t.Errorf("body %q, want %q", b, body)
	}
	e.gone("0123456789abcdef")

	if err := e.b.Put(context.Background(), newMessage(), []byte("x")); err == nil {
		e.t.Error("Put of a message without recipients succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := e.b.Put(ctx, newMessage("c@example.net"), []byte("x")); err == nil {
		e.t.Error("Put with a cancelled context succeeded")
	}
	dup := newMessage("d@example.net")
	dup.ID = m.ID
	if err := e.b.Put(context.Background(), dup, []byte("other")); !errors.Is(err, queue.ErrExists) {
		e.t.Errorf("Put of a stored ID: %v, want ErrExists", err)
	}
	if n, err := e.b.Len(); err != nil || n != 1 {
		e.t.Errorf("Len = %d, %v after refused Puts; want 1", n, err)
	}
}

// testDurable: what was committed survives a close and a reopen whole:
// messages in every state, with their bodies.
func testDurable(e *env) {
	plain := e.put(t0.Add(-time.Hour), "Subject: plain\r\n\r\nplain\r\n", "a@example.net")
	held := e.put(t0.Add(-time.Minute), "Subject: held\r\n\r\nheld\r\n", "b@example.net")
	if err := e.b.Hold(held.ID); err != nil {
		e.t.Fatal(err)
	}
	head, rest := "Subject: large\r\n\r\n", strings.Repeat("0123456789abcdef", 20000)
	large := newMessage("c@example.net")
	e.putSpooled(large, head, rest)
	tried := e.put(t0.Add(-2*time.Hour), "Subject: tried\r\n\r\ntried\r\n", "d@example.net", "e@example.net")
	retry := t0.Add(time.Hour)
	e.keep(e.claimOne(t0.Add(-time.Hour-time.Second), retry, tried.ID), func(m *queue.Message) {
		m.Recipients[0].State, m.Recipients[0].Reply, m.Recipients[0].Upstream = queue.Delivered, "250 ok", "up"
		m.Recipients[1].Reply, m.Recipients[1].Upstream = "451 later", "up"
		m.LastReply, m.Warned = "451 later", true
	})

	before := map[string]queue.Message{}
	for _, id := range []string{plain.ID, held.ID, large.ID, tried.ID} {
		before[id] = e.get(id).Message
	}
	e.reopen()
	for id, want := range before {
		got := e.get(id)
		e.same("after reopen", got.Message, want)
		if got.InFlight {
			e.t.Errorf("%s in flight after reopen", id)
		}
	}
	e.check("after reopen", queue.Stats{Queued: 3, Held: 1, Oldest: t0.Add(-2 * time.Hour)})
	c := e.claim(t0, retry, 10)
	if got, want := ids(c.Attempts), []string{plain.ID, large.ID}; !slices.Equal(got, want) {
		e.t.Fatalf("claimed %v after reopen, want %v (due order; held and tried not due)", got, want)
	}
	if b := e.read(c.Attempts[0]); string(b) != "Subject: plain\r\n\r\nplain\r\n" {
		e.t.Errorf("plain body after reopen %q", b)
	}
	if b := e.read(c.Attempts[1]); string(b) != head+rest {
		e.t.Errorf("spooled body after reopen: %d bytes, want %d", len(b), len(head+rest))
	}
}

func (e *env) putSpooled(m *queue.Message, head, rest string) {
	e.t.Helper()
	sp, err := e.b.NewSpool()
	if err != nil {
		e.t.Fatal(err)
	}
	for r := rest; r != ""; {
		n := min(len(r), 4096)
		if _, err := sp.Write([]byte(r[:n])); err != nil {
			e.t.Fatal(err)
		}
		r = r[n:]
	}
	if err := e.b.PutSpooled(context.Background(), m, []byte(head), sp); err != nil {
		e.t.Fatalf("PutSpooled: %v", err)
	}
}

// testClaimExclusive: Claim records the attempt before returning it, and
// a message claimed is not claimed again while its claim holds.
func testClaimExclusive(e *env) {
	m := e.put(t0, "x", "a@example.net")
	retry := t0.Add(time.Hour)
	a := e.claimOne(t0, retry, m.ID)
	if a.Message.Attempts != 1 || !a.Message.LastAttempt.Equal(t0) || !a.Message.NextAttempt.Equal(retry) {
		e.t.Errorf("claimed %+v: want Attempts 1, LastAttempt %v, NextAttempt %v", a.Message, t0, retry)
	}
	got := e.get(m.ID)
	if !got.InFlight || got.Attempts != 1 || !got.NextAttempt.Equal(retry) {
		e.t.Errorf("stored during the attempt: %+v; want in flight, the attempt recorded", got)
	}
	if list, _, err := e.b.List(); err != nil || len(list) != 1 || !list[0].InFlight {
		e.t.Errorf("List during the attempt: %+v, %v; want in flight", list, err)
	}
	e.check("claimed", queue.Stats{InFlight: 1, Oldest: t0})
	if c := e.claim(t0.Add(30*time.Minute), t0.Add(2*time.Hour), 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed again while in progress: %v", ids(c.Attempts))
	}
	e.keep(a, func(*queue.Message) {})
	if got := e.get(m.ID); got.InFlight {
		e.t.Error("in flight after Finish")
	}
	e.check("finished", queue.Stats{Queued: 1, Oldest: t0})
}

// testClaimConcurrent: concurrent Claims never return one message twice,
// and between them take every due message.
func testClaimConcurrent(e *env) {
	const n, claimers = 60, 6
	want := map[string]bool{}
	for i := range n {
		want[e.put(t0.Add(-time.Duration(i)*time.Second), "x", "a@example.net").ID] = true
	}
	var (
		mu      sync.Mutex
		claimed = map[string]int{}
		wg      sync.WaitGroup
	)
	for range claimers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := e.b.Claim(context.Background(), startAt(t0, t0.Add(time.Hour)), 3, nil)
				if err != nil {
					e.t.Errorf("Claim: %v", err)
					return
				}
				if len(c.Attempts) == 0 {
					return
				}
				mu.Lock()
				for _, a := range c.Attempts {
					claimed[a.Message.ID]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for id, k := range claimed {
		if k != 1 {
			e.t.Errorf("%s claimed %d times", id, k)
		}
		if !want[id] {
			e.t.Errorf("claimed %s, which was never put", id)
		}
	}
	if len(claimed) != n {
		e.t.Errorf("claimed %d messages, want %d", len(claimed), n)
	}
	e.check("all claimed", queue.Stats{InFlight: n, Oldest: t0.Add(-(n - 1) * time.Second)})
}

// testDueOrder: Claim takes the earliest NextAttempt first, nothing that
// is not due, nothing skip rejects, and reports when the next is due.
func testDueOrder(e *env) {
	var ms []*queue.Message
	for _, off := range []time.Duration{-3 * time.Minute, -time.Minute, -2 * time.Minute, time.Hour} {
		ms = append(ms, e.put(t0.Add(off), "x", "a@example.net"))
	}
	skip := func(id string) bool { return id == ms[0].ID }
	retry := t0.Add(2 * time.Hour)
	c, err := e.b.Claim(context.Background(), startAt(t0, retry), 1, skip)
	if err != nil {
		e.t.Fatal(err)
	}
	if got := ids(c.Attempts); !slices.Equal(got, []string{ms[2].ID}) {
		e.t.Errorf("claimed %v, want %s: the earliest not skipped", got, ms[2].ID)
	}
	if !c.Wake.Equal(t0.Add(-time.Minute)) {
		e.t.Errorf("Wake = %v, want %v: the earliest left, not skipped", c.Wake, t0.Add(-time.Minute))
	}
	c = e.claim(t0, retry, 10)
	if got, want := ids(c.Attempts), []string{ms[0].ID, ms[1].ID}; !slices.Equal(got, want) {
		e.t.Errorf("claimed %v, want %v in due order, not the one due in an hour", got, want)
	}
	if !c.Wake.Equal(t0.Add(time.Hour)) {
		e.t.Errorf("Wake = %v, want %v", c.Wake, t0.Add(time.Hour))
	}
	if c := e.claim(t0.Add(time.Hour), retry, 10); !slices.Equal(ids(c.Attempts), []string{ms[3].ID}) {
		e.t.Errorf("claimed %v at its due time, want %s", ids(c.Attempts), ms[3].ID)
	}
	if c := e.claim(t0.Add(time.Hour), retry, 10); len(c.Attempts) != 0 || !c.Wake.Equal(retry) {
		e.t.Errorf("claimed %v, Wake %v from a queue in progress; want none, Wake at the retries %v", ids(c.Attempts), c.Wake, retry)
	}
}

// testFinishKeeps: an outcome that keeps the message stores the change
// and makes it due at its new NextAttempt.
func testFinishKeeps(e *env) {
	m := e.put(t0, "x", "a@example.net", "b@example.net")
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	later := t0.Add(30 * time.Minute)
	f := e.keep(a, func(m *queue.Message) {
		m.Recipients[0].State, m.Recipients[0].Reply = queue.Delivered, "250 ok"
		m.LastReply, m.NextAttempt = "451 later", later
	})
	want := a.Message
	want.Recipients = slices.Clone(want.Recipients)
	want.Recipients[0].State, want.Recipients[0].Reply = queue.Delivered, "250 ok"
	want.LastReply, want.NextAttempt = "451 later", later
	if f.Removed {
		e.t.Error("Finished.Removed for a message kept")
	}
	e.same("Finished", f.Message, want)
	e.same("stored", e.get(m.ID).Message, want)
	if c := e.claim(later.Add(-time.Second), t0.Add(2*time.Hour), 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed before its new NextAttempt: %v", ids(c.Attempts))
	}
	if a := e.claimOne(later, t0.Add(2*time.Hour), m.ID); a.Message.Attempts != 2 {
		e.t.Errorf("second attempt %+v, want Attempts 2", a.Message)
	}
}

// dsnFor is a DSN about m, due at at.
func dsnFor(m *queue.Message, id string, at time.Time) queue.DSN {
	return queue.DSN{
		Message: queue.Message{ID: id, Recipients: []queue.Recipient{{Addr: m.From}}, DSN: true, Received: at, NextAttempt: at, Size: 3},
		Body:    []byte("dsn"),
		Kind:    queue.BounceFailed,
	}
}

// testFinishWithDSNs: an outcome that removes the message stores its DSN
// in the same commit, due at once, and a reopen finds both.
func testFinishWithDSNs(e *env) {
	m := e.put(t0.Add(-time.Minute), "x", "a@example.net")
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	e.drainWake()
	const dsnID = "00000000dddddddd"
	f, err := e.b.Finish(context.Background(), a, nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State, m.Recipients[0].Reply = queue.Failed, "550 no such user"
		return true, []queue.DSN{dsnFor(m, dsnID, t0)}
	})
	if err != nil || !f.Removed || f.Message.Recipients[0].State != queue.Failed {
		e.t.Fatalf("Finish = %+v, %v; want removed with the recipient failed", f, err)
	}
	if !e.woken() {
		e.t.Error("no Wake after a DSN was stored")
	}
	for _, step := range []string{"DSN stored", "after reopen"} {
		if step == "after reopen" {
			e.reopen()
		}
		e.gone(m.ID)
		d := e.get(dsnID)
		if !d.DSN || d.From != "" || d.Recipients[0].Addr != m.From || d.Recipients[0].State != queue.Pending || d.InFlight {
			e.t.Errorf("%s: %+v", step, d)
		}
		e.check(step, queue.Stats{Queued: 1, Oldest: t0})
	}
	if b := e.read(e.claimOne(t0, t0.Add(time.Hour), dsnID)); string(b) != "dsn" {
		e.t.Errorf("DSN body %q", b)
	}
}

// testFinishAllOrNothing: an outcome whose DSN cannot be stored (its ID
// is taken) stores nothing, the claim still holds, and a reopen finds
// the message as the claim left it.
func testFinishAllOrNothing(e *env) {
	m := e.put(t0, "x", "a@example.net")
	other := e.put(t0.Add(time.Hour), "y", "b@example.net")
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	update := func(dsnID string) func(m *queue.Message) (bool, []queue.DSN) {
		return func(m *queue.Message) (bool, []queue.DSN) {
			m.Recipients[0].State = queue.Failed
			return true, []queue.DSN{dsnFor(m, dsnID, t0)}
		}
	}
	if _, err := e.b.Finish(context.Background(), a, nil, update(other.ID)); err == nil {
		e.t.Fatal("Finish with a DSN whose ID is taken succeeded")
	}
	got := e.get(m.ID)
	if !got.InFlight || got.Recipients[0].State != queue.Pending {
		e.t.Errorf("after a failed Finish: %+v, want the claim and the state unchanged", got)
	}
	e.same("the other message", e.get(other.ID).Message, *other)
	e.check("failed finish", queue.Stats{Queued: 1, InFlight: 1, Oldest: t0})

	const dsnID = "00000000eeeeeeee"
	if f, err := e.b.Finish(context.Background(), a, nil, update(dsnID)); err != nil || !f.Removed {
		e.t.Fatalf("Finish again: %+v, %v", f, err)
	}
	e.reopen()
	e.gone(m.ID)
	if d := e.get(dsnID); !d.DSN {
		e.t.Errorf("DSN after reopen: %+v", d)
	}
	e.check("after reopen", queue.Stats{Queued: 2, Oldest: t0})
}

// testFinishClaimLost: Finish records nothing for an attempt the backend
// does not hold: finished already, or never handed out.
func testFinishClaimLost(e *env) {
	m := e.put(t0, "x", "a@example.net")
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	forged := a
	forged.Token += 12345
	for _, tc := range []struct {
		name string
		a    queue.Attempt
	}{{"never handed out", forged}, {"finished already", a}} {
		if tc.name == "finished already" {
			e.keep(a, func(m *queue.Message) { m.LastReply = "first" })
		}
		before := e.get(m.ID).Message
		_, err := e.b.Finish(context.Background(), tc.a, nil, func(m *queue.Message) (bool, []queue.DSN) {
			m.LastReply = "second"
			return true, nil
		})
		if !errors.Is(err, queue.ErrClaimLost) {
			e.t.Errorf("Finish of an attempt %s: %v, want ErrClaimLost", tc.name, err)
		}
		e.same("after Finish of an attempt "+tc.name, e.get(m.ID).Message, before)
	}
	e.check("after", queue.Stats{Queued: 1, Oldest: t0})
}

// testDeleteDuringAttempt: a message deleted during its attempt stays
// deleted: Finish stores nothing and reports ErrNotFound.
func testDeleteDuringAttempt(e *env) {
	m := e.put(t0, "x", "a@example.net")
	keep := e.put(t0.Add(time.Second), "y", "b@example.net")
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	if err := e.b.Delete(m.ID); err != nil {
		e.t.Fatal(err)
	}
	e.gone(m.ID)
	_, err := e.b.Finish(context.Background(), a, nil, func(m *queue.Message) (bool, []queue.DSN) {
		return false, []queue.DSN{dsnFor(m, "00000000ffffffff", t0)}
	})
	if !errors.Is(err, queue.ErrNotFound) {
		e.t.Errorf("Finish of a deleted message: %v, want ErrNotFound", err)
	}
	e.gone(m.ID)
	e.gone("00000000ffffffff")
	e.check("deleted", queue.Stats{Queued: 1, Oldest: t0.Add(time.Second)})
	for _, op := range []func(string) error{e.b.Delete, e.b.Hold, e.b.Release, e.b.Retry} {
		if err := op(m.ID); !errors.Is(err, queue.ErrNotFound) {
			e.t.Errorf("an operation on a deleted message: %v, want ErrNotFound", err)
		}
	}
	e.reopen()
	e.gone(m.ID)
	e.same("the other message", e.get(keep.ID).Message, *keep)
}

// testHeldNeverClaimed: a held message is never claimed, held before or
// during its attempt, across a reopen, until Release makes it due now.
func testHeldNeverClaimed(e *env) {
	far := t0.Add(1000 * time.Hour)
	m := e.put(t0, "x", "a@example.net")
	for range 2 { // holding a held message changes nothing
		if err := e.b.Hold(m.ID); err != nil {
			e.t.Fatal(err)
		}
	}
	e.check("held", queue.Stats{Held: 1, Oldest: t0})
	if c := e.claim(far, far, 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed a held message: %v", ids(c.Attempts))
	}
	e.reopen()
	if got := e.get(m.ID); !got.Held {
		e.t.Errorf("not held after reopen: %+v", got)
	}
	if c := e.claim(far, far, 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed a held message after reopen: %v", ids(c.Attempts))
	}
	if err := e.b.Retry(m.ID); !errors.Is(err, queue.ErrHeld) {
		e.t.Errorf("Retry of a held message: %v, want ErrHeld", err)
	}
	e.clock.set(t0.Add(time.Minute))
	e.drainWake()
	if err := e.b.Release(m.ID); err != nil {
		e.t.Fatal(err)
	}
	if !e.woken() {
		e.t.Error("no Wake after Release")
	}
	if got := e.get(m.ID); got.Held || !got.NextAttempt.Equal(t0.Add(time.Minute)) {
		e.t.Errorf("released: %+v, want due at the release", got)
	}
	e.check("released", queue.Stats{Queued: 1, Oldest: t0})

	// Held during its attempt: the attempt ends and the message stays
	// held.
	a := e.claimOne(t0.Add(time.Minute), t0.Add(time.Hour), m.ID)
	if err := e.b.Hold(m.ID); err != nil {
		e.t.Fatal(err)
	}
	if got := e.get(m.ID); !got.Held || !got.InFlight {
		e.t.Errorf("held during the attempt: %+v", got)
	}
	e.check("held in flight", queue.Stats{InFlight: 1, Oldest: t0})
	e.keep(a, func(*queue.Message) {})
	e.check("held after its attempt", queue.Stats{Held: 1, Oldest: t0})
	if c := e.claim(far, far, 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed a message held during its attempt: %v", ids(c.Attempts))
	}

	// Held and released during an attempt: the retry time that the
	// attempt set stays.
	if err := e.b.Release(m.ID); err != nil {
		e.t.Fatal(err)
	}
	retry := t0.Add(2 * time.Hour)
	a = e.claimOne(t0.Add(time.Minute), retry, m.ID)
	for _, op := range []func(string) error{e.b.Hold, e.b.Release} {
		if err := op(m.ID); err != nil {
			e.t.Fatal(err)
		}
	}
	e.keep(a, func(*queue.Message) {})
	if c := e.claim(retry.Add(-time.Second), far, 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed before the retry time its attempt set: %v", ids(c.Attempts))
	}
	e.claimOne(retry, far, m.ID)
}

// testRetryFlush: Retry and Flush make messages due now, leaving held
// ones and attempts in progress alone, and wake the scheduler.
func testRetryFlush(e *env) {
	later, now := t0.Add(time.Hour), t0.Add(time.Minute)
	var ms []*queue.Message
	for i := range 5 {
		m := e.put(t0.Add(time.Duration(i)*time.Second), "x", fmt.Sprintf("r%d@example.net", i))
		ms = append(ms, m)
	}
	for _, a := range e.claim(t0.Add(10*time.Second), later, 10).Attempts {
		if a.Message.ID != ms[4].ID {
			e.keep(a, func(*queue.Message) {}) // deferred to later
		}
	}
	if err := e.b.Hold(ms[3].ID); err != nil {
		e.t.Fatal(err)
	}
	e.clock.set(now)

	e.drainWake()
	if err := e.b.Retry(ms[0].ID); err != nil {
		e.t.Fatal(err)
	}
	if !e.woken() {
		e.t.Error("no Wake after Retry")
	}
	if got := e.get(ms[0].ID); !got.NextAttempt.Equal(now) || got.Attempts != 1 {
		e.t.Errorf("after Retry: %+v, want due now, Attempts 1", got)
	}
	if err := e.b.Retry(ms[4].ID); err != nil { // in flight: nothing to do
		e.t.Errorf("Retry in flight: %v", err)
	}
	if got := e.get(ms[4].ID); !got.NextAttempt.Equal(later) {
		e.t.Errorf("Retry changed an attempt in progress: %+v", got)
	}
	e.drainWake()
	if n, err := e.b.Flush(); n != 3 || err != nil {
		e.t.Errorf("Flush = %d, %v; want 3 (not held, not in flight)", n, err)
	}
	if !e.woken() {
		e.t.Error("no Wake after Flush")
	}
	for i, m := range ms {
		got := e.get(m.ID)
		if due := !got.NextAttempt.After(now); due != (i <= 2) {
			e.t.Errorf("message %d after Flush: NextAttempt %v", i, got.NextAttempt)
		}
	}
	c := e.claim(now, later, 10)
	got, want := ids(c.Attempts), []string{ms[0].ID, ms[1].ID, ms[2].ID}
	slices.Sort(got) // all due at the same instant: in no given order
	slices.Sort(want)
	if !slices.Equal(got, want) {
		e.t.Errorf("claimed %v after Flush, want %v", got, want)
	}
	e.check("flushed and claimed", queue.Stats{Held: 1, InFlight: 4, Oldest: t0})
}

// testCounts: Stats and Len are exact after every kind of change.
func testCounts(e *env) {
	e.check("empty", queue.Stats{})
	a := e.put(t0.Add(-3*time.Minute), "a", "a@example.net")
	e.check("put", queue.Stats{Queued: 1, Oldest: t0.Add(-3 * time.Minute)})
	b := newMessage("b@example.net")
	b.Received = t0.Add(-4 * time.Minute)
	e.putSpooled(b, "Subject: b\r\n\r\n", strings.Repeat("b", 10000))
	e.check("put spooled", queue.Stats{Queued: 2, Oldest: t0.Add(-4 * time.Minute)})
	imp := queue.Message{ID: "00000000cccccccc", From: "app@example.com", Received: t0.Add(-5 * time.Minute),
		NextAttempt: t0, Held: true, Recipients: []queue.Recipient{{Addr: "c@example.net"}}}
	if err := e.b.Import(context.Background(), imp, []byte("c"), nil); err != nil {
		e.t.Fatal(err)
	}
	e.check("imported held", queue.Stats{Queued: 2, Held: 1, Oldest: t0.Add(-5 * time.Minute)})
	if err := e.b.Hold(a.ID); err != nil {
		e.t.Fatal(err)
	}
	e.check("hold", queue.Stats{Queued: 1, Held: 2, Oldest: t0.Add(-5 * time.Minute)})
	if err := e.b.Release(imp.ID); err != nil {
		e.t.Fatal(err)
	}
	e.check("release", queue.Stats{Queued: 2, Held: 1, Oldest: t0.Add(-5 * time.Minute)})
	c := e.claim(t0, t0.Add(time.Hour), 10)
	if len(c.Attempts) != 2 {
		e.t.Fatalf("claimed %v, want b and the import", ids(c.Attempts))
	}
	e.check("claim", queue.Stats{Held: 1, InFlight: 2, Oldest: t0.Add(-5 * time.Minute)})
	if err := e.b.Hold(c.Attempts[0].Message.ID); err != nil {
		e.t.Fatal(err)
	}
	e.check("hold in flight", queue.Stats{Held: 1, InFlight: 2, Oldest: t0.Add(-5 * time.Minute)})
	e.keep(c.Attempts[0], func(*queue.Message) {})
	e.check("finish kept", queue.Stats{Held: 2, InFlight: 1, Oldest: t0.Add(-5 * time.Minute)})
	_, err := e.b.Finish(context.Background(), c.Attempts[1], nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Failed
		return true, []queue.DSN{dsnFor(m, "00000000dddddddd", t0)}
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.check("finish removed, DSN stored", queue.Stats{Queued: 1, Held: 2, Oldest: t0.Add(-4 * time.Minute)})
	if err := e.b.Delete(b.ID); err != nil {
		e.t.Fatal(err)
	}
	e.check("delete", queue.Stats{Queued: 1, Held: 1, Oldest: t0.Add(-3 * time.Minute)})
	if _, err := e.b.Flush(); err != nil {
		e.t.Fatal(err)
	}
	if err := e.b.Release(a.ID); err != nil {
		e.t.Fatal(err)
	}
	if err := e.b.Retry(a.ID); err != nil {
		e.t.Fatal(err)
	}
	e.check("flush, release, retry", queue.Stats{Queued: 2, Oldest: t0.Add(-3 * time.Minute)})
	e.reopen()
	e.check("reopen", queue.Stats{Queued: 2, Oldest: t0.Add(-3 * time.Minute)})
	for _, a := range e.claim(t0.Add(time.Minute), t0.Add(time.Hour), 10).Attempts {
		if _, err := e.b.Finish(context.Background(), a, nil, func(m *queue.Message) (bool, []queue.DSN) {
			m.Recipients[0].State = queue.Delivered
			return true, nil
		}); err != nil {
			e.t.Fatal(err)
		}
	}
	e.check("all delivered", queue.Stats{})
}

// testSpooled: a message spooled as it arrives reads back whole, before
// and after a reopen; an aborted spool stores nothing.
func testSpooled(e *env) {
	head := "Subject: large\r\n\r\n"
	var rest bytes.Buffer
	for i := 0; rest.Len() < 300<<10; i++ {
		fmt.Fprintf(&rest, "line %d of a large message\r\n", i)
	}
	m := newMessage("a@example.net")
	e.putSpooled(m, head, rest.String())
	if m.Size != int64(len(head)+rest.Len()) {
		e.t.Errorf("Size %d, want %d", m.Size, len(head)+rest.Len())
	}
	want := head + rest.String()
	a := e.claimOne(t0, t0.Add(time.Hour), m.ID)
	body, closeBody, err := e.b.OpenBody(a)
	if err != nil {
		e.t.Fatal(err)
	}
	if !bytes.HasPrefix(body.Head(), []byte(head)) || body.Size() != int64(len(want)) {
		e.t.Errorf("Body: head %q…, Size %d; want the header section first, Size %d", body.Head()[:min(len(body.Head()), 20)], body.Size(), len(want))
	}
	for range 2 { // each reader reads from the start
		if got, err := io.ReadAll(body.Reader()); err != nil || string(got) != want {
			e.t.Errorf("read %d bytes, %v; want %d", len(got), err, len(want))
		}
	}
	closeBody()
	e.keep(a, func(m *queue.Message) { m.NextAttempt = t0 })
	e.reopen()
	if got := e.read(e.claimOne(t0, t0.Add(time.Hour), m.ID)); string(got) != want {
		e.t.Errorf("after reopen: read %d bytes, want %d", len(got), len(want))
	}

	sp, err := e.b.NewSpool()
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := sp.Write([]byte("never stored")); err != nil {
		e.t.Fatal(err)
	}
	if err := sp.Abort(); err != nil {
		e.t.Fatal(err)
	}
	if err := e.b.PutSpooled(context.Background(), newMessage("b@example.net"), []byte(head), sp); err == nil {
		e.t.Error("PutSpooled of an aborted spool succeeded")
	}
	e.check("after abort", queue.Stats{InFlight: 1, Oldest: t0})
}

// content reads the whole stored content of a queued message by its ID.
func (e *env) content(id string) ([]byte, error) {
	body, closeBody, err := e.b.Content(id)
	if err != nil {
		return nil, err
	}
	defer closeBody()
	data, err := io.ReadAll(body.Reader())
	if err == nil && int64(len(data)) != body.Size() {
		e.t.Errorf("content of %s: read %d bytes, Size %d", id, len(data), body.Size())
	}
	return data, err
}

// testContent: Content reads a queued message's content by its ID, whole
// or spooled, claimed or not, held or not; a message not queued is
// ErrNotFound.
func testContent(e *env) {
	small := e.put(t0, "Subject: small\r\n\r\nhello\r\n", "a@example.net")
	head := "Subject: large\r\n\r\n"
	var rest bytes.Buffer
	for i := 0; rest.Len() < 300<<10; i++ {
		fmt.Fprintf(&rest, "line %d of a large message\r\n", i)
	}
	large := newMessage("b@example.net")
	e.putSpooled(large, head, rest.String())
	want := map[string]string{small.ID: "Subject: small\r\n\r\nhello\r\n", large.ID: head + rest.String()}
	for id, w := range want {
		if got, err := e.content(id); err != nil || string(got) != w {
			e.t.Errorf("Content %s: %d bytes, %v; want %d", id, len(got), err, len(w))
		}
	}
	if err := e.b.Hold(large.ID); err != nil {
		e.t.Fatal(err)
	}
	e.claimOne(t0, t0.Add(time.Hour), small.ID)
	e.reopen()
	for id, w := range want {
		if got, err := e.content(id); err != nil || string(got) != w {
			e.t.Errorf("Content %s claimed or held, after reopen: %d bytes, %v; want %d", id, len(got), err, len(w))
		}
	}
	if err := e.b.Delete(large.ID); err != nil {
		e.t.Fatal(err)
	}
	for _, id := range []string{large.ID, "0000000000000000"} {
		if _, err := e.content(id); !errors.Is(err, queue.ErrNotFound) {
			e.t.Errorf("Content %s, not queued: %v, want ErrNotFound", id, err)
		}
	}
}

// testImport: Import keeps the whole state of a message, and a second
// import of the same ID changes nothing.
func testImport(e *env) {
	m := queue.Message{
		ID: "0000000012345678", From: "app@example.com", User: "billing-app", MessageID: "<i@example.com>",
		Size: 10, Received: t0.Add(-time.Hour), Attempts: 3, Paced: 1, LastAttempt: t0.Add(-time.Minute),
		NextAttempt: t0.Add(time.Minute), LastReply: "451 later", Warned: true,
		Recipients: []queue.Recipient{
			{Addr: "a@example.net", State: queue.Delivered, Reply: "250 ok", Upstream: "up"},
			{Addr: "b@example.net", State: queue.Failed, Reply: "550 no", Upstream: "up"},
			{Addr: "c@example.net", State: queue.Pending, Reply: "451 later", Upstream: "up"},
		},
	}
	if err := e.b.Import(context.Background(), m, []byte("head\r\n"), strings.NewReader("rest")); err != nil {
		e.t.Fatal(err)
	}
	if !e.woken() {
		e.t.Error("no Wake after Import")
	}
	e.same("imported", e.get(m.ID).Message, m)
	again := m
	again.Attempts = 7
	if err := e.b.Import(context.Background(), again, []byte("other"), nil); !errors.Is(err, queue.ErrExists) {
		e.t.Errorf("second Import: %v, want ErrExists", err)
	}
	e.reopen()
	e.same("imported, after reopen", e.get(m.ID).Message, m)
	if c := e.claim(t0, t0.Add(time.Hour), 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed before its NextAttempt: %v", ids(c.Attempts))
	}
	a := e.claimOne(t0.Add(time.Minute), t0.Add(time.Hour), m.ID)
	if a.Message.Attempts != 4 {
		e.t.Errorf("attempt %d, want 4", a.Message.Attempts)
	}
	if got := e.read(a); string(got) != "head\r\nrest" {
		e.t.Errorf("body %q", got)
	}
	e.check("imported", queue.Stats{InFlight: 1, Oldest: t0.Add(-time.Hour)})
}

// intake records what a backend's Put asks of it.
type intake struct {
	at       queue.Start
	mu       sync.Mutex
	take     bool
	reserved []string
	canceled []string
	enqueued chan queue.Attempt
}

func (in *intake) Reserve(id string) (queue.Start, bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.reserved = append(in.reserved, id)
	return in.at, in.take
}

func (in *intake) Enqueue(a queue.Attempt) { in.enqueued <- a }

func (in *intake) Cancel(id string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.canceled = append(in.canceled, id)
}

func (in *intake) calls() (reserved, canceled []string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.reserved), slices.Clone(in.canceled)
}

// testIntake: a Put that the Intake takes stores the message claimed for
// its first attempt in the same commit and hands the attempt over; one it
// does not take is due and wakes the scheduler; a failed Put cancels.
func testIntake(e *env) {
	retry := t0.Add(time.Hour)
	in := &intake{take: true, at: startAt(t0, retry), enqueued: make(chan queue.Attempt, 1)}
	e.b.SetIntake(in)
	e.drainWake()
	m := e.put(t0, "body", "a@example.net")
	var a queue.Attempt
	select {
	case a = <-in.enqueued:
	default:
		e.t.Fatal("Put returned without handing over the attempt")
	}
	if a.Message.ID != m.ID || a.Message.Attempts != 1 || !a.Message.LastAttempt.Equal(t0) || !a.Message.NextAttempt.Equal(retry) {
		e.t.Errorf("attempt %+v: want the message with attempt 1 at %v, retried at %v", a.Message, t0, retry)
	}
	if reserved, _ := in.calls(); !slices.Equal(reserved, []string{m.ID}) {
		e.t.Errorf("Reserve asked for %v, want %s", reserved, m.ID)
	}
	if got := e.get(m.ID); !got.InFlight || got.Attempts != 1 || !got.NextAttempt.Equal(retry) {
		e.t.Errorf("stored: %+v; want in flight, the attempt recorded", got)
	}
	e.check("taken", queue.Stats{InFlight: 1, Oldest: t0})
	if c := e.claim(t0, retry, 10); len(c.Attempts) != 0 {
		e.t.Errorf("claimed a message the Intake took: %v", ids(c.Attempts))
	}
	if got := e.read(a); string(got) != "body" {
		e.t.Errorf("body %q", got)
	}
	if _, err := e.b.Finish(context.Background(), a, nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Delivered
		return true, nil
	}); err != nil {
		e.t.Fatal(err)
	}
	e.gone(m.ID)

	// A Put that fails after Reserve is cancelled, and hands nothing over.
	other := e.put(t0, "other", "b@example.net")
	<-in.enqueued
	dup := newMessage("c@example.net")
	dup.ID = other.ID
	if err := e.b.Put(context.Background(), dup, []byte("dup")); err == nil {
		e.t.Error("Put of a stored ID succeeded")
	}
	if _, canceled := in.calls(); !slices.Equal(canceled, []string{other.ID}) {
		e.t.Errorf("canceled %v, want %s", canceled, other.ID)
	}
	select {
	case a := <-in.enqueued:
		e.t.Errorf("a failed Put handed over %+v", a.Message)
	default:
	}

	// Not taken: due at once, and the scheduler is woken.
	in.mu.Lock()
	in.take = false
	in.mu.Unlock()
	e.drainWake()
	n := e.put(t0, "not taken", "d@example.net")
	if !e.woken() {
		e.t.Error("no Wake after a Put the Intake did not take")
	}
	if got := e.get(n.ID); got.InFlight || got.Attempts != 0 {
		e.t.Errorf("not taken, yet %+v", got)
	}
	e.claimOne(t0, retry, n.ID)

	// Without an Intake, Put asks nobody.
	e.b.SetIntake(nil)
	e.put(t0, "alone", "e@example.net")
	if reserved, _ := in.calls(); len(reserved) != 4 {
		e.t.Errorf("Reserve asked %d times, want 4: not after SetIntake(nil)", len(reserved))
	}
}

// testUnreadable: a record that cannot be decoded is reported by ID, is
// never claimed, is counted, and Delete removes it.
func testUnreadable(e *env) {
	bad := e.put(t0.Add(-time.Minute), "bad", "a@example.net")
	good := e.put(t0, "good", "b@example.net")
	if err := e.b.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.storage.Damage(e.t, bad.ID)
	e.open()
	list, unreadable, err := e.b.List()
	if err != nil || len(list) != 1 || list[0].ID != good.ID {
		e.t.Errorf("List = %+v, %v; want only %s", list, err, good.ID)
	}
	if len(unreadable) != 1 || unreadable[0].ID != bad.ID || unreadable[0].Reason == "" {
		e.t.Errorf("unreadable = %+v, want %s with a reason", unreadable, bad.ID)
	}
	if m, err := e.b.Get(bad.ID); err == nil {
		e.t.Errorf("Get of an unreadable record = %+v", m)
	}
	if n, err := e.b.Len(); err != nil || n != 2 {
		e.t.Errorf("Len = %d, %v; want 2", n, err)
	}
	c := e.claim(t0, t0.Add(time.Hour), 10)
	if got := ids(c.Attempts); !slices.Equal(got, []string{good.ID}) {
		e.t.Errorf("claimed %v, want only %s", got, good.ID)
	}
	if !slices.Contains(c.Unreadable, bad.ID) {
		e.t.Errorf("Claim reported %v unreadable, want %s", c.Unreadable, bad.ID)
	}
	if c := e.claim(t0.Add(2*time.Hour), t0.Add(3*time.Hour), 10); slices.Contains(ids(c.Attempts), bad.ID) || slices.Contains(c.Unreadable, bad.ID) {
		e.t.Errorf("the unreadable record came back: %+v", c)
	}
	if n, err := e.b.Flush(); err != nil || n != 0 {
		e.t.Errorf("Flush = %d, %v; want 0: the unreadable record left alone", n, err)
	}
	if err := e.b.Delete(bad.ID); err != nil {
		e.t.Fatalf("Delete of an unreadable record: %v", err)
	}
	if _, unreadable, err := e.b.List(); err != nil || len(unreadable) != 0 {
		e.t.Errorf("after Delete: unreadable %+v, %v", unreadable, err)
	}
	if n, err := e.b.Len(); err != nil || n != 1 {
		e.t.Errorf("Len = %d, %v after Delete; want 1", n, err)
	}
}

// events lists the types of a history's events, and the recipient of
// those that have one: "accepted deferred:a@example.net held".
func events(h *queue.History) string {
	var out []string
	for _, ev := range h.Events {
		s := string(ev.Type)
		if ev.Rcpt != "" {
			s += ":" + ev.Rcpt
		}
		if ev.DSNID != "" {
			s += ":" + ev.DSNID
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

func (e *env) history(id string) *queue.History {
	e.t.Helper()
	h, err := e.b.History(id)
	if err != nil {
		e.t.Fatalf("History %s: %v", id, err)
	}
	return h
}

// testHistory: every change records its events in the history, with the
// change, and the history outlives the message until it is pruned.
func testHistory(e *env) {
	m := e.put(t0, "Subject: h\r\n\r\nx\r\n", "a@example.net", "b@example.org")
	h := e.history(m.ID)
	if h.ID != m.ID || h.From != "app@example.com" || h.User != "billing-app" || h.MessageID != "<1@example.com>" ||
		!h.Received.Equal(t0) || strings.Join(h.Recipients, ",") != "a@example.net,b@example.org" ||
		!h.Left.IsZero() || h.Outcome != "" || events(h) != "accepted" || !h.Events[0].At.Equal(t0) {
		e.t.Errorf("history after Put: %+v", h)
	}

	// An attempt that defers one recipient and delivers the other.
	t1 := t0.Add(time.Second)
	a := e.claimOne(t0, t1, m.ID)
	deferred := []queue.Event{
		{At: t1, Type: queue.EventDelivered, Attempt: 1, Rcpt: "b@example.org", Upstream: "up", Relay: "192.0.2.1:465", Reply: "250 ok"},
		{At: t1, Type: queue.EventDeferred, Attempt: 1, Rcpt: "a@example.net", Upstream: "up", Relay: "192.0.2.1:465", Reply: "451 later"},
	}
	if _, err := e.b.Finish(context.Background(), a, deferred, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[1].State = queue.Delivered
		m.NextAttempt = t1
		return false, nil
	}); err != nil {
		e.t.Fatal(err)
	}
	if err := e.b.Hold(m.ID); err != nil {
		e.t.Fatal(err)
	}
	if err := e.b.Release(m.ID); err != nil {
		e.t.Fatal(err)
	}
	e.reopen()
	h = e.history(m.ID)
	if got := events(h); got != "accepted delivered:b@example.org deferred:a@example.net held released" {
		e.t.Errorf("events %q", got)
	}
	if got := h.Events[2]; got != deferred[1] && !(got.At.Equal(t1) && got.Reply == "451 later" && got.Relay == "192.0.2.1:465" &&
		got.Upstream == "up" && got.Attempt == 1) {
		e.t.Errorf("deferred event %+v, want %+v", got, deferred[1])
	}

	// The last attempt bounces the other recipient and queues a DSN: the
	// message leaves, its history stays, the DSN has one of its own.
	e.clock.set(t1)
	a = e.claimOne(t1, t1.Add(time.Minute), m.ID)
	dsn := dsnFor(m, "d5a0000000000001", t1)
	bounced := []queue.Event{
		{At: t1, Type: queue.EventBounced, Attempt: 2, Rcpt: "a@example.net", Reply: "550 no"},
		{At: t1, Type: queue.EventDSN, Attempt: 2, DSNID: dsn.Message.ID},
	}
	if f, err := e.b.Finish(context.Background(), a, bounced, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Failed
		return true, []queue.DSN{dsn}
	}); err != nil || !f.Removed {
		e.t.Fatalf("Finish: %+v %v", f, err)
	}
	e.gone(m.ID)
	h = e.history(m.ID)
	if got := events(h); got != "accepted delivered:b@example.org deferred:a@example.net held released bounced:a@example.net dsn:d5a0000000000001" ||
		!h.Left.Equal(t1) || h.Outcome != queue.OutcomeBounced {
		e.t.Errorf("history of a bounced message: left %v outcome %q events %q", h.Left, h.Outcome, got)
	}
	if d := e.history(dsn.Message.ID); events(d) != "accepted" || d.From != "" {
		e.t.Errorf("history of the DSN: %+v", d)
	}

	// Deleted by the administrator: that is its outcome.
	other := e.put(t1, "x", "c@example.net")
	t2 := t1.Add(time.Second)
	e.clock.set(t2)
	if err := e.b.Delete(other.ID); err != nil {
		e.t.Fatal(err)
	}
	if h := e.history(other.ID); events(h) != "accepted deleted" || h.Outcome != queue.OutcomeDeleted || !h.Left.Equal(t2) {
		e.t.Errorf("history of a deleted message: %+v", h)
	}

	// Pruning: the histories of messages that left before a time, a
	// bounded number at a time; queued messages keep theirs.
	if n, err := e.b.PruneHistory(t1, 10); err != nil || n != 0 {
		e.t.Errorf("PruneHistory before anything left: %d, %v", n, err)
	}
	if n, err := e.b.PruneHistory(t2.Add(time.Hour), 1); err != nil || n != 1 {
		e.t.Errorf("PruneHistory, at most 1: %d, %v", n, err)
	}
	if _, err := e.b.History(m.ID); !errors.Is(err, queue.ErrNotFound) {
		e.t.Errorf("History of the first to leave after pruning: %v", err)
	}
	if n, err := e.b.PruneHistory(t2.Add(time.Hour), 10); err != nil || n != 1 {
		e.t.Errorf("PruneHistory, the rest: %d, %v", n, err)
	}
	if _, err := e.b.History(other.ID); !errors.Is(err, queue.ErrNotFound) {
		e.t.Errorf("History after pruning: %v", err)
	}
	if found, err := e.b.FindHistory(queue.HistoryFilter{To: "c@example.net"}); err != nil || len(found) != 0 {
		e.t.Errorf("FindHistory finds a pruned message: %v %v", found, err)
	}
	e.history(dsn.Message.ID) // still queued
	if _, err := e.b.History("0000000000000000"); !errors.Is(err, queue.ErrNotFound) {
		e.t.Errorf("History of an unknown ID: %v", err)
	}
}

// testFindHistory: FindHistory selects by recipient, sender, user,
// Message-ID and time, newest first, queued messages and gone ones alike.
func testFindHistory(e *env) {
	put := func(at time.Time, from, user, msgID string, rcpts ...string) string {
		e.t.Helper()
		m := newMessage(rcpts...)
		m.Received, m.From, m.User, m.MessageID = at, from, user, msgID
		if err := e.b.Put(context.Background(), m, []byte("x")); err != nil {
			e.t.Fatal(err)
		}
		return m.ID
	}
	a := put(t0, "app@example.com", "billing", "<a@example.com>", "bob@example.net", "carol@example.net")
	b := put(t0.Add(time.Second), "news@example.com", "news", "<b@example.com>", "Bob@Example.NET")
	c := put(t0.Add(2*time.Second), "app@example.com", "billing", "", "dave@example.org")
	if err := e.b.Delete(c); err != nil {
		e.t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		f    queue.HistoryFilter
		want []string
	}{
		{"all", queue.HistoryFilter{}, []string{c, b, a}},
		{"to, any case", queue.HistoryFilter{To: "bob@example.net"}, []string{b, a}},
		{"to, one", queue.HistoryFilter{To: "CAROL@example.net"}, []string{a}},
		{"to, gone", queue.HistoryFilter{To: "dave@example.org"}, []string{c}},
		{"to, nobody", queue.HistoryFilter{To: "bob@example.ne"}, nil},
		{"from", queue.HistoryFilter{From: "app@example.com"}, []string{c, a}},
		{"user", queue.HistoryFilter{User: "news"}, []string{b}},
		{"Message-ID without brackets", queue.HistoryFilter{MessageID: "a@example.com"}, []string{a}},
		{"Message-ID with brackets", queue.HistoryFilter{MessageID: "<b@example.com>"}, []string{b}},
		{"since", queue.HistoryFilter{Since: t0.Add(time.Second)}, []string{c, b}},
		{"until", queue.HistoryFilter{Until: t0.Add(time.Second)}, []string{b, a}},
		{"to and user", queue.HistoryFilter{To: "bob@example.net", User: "billing"}, []string{a}},
		{"from and since", queue.HistoryFilter{From: "app@example.com", Since: t0.Add(time.Second)}, []string{c}},
		{"limit", queue.HistoryFilter{Limit: 2}, []string{c, b}},
	} {
		found, err := e.b.FindHistory(tc.f)
		if err != nil {
			e.t.Fatalf("%s: %v", tc.name, err)
		}
		var got []string
		for _, h := range found {
			got = append(got, h.ID)
			if len(h.Events) != 0 {
				e.t.Errorf("%s: FindHistory returned events", tc.name)
			}
		}
		if !slices.Equal(got, tc.want) {
			e.t.Errorf("%s: found %v, want %v", tc.name, got, tc.want)
		}
	}
	found, _ := e.b.FindHistory(queue.HistoryFilter{To: "dave@example.org"})
	if len(found) != 1 || found[0].Outcome != queue.OutcomeDeleted || found[0].Left.IsZero() {
		e.t.Errorf("a gone message found without its outcome: %+v", found)
	}
}

// posts lists posts as "endpoint:type:rcpt", in order.
func posts(ps []queue.WebhookPost) string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Endpoint+":"+string(p.Type)+":"+p.Data.Rcpt)
	}
	return strings.Join(out, " ")
}

// testWebhooks: the posts that the subscriptions ask for are stored with
// their events, all or nothing, durably; DueWebhooks hands each out once
// per hold, with the same ID on every try, until it is done.
func testWebhooks(e *env) {
	m := e.put(t0, "x", "a@example.net", "b@example.net")
	t1 := t0.Add(time.Second)
	a := e.claimOne(t0, t1, m.ID)
	if _, err := e.b.Finish(context.Background(), a, []queue.Event{
		{At: t1, Type: queue.EventDelivered, Attempt: 1, Rcpt: "b@example.net", Upstream: "up", Reply: "250 ok"},
		{At: t1, Type: queue.EventDeferred, Attempt: 1, Rcpt: "a@example.net", Upstream: "up", Reply: "451 later"},
	}, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[1].State = queue.Delivered
		m.NextAttempt = t1
		return false, nil
	}); err != nil {
		e.t.Fatal(err)
	}
	// A Finish that fails stores no post.
	if _, err := e.b.Finish(context.Background(), a, []queue.Event{{At: t1, Type: queue.EventBounced, Rcpt: "a@example.net"}},
		func(m *queue.Message) (bool, []queue.DSN) { return true, nil }); err == nil {
		e.t.Fatal("a second Finish of one attempt succeeded")
	}
	e.clock.set(t1)
	a = e.claimOne(t1, t1.Add(time.Minute), m.ID)
	dsn := dsnFor(m, "d5a0000000000002", t1)
	if _, err := e.b.Finish(context.Background(), a, []queue.Event{
		{At: t1, Type: queue.EventBounced, Attempt: 2, Rcpt: "a@example.net", Upstream: "up", Relay: "192.0.2.1:25", Reply: "550 no"},
		{At: t1, Type: queue.EventDSN, Attempt: 2, DSNID: dsn.Message.ID},
	}, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Failed
		return true, []queue.DSN{dsn}
	}); err != nil {
		e.t.Fatal(err)
	}
	e.reopen()
	if n, oldest, err := e.b.WebhookBacklog(); err != nil || n != 5 || !oldest.Equal(t0) {
		e.t.Errorf("backlog %d, oldest %v, %v; want 5 from %v", n, oldest, err, t0)
	}

	due, err := e.b.DueWebhooks(t1, time.Minute, 100)
	if err != nil {
		e.t.Fatal(err)
	}
	// Oldest first; those of one commit in any order.
	want := "all:accepted: all:bounced:a@example.net all:deferred:a@example.net all:delivered:b@example.net billing:bounced:a@example.net"
	got := strings.Fields(posts(due))
	if len(got) > 0 {
		slices.Sort(got[1:])
	}
	if strings.Join(got, " ") != want {
		e.t.Errorf("due posts %q\nwant %q", got, want)
	}
	ids := map[string]bool{}
	for _, p := range due {
		ids[p.ID] = true
		if !strings.HasPrefix(p.ID, "msg_") || p.Data.QueueID != m.ID || p.Data.MessageID != "<1@example.com>" || p.Data.User != "billing-app" ||
			p.Data.From != "app@example.com" || p.Data.Status != string(p.Type) || p.Tries != 0 {
			e.t.Errorf("post %+v", p)
		}
	}
	for _, b := range due {
		if b.Endpoint == "billing" && (b.Data.Upstream != "up" || b.Data.Reply != "550 no" || b.Data.Attempt != 2 || !b.At.Equal(t1)) {
			e.t.Errorf("bounce post %+v", b)
		}
	}
	if len(ids) != 5 {
		e.t.Errorf("%d distinct IDs for 5 posts", len(ids))
	}
	if again, err := e.b.DueWebhooks(t1.Add(59*time.Second), time.Minute, 100); err != nil || len(again) != 0 {
		e.t.Errorf("posts handed out twice within their hold: %q, %v", posts(again), err)
	}
	// A failed try: due again when it says, with the same ID.
	retried := due[1]
	if err := e.b.WebhookRetry(retried.ID, t1.Add(10*time.Second)); err != nil {
		e.t.Fatal(err)
	}
	again, err := e.b.DueWebhooks(t1.Add(10*time.Second), time.Minute, 100)
	if err != nil || len(again) != 1 || again[0].ID != retried.ID || again[0].Tries != 1 {
		e.t.Errorf("after a retry: %+v, %v", again, err)
	}
	for _, p := range due {
		if err := e.b.WebhookDone(p.ID); err != nil {
			e.t.Fatal(err)
		}
	}
	if err := e.b.WebhookDone(due[0].ID); err != nil {
		e.t.Errorf("WebhookDone of a post gone: %v", err)
	}
	if err := e.b.WebhookRetry(due[0].ID, t1); err != nil {
		e.t.Errorf("WebhookRetry of a post gone: %v", err)
	}
	if n, oldest, err := e.b.WebhookBacklog(); err != nil || n != 0 || !oldest.IsZero() {
		e.t.Errorf("backlog after all done: %d %v %v", n, oldest, err)
	}
	if left, err := e.b.DueWebhooks(t1.Add(time.Hour), time.Minute, 100); err != nil || len(left) != 0 {
		e.t.Errorf("posts left: %q, %v", posts(left), err)
	}
}
