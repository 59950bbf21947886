package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/queue"
	"smarthost/relay/upstream"
)

var _ QueueAdmin = (*queue.Store)(nil)

// fakeAdmin is a QueueAdmin over a map that records what was asked of it.
type fakeAdmin struct {
	mu    sync.Mutex
	msgs  []queue.Entry
	calls []string // "retry ID", "flush", …
	err   error    // returned by every call when set
}

func (f *fakeAdmin) record(call string) {
	f.calls = append(f.calls, call)
}

func (f *fakeAdmin) find(id string) int {
	return slices.IndexFunc(f.msgs, func(m queue.Entry) bool { return m.ID == id })
}

func (f *fakeAdmin) List() ([]queue.Entry, []queue.Unreadable, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("list")
	if f.err != nil {
		return nil, nil, f.err
	}
	return slices.Clone(f.msgs), nil, nil
}

func (f *fakeAdmin) History(id string) (*queue.History, error) {
	return nil, fmt.Errorf("queue: history of %s: %w", id, queue.ErrNotFound)
}

func (f *fakeAdmin) FindHistory(queue.HistoryFilter) ([]queue.History, error) { return nil, f.err }

func (f *fakeAdmin) Content(id string) (queue.Body, func(), error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("content " + id)
	if f.err != nil {
		return queue.Body{}, nil, f.err
	}
	return queue.Body{}, nil, fmt.Errorf("queue: content of %s: %w", id, queue.ErrNotFound)
}

func (f *fakeAdmin) Get(id string) (*queue.Entry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("get " + id)
	if f.err != nil {
		return nil, f.err
	}
	i := f.find(id)
	if i < 0 {
		return nil, fmt.Errorf("queue: get %s: %w", id, queue.ErrNotFound)
	}
	m := f.msgs[i]
	return &m, nil
}

// change applies fn to the message id, the way the store reports errors.
func (f *fakeAdmin) change(op, id string, fn func(m *queue.Message) error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record(op + " " + id)
	if f.err != nil {
		return f.err
	}
	i := f.find(id)
	if i < 0 {
		return fmt.Errorf("queue: %s %s: %w", op, id, queue.ErrNotFound)
	}
	if err := fn(&f.msgs[i].Message); err != nil {
		return fmt.Errorf("queue: %s %s: %w", op, id, err)
	}
	return nil
}

func (f *fakeAdmin) Retry(id string) error {
	return f.change("retry", id, func(m *queue.Message) error {
		if m.Held {
			return queue.ErrHeld
		}
		m.NextAttempt = time.Time{}
		return nil
	})
}

func (f *fakeAdmin) Hold(id string) error {
	return f.change("hold", id, func(m *queue.Message) error { m.Held = true; return nil })
}

func (f *fakeAdmin) Release(id string) error {
	return f.change("release", id, func(m *queue.Message) error { m.Held = false; return nil })
}

func (f *fakeAdmin) Delete(id string) error {
	err := f.change("delete", id, func(*queue.Message) error { return nil })
	if err == nil {
		f.mu.Lock()
		f.msgs = slices.Delete(f.msgs, f.find(id), f.find(id)+1)
		f.mu.Unlock()
	}
	return err
}

func (f *fakeAdmin) Flush() (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.record("flush")
	if f.err != nil {
		return 0, f.err
	}
	n := 0
	for _, m := range f.msgs {
		if !m.Held {
			n++
		}
	}
	return n, nil
}

