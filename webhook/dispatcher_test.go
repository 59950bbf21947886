package webhook_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/queue"
	"smarthost/webhook"
)

// received is one request as a receiver saw it.
type received struct {
	id, timestamp, signature, contentType, userAgent string
	body                                             []byte
	verified                                         error
}

// receiver is a real HTTP endpoint that checks every request's signature
// with its own Standard Webhooks verification and answers with answer.
type receiver struct {
	*httptest.Server
	key    []byte
	answer func(r received, try int) int // the status for the try-th request (1 first) of a webhook-id

	mu       sync.Mutex
	requests []received
	tries    map[string]int
	inFlight int
	maxIn    int
}

func newReceiver(t *testing.T, answer func(r received, try int) int) *receiver {
	t.Helper()
	rc := &receiver{key: make([]byte, 32), answer: answer, tries: map[string]int{}}
	rand.Read(rc.key)
	rc.Server = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.Close)
	return rc
}

func (rc *receiver) secret() string { return "whsec_" + base64.StdEncoding.EncodeToString(rc.key) }

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	req := received{
		id: r.Header.Get("webhook-id"), timestamp: r.Header.Get("webhook-timestamp"),
		signature: r.Header.Get("webhook-signature"), contentType: r.Header.Get("Content-Type"),
		userAgent: r.Header.Get("User-Agent"), body: body,
	}
	if r.Method != http.MethodPost {
		req.verified = fmt.Errorf("method %s", r.Method)
	} else {
		req.verified = verify(rc.key, req, 5*time.Minute)
	}
	rc.mu.Lock()
	rc.requests = append(rc.requests, req)
	rc.tries[req.id]++
	try := rc.tries[req.id]
	rc.inFlight++
	rc.maxIn = max(rc.maxIn, rc.inFlight)
	rc.mu.Unlock()
	status := rc.answer(req, try)
	rc.mu.Lock()
	rc.inFlight--
	rc.mu.Unlock()
	w.WriteHeader(status)
}

func (rc *receiver) received() []received {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]received(nil), rc.requests...)
}

// verify checks a request as the Standard Webhooks specification tells a
// consumer to: HMAC-SHA256 over "id.timestamp.body", compared in constant
// time with each "v1," signature, and a timestamp within tolerance.
func verify(key []byte, r received, tolerance time.Duration) error {
	if r.id == "" || r.timestamp == "" || r.signature == "" {
		return errors.New("missing webhook headers")
	}
	ts, err := strconv.ParseInt(r.timestamp, 10, 64)
	if err != nil {
		return fmt.Errorf("timestamp %q", r.timestamp)
	}
	if d := time.Since(time.Unix(ts, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("timestamp %v off", d)
	}
	mac := hmac.New(sha256.New, key)
	fmt.Fprintf(mac, "%s.%s.", r.id, r.timestamp)
	mac.Write(r.body)
	want := mac.Sum(nil)
	for _, sig := range strings.Fields(r.signature) {
		b64, ok := strings.CutPrefix(sig, "v1,")
		if !ok {
			continue
		}
		got, err := base64.StdEncoding.DecodeString(b64)
		if err == nil && hmac.Equal(got, want) {
			return nil
		}
	}
	return errors.New("no valid signature")
}

// counts is an Observer that counts results by endpoint.
type counts struct {
	mu sync.Mutex
	n  map[string]int // "endpoint/result"
}

func (c *counts) WebhookPosted(endpoint string, r webhook.Result) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[endpoint+"/"+string(r)]++
}

func (c *counts) get(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[key]
}

// syncBuffer is a log destination written by many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// endpoint is a configured endpoint for rc.
func endpoint(t *testing.T, name string, rc *receiver, path string) webhook.Endpoint {
	t.Helper()
	key, err := webhook.ParseSecret(rc.secret())
	if err != nil {
		t.Fatal(err)
	}
	return webhook.Endpoint{Name: name, URL: rc.URL + path, Key: key, Events: webhook.DefaultEvents()}
}

