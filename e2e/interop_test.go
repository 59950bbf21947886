package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// lookPeer finds a third-party program the interop tests run. A missing
// peer fails the test: `make test` installs them from Debian.
func lookPeer(t *testing.T, name, pkg string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is needed for this test (make test installs Debian's %s): %v", name, pkg, err)
	}
	return path
}

// runPeer runs a client program with a deadline and fails the test with
// its output when it does not exit 0.
func runPeer(t *testing.T, cmd *exec.Cmd, stdin string) string {
	t.Helper()
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out.String())
		}
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s did not finish in 60s:\n%s", strings.Join(cmd.Args, " "), out.String())
	}
	return out.String()
}

// TestInteropClients submits through the relay with real mail clients from
// Debian, each over STARTTLS verified against the test CA and with AUTH,
// and checks that every message reaches the upstream with its envelope
// and body intact.
func TestInteropClients(t *testing.T) {
	t.Parallel()
	swaks := lookPeer(t, "swaks", "swaks")
	curl := lookPeer(t, "curl", "curl")
	msmtp := lookPeer(t, "msmtp", "msmtp")
	if out, err := exec.Command(python, "-I", "-c", "import smtplib, ssl").CombinedOutput(); err != nil {
		t.Fatalf("%s with smtplib is needed (make test installs Debian's python3): %v %s", python, err, out)
	}

	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()}))
	host, port, err := net.SplitHostPort(r.addr)
	if err != nil {
		t.Fatal(err)
	}
	const from = "app@example.com"

	message := func(name, rcpt, marker string) string {
		return "From: " + from + "\r\nTo: " + rcpt + "\r\nSubject: interop " + name + "\r\n" +
			"Message-ID: <" + name + "@interop.test>\r\n\r\nSent by " + name + ".\r\n" + marker + "\r\n"
	}
	swaksCmd := func(mech, rcpt, marker string) *exec.Cmd {
		return exec.Command(swaks, "--server", r.addr, "--helo", "swaks.test",
			"--tls", "--tls-verify", "--tls-ca-path", pki.CAFile,
			"--auth", mech, "--auth-user", userName, "--auth-password", userPassword,
			"--from", from, "--to", rcpt,
			"--header", "Subject: interop swaks "+mech, "--body", "Sent by swaks.\n"+marker+"\n")
	}
	curlCmd := func(name, rcpt, marker string, extra ...string) *exec.Cmd {
		dir := t.TempDir()
		file := filepath.Join(dir, "msg.eml")
		if err := os.WriteFile(file, []byte(message(name, rcpt, marker)), 0o600); err != nil {
			t.Fatal(err)
		}
		args := []string{"--silent", "--show-error", "--url", "smtp://" + r.addr + "/curl.test",
			"--ssl-reqd", "--cacert", pki.CAFile, "--user", userName + ":" + userPassword,
			"--mail-from", from, "--mail-rcpt", rcpt, "--upload-file", file}
		return exec.Command(curl, append(args, extra...)...)
	}

	cases := []struct {
		name string
		run  func(t *testing.T, rcpt, marker string)
	}{
		{"swaks-login", func(t *testing.T, rcpt, marker string) {
			out := runPeer(t, swaksCmd("LOGIN", rcpt, marker), "")
			if !strings.Contains(out, "<~  235 ") || !strings.Contains(out, "~> AUTH LOGIN") {
				t.Fatalf("swaks did not authenticate with LOGIN over TLS:\n%s", out)
			}
		}},
		{"swaks-plain", func(t *testing.T, rcpt, marker string) {
			out := runPeer(t, swaksCmd("PLAIN", rcpt, marker), "")
			if !strings.Contains(out, "<~  235 ") || !strings.Contains(out, "~> AUTH PLAIN") {
				t.Fatalf("swaks did not authenticate with PLAIN over TLS:\n%s", out)
			}
		}},
		{"curl-plain", func(t *testing.T, rcpt, marker string) {
			runPeer(t, curlCmd("curl-plain", rcpt, marker, "--login-options", "AUTH=PLAIN"), "")
		}},
		{"curl-login", func(t *testing.T, rcpt, marker string) {
			runPeer(t, curlCmd("curl-login", rcpt, marker, "--login-options", "AUTH=LOGIN"), "")
		}},
		{"msmtp", func(t *testing.T, rcpt, marker string) {
			rc := filepath.Join(t.TempDir(), "msmtprc")
			conf := fmt.Sprintf("defaults\nlogfile -\n\naccount default\nhost %s\nport %s\ndomain msmtp.test\n"+
				"tls on\ntls_starttls on\ntls_trust_file %s\nauth on\nuser %s\npassword %s\nfrom %s\n",
				host, port, pki.CAFile, userName, userPassword, from)
			// msmtp refuses a configuration with a password that others may read.
			if err := os.WriteFile(rc, []byte(conf), 0o600); err != nil {
				t.Fatal(err)
			}
			runPeer(t, exec.Command(msmtp, "-C", rc, "-a", "default", rcpt), message("msmtp", rcpt, marker))
		}},
		{"python-smtplib", func(t *testing.T, rcpt, marker string) {
			cmd := exec.Command(python, "-I", "testdata/smtplib_send.py", host, port, pki.CAFile, userName, from, rcpt, marker)
			cmd.Env = append(os.Environ(), "SMTPLIB_PASSWORD="+userPassword)
			runPeer(t, cmd, "")
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rcpt := "rcpt-" + tc.name + "@example.net"
			marker := fmt.Sprintf("interop-marker-%s-%d", tc.name, time.Now().UnixNano())
			tc.run(t, rcpt, marker)
			msgs := up.WaitMessages(t, i+1, 30*time.Second)
			var got *smtptest.Message
			for j := range msgs {
				if len(msgs[j].To) == 1 && msgs[j].To[0] == rcpt {
					got = &msgs[j]
				}
			}
			if got == nil {
				t.Fatalf("no message for %s at the upstream: %+v", rcpt, msgs)
			}
			if got.From != from || got.AuthUser != upUser || !got.TLS {
				t.Errorf("envelope from %q auth %q tls %v, want %q %q true", got.From, got.AuthUser, got.TLS, from, upUser)
			}
			if !bytes.Contains(got.Data, []byte("\r\n"+marker+"\r\n")) {
				t.Errorf("body marker %q missing:\n%s", marker, got.Data)
			}
			if !bytes.Contains(got.Data, []byte("\r\nTo: "+rcpt+"\r\n")) || queueIDOf(got.Data) == "" {
				t.Errorf("header To: or the relay's Received: missing:\n%s", got.Data)
			}
			r.waitLog("accepted", map[string]string{"queue_id": queueIDOf(got.Data), "from": from, "rcpts": "1"}, 5*time.Second)
		})
	}

	// The same clients trusting another CA must refuse the relay's
	// certificate, so the passes above did verify it.
	t.Run("untrusted-ca", func(t *testing.T) {
		other := testpki.New(t)
		for _, cmd := range []*exec.Cmd{
			exec.Command(swaks, "--server", r.addr, "--tls", "--tls-verify", "--tls-ca-path", other.CAFile,
				"--auth", "PLAIN", "--auth-user", userName, "--auth-password", userPassword,
				"--from", from, "--to", "rcpt-untrusted@example.net"),
			exec.Command(curl, "--silent", "--show-error", "--url", "smtp://"+r.addr, "--ssl-reqd", "--cacert", other.CAFile,
				"--user", userName+":"+userPassword, "--mail-from", from, "--mail-rcpt", "rcpt-untrusted@example.net",
				"--upload-file", "-"),
		} {
			cmd.Stdin = strings.NewReader(message("untrusted", "rcpt-untrusted@example.net", "never"))
			if out, err := cmd.CombinedOutput(); err == nil {
				t.Errorf("%s trusted a certificate from another CA:\n%s", cmd.Path, out)
			}
		}
		if n := len(up.Messages()); n != len(cases) {
			t.Errorf("%d messages at the upstream, want %d", n, len(cases))
		}
	})
}

