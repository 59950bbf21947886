package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// logBuffer collects a server's log while it runs.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// find returns the first JSON log line whose msg is msg, or nil.
func (b *logBuffer) find(msg string) map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	sc := bufio.NewScanner(bytes.NewReader(b.buf.Bytes()))
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) == nil && line["msg"] == msg {
			return line
		}
	}
	return nil
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// serveConfig writes a configuration for a relay on loopback: a plain
// listener for 127.0.0.0/8 without AUTH, one upstream at upstream, and
// the HTTP listener on port 0 with a bearer token in
// $SMARTHOST_TEST_ADMIN.
func serveConfig(t testing.TB, upstream, extra string) string {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "config.toml")
	text := fmt.Sprintf(`hostname = "relay.test"
log_format = "json"

[queue]
path = %q
retry_min = "1h"
retry_max = "2h"

[[listen]]
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[[upstream]]
name = "up"
address = %q
tls = "none"

[[route]]
from_domain = "*"
upstreams = ["up"]

[http]
address = "127.0.0.1:0"
admin_token_env = "SMARTHOST_TEST_ADMIN"
%s`, filepath.Join(dir, "queue.db"), upstream, extra)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestServeHTTP runs `serve` in process: the start log names the bound
// HTTP address, the probes and the token-protected API answer there,
// `smarthost queue` manages a message that the upstream defers, and
// SIGTERM stops it all.
func TestServeHTTP(t *testing.T) {
	up := smtptest.Start(t, smtptest.Options{
		RcptReply: func(string) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted, try later"}
		},
	})
	t.Setenv("SMARTHOST_TEST_ADMIN", "serve-token")
	config := serveConfig(t, up.Addr(), "")

	var logs logBuffer
	exited := make(chan int, 1)
	go func() { exited <- runServe([]string{"-config", config}, io.Discard, &logs) }()
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			syscall.Kill(os.Getpid(), syscall.SIGTERM)
			<-exited
		}
	})

	var started map[string]any
	for deadline := time.Now().Add(10 * time.Second); started == nil; {
		if started = logs.find("smarthost started"); started != nil {
			break
		}
		select {
		case code := <-exited:
			stopped = true
			t.Fatalf("serve exited with %d:\n%s", code, logs.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no start logged:\n%s", logs.String())
		}
	}
	listeners, _ := started["listeners"].([]any)
	httpAddr, _ := started["http"].(string)
	if len(listeners) != 1 || strings.HasSuffix(listeners[0].(string), ":0") ||
		!strings.HasPrefix(httpAddr, "127.0.0.1:") || strings.HasSuffix(httpAddr, ":0") {
		t.Fatalf("start line: listeners %v, http %q", started["listeners"], started["http"])
	}
	base := "http://" + httpAddr

	for _, p := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get(base + p)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("%s = %d", p, resp.StatusCode)
		}
	}
	resp, err := http.Get(base + "/api/queue")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Errorf("/api/queue without the token = %d, want 401", resp.StatusCode)
	}

	c, err := smtp.Dial(listeners[0].(string))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("app@example.com", []string{"friend@example.net"},
		strings.NewReader("From: app@example.com\r\nSubject: hi\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	c.Quit()

	// The CLI takes the token's variable from the same configuration.
	queueCmd := func(args ...string) string {
		t.Helper()
		code, stdout, stderr := runCmd(t, append([]string{"queue", "-config", config, "-server", base}, args...)...)
		if code != 0 {
			t.Fatalf("queue %v: exit %d: %s", args, code, stderr)
		}
		return stdout
	}
	var msgs []map[string]any
	for deadline := time.Now().Add(10 * time.Second); ; {
		if err := json.Unmarshal([]byte(queueCmd("-json", "list")), &msgs); err != nil {
			t.Fatal(err)
		}
		// Deferred by the upstream, with its reply, and waiting for retry_min.
		if len(msgs) == 1 && msgs[0]["attempts"] == 1.0 && msgs[0]["in_flight"] == false &&
			strings.Contains(fmt.Sprint(msgs[0]["last_reply"]), "Greylisted") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("message not deferred: %v\n%s", msgs, logs.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	id := msgs[0]["id"].(string)
	if out := queueCmd("list"); !strings.Contains(out, id) || !strings.Contains(out, "friend@example.net:pending") {
		t.Errorf("list:\n%s", out)
	}
	queueCmd("retry", id)
	for deadline := time.Now().Add(10 * time.Second); ; {
		if err := json.Unmarshal([]byte(queueCmd("-json", "list")), &msgs); err != nil {
			t.Fatal(err)
		}
		if len(msgs) == 1 && msgs[0]["attempts"] == 2.0 && msgs[0]["in_flight"] == false {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("retry did not lead to a second attempt: %v", msgs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	queueCmd("delete", id)
	if out := queueCmd("list"); out != "queue is empty\n" {
		t.Errorf("after delete: %q", out)
	}

	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case code := <-exited:
		stopped = true
		if code != 0 {
			t.Errorf("serve exited with %d:\n%s", code, logs.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop on SIGTERM")
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("HTTP listener still answers after shutdown")
	}
}

// TestStartHTTPPortInUse: a taken [http] address fails the start with a
// message naming the key, and leaves neither the queue locked nor the SMTP
// listener bound.
func TestStartHTTPPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	cfg, err := config.Load(serveConfig(t, "127.0.0.1:2525", ""))
	if err != nil {
		t.Fatal(err)
	}
	cfg.HTTPAddress = ln.Addr().String()
	inst, err := start(cfg, slog.New(slog.DiscardHandler))
	if err == nil {
		inst.shutdown(t.Context())
		t.Fatal("start succeeded with the HTTP port in use")
	}
	if msg := err.Error(); !strings.Contains(msg, "[http] address: listen tcp "+cfg.HTTPAddress) || !strings.Contains(msg, "address already in use") {
		t.Errorf("error = %q", msg)
	}
	store, err := queue.Open(cfg.Queue.Path, queue.Options{LockTimeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("queue left locked: %v", err)
	}
	store.Close()
}

// TestStartWiring checks what start hands the scheduler from [queue].
func TestStartWiring(t *testing.T) {
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	for _, tt := range []struct {
		name, queue  string
		bounce       bool
		delayWarning time.Duration
	}{
		{"bounces on by default", "", true, 0},
		{"delay warning", "delay_warning = \"30m\"\n", true, 30 * time.Minute},
		{"bounces off", "bounce = false\n", false, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := serveConfig(t, "127.0.0.1:2525", "")
			data, _ := os.ReadFile(path)
			text := strings.Replace(string(data), "retry_max = \"2h\"\n", "retry_max = \"2h\"\n"+tt.queue, 1)
			cfg, err := config.Parse([]byte(text), path)
			if err != nil {
				t.Fatal(err)
			}
			inst, err := start(cfg, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			defer inst.shutdown(t.Context())
			if (inst.sched.Bounce != nil) != tt.bounce || inst.sched.DelayWarning != tt.delayWarning {
				t.Errorf("scheduler: bounce hook set %v, delay warning %v; want %v, %v",
					inst.sched.Bounce != nil, inst.sched.DelayWarning, tt.bounce, tt.delayWarning)
			}
			if !inst.ready.Load() {
				t.Error("not ready after start")
			}
		})
	}
}

// TestNotReadyWhileQueueUnwritable: while commits to the queue file fail,
// the relay answers 452 and /readyz 503, and it turns ready again by
// itself, with no traffic, once the file can be written. The failure is
// real: a file size limit (RLIMIT_FSIZE), which binds root as it binds
// anyone, makes every write past the first two pages fail with EFBIG, as
// a full disk fails them with ENOSPC. It is the whole process's limit, so
// this test must not run in parallel with others that write files.
func TestNotReadyWhileQueueUnwritable(t *testing.T) {
	up := smtptest.Start(t, smtptest.Options{})
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	cfg, err := config.Load(serveConfig(t, up.Addr(), ""))
	if err != nil {
		t.Fatal(err)
	}
	var logs logBuffer
	inst, err := start(cfg, newLogger("json", slog.LevelInfo, &logs))
	if err != nil {
		t.Fatal(err)
	}
	defer inst.shutdown(t.Context())
	readyz := func() int {
		resp, err := http.Get("http://" + inst.httpAddr() + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	waitReady := func(want int, within time.Duration) {
		t.Helper()
		for deadline := time.Now().Add(within); readyz() != want; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("/readyz not %d within %v:\n%s", want, within, logs.String())
			}
		}
	}
	send := func(subject string) error {
		c, err := smtp.Dial(inst.addrs()[0])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.SendMail("app@example.com", []string{"friend@example.net"},
			strings.NewReader("From: app@example.com\r\nSubject: "+subject+"\r\n\r\nhello\r\n"))
	}
	waitReady(200, 5*time.Second)
	if err := send("before"); err != nil {
		t.Fatal(err)
	}
	up.WaitMessages(t, 1, 10*time.Second)

	var limit syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &limit); err != nil {
		t.Fatal(err)
	}
	restore := sync.OnceFunc(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &limit); err != nil {
			t.Errorf("restore the file size limit: %v", err)
		}
	})
	defer restore()
	low := limit
	low.Cur = 8192 // the two meta pages of the queue file, no more
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &low); err != nil {
		t.Fatal(err)
	}
	// The first may still be taken by the queue's journal, whose file is
	// small, and then stays there until the queue file can be written; the
	// commit after it fails, and from then on submissions are refused.
	var se *smtp.SMTPError
	delivered := 2
	if err := send("while failing"); err == nil {
		delivered++
	} else if !errors.As(err, &se) || se.Code != 452 {
		t.Fatalf("submission while the queue cannot be written: %v, want 452 or a message kept in the journal", err)
	}
	waitReady(503, 5*time.Second)
	if err := send("while failing, again"); !errors.As(err, &se) || se.Code != 452 {
		t.Fatalf("submission while the queue cannot be written: %v, want 452", err)
	}
	// Not ready for as long as writes fail, though the store tries one
	// every second.
	for deadline := time.Now().Add(2500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if code := readyz(); code != 503 {
			t.Fatalf("/readyz %d while writes still fail", code)
		}
	}

	restore()
	waitReady(200, 5*time.Second) // no submission in between
	if err := send("after"); err != nil {
		t.Fatalf("submission once writes work: %v", err)
	}
	up.WaitMessages(t, delivered, 10*time.Second)
	for _, msg := range []string{
		"queue: the queue file cannot be written; the relay is not ready until a write succeeds",
		"queue: the queue file can be written again",
	} {
		if logs.find(msg) == nil {
			t.Errorf("no log %q:\n%s", msg, logs.String())
		}
	}
	if line := logs.find("queue write failed"); line == nil || !strings.Contains(fmt.Sprint(line["error"]), "file too large") {
		t.Errorf("the failed write is not logged with its cause: %v", line)
	}
}

// TestParseConfigUpstreamTimeouts: the [queue] upstream timeouts reach
// the Deliverer.
func TestParseConfigUpstreamTimeouts(t *testing.T) {
	f := configtest.NewFiles(t)
	cfg := configtest.MustParse(t, f.Config(map[string]string{"queue": "[queue]\nupstream_command_timeout = \"1s\"\nupstream_data_timeout = \"90s\""}))
	d := newDeliverer(cfg, slog.New(slog.DiscardHandler), nil).Config()
	if d.CommandTimeout != time.Second || d.DataTimeout != 90*time.Second {
		t.Errorf("Deliverer timeouts %v and %v, want 1s and 1m30s", d.CommandTimeout, d.DataTimeout)
	}
}
