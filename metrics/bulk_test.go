package metrics

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/url"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"smarthost/queue"
)

func TestAddrPattern(t *testing.T) {
	tests := []struct {
		pattern string
		match   []string
		nomatch []string
	}{
		{"bob@example.net", []string{"bob@example.net", "bob@EXAMPLE.Net"}, []string{"Bob@example.net", "bob@example.org", "xbob@example.net", "bob@sub.example.net", "", "bob"}},
		{"*@example.net", []string{"bob@example.net", "Alice@Example.NET", "@example.net"}, []string{"bob@example.org", "bob@sub.example.net", "example.net", ""}},
		{"@Example.net", []string{"bob@example.net", "carol@EXAMPLE.NET"}, []string{"bob@example.netx", "bob@xexample.net"}},
		{`"a@b"@example.net`, []string{`"a@b"@example.net`}, []string{"b@example.net", `"a@b"@example.org`}},
	}
	for _, tt := range tests {
		p, err := ParseAddrPattern(tt.pattern)
		if err != nil {
			t.Errorf("ParseAddrPattern(%q): %v", tt.pattern, err)
			continue
		}
		for _, a := range tt.match {
			if !p.Match(a) {
				t.Errorf("%q does not match %q", tt.pattern, a)
			}
		}
		for _, a := range tt.nomatch {
			if p.Match(a) {
				t.Errorf("%q matches %q", tt.pattern, a)
			}
		}
	}
	for _, bad := range []string{"", "example.net", "bob@", "*@", "@", "bob@*.example.net", "bob@*"} {
		if _, err := ParseAddrPattern(bad); err == nil {
			t.Errorf("ParseAddrPattern(%q) accepted", bad)
		}
	}
}