// aiosmtpd is a running aiosmtpd upstream (e2e/testdata/aiosmtpd_upstream.py).
type aiosmtpd struct {
	dir  string
	addr string
}

// aiosmtpdMessage is one message aiosmtpd accepted, as the script writes it.
type aiosmtpdMessage struct {
	MailFrom  string   `json:"mail_from"`
	RcptTos   []string `json:"rcpt_tos"`
	Data      []byte   `json:"data"`
	AuthLogin string   `json:"auth_login"`
	TLS       bool     `json:"tls"`
}

// aiosmtpdAuth is one AUTH attempt aiosmtpd saw.
type aiosmtpdAuth struct {
	Mechanism string `json:"mechanism"`
	Login     string `json:"login"`
	Success   bool   `json:"success"`
}

// startAiosmtpd runs Debian's aiosmtpd as an upstream with TLS in the
// given mode ("implicit" or "starttls") and required AUTH for upUser with
// password, and waits until it accepts connections.
func startAiosmtpd(t *testing.T, pki *testpki.PKI, mode, password string) *aiosmtpd {
	t.Helper()
	if out, err := exec.Command(python, "-I", "-c", "import aiosmtpd").CombinedOutput(); err != nil {
		t.Fatalf("aiosmtpd is needed for this test (make test installs Debian's python3-aiosmtpd): %v %s", err, out)
	}
	a := &aiosmtpd{dir: t.TempDir()}
	logPath := filepath.Join(a.dir, "aiosmtpd.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(python, "-I", "testdata/aiosmtpd_upstream.py", a.dir, mode, pki.CertFile, pki.KeyFile, upUser)
	cmd.Env = append(os.Environ(), "AIOSMTPD_PASSWORD="+password)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// The server must not outlive a test binary that is itself killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("aiosmtpd log:\n%s", tail(logPath, 40))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if data, err := os.ReadFile(filepath.Join(a.dir, "port")); err == nil {
			addr := net.JoinHostPort("127.0.0.1", strings.TrimSpace(string(data)))
			if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
				c.Close()
				a.addr = addr
				return a
			}
		}
		select {
		case <-exited:
			t.Fatalf("aiosmtpd exited at start:\n%s", tail(logPath, 40))
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("aiosmtpd did not listen within 30s:\n%s", tail(logPath, 40))
	return nil
}

