package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

func runCommand(t *testing.T, env func(string) string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut, env)
	return code, out.String(), errOut.String()
}

func TestCommandExitStatus(t *testing.T) {
	pki := testpki.New(t)
	srv := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSStartTLS, TLSConfig: pki.ServerTLS(), Username: "app", Password: "pw",
	})
	env := envWith("SMTPLOAD_PASSWORD", "pw")
	base := []string{"-addr", srv.Addr(), "-tls", "starttls", "-ca", pki.CAFile, "-user", "app",
		"-c", "3", "-n", "30", "-size", "2KB", "-from", "app@example.com", "-to", "x@example.net"}

	code, stdout, stderr := runCommand(t, env, base...)
	if code != 0 || !strings.Contains(stdout, "sent ok:            30 of 30\n") {
		t.Errorf("exit status %d, stdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}

	code, stdout, stderr = runCommand(t, env, append(base, "-json")...)
	var res jsonResult
	if err := json.Unmarshal([]byte(stdout), &res); err != nil || code != 0 || res.Sent != 30 || res.Connections != 3 {
		t.Errorf("-json: exit status %d, %+v, %v; stdout:\n%s\nstderr:\n%s", code, res, err, stdout, stderr)
	}

	srv.SetDataReply(func(_ string, _ []string, data []byte) *smtp.SMTPError {
		if seq, _ := seqOf(data); seq == 7 {
			return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Try later"}
		}
		return nil
	})
	code, stdout, _ = runCommand(t, env, base...)
	if code != 1 || !strings.Contains(stdout, "  452 4.3.1: 1  (Try later)\n") {
		t.Errorf("one refusal: exit status %d, stdout:\n%s", code, stdout)
	}

	code, stdout, stderr = runCommand(t, envWith("SMTPLOAD_PASSWORD", "bad"), base...)
	if code != 1 || !strings.Contains(stderr, "stopped: AUTH as app: SMTP error 535") || !strings.Contains(stdout, "not sent:") {
		t.Errorf("bad password: exit status %d, stdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
}

func TestCommandInsecureWarns(t *testing.T) {
	pki := testpki.New(t)
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})
	code, stdout, stderr := runCommand(t, noEnv, "-addr", srv.Addr(), "-tls", "implicit", "-insecure", "-n", "5", "-c", "1")
	if code != 0 || !strings.Contains(stderr, "warning: -insecure") {
		t.Errorf("exit status %d, stdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if got := len(srv.Messages()); got != 5 {
		t.Errorf("server received %d messages, want 5", got)
	}
}

func TestCommandInterrupted(t *testing.T) {
	srv := smtptest.Start(t, smtptest.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // ctrl-C before the first message
	var out, errOut bytes.Buffer
	code := run(ctx, []string{"-addr", srv.Addr(), "-n", "50"}, &out, &errOut, noEnv)
	if code != 1 || !strings.Contains(out.String(), "not sent:           50  (interrupted)") {
		t.Errorf("exit status %d, stdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
	}
	if srv.Connections() != 0 {
		t.Errorf("%d connections after the interrupt", srv.Connections())
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:25": true, "[::1]:25": true, "localhost:587": true,
		"relay.example.com:587": false, "192.0.2.1:25": false, "bad": false,
	} {
		if got := isLoopback(addr); got != want {
			t.Errorf("isLoopback(%s) = %v, want %v", addr, got, want)
		}
	}
}
