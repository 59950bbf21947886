package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/internal/smtptest"
)

// secretsInstance runs an instance whose upstream logs in with the
// password in the file it returns, and a function that submits a message.
func secretsInstance(t *testing.T, up *smtptest.Server, password string) (inst *instance, path, pwFile string, logs *logBuffer, send func(rcpt string)) {
	t.Helper()
	t.Setenv("SMARTHOST_TEST_ADMIN", "x")
	pwFile = filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	path = serveConfig(t, up.Addr(), "")
	text, _ := os.ReadFile(path)
	login := fmt.Sprintf("address = %q\ntls = \"none\"\nusername = \"relay\"\npassword_file = %q\n", up.Addr(), pwFile)
	edited := strings.Replace(string(text), fmt.Sprintf("address = %q\ntls = \"none\"\n", up.Addr()), login, 1)
	if err := os.WriteFile(path, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	logs = &logBuffer{}
	inst, err = start(cfg, slog.New(slog.NewJSONHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.shutdown(t.Context()) })
	send = func(rcpt string) {
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
	return inst, path, pwFile, logs, send
}

// TestReloadSecretsPasswordFile: the upstream's password changes and its
// password_file is rewritten; the next message goes through a new
// connection that logs in with the new password, and the password is
// never logged. A file missing half-way through a rotation is logged once
// and the running password kept.
func TestReloadSecretsPasswordFile(t *testing.T) {
	up := smtptest.Start(t, smtptest.Options{Username: "relay", Password: "first-Pw-7f3a"})
	inst, _, pwFile, logs, send := secretsInstance(t, up, "first-Pw-7f3a")
	send("one@example.net")
	up.WaitMessages(t, 1, 10*time.Second)

	if err := os.Remove(pwFile); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := inst.reloadSecrets(); err == nil {
			t.Fatal("a missing password_file was not reported")
		}
	}
	if n := strings.Count(logs.String(), "upstream secrets not reloaded"); n != 1 {
		t.Errorf("missing file logged %d times, want once:\n%s", n, logs.String())
	}
	if got := inst.delivery.Config().Upstreams[0].Password; got != "first-Pw-7f3a" {
		t.Errorf("running password became %q", got)
	}

	up.SetPassword("second-Pw-91c2")
	if err := os.WriteFile(pwFile, []byte("second-Pw-91c2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := inst.reloadSecrets(); err != nil {
		t.Fatal(err)
	}
	send("two@example.net")
	if got := up.WaitMessages(t, 2, 10*time.Second); got[1].To[0] != "two@example.net" {
		t.Errorf("second message %+v", got[1])
	}
	// The connection logged in with the old password is not reused.
	if n := len(up.AuthAttempts()); n != 2 {
		t.Errorf("%d logins, want 2: one per password", n)
	}
	if line := logs.find("upstream secrets reloaded"); line == nil || fmt.Sprint(line["upstreams"]) != "[up]" {
		t.Errorf("reload logged as %v\n%s", line, logs.String())
	}
	if s := logs.String(); strings.Contains(s, "Pw-") {
		t.Errorf("a password was logged:\n%s", s)
	}
}

// TestReloadSecretsSIGHUP: a reload of an unchanged configuration puts a
// rewritten password_file in effect, and so does one of a broken
// configuration, which is otherwise rejected.
func TestReloadSecretsSIGHUP(t *testing.T) {
	up := smtptest.Start(t, smtptest.Options{Username: "relay", Password: "one"})
	inst, path, pwFile, _, send := secretsInstance(t, up, "one")

	up.SetPassword("two")
	if err := os.WriteFile(pwFile, []byte("two\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := inst.reload(path); err != nil {
		t.Fatal(err)
	}
	send("one@example.net")
	up.WaitMessages(t, 1, 10*time.Second)

	text, _ := os.ReadFile(path)
	if err := os.WriteFile(path, append(text, "\nunknown_key = 1\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	up.SetPassword("three")
	if err := os.WriteFile(pwFile, []byte("three\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := inst.reload(path); err == nil {
		t.Fatal("a broken configuration was applied")
	}
	if got := inst.delivery.Config().Upstreams[0].Password; got != "three" {
		t.Errorf("after a rejected reload the password is %q, want the file's", got)
	}
	send("two@example.net")
	up.WaitMessages(t, 2, 10*time.Second)
}