// start runs a dispatcher with fast retries and a log of its own, and
// stops it at the end of the test.
func start(t *testing.T, o webhook.Outbox, eps []webhook.Endpoint, tune func(*webhook.Dispatcher)) (*webhook.Dispatcher, *counts, *syncBuffer) {
	t.Helper()
	d := webhook.NewDispatcher(o, eps)
	c := &counts{}
	logs := &syncBuffer{}
	d.Observer = c
	d.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	d.RetryMin, d.RetryMax = 20*time.Millisecond, 80*time.Millisecond
	d.Poll = 20 * time.Millisecond
	if tune != nil {
		tune(d)
	}
	ran := make(chan error, 1)
	go func() { ran <- d.Run() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := d.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-ran; !errors.Is(err, webhook.ErrDispatcherClosed) {
			t.Errorf("Run: %v", err)
		}
	})
	return d, c, logs
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newPost(endpoint string, typ queue.EventType, rcpt string, at time.Time) queue.WebhookPost {
	return queue.WebhookPost{Endpoint: endpoint, Type: typ, At: at, Data: queue.PostData{
		QueueID: "Q" + rcpt, MessageID: "<" + rcpt + "@test>", User: "app", From: "app@example.com",
		Rcpt: rcpt, Upstream: "up", Reply: "550 5.1.1 unknown user " + rcpt, Status: string(typ), Attempt: 1,
	}}
}

// An endpoint that fails twice and then takes the post gets every post
// three times, signed, with the same webhook-id and body each time.
func TestDispatcherRetriesUntilTaken(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		rc := newReceiver(t, func(r received, try int) int {
			if try <= 2 {
				return http.StatusInternalServerError
			}
			return http.StatusNoContent
		})
		ids := map[string]string{} // webhook-id → rcpt
		now := time.Now()
		for i, rcpt := range []string{"a@x.test", "b@x.test", "c@x.test"} {
			ids[o.add(t, newPost("billing", queue.EventBounced, rcpt, now.Add(time.Duration(i)*time.Millisecond)))] = rcpt
		}
		_, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/hook")}, nil)
		waitFor(t, "every post taken", 10*time.Second, func() bool { return c.get("billing/sent") == 3 })

		reqs := rc.received()
		if len(reqs) != 9 {
			t.Fatalf("%d requests, want 9", len(reqs))
		}
		bodies := map[string][]byte{}
		for _, r := range reqs {
			if r.verified != nil {
				t.Errorf("request %s: %v", r.id, r.verified)
			}
			if r.contentType != "application/json" || r.userAgent != "smarthost" {
				t.Errorf("request %s: Content-Type %q, User-Agent %q", r.id, r.contentType, r.userAgent)
			}
			rcpt, ok := ids[r.id]
			if !ok {
				t.Fatalf("webhook-id %q was not stored", r.id)
			}
			if prev, seen := bodies[r.id]; seen && !bytes.Equal(prev, r.body) {
				t.Errorf("%s: body changed between tries:\n%s\n%s", r.id, prev, r.body)
			}
			bodies[r.id] = r.body
			var p webhook.Payload
			if err := json.Unmarshal(r.body, &p); err != nil {
				t.Fatal(err)
			}
			if p.Type != "message.bounced" || p.Data.Rcpt != rcpt || p.Data.Status != "bounced" || p.Data.Reply != "550 5.1.1 unknown user "+rcpt {
				t.Errorf("%s: body %s", r.id, r.body)
			}
		}
		rc.mu.Lock()
		defer rc.mu.Unlock()
		for id := range ids {
			if n := rc.tries[id]; n != 3 {
				t.Errorf("%s: %d tries, want 3", id, n)
			}
			if _, ok := o.post(t, id); ok {
				t.Errorf("%s: still in the outbox after it was taken", id)
			}
		}
		if n := c.get("billing/failed"); n != 6 {
			t.Errorf("%d failed tries counted, want 6", n)
		}
		if n, _, _ := o.WebhookBacklog(); n != 0 {
			t.Errorf("backlog %d, want 0", n)
		}
	})
}