func TestFilterMatch(t *testing.T) {
	m := &queue.Message{
		From: "app@example.com", User: "billing",
		Recipients: []queue.Recipient{
			{Addr: "done@example.net", State: queue.Delivered},
			{Addr: "refused@example.net", State: queue.Failed},
			{Addr: "waiting@example.org", State: queue.Pending},
		},
	}
	pat := func(s string) AddrPattern {
		p, err := ParseAddrPattern(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name string
		f    Filter
		want bool
	}{
		{"all", Filter{All: true}, true},
		{"nothing set", Filter{}, false},
		{"from", Filter{From: pat("app@example.com")}, true},
		{"from other", Filter{From: pat("other@example.com")}, false},
		{"from domain", Filter{From: pat("*@EXAMPLE.com")}, true},
		{"to pending", Filter{To: pat("waiting@example.org")}, true},
		{"to delivered", Filter{To: pat("done@example.net")}, false},
		{"to failed", Filter{To: pat("refused@example.net")}, false},
		{"to domain of finished ones", Filter{To: pat("@example.net")}, false},
		{"to domain of a pending one", Filter{To: pat("@example.org")}, true},
		{"user", Filter{User: "billing"}, true},
		{"user differs in case", Filter{User: "Billing"}, false},
		{"from and user", Filter{From: pat("*@example.com"), User: "billing"}, true},
		{"from and other user", Filter{From: pat("*@example.com"), User: "alerts"}, false},
		{"all three", Filter{From: pat("app@example.com"), To: pat("*@example.org"), User: "billing"}, true},
		{"all three, to finished", Filter{From: pat("app@example.com"), To: pat("*@example.net"), User: "billing"}, false},
	}
	for _, tt := range tests {
		if got := tt.f.Match(m); got != tt.want {
			t.Errorf("%s: Match = %v, want %v", tt.name, got, tt.want)
		}
	}
	if (Filter{From: pat("app@example.com")}).Match(&queue.Message{From: ""}) {
		t.Error("a sender pattern matches the null sender")
	}
}

func TestParseBulkQuery(t *testing.T) {
	for _, bad := range []string{
		"", "dry_run=1", "all=0", "all=1&from=a@example.com", "all=yes", "from=", "user=", "from=example.com",
		"to=a@", "form=a@example.com", "from=a@example.com&from=b@example.com", "user=u&dry_run=true", "user=u&id=1",
	} {
		q, _ := url.ParseQuery(bad)
		if f, _, err := parseBulkQuery(q); err == nil {
			t.Errorf("%q accepted as %+v", bad, f)
		}
	}
	q, _ := url.ParseQuery("from=*@example.com&user=u&dry_run=1")
	f, dry, err := parseBulkQuery(q)
	if err != nil || !dry || f.String() != "from=*@example.com user=u" {
		t.Errorf("got %q, dry run %v, %v", f, dry, err)
	}
}

// bulkStore is a bbolt store holding messages from two senders' domains,
// three users and to several recipients, in states that the filters must
// tell apart.
type bulkStore struct {
	*queue.Store
	ids map[string]string // name → queue ID
}

func newBulkStore(t *testing.T) *bulkStore {
	t.Helper()
	store, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{Now: func() time.Time { return testNow }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	rcpt := func(addr string, st queue.RcptState) queue.Recipient { return queue.Recipient{Addr: addr, State: st} }
	msgs := []struct {
		name string
		m    queue.Message
	}{
		{"a1", queue.Message{From: "a@one.example", User: "alice", Recipients: []queue.Recipient{rcpt("x@dest.example", queue.Pending)}}},
		{"a2", queue.Message{From: "a@one.example", User: "bob", Recipients: []queue.Recipient{rcpt("y@other.example", queue.Pending)}}},
		{"b3", queue.Message{From: "b@One.Example", User: "alice", Recipients: []queue.Recipient{rcpt("x@dest.example", queue.Delivered), rcpt("z@dest.example", queue.Pending)}}},
		{"A4", queue.Message{From: "A@one.example", User: "bob", Recipients: []queue.Recipient{rcpt("X@DEST.example", queue.Pending)}}},
		{"dsn", queue.Message{From: "", DSN: true, Recipients: []queue.Recipient{rcpt("a@one.example", queue.Pending)}}},
		{"c6", queue.Message{From: "c@two.example", User: "carol", Held: true, Recipients: []queue.Recipient{rcpt("x@dest.example", queue.Pending)}}},
	}
	s := &bulkStore{Store: store, ids: map[string]string{}}
	for i, e := range msgs {
		m := e.m
		m.ID = "00000000000000" + string("0123456789"[i]) + "f"
		m.Received = testNow.Add(time.Duration(i-len(msgs)) * time.Minute)
		m.NextAttempt = testNow.Add(time.Hour)
		if err := store.Import(context.Background(), m, []byte("Subject: x\r\n\r\nx\r\n"), nil); err != nil {
			t.Fatal(err)
		}
		s.ids[e.name] = m.ID
	}
	return s
}

// names returns the IDs of the named messages, in the order they were
// stored (the order List answers).
func (s *bulkStore) names(t *testing.T, ids []string) []string {
	t.Helper()
	var out []string
	for _, id := range ids {
		name := ""
		for n, nid := range s.ids {
			if nid == id {
				name = n
			}
		}
		if name == "" {
			t.Fatalf("unknown ID %s", id)
		}
		out = append(out, name)
	}
	return out
}

// state is every queued message's name with its held flag and whether it
// is due now.
func (s *bulkStore) state(t *testing.T) map[string]string {
	t.Helper()
	msgs, bad, err := s.List()
	if err != nil || len(bad) > 0 {
		t.Fatalf("list: %v, %v", bad, err)
	}
	out := map[string]string{}
	for _, m := range msgs {
		st := "waiting"
		if !m.NextAttempt.After(testNow) {
			st = "due"
		}
		if m.Held {
			st += ",held"
		}
		out[s.names(t, []string{m.ID})[0]] = st
	}
	return out
}

// bulkCall posts a bulk action and decodes its answer.
func bulkCall(t *testing.T, api *API, path string, s *bulkStore) (ActionResult, []string) {
	t.Helper()
	resp := call(t, api, "POST", path, loopback4, "")
	if resp.StatusCode != 200 {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST %s: status %d: %s", path, resp.StatusCode, body)
	}
	var res ActionResult
	decode(t, resp, &res)
	return res, s.names(t, res.IDs)
}

// TestAPIBulkOverStore: each filter acts on exactly the messages it
// matches in a real bbolt store, a dry run changes nothing, and what an
// action cannot apply to is counted as skipped.
func TestAPIBulkOverStore(t *testing.T) {
	s := newBulkStore(t)
	api := &API{Queue: s, Logger: slog.New(slog.DiscardHandler), Now: func() time.Time { return testNow }}
	initial := s.state(t)

	// Dry runs: what each filter selects, and nothing changes.
	for _, tt := range []struct {
		path string
		want []string
		skip map[string]int
	}{
		{"/api/queue/delete?from=a@one.example", []string{"a1", "a2"}, nil},
		{"/api/queue/delete?from=*@one.example", []string{"a1", "a2", "b3", "A4"}, nil},
		{"/api/queue/delete?from=@ONE.EXAMPLE", []string{"a1", "a2", "b3", "A4"}, nil},
		{"/api/queue/delete?to=x@dest.example", []string{"a1", "c6"}, nil},
		{"/api/queue/delete?to=*@dest.example", []string{"a1", "b3", "A4", "c6"}, nil},
		{"/api/queue/delete?user=alice", []string{"a1", "b3"}, nil},
		{"/api/queue/delete?user=bob&from=*@one.example", []string{"a2", "A4"}, nil},
		{"/api/queue/delete?user=bob&to=y@other.example", []string{"a2"}, nil},
		{"/api/queue/delete?user=nobody", []string{}, nil},
		{"/api/queue/delete?all=1", []string{"a1", "a2", "b3", "A4", "dsn", "c6"}, nil},
		{"/api/queue/hold?all=1", []string{"a1", "a2", "b3", "A4", "dsn"}, map[string]int{"already held": 1}},
		{"/api/queue/release?all=1", []string{"c6"}, map[string]int{"not held": 5}},
		{"/api/queue/retry?to=x@dest.example", []string{"a1"}, map[string]int{"held": 1}},
	} {
		res, got := bulkCall(t, api, tt.path+"&dry_run=1", s)
		if !res.DryRun || res.Messages != len(tt.want) || !slices.Equal(got, tt.want) || !reflect.DeepEqual(res.SkippedBecause, tt.skip) {
			t.Errorf("%s dry run: %+v (%v), want %v skipping %v", tt.path, res, got, tt.want, tt.skip)
		}
	}
	if now := s.state(t); !reflect.DeepEqual(now, initial) {
		t.Fatalf("dry runs changed the queue: %v, was %v", now, initial)
	}

	res, got := bulkCall(t, api, "/api/queue/hold?user=alice", s)
	if res.Action != "hold" || res.Messages != 2 || res.DryRun || !slices.Equal(got, []string{"a1", "b3"}) {
		t.Errorf("hold user=alice: %+v (%v)", res, got)
	}
	want := map[string]string{"a1": "waiting,held", "a2": "waiting", "b3": "waiting,held", "A4": "waiting", "dsn": "waiting", "c6": "waiting,held"}
	if now := s.state(t); !reflect.DeepEqual(now, want) {
		t.Errorf("after hold: %v, want %v", now, want)
	}

	res, got = bulkCall(t, api, "/api/queue/retry?from=*@one.example", s)
	if res.Messages != 2 || !slices.Equal(got, []string{"a2", "A4"}) || res.Skipped != 2 || res.SkippedBecause["held"] != 2 {
		t.Errorf("retry from=*@one.example: %+v (%v)", res, got)
	}
	want = map[string]string{"a1": "waiting,held", "a2": "due", "b3": "waiting,held", "A4": "due", "dsn": "waiting", "c6": "waiting,held"}
	if now := s.state(t); !reflect.DeepEqual(now, want) {
		t.Errorf("after retry: %v, want %v", now, want)
	}

	res, got = bulkCall(t, api, "/api/queue/release?to=@dest.example", s)
	if res.Messages != 3 || !slices.Equal(got, []string{"a1", "b3", "c6"}) || res.SkippedBecause["not held"] != 1 {
		t.Errorf("release to=@dest.example: %+v (%v)", res, got)
	}
	want = map[string]string{"a1": "due", "a2": "due", "b3": "due", "A4": "due", "dsn": "waiting", "c6": "due"}
	if now := s.state(t); !reflect.DeepEqual(now, want) {
		t.Errorf("after release: %v, want %v", now, want)
	}

	res, got = bulkCall(t, api, "/api/queue/delete?to=x@dest.example", s)
	if res.Messages != 2 || !slices.Equal(got, []string{"a1", "c6"}) || res.Skipped != 0 {
		t.Errorf("delete to=x@dest.example: %+v (%v)", res, got)
	}
	want = map[string]string{"a2": "due", "b3": "due", "A4": "due", "dsn": "waiting"}
	if now := s.state(t); !reflect.DeepEqual(now, want) {
		t.Errorf("after delete: %v, want %v", now, want)
	}

	// Refused requests change nothing.
	for _, tt := range []struct{ method, path, err string }{
		{"POST", "/api/queue/delete", "no filter"},
		{"POST", "/api/queue/delete?dry_run=1", "no filter"},
		{"POST", "/api/queue/hold?all=1&user=bob", "without from, to or user"},
		{"POST", "/api/queue/retry?from=one.example", "want user@domain"},
		{"POST", "/api/queue/release?user=", "empty"},
		{"POST", "/api/queue/delete?usr=bob", "unknown parameter"},
	} {
		wantError(t, call(t, api, tt.method, tt.path, loopback4, ""), 400, tt.err)
	}
	for _, path := range []string{"/api/queue/hold", "/api/queue/delete"} {
		wantError(t, call(t, api, "GET", path+"?all=1", loopback4, ""), 405, "use POST")
	}
	if now := s.state(t); !reflect.DeepEqual(now, want) {
		t.Errorf("refused requests changed the queue: %v, want %v", now, want)
	}

	res, got = bulkCall(t, api, "/api/queue/delete?all=1", s)
	if res.Messages != 4 || !slices.Equal(got, []string{"a2", "b3", "A4", "dsn"}) {
		t.Errorf("delete all=1: %+v (%v)", res, got)
	}
	if n, err := s.Len(); err != nil || n != 0 {
		t.Errorf("%d messages left, %v", n, err)
	}
}

// vanishing is a store from which one message is deleted, as if by
// another administrator, after a List and before what follows it.
type vanishing struct {
	*bulkStore
	victim string
}

func (v vanishing) List() ([]queue.Entry, []queue.Unreadable, error) {
	msgs, bad, err := v.bulkStore.List()
	if err == nil {
		err = v.Store.Delete(v.victim)
	}
	return msgs, bad, err
}

// TestAPIBulkGone: a matching message that leaves the queue while a bulk
// action runs is skipped as gone, not an error; the action is logged in
// one line, a dry run not at all.
func TestAPIBulkGone(t *testing.T) {
	s := newBulkStore(t)
	var logged bytes.Buffer
	api := &API{Queue: s, Logger: slog.New(slog.NewJSONHandler(&logged, nil))}
	if res, _ := bulkCall(t, api, "/api/queue/hold?user=alice&dry_run=1", s); res.Messages != 2 || logged.Len() != 0 {
		t.Errorf("dry run: %+v, logged %q", res, logged.String())
	}

	api = &API{Queue: vanishing{s, s.ids["b3"]}, Logger: api.Logger}
	res, got := bulkCall(t, api, "/api/queue/hold?user=alice", s)
	if res.Messages != 1 || !slices.Equal(got, []string{"a1"}) || res.Skipped != 1 || res.SkippedBecause["gone"] != 1 {
		t.Errorf("hold user=alice with b3 gone: %+v (%v)", res, got)
	}
	if st := s.state(t); st["a1"] != "waiting,held" || st["a2"] != "waiting" || len(st) != 5 {
		t.Errorf("after hold: %v", st)
	}
	lines := strings.Split(strings.TrimSpace(logged.String()), "\n")
	var line map[string]any
	if len(lines) != 1 || json.Unmarshal([]byte(lines[0]), &line) != nil {
		t.Fatalf("log: %q, want one JSON line", lines)
	}
	for k, v := range map[string]any{"msg": "queue: hold by administrator", "filter": "user=alice", "messages": 1.0, "skipped": 1.0, "client": loopback4} {
		if line[k] != v {
			t.Errorf("log %s = %v, want %v", k, line[k], v)
		}
	}
}
