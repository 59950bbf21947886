package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"
	bolt "go.etcd.io/bbolt"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/metrics"
	"smarthost/queue"
	"smarthost/relay/upstream"
)

// adminServer is a queue with an admin API in front of it, as a running
// server has, but without a scheduler, so that messages stay as the test
// put them.
type adminServer struct {
	store *queue.Store
	url   string
	dir   string // holds config.toml, which names nothing by default
	ids   []string
}

// newAdminServer serves the API over a store holding three messages: one
// to three recipients, one from the null sender (held), one plain.
func newAdminServer(t *testing.T, token string) *adminServer {
	t.Helper()
	// The shell running the tests must not leak a token into them.
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "")
	dir := t.TempDir()
	store, err := queue.Open(filepath.Join(dir, "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	s := &adminServer{store: store, dir: dir}
	msgs := []*queue.Message{
		{From: "billing@example.com", User: "billing-app", MessageID: "<1@example.com>",
			Received:   time.Now().Add(-2 * time.Hour),
			Recipients: []queue.Recipient{{Addr: "a@example.net"}, {Addr: "b@example.net"}, {Addr: "c@example.org"}}},
		{From: "", DSN: true, Received: time.Now().Add(-time.Hour),
			Recipients: []queue.Recipient{{Addr: "billing@example.com"}}},
		{From: "cron@example.com", Recipients: []queue.Recipient{{Addr: "ops@example.net"}}},
	}
	for _, m := range msgs {
		if err := store.Put(context.Background(), m, []byte("Subject: test\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		s.ids = append(s.ids, m.ID)
	}
	if err := store.Hold(s.ids[1]); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(&metrics.API{Queue: store, Token: token, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(srv.Close)
	s.url = srv.URL
	s.writeConfig(t, "")
	return s
}

func (s *adminServer) configPath() string { return filepath.Join(s.dir, "config.toml") }

func (s *adminServer) writeConfig(t *testing.T, text string) {
	t.Helper()
	if err := os.WriteFile(s.configPath(), []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// queueCmd runs `smarthost queue -config <s's config> -server <s> args…`.
func (s *adminServer) queueCmd(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	return runCmd(t, append([]string{"queue", "-config", s.configPath(), "-server", s.url}, args...)...)
}

// mustQueue runs a queue command that must succeed and returns its output.
func (s *adminServer) mustQueue(t *testing.T, args ...string) string {
	t.Helper()
	code, stdout, stderr := s.queueCmd(t, args...)
	if code != 0 {
		t.Fatalf("queue %v: exit %d\nstdout:\n%s\nstderr:\n%s", args, code, stdout, stderr)
	}
	if stderr != "" {
		t.Errorf("queue %v: stderr %q", args, stderr)
	}
	return stdout
}

func (s *adminServer) get(t *testing.T, id string) *queue.Entry {
	t.Helper()
	m, err := s.store.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestQueueList(t *testing.T) {
	s := newAdminServer(t, "")
	out := s.mustQueue(t, "list")
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != 5 {
		t.Fatalf("want a header, 3 rows and a total:\n%s", out)
	}
	if !regexp.MustCompile(`^ID +AGE +FROM +RCPTS +ATTEMPTS +NEXT +LAST REPLY +FLAGS$`).MatchString(lines[0]) {
		t.Errorf("header = %q", lines[0])
	}
	rows := []*regexp.Regexp{
		regexp.MustCompile(`^` + s.ids[0] + ` +2h0m +billing@example\.com +3: 3 pending +0 +now +- +-$`),
		regexp.MustCompile(`^` + s.ids[1] + ` +1h0m +<> +billing@example\.com:pending +0 +held +- +held,dsn$`),
		regexp.MustCompile(`^` + s.ids[2] + ` +\d+s +cron@example\.com +ops@example\.net:pending +0 +now +- +-$`),
	}
	for i, re := range rows {
		if !re.MatchString(lines[i+1]) {
			t.Errorf("row %d = %q, want %s", i, lines[i+1], re)
		}
	}
	if lines[4] != "3 messages (1 held)" {
		t.Errorf("total = %q", lines[4])
	}
}

func TestQueueListEmpty(t *testing.T) {
	s := newAdminServer(t, "")
	for _, id := range s.ids {
		if err := s.store.Delete(id); err != nil {
			t.Fatal(err)
		}
	}
	if out := s.mustQueue(t, "list"); out != "queue is empty\n" {
		t.Errorf("out = %q", out)
	}
	if out := s.mustQueue(t, "-json", "list"); out != "[]\n" {
		t.Errorf("-json out = %q", out)
	}
}

func TestQueueListJSON(t *testing.T) {
	s := newAdminServer(t, "")
	// -json may come before or after the command.
	for _, args := range [][]string{{"-json", "list"}, {"list", "-json"}} {
		var got []map[string]any
		out := s.mustQueue(t, args...)
		if err := json.Unmarshal([]byte(out), &got); err != nil {
			t.Fatalf("%v: not JSON: %v\n%s", args, err, out)
		}
		if len(got) != 3 {
			t.Fatalf("%v: %d messages", args, len(got))
		}
		for i, m := range got {
			if m["id"] != s.ids[i] {
				t.Errorf("%v: [%d].id = %v, want %s", args, i, m["id"], s.ids[i])
			}
		}
		if got[1]["held"] != true || got[1]["from"] != "" || got[0]["age"].(float64) < 7200 {
			t.Errorf("%v: fields = %v", args, got)
		}
	}
}

func TestQueueShow(t *testing.T) {
	s := newAdminServer(t, "")
	out := s.mustQueue(t, "show", s.ids[0])
	for _, re := range []string{
		`(?m)^ID: +` + s.ids[0] + `$`,
		`(?m)^Received: +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ \(2h0m ago\)$`,
		`(?m)^From: +billing@example\.com$`,
		`(?m)^User: +billing-app$`,
		`(?m)^Message-ID: +<1@example\.com>$`,
		`(?m)^Size: +\d+ bytes$`,
		`(?m)^Attempts: +0$`,
		`(?m)^Next attempt: +.* \(now\)$`,
		`(?m)^Flags: +-$`,
		`(?m)^Recipients:\n  a@example\.net +pending\n  b@example\.net +pending\n  c@example\.org +pending\n`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("show output does not match %s:\n%s", re, out)
		}
	}

	out = s.mustQueue(t, "show", s.ids[1])
	if !regexp.MustCompile(`(?m)^From: +<>$`).MatchString(out) || !regexp.MustCompile(`(?m)^Flags: +held, ?dsn$|^Flags: +held,dsn$`).MatchString(out) {
		t.Errorf("show of the held DSN:\n%s", out)
	}

	var got map[string]any
	if err := json.Unmarshal([]byte(s.mustQueue(t, "-json", "show", s.ids[0])), &got); err != nil {
		t.Fatal(err)
	}
	if got["id"] != s.ids[0] || len(got["recipients"].([]any)) != 3 {
		t.Errorf("-json show = %v", got)
	}
}

func TestQueueActions(t *testing.T) {
	s := newAdminServer(t, "")
	id := s.ids[2]

	if out := s.mustQueue(t, "hold", id); out != id+": held\n" {
		t.Errorf("hold: %q", out)
	}
	if !s.get(t, id).Held {
		t.Error("not held after hold")
	}
	code, _, stderr := s.queueCmd(t, "retry", id)
	if code != 1 || !strings.Contains(stderr, "is held; release it first") {
		t.Errorf("retry of a held message: exit %d, stderr %q", code, stderr)
	}
	if out := s.mustQueue(t, "release", id); out != id+": released\n" {
		t.Errorf("release: %q", out)
	}
	if s.get(t, id).Held {
		t.Error("held after release")
	}
	if out := s.mustQueue(t, "retry", id); out != id+": due now\n" {
		t.Errorf("retry: %q", out)
	}
	// Two messages are not held.
	if out := s.mustQueue(t, "flush"); out != "flush: 2 messages due now\n" {
		t.Errorf("flush: %q", out)
	}
	if out := s.mustQueue(t, "delete", id); out != id+": deleted\n" {
		t.Errorf("delete: %q", out)
	}
	if _, err := s.store.Get(id); err == nil {
		t.Error("message still queued after delete")
	}

	var res metrics.ActionResult
	if err := json.Unmarshal([]byte(s.mustQueue(t, "-json", "hold", s.ids[0])), &res); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res, metrics.ActionResult{Action: "hold", ID: s.ids[0], Messages: 1}) {
		t.Errorf("-json hold = %+v", res)
	}
	res = metrics.ActionResult{}
	if err := json.Unmarshal([]byte(s.mustQueue(t, "-json", "flush")), &res); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(res, metrics.ActionResult{Action: "flush", Messages: 0}) {
		t.Errorf("-json flush = %+v (both remaining messages are held)", res)
	}

	for _, cmd := range []string{"show", "retry", "hold", "release", "delete"} {
		code, stdout, stderr := s.queueCmd(t, cmd, id)
		if code != 1 || stdout != "" || stderr != "smarthost queue: no queued message "+id+" (HTTP 404)\n" {
			t.Errorf("%s of a deleted message: exit %d, stdout %q, stderr %q", cmd, code, stdout, stderr)
		}
	}
}

// TestQueueBulk drives the filters of retry, hold, release and delete
// against a real store behind the API, and checks what each changed.
func TestQueueBulk(t *testing.T) {
	s := newAdminServer(t, "")
	held := func() []bool {
		var out []bool
		for _, id := range s.ids {
			m, err := s.store.Get(id)
			if err != nil {
				out = append(out, false)
				continue
			}
			out = append(out, m.Held)
		}
		return out
	}

	if out := s.mustQueue(t, "hold", "-dry-run", "-from", "*@example.com"); out != "would hold 2 messages:\n"+s.ids[0]+"\n"+s.ids[2]+"\n" {
		t.Errorf("hold -dry-run: %q", out)
	}
	if out := s.mustQueue(t, "delete", "-dry-run", "-to", "nobody@example.com"); out != "would delete 0 messages\n" {
		t.Errorf("delete -dry-run of nothing: %q", out)
	}
	if h := held(); !slices.Equal(h, []bool{false, true, false}) {
		t.Errorf("dry runs changed holds: %v", h)
	}
	if out := s.mustQueue(t, "release", "-to", "@example.net"); out != "released 0 messages\nskipped 2: not held\n" {
		t.Errorf("release -to: %q", out)
	}
	if out := s.mustQueue(t, "hold", "-from", "cron@example.com"); out != "held 1 message\n" {
		t.Errorf("hold -from: %q", out)
	}
	if h := held(); !slices.Equal(h, []bool{false, true, true}) {
		t.Errorf("after hold -from: %v", h)
	}
	if out := s.mustQueue(t, "retry", "-all"); out != "retried 1 message\nskipped 2: held\n" {
		t.Errorf("retry -all: %q", out)
	}

	var res metrics.ActionResult
	if err := json.Unmarshal([]byte(s.mustQueue(t, "-json", "release", "-all", "-dry-run")), &res); err != nil {
		t.Fatal(err)
	}
	want := metrics.ActionResult{Action: "release", Messages: 2, IDs: []string{s.ids[1], s.ids[2]}, DryRun: true,
		Skipped: 1, SkippedBecause: map[string]int{"not held": 1}}
	if !reflect.DeepEqual(res, want) {
		t.Errorf("-json release -all -dry-run = %+v, want %+v", res, want)
	}

	if out := s.mustQueue(t, "delete", "-user", "billing-app"); out != "deleted 1 message\n" {
		t.Errorf("delete -user: %q", out)
	}
	if _, err := s.store.Get(s.ids[0]); err == nil {
		t.Error("the billing-app message is still queued")
	}
	if n, err := s.store.Len(); err != nil || n != 2 {
		t.Errorf("%d messages left, want 2 (%v)", n, err)
	}
}

func TestPrintBulk(t *testing.T) {
	tests := []struct {
		r    metrics.ActionResult
		want string
	}{
		{metrics.ActionResult{Action: "hold", Messages: 3, IDs: []string{"a", "b", "c"}}, "held 3 messages\n"},
		{metrics.ActionResult{Action: "retry", Messages: 0, IDs: []string{}, Skipped: 3, SkippedBecause: map[string]int{"held": 2, "gone": 1}},
			"retried 0 messages\nskipped 3: 1 gone, 2 held\n"},
		{metrics.ActionResult{Action: "delete", Messages: 1, IDs: []string{"a\x1b[2J"}, DryRun: true, Skipped: 1, SkippedBecause: map[string]int{"unreadable": 1}},
			"would delete 1 message:\n\"a\\x1b[2J\"\nwould skip 1: unreadable\n"},
	}
	for _, tt := range tests {
		var b strings.Builder
		printBulk(&b, tt.r)
		if b.String() != tt.want {
			t.Errorf("%+v:\n%q, want\n%q", tt.r, b.String(), tt.want)
		}
	}
}

func TestQueueToken(t *testing.T) {
	s := newAdminServer(t, "the-token")

	code, stdout, stderr := s.queueCmd(t, "list")
	if code != 1 || stdout != "" || stderr != "smarthost queue: unauthorized: set $SMARTHOST_ADMIN_TOKEN to the server's admin token\n" {
		t.Errorf("no token: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "wrong")
	code, _, stderr = s.queueCmd(t, "flush")
	if code != 1 || !strings.Contains(stderr, "unauthorized: the server refused the token in $SMARTHOST_ADMIN_TOKEN") {
		t.Errorf("wrong token: exit %d, stderr %q", code, stderr)
	}
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "the-token")
	if out := s.mustQueue(t, "list"); !strings.Contains(out, s.ids[0]) {
		t.Errorf("with the token: %q", out)
	}

	// The configuration names another variable: that one is used, and
	// SMARTHOST_ADMIN_TOKEN no longer is.
	s.writeConfig(t, "[http]\nadmin_token_env = \"RELAY_API_TOKEN\"\n")
	t.Setenv("RELAY_API_TOKEN", "")
	code, _, stderr = s.queueCmd(t, "list")
	if code != 1 || !strings.Contains(stderr, "unauthorized: set $RELAY_API_TOKEN") {
		t.Errorf("token variable from the config: exit %d, stderr %q", code, stderr)
	}
	t.Setenv("RELAY_API_TOKEN", "the-token")
	s.mustQueue(t, "list")
}

// TestQueueServerFromConfig finds the server through the configuration's
// [http] address, reading that table alone: the rest of the file may need
// secrets that the administrator's shell does not have.
func TestQueueServerFromConfig(t *testing.T) {
	s := newAdminServer(t, "")
	addr := strings.TrimPrefix(s.url, "http://")
	s.writeConfig(t, `
hostname = "relay.example.com"

[[upstream]]
name = "gmail"
address = "smtp.gmail.com:465"
tls = "implicit"
username = "relay@example.com"
password_env = "SMARTHOST_TEST_UNSET_VARIABLE"

[http]
address = "`+addr+`"
`)
	code, stdout, stderr := runCmd(t, "queue", "-config", s.configPath(), "list")
	if code != 0 || !strings.Contains(stdout, s.ids[0]) {
		t.Errorf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	// SMARTHOST_CONFIG is the default -config, as for serve.
	t.Setenv("SMARTHOST_CONFIG", s.configPath())
	code, stdout, stderr = runCmd(t, "queue", "list")
	if code != 0 || !strings.Contains(stdout, s.ids[0]) {
		t.Errorf("with $SMARTHOST_CONFIG: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}

	s.writeConfig(t, "[http]\naddress = 9090\n")
	code, _, stderr = runCmd(t, "queue", "-config", s.configPath(), "list")
	if code != 1 || !strings.Contains(stderr, "[http]") {
		t.Errorf("bad [http] address: exit %d, stderr %q", code, stderr)
	}
}

func TestQueueClientDefaults(t *testing.T) {
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "tok")
	missing := filepath.Join(t.TempDir(), "no-such-config.toml")
	c, err := newQueueClient("", missing)
	if err != nil {
		t.Fatal(err)
	}
	if c.base != "http://127.0.0.1:9090" || c.token != "tok" || c.tokenEnv != "SMARTHOST_ADMIN_TOKEN" {
		t.Errorf("without a config: base %q, token %q from %s", c.base, c.token, c.tokenEnv)
	}

	dir := t.TempDir()
	if _, err := newQueueClient("", dir); err == nil || !strings.Contains(err.Error(), "read config") {
		t.Errorf("config path is a directory: err = %v", err)
	}
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte("[http\n"), 0o644)
	if _, err := newQueueClient("", bad); err == nil {
		t.Error("a config that is not TOML was accepted")
	}
}

func TestHTTPAddressURL(t *testing.T) {
	tests := []struct{ addr, want string }{
		{"127.0.0.1:9090", "http://127.0.0.1:9090"},
		{":9090", "http://127.0.0.1:9090"},
		{"0.0.0.0:9091", "http://127.0.0.1:9091"},
		{"[::]:9090", "http://[::1]:9090"},
		{"[::1]:9090", "http://[::1]:9090"},
		{"relay.internal:80", "http://relay.internal:80"},
		{"9090", ""},
	}
	for _, tt := range tests {
		got, err := httpAddressURL(tt.addr)
		if (err != nil) != (tt.want == "") || got != tt.want {
			t.Errorf("httpAddressURL(%q) = %q, %v; want %q", tt.addr, got, err, tt.want)
		}
	}
}

func TestParseServerURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"http://127.0.0.1:9090", "http://127.0.0.1:9090"},
		{"http://127.0.0.1:9090/", "http://127.0.0.1:9090"},
		{"127.0.0.1:9090", "http://127.0.0.1:9090"},
		{"https://relay.example.com:8443", "https://relay.example.com:8443"},
		{"ftp://relay.example.com", ""},
		{"http://", ""},
	}
	for _, tt := range tests {
		got, err := parseServerURL(tt.in)
		if (err != nil) != (tt.want == "") || got != tt.want {
			t.Errorf("parseServerURL(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestQueueUsage(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "none.toml")
	tests := [][]string{
		{},
		{"bogus"},
		{"show"},
		{"retry"},
		{"hold", "a", "b"},
		{"list", "extra"},
		{"flush", "now"},
		{"-nosuchflag", "list"},
		{"hold", "-all", "0000000000000001"},
		{"delete", "-from", "a@example.com", "0000000000000001"},
		{"hold", "-all", "-from", "a@example.com"},
		{"hold", "-dry-run", "0000000000000001"},
		{"release", "-dry-run"},
		{"list", "-all"},
		{"flush", "-user", "u"},
		{"cat", "-to", "a@example.com"},
		{"show", "-all"},
		{"hold", "-headers", "-all"},
		{"hold", "-from", "example.com"},
		{"hold", "-to", "a@"},
		{"hold", "-user", ""},
	}
	for _, args := range tests {
		code, stdout, stderr := runCmd(t, append([]string{"queue", "-config", cfg}, args...)...)
		if code != 2 || stdout != "" || stderr == "" {
			t.Errorf("queue %v: exit %d, stdout %q, stderr %q; want exit 2 with a message", args, code, stdout, stderr)
		}
	}
}

func TestQueueServerDown(t *testing.T) {
	// A port that was just free: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	code, _, stderr := runCmd(t, "queue", "-config", filepath.Join(t.TempDir(), "none.toml"), "-server", addr, "list")
	if code != 1 || !strings.Contains(stderr, "cannot reach smarthost at http://"+addr) {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

func TestShortDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{-time.Second, "0s"},
		{0, "0s"},
		{42*time.Second + 900*time.Millisecond, "42s"},
		{4*time.Minute + 12*time.Second, "4m12s"},
		{2*time.Hour + 5*time.Minute + 59*time.Second, "2h5m"},
		{3*24*time.Hour + 4*time.Hour + 30*time.Minute, "3d4h"},
	}
	for _, tt := range tests {
		if got := shortDuration(tt.d); got != tt.want {
			t.Errorf("shortDuration(%v) = %q, want %q", tt.d, got, tt.want)
		}
	}
}

func TestRcptSummary(t *testing.T) {
	r := func(addr, state string) metrics.RecipientInfo { return metrics.RecipientInfo{Addr: addr, State: state} }
	tests := []struct {
		rs   []metrics.RecipientInfo
		want string
	}{
		{[]metrics.RecipientInfo{r("a@x.org", "pending")}, "a@x.org:pending"},
		{[]metrics.RecipientInfo{r("a@x.org", "delivered"), r("b@x.org", "failed")}, "a@x.org:delivered b@x.org:failed"},
		{[]metrics.RecipientInfo{r("a@x", "failed"), r("b@x", "pending"), r("c@x", "delivered"), r("d@x", "pending")}, "4: 2 pending, 1 delivered, 1 failed"},
	}
	for _, tt := range tests {
		if got := rcptSummary(tt.rs); got != tt.want {
			t.Errorf("rcptSummary = %q, want %q", got, tt.want)
		}
	}
}

func TestOneLine(t *testing.T) {
	if got := oneLine("550-5.1.1 No such\r\n550 5.1.1 user", 0); got != "550-5.1.1 No such 550 5.1.1 user" {
		t.Errorf("folded = %q", got)
	}
	if got := oneLine("abcdefghij", 5); got != "abcd…" {
		t.Errorf("shortened = %q", got)
	}
	if got := oneLine("", 5); got != "-" {
		t.Errorf("empty = %q", got)
	}
}

// TestQueueLoopbackNamesWithoutToken: without a token the API answers
// only requests to a loopback address or localhost; the command reaches
// it by each of those names, from -server and from [http] address.
func TestQueueLoopbackNamesWithoutToken(t *testing.T) {
	s := newAdminServer(t, "")
	port := strings.TrimPrefix(s.url, "http://127.0.0.1:")
	servers := []string{"http://127.0.0.1:" + port, "http://localhost:" + port, "127.0.0.1:" + port, "localhost:" + port}
	addrs := []string{"127.0.0.1:" + port, "localhost:" + port, "0.0.0.0:" + port, ":" + port}
	if ln, err := net.Listen("tcp", "[::1]:0"); err == nil {
		v6 := httptest.NewUnstartedServer(&metrics.API{Queue: s.store, Logger: slog.New(slog.DiscardHandler)})
		v6.Listener.Close()
		v6.Listener = ln
		v6.Start()
		t.Cleanup(v6.Close)
		_, port6, _ := net.SplitHostPort(ln.Addr().String())
		servers = append(servers, "http://[::1]:"+port6)
		addrs = append(addrs, "[::1]:"+port6, "[::]:"+port6)
	} else {
		t.Logf("no IPv6 loopback: %v", err)
	}
	for _, server := range servers {
		code, stdout, stderr := runCmd(t, "queue", "-config", s.configPath(), "-server", server, "list")
		if code != 0 || !strings.Contains(stdout, s.ids[0]) {
			t.Errorf("-server %s: exit %d\nstdout:\n%s\nstderr:\n%s", server, code, stdout, stderr)
		}
	}
	for _, addr := range addrs {
		s.writeConfig(t, "[http]\naddress = \""+addr+"\"\n")
		code, stdout, stderr := runCmd(t, "queue", "-config", s.configPath(), "hold", s.ids[2])
		if code != 0 || stdout != s.ids[2]+": held\n" {
			t.Errorf("[http] address %s: exit %d\nstdout:\n%s\nstderr:\n%s", addr, code, stdout, stderr)
		}
	}
}

// TestQueueShowEscapesStoredFields: a message whose envelope, user,
// Message-ID and upstream reply carry terminal escape sequences, C1
// controls, a bidi override and invalid UTF-8 is delivered (and refused)
// through a real upstream and stored in a real queue; `queue show` and
// `queue list` print every such field escaped, and -json as JSON.
func TestQueueShowEscapesStoredFields(t *testing.T) {
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "")
	dir := t.TempDir()
	store, err := queue.Open(filepath.Join(dir, "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	up := smtptest.Start(t, smtptest.Options{GreetReply: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
		Message: "go away \x1b[2J\x1b]0;owned\x07 \u009b31m \u202eevil \xff"}})
	d := upstream.NewDeliverer()
	d.Logger = slog.New(slog.DiscardHandler)
	d.SetConfig(upstream.Config{
		Upstreams: []upstream.Upstream{{Name: "up", Address: up.Addr(), TLS: mailproto.TLSNone}},
		Routes:    []upstream.Route{{FromDomain: "*", Upstreams: []string{"up"}}},
	})
	t.Cleanup(func() { d.Close() })
	sched := queue.NewScheduler(store, d.Deliver)
	sched.Workers, sched.RetryMin, sched.RetryMax = 1, time.Hour, time.Hour
	sched.MaxAge, sched.Logger = 24*time.Hour, slog.New(slog.DiscardHandler)
	go sched.Run()
	t.Cleanup(func() { sched.Close() })

	m := &queue.Message{
		From: "ceo\x1b[2J@example.com", User: "app\x1b]0;title\x07", MessageID: "<\x1b[31mred\u009b@example.com>",
		Recipients: []queue.Recipient{{Addr: "a\u202e@example.net"}, {Addr: "b\xff@example.net"}},
	}
	if err := store.Put(context.Background(), m, []byte("Subject: hi\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := store.Get(m.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Attempts > 0 && !got.InFlight && got.Recipients[0].Reply != "" {
			if !strings.Contains(got.Recipients[0].Reply, "\x1b[2J") {
				t.Fatalf("stored reply %q does not carry the upstream's escapes", got.Recipients[0].Reply)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no attempt stored: %+v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}

	srv := httptest.NewServer(&metrics.API{Queue: store, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(srv.Close)
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, nil, 0o644)
	cmd := func(args ...string) string {
		t.Helper()
		code, stdout, stderr := runCmd(t, append([]string{"queue", "-config", config, "-server", srv.URL}, args...)...)
		if code != 0 || stderr != "" {
			t.Fatalf("queue %v: exit %d, stderr %q", args, code, stderr)
		}
		return stdout
	}
	for _, args := range [][]string{{"show", m.ID}, {"list"}} {
		out := cmd(args...)
		if !utf8.ValidString(out) {
			t.Errorf("queue %v prints invalid UTF-8:\n%q", args, out)
		}
		for _, r := range out {
			if r != '\n' && !strconv.IsPrint(r) {
				t.Errorf("queue %v prints %U:\n%q", args, r, out)
				break
			}
		}
		for _, want := range []string{`"ceo\x1b[2J@example.com"`, `\x1b[2J\x1b]0;owned\a \u009b31m \u202eevil \ufffd"`, `"b\ufffd@example.net"`} {
			if !strings.Contains(out, want) {
				t.Errorf("queue %v does not show %s:\n%s", args, want, out)
			}
		}
	}
	out := cmd("show", m.ID)
	for _, want := range []string{
		`User: +"app\\x1b]0;title\\a"` + "\n",
		`Message-ID: +"<\\x1b\[31mred\\u009b@example\.com>"` + "\n",
		`"a\\u202e@example\.net" +pending +via up: "554 5\.7\.1 go away`,
		`"b\\ufffd@example\.net" +pending`,
		`Size: +\d+ bytes`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("show does not match %s:\n%s", want, out)
		}
	}

	var got metrics.MessageInfo
	if err := json.Unmarshal([]byte(cmd("-json", "show", m.ID)), &got); err != nil {
		t.Fatal(err)
	}
	if got.From != m.From || got.User != m.User || got.MessageID != m.MessageID || got.Recipients[0].Addr != m.Recipients[0].Addr {
		t.Errorf("-json show does not round-trip the fields: %+v", got)
	}
}

func TestPrintable(t *testing.T) {
	for in, want := range map[string]string{
		"billing@example.com":    "billing@example.com",
		"почта@пример.рф":        "почта@пример.рф",
		"250 2.0.0 OK: queued":   "250 2.0.0 OK: queued",
		"":                       "",
		"\x1b[2J":                `"\x1b[2J"`,
		"a\tb":                   `"a\tb"`,
		"bell\x07":               `"bell\a"`,
		"csi\u009b1m":            `"csi\u009b1m"`,
		"del\x7f":                `"del\x7f"`,
		"rtl\u202eexe.txt":       `"rtl\u202eexe.txt"`,
		"zero\u200bwidth":        `"zero\u200bwidth"`,
		"bad\xffbyte":            `"bad\xffbyte"`,
		"lost\ufffd":             `"lost\ufffd"`,
		`back\slash`:             `"back\\slash"`,
		`"quoted\x1b" as text`:   `"\"quoted\\x1b\" as text"`,
		`"only quotes" are fine`: `"only quotes" are fine`,
	} {
		if got := printable(in); got != want {
			t.Errorf("printable(%q) = %s, want %s", in, got, want)
		}
	}
}

// TestQueueListUnreadable: one record that does not decode, in a real
// queue file served over HTTP, neither fails `queue list` (GET /api/queue
// answered 500) nor hides the others: they are listed, it shows by ID
// with the reason, in the JSON too, and `queue delete` removes it.
func TestQueueListUnreadable(t *testing.T) {
	t.Setenv("SMARTHOST_ADMIN_TOKEN", "")
	dir := t.TempDir()
	path := filepath.Join(dir, "queue.db")
	store, err := queue.Open(path, queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, rcpt := range []string{"a@example.net", "b@example.net"} {
		m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: rcpt}}}
		if err := store.Put(context.Background(), m, []byte("Subject: x\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	// A record damaged in its content: the file itself is sound.
	const bad = "00000000000000aa"
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket([]byte("msgs")).Put([]byte(bad), []byte("\x01{\"id\": 7")); err != nil {
			return err
		}
		return tx.Bucket([]byte("bodies")).Put([]byte(bad), []byte("x"))
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	store, err = queue.Open(path, queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	srv := httptest.NewServer(&metrics.API{Queue: store, Logger: slog.New(slog.DiscardHandler)})
	t.Cleanup(srv.Close)
	s := &adminServer{store: store, url: srv.URL, dir: dir}
	s.writeConfig(t, "")

	out := s.mustQueue(t, "list")
	for _, id := range ids {
		if !strings.Contains(out, id) {
			t.Errorf("list lacks %s:\n%s", id, out)
		}
	}
	if !regexp.MustCompile(`(?m)^`+bad+` +- +- +- +- +- +decode record: .* +unreadable$`).MatchString(out) ||
		!strings.Contains(out, "3 messages (1 unreadable)") {
		t.Errorf("list does not show the unreadable record:\n%s", out)
	}
	var got []metrics.MessageInfo
	if err := json.Unmarshal([]byte(s.mustQueue(t, "-json", "list")), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[2].ID != bad || !strings.Contains(got[2].Error, "decode record") || got[0].Error != "" || got[1].Error != "" {
		t.Errorf("-json list: %+v", got)
	}
	s.mustQueue(t, "delete", bad)
	if out := s.mustQueue(t, "list"); strings.Contains(out, bad) || !strings.Contains(out, "2 messages") {
		t.Errorf("after delete:\n%s", out)
	}
}

// salvageFixture writes a closed queue file of n messages, the last with
// a spool file of 200 KB, and returns its path and their IDs.
func salvageFixture(t *testing.T, n int) (string, []string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "queue.db")
	store, err := queue.Open(path, queue.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range n {
		m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: fmt.Sprintf("r%d@example.net", i)}}}
		body := []byte(fmt.Sprintf("Subject: %d\r\n\r\n%s\r\n", i, strings.Repeat("body ", 400)))
		if i == n-1 {
			sp, err := store.NewSpool()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := sp.Write(bytes.Repeat([]byte("spooled line\r\n"), 200<<10/14)); err != nil {
				t.Fatal(err)
			}
			if err := store.PutSpooled(context.Background(), m, body, sp); err != nil {
				t.Fatal(err)
			}
		} else if err := store.Put(context.Background(), m, body); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	return path, ids
}

func sha(t *testing.T, path string) [32]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// TestQueueSalvage runs `smarthost queue salvage` on a sound file (all
// saved, exit 0), on one cut to half its pages (the damage and what was
// lost printed, exit 1, the new file written all the same, the old one
// unchanged), and on the wrong arguments (exit 2) or a file in use (1).
func TestQueueSalvage(t *testing.T) {
	path, ids := salvageFixture(t, 60)
	out := filepath.Join(t.TempDir(), "copy.db")
	code, stdout, stderr := runCmd(t, "queue", "salvage", "-path", path, "-out", out)
	if code != 0 || stderr != "" || !strings.Contains(stdout, "saved 60 messages to "+out+" (1 with a spool file)\n") {
		t.Fatalf("sound file: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	copied, err := queue.Open(out, queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	list, _, err := copied.List()
	if err != nil || len(list) != 60 {
		t.Fatalf("copy holds %d messages, %v", len(list), err)
	}
	if body, err := copied.Body(ids[59]); err != nil || !bytes.HasSuffix(body, []byte("spooled line\r\n")) || len(body) < 200<<10 {
		t.Errorf("the spooled message's body: %d bytes, %v", len(body), err)
	}
	copied.Close()

	for _, tt := range []struct {
		name string
		args []string
		code int
		err  string
	}{
		{"no -out", []string{"-path", path}, 2, "both required"},
		{"same file", []string{"-path", path, "-out", path}, 2, "must be a new file"},
		{"existing -out", []string{"-path", path, "-out", out}, 2, out + " exists"},
		{"extra argument", []string{"-path", path, "-out", out + "2", "x"}, 2, "unexpected argument"},
		{"no such file", []string{"-path", path + ".none", "-out", out + "3"}, 1, "no such file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCmd(t, append([]string{"queue", "salvage"}, tt.args...)...)
			if code != tt.code || !strings.Contains(stderr, tt.err) {
				t.Errorf("exit %d, stderr %q; want %d and %q", code, stderr, tt.code, tt.err)
			}
		})
	}
	if _, err := os.Stat(out + "3"); err == nil {
		t.Error("a failed salvage wrote -out")
	}

	// In use by a running relay.
	store, err := queue.Open(path, queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runCmd(t, "queue", "salvage", "-path", path, "-out", out+"4")
	store.Close()
	if code != 1 || !strings.Contains(stderr, "in use by a running relay") {
		t.Errorf("file in use: exit %d, %q", code, stderr)
	}
	if _, err := os.Stat(out + "4"); err == nil {
		t.Error("salvage of a file in use wrote -out")
	}

	// Cut to half its pages in use (bbolt grows the file ahead of them).
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var used int64
	db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil })
	db.Close()
	if err := os.Truncate(path, used/2); err != nil {
		t.Fatal(err)
	}
	hash := sha(t, path)
	out5 := filepath.Join(t.TempDir(), "salvaged.db")
	code, stdout, stderr = runCmd(t, "queue", "salvage", "-path", path, "-out", out5)
	t.Logf("cut file:\n%s", stdout)
	if code != 1 || stderr != "" || !strings.HasPrefix(stdout, "damage: the file is ") ||
		!regexp.MustCompile(`(?m)^saved \d+ messages? to `+regexp.QuoteMeta(out5)).MatchString(stdout) ||
		!strings.Contains(stdout, "keep "+path+": salvage did not change it") {
		t.Errorf("cut file: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if sha(t, path) != hash {
		t.Error("salvage changed the damaged file")
	}
	salvaged, err := queue.Open(out5, queue.Options{})
	if err != nil {
		t.Fatalf("the new file: %v", err)
	}
	salvaged.Close()
}

// TestQueueImport runs `smarthost queue import` from a stopped relay's
// queue file into the configured queue: every message with its state
// (held kept), the source unchanged; a second run copies nothing; a
// configured queue in use, or the source itself as the target, refused.
func TestQueueImport(t *testing.T) {
	from, ids := salvageFixture(t, 40)
	src, err := queue.Open(from, queue.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Hold(ids[7]); err != nil {
		t.Fatal(err)
	}
	want, _, err := src.List()
	if err != nil {
		t.Fatal(err)
	}
	src.Close()
	before := sha(t, from)

	t.Setenv("SMARTHOST_TEST_ADMIN", "token")
	cfgPath := serveConfig(t, "127.0.0.1:1", "")
	code, stdout, stderr := runCmd(t, "queue", "import", "-from", from, "-config", cfgPath)
	if code != 0 || stderr != "" || !strings.Contains(stdout, "copied 40 messages from "+from+" (1 with a spool file, 1 held)\n") {
		t.Fatalf("first import: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if sha(t, from) != before {
		t.Error("import changed the source file")
	}
	target := filepath.Join(filepath.Dir(cfgPath), "queue.db")
	dst, err := queue.Open(target, queue.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := dst.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("the queue holds %d messages, want %d", len(got), len(want))
	}
	for i := range want {
		w, g := want[i].Message, got[i].Message
		if g.ID != w.ID || g.Held != w.Held || !reflect.DeepEqual(g.Recipients, w.Recipients) || g.Attempts != w.Attempts {
			t.Errorf("message %d: got %+v, want %+v", i, g, w)
		}
	}
	if body, err := dst.Body(ids[39]); err != nil || !bytes.HasSuffix(body, []byte("spooled line\r\n")) || len(body) < 200<<10 {
		t.Errorf("the spooled message's body: %d bytes, %v", len(body), err)
	}

	// In use by a running relay: refused, nothing written.
	code, _, stderr = runCmd(t, "queue", "import", "-from", from, "-config", cfgPath)
	if code != 1 || !strings.Contains(stderr, "in use by a running relay") {
		t.Errorf("target in use: exit %d, %q", code, stderr)
	}
	dst.Close()

	code, stdout, stderr = runCmd(t, "queue", "import", "-from", from, "-config", cfgPath)
	if code != 0 || stderr != "" || !strings.Contains(stdout, "copied 0 messages from ") || !strings.Contains(stdout, "40 messages were copied before, not copied again") {
		t.Fatalf("second import: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}

	for _, tt := range []struct {
		name string
		args []string
		code int
		err  string
	}{
		{"no -from", []string{"-config", cfgPath}, 2, "-from FILE is required"},
		{"itself", []string{"-from", target, "-config", cfgPath}, 2, "is the configured queue itself"},
		{"extra argument", []string{"-from", from, "-config", cfgPath, "x"}, 2, "unexpected argument"},
		{"no such file", []string{"-from", from + ".none", "-config", cfgPath}, 1, "no such file"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCmd(t, append([]string{"queue", "import"}, tt.args...)...)
			if code != tt.code || !strings.Contains(stderr, tt.err) {
				t.Errorf("exit %d, stderr %q; want %d and %q", code, stderr, tt.code, tt.err)
			}
		})
	}
}

// TestCopyEscaped: what cat writes to a terminal shows a message's control
// characters and invalid UTF-8 escaped, line by line, and the rest as it
// is; a buffer is no terminal, so that a pipe gets the exact bytes.
func TestCopyEscaped(t *testing.T) {
	in := "Subject: \x1b]0;owned\x07 Привет\r\nX-Tab:\ta\r\n\r\nbody \xff\u202e\r\nlast line without end"
	want := "Subject: \\x1b]0;owned\\a Привет\nX-Tab:\ta\n\nbody \\xff\\u202e\nlast line without end"
	var out bytes.Buffer
	if err := copyEscaped(&out, strings.NewReader(in)); err != nil {
		t.Fatal(err)
	}
	if out.String() != want {
		t.Errorf("got  %q\nwant %q", out.String(), want)
	}
	if isTerminal(&out) {
		t.Error("a buffer taken for a terminal")
	}
	long := strings.Repeat("x", 200<<10) + "\x1b\r\n"
	out.Reset()
	if err := copyEscaped(&out, strings.NewReader(long)); err != nil || out.String() != strings.Repeat("x", 200<<10)+"\\x1b\n" {
		t.Errorf("a line longer than the buffer: %v, %d bytes", err, out.Len())
	}
}