// A failed try is recorded in the outbox: one more try, due after the
// backoff.
func TestDispatcherRecordsFailedTry(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		rc := newReceiver(t, func(received, int) int { return http.StatusServiceUnavailable })
		id := o.add(t, newPost("billing", queue.EventExpired, "a@x.test", time.Now()))
		before := time.Now()
		_, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/")}, func(d *webhook.Dispatcher) {
			d.RetryMin, d.RetryMax = time.Hour, 2*time.Hour
		})
		waitFor(t, "a failed try", 5*time.Second, func() bool { return c.get("billing/failed") == 1 })
		waitFor(t, "the try recorded", 5*time.Second, func() bool { p, _ := o.post(t, id); return p.Tries == 1 })
		p, ok := o.post(t, id)
		// Backoff: RetryMin ±25%.
		if lo, hi := before.Add(45*time.Minute), time.Now().Add(75*time.Minute); !ok || p.NextTry.Before(lo) || p.NextTry.After(hi) {
			t.Errorf("post %+v: next try not within %v..%v", p, lo, hi)
		}
		if c.get("billing/sent") != 0 || len(rc.received()) != 1 {
			t.Errorf("sent %d, requests %d", c.get("billing/sent"), len(rc.received()))
		}
	})
}

// An endpoint that never answers holds at most Concurrency posts, and
// posts to another endpoint go out meanwhile, though older ones of the
// dead endpoint are due before them.
func TestDispatcherDeadEndpointHoldsOnlyItsShare(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		release := make(chan struct{})
		dead := newReceiver(t, func(received, int) int {
			<-release
			return http.StatusOK
		})
		live := newReceiver(t, func(received, int) int { return http.StatusOK })

		now := time.Now()
		for i := range 200 {
			o.add(t, newPost("dead", queue.EventBounced, fmt.Sprintf("d%d@x.test", i), now.Add(-time.Minute+time.Duration(i)*time.Millisecond)))
		}
		var liveIDs []string
		for i := range 5 {
			liveIDs = append(liveIDs, o.add(t, newPost("live", queue.EventBounced, fmt.Sprintf("l%d@x.test", i), now)))
		}
		_, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "dead", dead, "/"), endpoint(t, "live", live, "/")}, func(d *webhook.Dispatcher) {
			d.Concurrency = 3
			d.Client.Timeout = 30 * time.Second
			d.Hold = time.Minute
		})
		t.Cleanup(func() { close(release) }) // first: Shutdown waits for the dead endpoint's requests
		waitFor(t, "the live endpoint's posts", 5*time.Second, func() bool { return c.get("live/sent") == 5 })
		waitFor(t, "the dead endpoint's share taken", 5*time.Second, func() bool { return len(dead.received()) == 3 })
		time.Sleep(100 * time.Millisecond) // several polls, to see that no more go
		dead.mu.Lock()
		maxIn, n := dead.maxIn, len(dead.requests)
		dead.mu.Unlock()
		if maxIn != 3 || n != 3 {
			t.Errorf("the dead endpoint had %d requests, %d at once; want 3", n, maxIn)
		}
		for _, id := range liveIDs {
			if _, ok := o.post(t, id); ok {
				t.Errorf("%s still in the outbox", id)
			}
		}
	})
}

// Posts that a busy endpoint could not take at once wait in line for its
// slots rather than for their lease to end.
func TestDispatcherBusyEndpointDrainsItsLine(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		rc := newReceiver(t, func(received, int) int {
			time.Sleep(20 * time.Millisecond)
			return http.StatusOK
		})
		for i := range 40 {
			o.add(t, newPost("slow", queue.EventBounced, fmt.Sprintf("r%d@x.test", i), time.Now()))
		}
		_, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "slow", rc, "/")}, func(d *webhook.Dispatcher) {
			d.Concurrency = 2
			d.Hold = time.Hour // a post left out of the line would wait this long
		})
		waitFor(t, "40 posts through 2 slots", 10*time.Second, func() bool { return c.get("slow/sent") == 40 })
		rc.mu.Lock()
		defer rc.mu.Unlock()
		if rc.maxIn > 2 {
			t.Errorf("%d requests at once, want at most 2", rc.maxIn)
		}
	})
}