// readJSON decodes every file dir/prefix-N.json.
func readJSON[T any](t *testing.T, dir, prefix string) []T {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, prefix+"-*.json"))
	if err != nil {
		t.Fatal(err)
	}
	var out []T
	for _, name := range names {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		var v T
		if err := json.Unmarshal(data, &v); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out = append(out, v)
	}
	return out
}

// waitMessages waits until aiosmtpd has accepted at least n messages.
func (a *aiosmtpd) waitMessages(t *testing.T, n int, timeout time.Duration) []aiosmtpdMessage {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		msgs := readJSON[aiosmtpdMessage](t, a.dir, "msg")
		if len(msgs) >= n {
			return msgs
		}
		if time.Now().After(deadline) {
			t.Fatalf("aiosmtpd has %d messages after %s, want %d", len(msgs), timeout, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInteropAiosmtpdUpstream delivers through aiosmtpd, a server we did
// not write, with implicit TLS and with required STARTTLS, both with AUTH
// verified against the test CA.
func TestInteropAiosmtpdUpstream(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"implicit", "starttls"} {
		t.Run(mode, func(t *testing.T) {
			pki := testpki.New(t)
			up := startAiosmtpd(t, pki, mode, upPassword)
			r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.addr, UpstreamTLS: mode}))

			s := connect(t, r.addr, pki)
			to := []string{"bob@example.net", "carol@example.org"}
			marker := "aiosmtpd-marker-" + mode
			body := "From: app@example.com\r\nTo: bob@example.net, carol@example.org\r\nSubject: interop aiosmtpd\r\n\r\n" +
				"Line one.\r\n.leading dot survives dot-stuffing\r\n" + marker + "\r\n"
			id, err := s.send("app@example.com", to, body)
			s.close()
			if err != nil {
				t.Fatal(err)
			}
			got := up.waitMessages(t, 1, 30*time.Second)
			if len(got) != 1 {
				t.Fatalf("%d messages at aiosmtpd, want 1", len(got))
			}
			m := got[0]
			if m.MailFrom != "app@example.com" || strings.Join(m.RcptTos, ",") != strings.Join(to, ",") {
				t.Errorf("envelope %q -> %q, want app@example.com -> %q", m.MailFrom, m.RcptTos, to)
			}
			if m.AuthLogin != upUser || !m.TLS {
				t.Errorf("auth login %q tls %v, want %q true", m.AuthLogin, m.TLS, upUser)
			}
			if queueIDOf(m.Data) != id {
				t.Errorf("queue ID in Received: %q, want %q:\n%s", queueIDOf(m.Data), id, m.Data)
			}
			if !bytes.HasSuffix(m.Data, []byte("\r\n\r\nLine one.\r\n.leading dot survives dot-stuffing\r\n"+marker+"\r\n")) {
				t.Errorf("body changed on the way:\n%s", m.Data)
			}
			r.waitLog("delivered", map[string]string{"queue_id": id}, 10*time.Second)
		})
	}
}

