package main

import (
	"log/slog"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/internal/smtptest"
)

// TestReload runs an instance in process and reloads its configuration:
// a new upstream takes the next message, shutdown_timeout applies, a key
// that needs a restart is named and kept, and a broken file changes
// nothing.
func TestReload(t *testing.T) {
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	a := smtptest.Start(t, smtptest.Options{})
	b := smtptest.Start(t, smtptest.Options{})
	path := serveConfig(t, a.Addr(), "")
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	var logs logBuffer
	inst, err := start(cfg, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer inst.shutdown(t.Context())
	var outcomes []error
	inst.onReload = func(err error) { outcomes = append(outcomes, err) }

	send := func(rcpt string) {
		t.Helper()
		c, err := smtp.Dial(inst.addrs()[0])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail("app@example.com", []string{rcpt}, strings.NewReader("From: app@example.com\r\n\r\nhi\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	send("one@example.net")
	a.WaitMessages(t, 1, 10*time.Second)

	original, _ := os.ReadFile(path)
	edited := strings.Replace(string(original), a.Addr(), b.Addr(), 1)
	edited = strings.Replace(edited, "hostname = \"relay.test\"\n", "hostname = \"relay.test\"\nshutdown_timeout = \"3s\"\n", 1)
	edited += "\n[limits]\nmax_recipients = 5\n"
	if err := os.WriteFile(path, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := inst.reload(path); err != nil {
		t.Fatalf("reload: %v\n%s", err, logs.String())
	}
	if inst.delivery.Config().Upstreams[0].Address != b.Addr() {
		t.Error("the Deliverer's configuration was not replaced")
	}
	send("two@example.net")
	if got := b.WaitMessages(t, 1, 10*time.Second); got[0].To[0] != "two@example.net" {
		t.Errorf("new upstream got %+v", got)
	}
	if d := inst.shutdownTimeout(); d != 3*time.Second {
		t.Errorf("shutdown_timeout after reload = %v", d)
	}
	if inst.cfg.Limits.MaxRecipients != 100 {
		t.Errorf("max_recipients changed to %d without a restart", inst.cfg.Limits.MaxRecipients)
	}
	if line := logs.find("configuration changes that need a restart were not applied"); line == nil || !reflect.DeepEqual(line["keys"], []any{"limits"}) {
		t.Errorf("restart warning: %v\n%s", line, logs.String())
	}
	if logs.find("configuration reloaded") == nil {
		t.Errorf("no reload logged:\n%s", logs.String())
	}

	// Broken: an unknown upstream in a route, and a bad duration.
	broken := strings.Replace(edited, `upstreams = ["up"]`, `upstreams = ["nowhere"]`, 1)
	broken = strings.Replace(broken, `shutdown_timeout = "3s"`, `shutdown_timeout = "soon"`, 1)
	if err := os.WriteFile(path, []byte(broken), 0o644); err != nil {
		t.Fatal(err)
	}
	current := inst.delivery.Config()
	if err := inst.reload(path); err == nil {
		t.Fatal("a broken configuration was applied")
	}
	if !reflect.DeepEqual(inst.delivery.Config(), current) || inst.shutdownTimeout() != 3*time.Second {
		t.Error("a broken configuration changed the running one")
	}
	line := logs.find("configuration reload failed")
	problems, _ := line["problems"].([]any)
	if len(problems) != 2 || !strings.HasPrefix(problems[0].(string), "shutdown_timeout: ") ||
		!strings.HasPrefix(problems[1].(string), "route[0].upstreams[0]: ") {
		t.Errorf("failure logged as %v", line)
	}
	send("three@example.net")
	b.WaitMessages(t, 2, 10*time.Second)

	if len(outcomes) != 2 || outcomes[0] != nil || outcomes[1] == nil {
		t.Errorf("onReload got %v", outcomes)
	}
}

func TestKeepRestartValues(t *testing.T) {
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	path := serveConfig(t, "127.0.0.1:2525", "")
	old, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := config.Load(path)
	if got := keepRestartValues(cfg, old, false); got != nil {
		t.Errorf("unchanged configuration: %v", got)
	}

	cfg, _ = config.Load(path)
	cfg.Hostname = "other.test"
	cfg.Queue.Path = "/elsewhere.db"
	cfg.Queue.Workers = 3
	cfg.Listeners[0].Address = "127.0.0.1:2526"
	cfg.Limits.MaxConnections = 7
	cfg.HTTPAddress = "127.0.0.1:9999"
	cfg.HTTPMaxConnections = 3
	cfg.TLSCertFile = "/new.crt"
	cfg.ShutdownTimeout = time.Second // applies
	want := []string{"hostname", "queue.path", "queue.workers", "listen", "limits", "http.address", "http.max_connections", "tls"}
	if got := keepRestartValues(cfg, old, false); !reflect.DeepEqual(got, want) {
		t.Errorf("changed keys %v, want %v", got, want)
	}
	cfg.ShutdownTimeout = old.ShutdownTimeout
	if !reflect.DeepEqual(cfg, old) {
		t.Errorf("running values not kept:\n%+v\nwant\n%+v", cfg, old)
	}
}