// A post whose event is older than GiveUp is dropped untried; one whose
// next try would be past it is dropped after its failed try; one for an
// endpoint no longer configured is dropped. Each is counted and logged.
func TestDispatcherGivesUp(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		rc := newReceiver(t, func(received, int) int { return http.StatusBadGateway })
		now := time.Now()
		old := o.add(t, newPost("billing", queue.EventBounced, "old@x.test", now.Add(-25*time.Hour)))
		late := o.add(t, newPost("billing", queue.EventBounced, "late@x.test", now.Add(-24*time.Hour+time.Minute)))
		gone := o.add(t, newPost("removed", queue.EventBounced, "gone@x.test", now))
		_, c, logs := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/")}, func(d *webhook.Dispatcher) {
			d.RetryMin, d.RetryMax = time.Hour, time.Hour
		})
		waitFor(t, "three posts dropped", 5*time.Second, func() bool {
			return c.get("billing/dropped") == 2 && c.get("removed/dropped") == 1
		})
		for _, id := range []string{old, late, gone} {
			if _, ok := o.post(t, id); ok {
				t.Errorf("%s still in the outbox", id)
			}
			if !strings.Contains(logs.String(), `"webhook_id":"`+id+`"`) {
				t.Errorf("no log line names %s:\n%s", id, logs)
			}
		}
		reqs := rc.received()
		if len(reqs) != 1 || !strings.Contains(string(reqs[0].body), "late@x.test") {
			t.Errorf("requests %+v, want the late post's only", reqs)
		}
		if c.get("billing/failed") != 1 {
			t.Errorf("failed %d, want 1", c.get("billing/failed"))
		}
		if !strings.Contains(logs.String(), `"level":"WARN","msg":"webhook dropped"`) {
			t.Errorf("no warning of the drops:\n%s", logs)
		}
	})
}

// A redirect is a failure, not followed: the URL is to be changed.
func TestDispatcherDoesNotFollowRedirects(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		target := newReceiver(t, func(received, int) int { return http.StatusOK })
		moved := httptest.NewServer(http.RedirectHandler(target.URL, http.StatusTemporaryRedirect))
		t.Cleanup(moved.Close)
		o.add(t, newPost("billing", queue.EventBounced, "a@x.test", time.Now()))
		ep := endpoint(t, "billing", target, "")
		ep.URL = moved.URL
		_, c, logs := start(t, o, []webhook.Endpoint{ep}, nil)
		waitFor(t, "failed tries", 5*time.Second, func() bool { return c.get("billing/failed") >= 2 })
		if n := len(target.received()); n != 0 || c.get("billing/sent") != 0 {
			t.Errorf("redirect followed: %d requests at its target", n)
		}
		if !strings.Contains(logs.String(), `"status":307`) {
			t.Errorf("the log does not give the status:\n%s", logs)
		}
	})
}