// TestInteropAiosmtpdRejectsAuth has aiosmtpd refuse the relay's
// credentials: nothing is delivered and the message stays queued.
func TestInteropAiosmtpdRejectsAuth(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startAiosmtpd(t, pki, "starttls", "not-the-relays-password")
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.addr, UpstreamTLS: "starttls"}))

	s := connect(t, r.addr, pki)
	id, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg)
	s.close()
	if err != nil {
		t.Fatal(err)
	}
	r.waitLog("deferred", map[string]string{"queue_id": id, "attempt": "1"}, 20*time.Second)
	// After the refusal the upstream is marked down for a while; once that
	// passes the relay must come back and try its credentials again.
	var auths []aiosmtpdAuth
	deadline := time.Now().Add(30 * time.Second)
	for len(auths) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("aiosmtpd saw %d AUTH attempts in 30s, want 2: %+v", len(auths), auths)
		}
		time.Sleep(20 * time.Millisecond)
		auths = readJSON[aiosmtpdAuth](t, up.dir, "auth")
	}
	for _, a := range auths {
		if a.Login != upUser || a.Success {
			t.Errorf("AUTH attempt %+v, want a failed one for %s", a, upUser)
		}
	}
	if msgs := readJSON[aiosmtpdMessage](t, up.dir, "msg"); len(msgs) != 0 {
		t.Fatalf("aiosmtpd accepted %d messages with a wrong password", len(msgs))
	}
	if e, ok := queueByID(t, r)[id]; !ok || e.Attempts < 1 {
		t.Errorf("message %s not queued after the refusals: %+v (queued %v)", id, e, ok)
	}
	line := r.waitLog("delivery attempt", map[string]string{"queue_id": id}, time.Second)
	if !strings.Contains(fmt.Sprint(line["reply"]), "535") || line["stage"] != "auth" || fmt.Sprint(line["delivered"]) != "0" {
		t.Errorf("delivery attempt log %v, want stage auth with the 535 reply", line)
	}
	for _, l := range r.logLines() {
		if l["queue_id"] == id && (l["msg"] == "delivered" || l["msg"] == "failed" || l["msg"] == "bounced") {
			t.Errorf("message left the queue: %v", l)
		}
	}
}