func (f *fakeAdmin) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func testMessages() []queue.Entry {
	return []queue.Entry{
		{Message: queue.Message{
			ID: "0001aaaa", From: "billing@example.com", User: "billing-app", MessageID: "<1@example.com>",
			Size: 1234, Received: testNow.Add(-90 * time.Second), Attempts: 2,
			LastAttempt: testNow.Add(-30 * time.Second), NextAttempt: testNow.Add(time.Minute),
			LastReply: "451 4.7.1 Try again later",
			Recipients: []queue.Recipient{
				{Addr: "a@example.net", State: queue.Delivered, Reply: "250 2.0.0 OK", Upstream: "gmail"},
				{Addr: "b@example.net", State: queue.Pending, Reply: "451 4.7.1 Try again later", Upstream: "gmail"},
				{Addr: "c@example.net", State: queue.Failed, Reply: "550 5.1.1 No such user", Upstream: "gmail"},
			},
		}},
		{Message: queue.Message{
			ID: "0002bbbb", From: "", Size: 99, Received: testNow.Add(-time.Hour), NextAttempt: testNow,
			Held: true, DSN: true,
			Recipients: []queue.Recipient{{Addr: "billing@example.com", State: queue.Pending}},
		}, InFlight: true},
	}
}

// newTestAPI returns an API over a fake queue holding testMessages, with
// a fixed clock and the given token.
func newTestAPI(token string) (*API, *fakeAdmin) {
	admin := &fakeAdmin{msgs: testMessages()}
	api := &API{
		Queue: admin,
		Upstreams: func() []upstream.State {
			return []upstream.State{{Name: "gmail", Up: true}, {Name: "yandex", Up: false}}
		},
		Token:  token,
		Now:    func() time.Time { return testNow },
		Logger: slog.New(slog.DiscardHandler),
	}
	return api, admin
}

// call sends one request to h as if from remote ("ip:port") and returns
// the response. Its Host is a loopback address, as smarthost queue sends.
func call(t *testing.T, h http.Handler, method, path, remote, auth string) *http.Response {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	req.RemoteAddr = remote
	req.Host = "127.0.0.1:9090"
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Result()
}

// decode reads a JSON body into v, checking the content type.
func decode(t *testing.T, resp *http.Response, v any) {
	t.Helper()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
}

// wantError checks an error answer: its status and a JSON error whose
// text contains msg.
func wantError(t *testing.T, resp *http.Response, code int, msg string) {
	t.Helper()
	if resp.StatusCode != code {
		t.Errorf("status = %d, want %d", resp.StatusCode, code)
	}
	var e APIError
	decode(t, resp, &e)
	if !strings.Contains(e.Error, msg) {
		t.Errorf("error = %q, want it to contain %q", e.Error, msg)
	}
}

const (
	loopback4 = "127.0.0.1:40000"
	remote4   = "192.0.2.7:40000"
)