// The logs name the endpoint and its answer, never the key, a signature
// or the URL (its path may hold a token).
func TestDispatcherLogsNoSecrets(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		var sigs []string
		var mu sync.Mutex
		rc := newReceiver(t, func(r received, _ int) int {
			mu.Lock()
			sigs = append(sigs, strings.TrimPrefix(r.signature, "v1,"))
			mu.Unlock()
			return http.StatusForbidden
		})
		closed := httptest.NewServer(http.NotFoundHandler())
		closedURL := closed.URL + "/T0KEN-in-path"
		closed.Close() // refused connections: a transport error
		o.add(t, newPost("billing", queue.EventBounced, "a@x.test", time.Now()))
		o.add(t, newPost("refused", queue.EventBounced, "b@x.test", time.Now()))
		down := endpoint(t, "refused", rc, "")
		down.URL = closedURL
		_, c, logs := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/T0KEN-in-path"), down}, nil)
		waitFor(t, "failed tries", 5*time.Second, func() bool {
			return c.get("billing/failed") >= 2 && c.get("refused/failed") >= 2
		})
		out := logs.String()
		mu.Lock()
		defer mu.Unlock()
		for _, leak := range append([]string{rc.secret(), base64.StdEncoding.EncodeToString(rc.key), "T0KEN"}, sigs...) {
			if strings.Contains(out, leak) {
				t.Errorf("the log shows %q:\n%s", leak, out)
			}
		}
		for _, want := range []string{`"webhook":"billing"`, `"status":403`, `"webhook":"refused"`, "connection refused"} {
			if !strings.Contains(out, want) {
				t.Errorf("the log lacks %s:\n%s", want, out)
			}
		}
	})
}

// Wake starts posts stored after Run at once, without waiting for a poll.
func TestDispatcherWake(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		rc := newReceiver(t, func(received, int) int { return http.StatusOK })
		d, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/")}, func(d *webhook.Dispatcher) {
			d.Poll = time.Hour
		})
		time.Sleep(50 * time.Millisecond) // Run's first pass over an empty outbox
		o.add(t, newPost("billing", queue.EventBounced, "a@x.test", time.Now()))
		d.Wake()
		waitFor(t, "the post after Wake", 5*time.Second, func() bool { return c.get("billing/sent") == 1 })
	})
}

// Shutdown cancels a post in flight when its context ends; the post is
// not counted failed and stays in the outbox, leased, for another try.
func TestDispatcherShutdownLeavesPostInFlight(t *testing.T) {
	forEachOutbox(t, func(t *testing.T, o filledOutbox) {
		release := make(chan struct{})
		rc := newReceiver(t, func(received, int) int {
			<-release
			return http.StatusOK
		})
		t.Cleanup(func() { close(release) })
		id := o.add(t, newPost("billing", queue.EventBounced, "a@x.test", time.Now()))
		d := webhook.NewDispatcher(o, []webhook.Endpoint{endpoint(t, "billing", rc, "/")})
		c := &counts{}
		d.Observer = c
		ran := make(chan error, 1)
		go func() { ran <- d.Run() }()
		waitFor(t, "the post in flight", 5*time.Second, func() bool { return len(rc.received()) == 1 })
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if err := d.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Shutdown: %v, want the deadline", err)
		}
		if err := <-ran; !errors.Is(err, webhook.ErrDispatcherClosed) {
			t.Errorf("Run: %v", err)
		}
		p, ok := o.post(t, id)
		if !ok || p.Tries != 0 || c.get("billing/failed") != 0 || c.get("billing/sent") != 0 {
			t.Errorf("post %+v (present %v), counts %v", p, ok, c.n)
		}
		if !p.NextTry.After(time.Now()) {
			t.Errorf("post due at %v: not leased", p.NextTry)
		}
	})
}

// An idle dispatcher only counts the posts of an empty outbox: taking
// posts is a write.
func TestDispatcherIdleTakesNothing(t *testing.T) {
	rc := newReceiver(t, func(received, int) int { return http.StatusOK })
	o := &memOutbox{posts: map[string]*queue.WebhookPost{}}
	d, c, _ := start(t, o, []webhook.Endpoint{endpoint(t, "billing", rc, "/")}, func(d *webhook.Dispatcher) {
		d.Poll = 5 * time.Millisecond
	})
	time.Sleep(100 * time.Millisecond) // some 20 polls
	o.mu.Lock()
	takes := o.takes
	o.mu.Unlock()
	if takes != 0 {
		t.Errorf("%d DueWebhooks calls on an empty outbox", takes)
	}
	o.add(t, newPost("billing", queue.EventBounced, "a@x.test", time.Now()))
	d.Wake()
	waitFor(t, "the post", 5*time.Second, func() bool { return c.get("billing/sent") == 1 })
}