func TestAPIAccessWithToken(t *testing.T) {
	api, admin := newTestAPI("s3cret-token")
	tests := []struct {
		name, remote, auth string
		code               int
		challenge          string // WWW-Authenticate on 401
	}{
		{"no header", loopback4, "", 401, `Bearer realm="smarthost"`},
		{"wrong token", loopback4, "Bearer nope", 401, `Bearer realm="smarthost", error="invalid_token"`},
		{"token prefix", loopback4, "Bearer s3cret", 401, `Bearer realm="smarthost", error="invalid_token"`},
		{"token longer", loopback4, "Bearer s3cret-token2", 401, `Bearer realm="smarthost", error="invalid_token"`},
		{"basic scheme", loopback4, "Basic czNjcmV0LXRva2Vu", 401, `Bearer realm="smarthost"`},
		{"scheme only", loopback4, "Bearer", 401, `Bearer realm="smarthost"`},
		{"right token, loopback", loopback4, "Bearer s3cret-token", 200, ""},
		{"right token, remote", remote4, "Bearer s3cret-token", 200, ""},
		{"scheme in lower case", remote4, "bearer s3cret-token", 200, ""},
		{"wrong token, remote", remote4, "Bearer nope", 401, `Bearer realm="smarthost", error="invalid_token"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := call(t, api, "GET", "/api/queue", tt.remote, tt.auth)
			if tt.code != 200 {
				wantError(t, resp, tt.code, "token")
				if got := resp.Header.Get("WWW-Authenticate"); got != tt.challenge {
					t.Errorf("WWW-Authenticate = %q, want %q", got, tt.challenge)
				}
				return
			}
			if resp.StatusCode != 200 {
				t.Errorf("status = %d, want 200", resp.StatusCode)
			}
		})
	}

	// A refused client learns nothing about the routes and changes nothing.
	before := len(admin.Calls())
	for _, r := range []struct{ method, path string }{
		{"POST", "/api/queue/flush"}, {"DELETE", "/api/queue/0001aaaa"}, {"GET", "/api/nothing"}, {"PUT", "/api/queue"},
	} {
		wantError(t, call(t, api, r.method, r.path, loopback4, "Bearer wrong"), 401, "invalid token")
	}
	if calls := admin.Calls()[before:]; len(calls) != 0 {
		t.Errorf("refused requests reached the queue: %v", calls)
	}
}

func TestAPIAccessWithoutToken(t *testing.T) {
	api, admin := newTestAPI("")
	tests := []struct {
		remote string
		code   int
	}{
		{"127.0.0.1:1234", 200},
		{"127.1.2.3:1234", 200},
		{"[::1]:1234", 200},
		{"[::ffff:127.0.0.1]:1234", 200},
		{"192.0.2.7:1234", 403},
		{"10.1.2.3:1234", 403},
		{"[2001:db8::1]:1234", 403},
		{"[::ffff:10.0.0.1]:1234", 403},
		{"not an address", 403},
	}
	for _, tt := range tests {
		t.Run(tt.remote, func(t *testing.T) {
			resp := call(t, api, "POST", "/api/queue/flush", tt.remote, "")
			if tt.code == 403 {
				wantError(t, resp, 403, "loopback")
				return
			}
			if resp.StatusCode != 200 {
				t.Errorf("status = %d, want 200", resp.StatusCode)
			}
		})
	}
	// The four loopback flushes went through, none of the others.
	if calls := admin.Calls(); !slices.Equal(calls, []string{"flush", "flush", "flush", "flush"}) {
		t.Errorf("calls = %v, want 4 flushes", calls)
	}
}

func TestAPIList(t *testing.T) {
	api, _ := newTestAPI("")
	resp := call(t, api, "GET", "/api/queue", loopback4, "")
	if resp.StatusCode != 200 {
		t.Fatalf("status = %d", resp.StatusCode)
	}
	var got []MessageInfo
	decode(t, resp, &got)
	want := []MessageInfo{
		{
			ID: "0001aaaa", Received: testNow.Add(-90 * time.Second), Age: 90, From: "billing@example.com",
			User: "billing-app", MessageID: "<1@example.com>", Size: 1234,
			Recipients: []RecipientInfo{
				{Addr: "a@example.net", State: "delivered", Reply: "250 2.0.0 OK", Upstream: "gmail"},
				{Addr: "b@example.net", State: "pending", Reply: "451 4.7.1 Try again later", Upstream: "gmail"},
				{Addr: "c@example.net", State: "failed", Reply: "550 5.1.1 No such user", Upstream: "gmail"},
			},
			Attempts: 2, LastAttempt: testNow.Add(-30 * time.Second), NextAttempt: testNow.Add(time.Minute),
			LastReply: "451 4.7.1 Try again later",
		},
		{
			ID: "0002bbbb", Received: testNow.Add(-time.Hour), Age: 3600, Size: 99,
			Recipients:  []RecipientInfo{{Addr: "billing@example.com", State: "pending"}},
			NextAttempt: testNow, Held: true, InFlight: true, DSN: true,
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %+v\nwant %+v", got, want)
	}
}

// TestAPIJSONShape pins the field names that scripts and the CLI rely on.
func TestAPIJSONShape(t *testing.T) {
	api, _ := newTestAPI("")
	resp := call(t, api, "GET", "/api/queue/0002bbbb", loopback4, "")
	var raw map[string]any
	decode(t, resp, &raw)
	for _, k := range []string{"id", "received", "age", "from", "size", "recipients", "attempts", "next_attempt", "held", "in_flight", "dsn"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("field %q missing from %v", k, raw)
		}
	}
	if raw["from"] != "" || raw["held"] != true || raw["age"] != 3600.0 {
		t.Errorf("from, held, age = %v, %v, %v", raw["from"], raw["held"], raw["age"])
	}
	rcpt := raw["recipients"].([]any)[0].(map[string]any)
	if rcpt["addr"] != "billing@example.com" || rcpt["state"] != "pending" {
		t.Errorf("recipient = %v", rcpt)
	}
}

func TestAPIShow(t *testing.T) {
	api, _ := newTestAPI("")
	var got MessageInfo
	resp := call(t, api, "GET", "/api/queue/0001aaaa", loopback4, "")
	if resp.StatusCode != 200 {
		t.Fatalf("status = %d", resp.StatusCode)
	}
	decode(t, resp, &got)
	if got.ID != "0001aaaa" || got.Age != 90 || len(got.Recipients) != 3 || got.Recipients[2].State != "failed" {
		t.Errorf("got %+v", got)
	}

	wantError(t, call(t, api, "GET", "/api/queue/nosuchid", loopback4, ""), 404, "no queued message nosuchid")
}

func TestAPIActions(t *testing.T) {
	tests := []struct {
		method, path string
		code         int
		want         ActionResult
		call         string
		err          string
	}{
		{"POST", "/api/queue/0001aaaa/retry", 200, ActionResult{Action: "retry", ID: "0001aaaa", Messages: 1}, "retry 0001aaaa", ""},
		{"POST", "/api/queue/0002bbbb/retry", 409, ActionResult{}, "retry 0002bbbb", "held; release it first"},
		{"POST", "/api/queue/0001aaaa/hold", 200, ActionResult{Action: "hold", ID: "0001aaaa", Messages: 1}, "hold 0001aaaa", ""},
		{"POST", "/api/queue/0002bbbb/release", 200, ActionResult{Action: "release", ID: "0002bbbb", Messages: 1}, "release 0002bbbb", ""},
		{"DELETE", "/api/queue/0001aaaa", 200, ActionResult{Action: "delete", ID: "0001aaaa", Messages: 1}, "delete 0001aaaa", ""},
		{"POST", "/api/queue/flush", 200, ActionResult{Action: "flush", Messages: 1}, "flush", ""},
		{"POST", "/api/queue/gone/retry", 404, ActionResult{}, "retry gone", "no queued message gone"},
		{"POST", "/api/queue/gone/hold", 404, ActionResult{}, "hold gone", "no queued message gone"},
		{"POST", "/api/queue/gone/release", 404, ActionResult{}, "release gone", "no queued message gone"},
		{"DELETE", "/api/queue/gone", 404, ActionResult{}, "delete gone", "no queued message gone"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			api, admin := newTestAPI("")
			resp := call(t, api, tt.method, tt.path, loopback4, "")
			if tt.code != 200 {
				wantError(t, resp, tt.code, tt.err)
			} else {
				if resp.StatusCode != 200 {
					t.Fatalf("status = %d", resp.StatusCode)
				}
				var got ActionResult
				decode(t, resp, &got)
				if !reflect.DeepEqual(got, tt.want) {
					t.Errorf("result = %+v, want %+v", got, tt.want)
				}
			}
			if calls := admin.Calls(); !slices.Equal(calls, []string{tt.call}) {
				t.Errorf("queue calls = %v, want [%s]", calls, tt.call)
			}
		})
	}
}

func TestAPIUpstreams(t *testing.T) {
	api, _ := newTestAPI("")
	var got []upstream.State
	resp := call(t, api, "GET", "/api/upstreams", loopback4, "")
	decode(t, resp, &got)
	if len(got) != 2 || got[0].Name != "gmail" || !got[0].Up || got[1].Name != "yandex" || got[1].Up {
		t.Errorf("upstreams = %+v", got)
	}

	// Without a source of states the list is empty, not null.
	api.Upstreams = nil
	resp = call(t, api, "GET", "/api/upstreams", loopback4, "")
	body, _ := io.ReadAll(resp.Body)
	if strings.TrimSpace(string(body)) != "[]" {
		t.Errorf("body = %q, want []", body)
	}
}

func TestAPIMethodsAndRoutes(t *testing.T) {
	api, admin := newTestAPI("")
	tests := []struct {
		method, path string
		code         int
		allow, err   string
	}{
		{"POST", "/api/queue", 405, "GET", "method POST not allowed"},
		{"DELETE", "/api/queue", 405, "GET", "not allowed"},
		{"GET", "/api/queue/flush", 405, "POST", "method GET not allowed; use POST"},
		{"DELETE", "/api/queue/flush", 405, "POST", "not allowed"},
		{"PUT", "/api/queue/0001aaaa", 405, "DELETE, GET", "use DELETE or GET"},
		{"POST", "/api/queue/0001aaaa", 405, "DELETE, GET", "not allowed"},
		{"GET", "/api/queue/0001aaaa/retry", 405, "POST", "not allowed"},
		{"DELETE", "/api/queue/0001aaaa/hold", 405, "POST", "not allowed"},
		{"GET", "/api/queue/0001aaaa/release", 405, "POST", "not allowed"},
		{"POST", "/api/upstreams", 405, "GET", "not allowed"},
		{"POST", "/api/queue/0001aaaa/bounce", 404, "", "no such API endpoint"},
		{"GET", "/api/queue/a/b/c", 404, "", "no such API endpoint"},
		{"GET", "/api/", 404, "", "no such API endpoint"},
		{"GET", "/api/stats", 404, "", "no such API endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			resp := call(t, api, tt.method, tt.path, loopback4, "")
			wantError(t, resp, tt.code, tt.err)
			if got := resp.Header.Get("Allow"); got != tt.allow {
				t.Errorf("Allow = %q, want %q", got, tt.allow)
			}
		})
	}
	if calls := admin.Calls(); len(calls) != 0 {
		t.Errorf("wrong methods reached the queue: %v", calls)
	}
}

func TestAPIQueueFailure(t *testing.T) {
	api, admin := newTestAPI("")
	admin.err = errors.New("queue: list: disk on fire")
	wantError(t, call(t, api, "GET", "/api/queue", loopback4, ""), 500, "disk on fire")
	wantError(t, call(t, api, "POST", "/api/queue/flush", loopback4, ""), 500, "disk on fire")
	wantError(t, call(t, api, "POST", "/api/queue/x/hold", loopback4, ""), 500, "disk on fire")
}

// TestAPIOverStore drives the API over a real bbolt store: the states a
// message goes through as an administrator holds, retries, releases and
// deletes it.
func TestAPIOverStore(t *testing.T) {
	store, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}, {Addr: "y@example.net"}}}
	if err := store.Put(context.Background(), m, []byte("Subject: hi\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	api := &API{Queue: store, Logger: slog.New(slog.DiscardHandler)}
	show := func() MessageInfo {
		t.Helper()
		var info MessageInfo
		resp := call(t, api, "GET", "/api/queue/"+m.ID, loopback4, "")
		if resp.StatusCode != 200 {
			t.Fatalf("show: status %d", resp.StatusCode)
		}
		decode(t, resp, &info)
		return info
	}
	act := func(method, path string, code int) {
		t.Helper()
		if resp := call(t, api, method, path, loopback4, ""); resp.StatusCode != code {
			body, _ := io.ReadAll(resp.Body)
			t.Fatalf("%s %s: status %d, want %d: %s", method, path, resp.StatusCode, code, body)
		}
	}

	var list []MessageInfo
	decode(t, call(t, api, "GET", "/api/queue", loopback4, ""), &list)
	if len(list) != 1 || list[0].ID != m.ID || list[0].Size != m.Size || list[0].From != "app@example.com" ||
		len(list[0].Recipients) != 2 || list[0].Recipients[1].State != "pending" {
		t.Fatalf("list = %+v", list)
	}

	act("POST", "/api/queue/"+m.ID+"/hold", 200)
	if !show().Held {
		t.Error("not held after hold")
	}
	act("POST", "/api/queue/"+m.ID+"/retry", 409)
	var flushed ActionResult
	decode(t, call(t, api, "POST", "/api/queue/flush", loopback4, ""), &flushed)
	if flushed.Messages != 0 {
		t.Errorf("flush touched %d messages, want 0 (the one is held)", flushed.Messages)
	}
	act("POST", "/api/queue/"+m.ID+"/release", 200)
	if show().Held {
		t.Error("held after release")
	}
	act("POST", "/api/queue/"+m.ID+"/retry", 200)
	for query, want := range map[string]string{"": "Subject: hi\r\n\r\nhello\r\n", "?headers=1": "Subject: hi\r\n\r\n"} {
		resp := call(t, api, "GET", "/api/queue/"+m.ID+"/content"+query, loopback4, "")
		got, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(got) != want || resp.Header.Get("Content-Type") != "message/rfc822" {
			t.Errorf("content%s: %d %s %q, want 200 message/rfc822 %q", query, resp.StatusCode, resp.Header.Get("Content-Type"), got, want)
		}
	}
	act("DELETE", "/api/queue/"+m.ID, 200)
	act("GET", "/api/queue/"+m.ID, 404)
	act("GET", "/api/queue/"+m.ID+"/content", 404)
	act("DELETE", "/api/queue/"+m.ID, 404)
}

// TestAPIHistoryOverStore: GET /api/messages finds messages queued and
// gone by recipient, and GET /api/messages/{id} shows one with its events,
// over a real bbolt store.
func TestAPIHistoryOverStore(t *testing.T) {
	store, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{HistoryRetention: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	put := func(rcpt string) string {
		m := &queue.Message{From: "app@example.com", User: "billing", MessageID: "<x@example.com>", Recipients: []queue.Recipient{{Addr: rcpt}}}
		if err := store.Put(context.Background(), m, []byte("Subject: hi\r\n\r\nhello\r\n")); err != nil {
			t.Fatal(err)
		}
		return m.ID
	}
	kept, gone := put("bob@example.net"), put("Bob@example.net")
	if err := store.Delete(gone); err != nil {
		t.Fatal(err)
	}
	api := &API{Queue: store, Logger: slog.New(slog.DiscardHandler)}

	var found []MessageHistory
	resp := call(t, api, "GET", "/api/messages?to=BOB@example.net&user=billing", loopback4, "")
	decode(t, resp, &found)
	if len(found) != 2 || found[0].ID != gone || found[0].State != "deleted" || found[1].ID != kept || found[1].State != "queued" ||
		found[1].From != "app@example.com" || len(found[1].Events) != 0 {
		t.Errorf("found %+v", found)
	}
	var one MessageHistory
	decode(t, call(t, api, "GET", "/api/messages/"+gone, loopback4, ""), &one)
	if one.ID != gone || one.State != "deleted" || len(one.Events) != 2 || one.Events[0].Type != queue.EventAccepted || one.Events[1].Type != queue.EventDeleted {
		t.Errorf("message %+v", one)
	}
	since := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	found = nil
	decode(t, call(t, api, "GET", "/api/messages?since="+since, loopback4, ""), &found)
	if len(found) != 0 {
		t.Errorf("since an hour from now: %+v", found)
	}
	for _, q := range []string{"?rcpt=bob@example.net", "?to=a&to=b", "?since=yesterday", "?limit=0", "?limit=1001", "?user="} {
		wantError(t, call(t, api, "GET", "/api/messages"+q, loopback4, ""), 400, "")
	}
	wantError(t, call(t, api, "GET", "/api/messages/0000000000000000", loopback4, ""), 404, "no message")
	wantError(t, call(t, api, "POST", "/api/messages", loopback4, ""), 405, "")
}
