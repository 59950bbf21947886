package e2e

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/postfixtest"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

const postfixUser, postfixPassword = "postfix", "postfix-relay-password"

// TestPostfixNullClientBounceE2E (acceptance 2): a Postfix null client
// relays through smarthost with AUTH over verified STARTTLS. smarthost
// refuses one recipient outside allowed_recipients at RCPT; Postfix
// bounces it at once and relays its own bounce, MAIL FROM:<>, through
// smarthost, which admits it for a user with allow_null_sender.
func TestPostfixNullClientBounceE2E(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("Postfix's master must start as root")
	}
	postconf, err := postfixtest.LookSbin("postconf")
	if err != nil {
		t.Fatalf("postconf is needed for this test (make test installs Debian's postfix): %v", err)
	}
	master, err := postfixtest.Master(postconf)
	if err != nil {
		t.Fatal(err)
	}

	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(),
		Extra: userTable(t, postfixUser, postfixPassword) +
			"allowed_recipients = [\"*@example.net\", \"app@example.com\"]\nallow_null_sender = true\n"}))

	pf, maillog := startPostfix(t, master, r.addr, pki)
	c, err := smtp.Dial(pf)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("app1.example.com"); err != nil {
		t.Fatal(err)
	}
	if err := c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	for _, to := range []string{"bob@example.net", "eve@example.org"} {
		if err := c.Rcpt(to, nil); err != nil {
			t.Fatalf("Postfix refused %s: %v", to, err)
		}
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(w, "From: <app@example.com>\r\nTo: bob@example.net, eve@example.org\r\nSubject: order 42\r\n\r\nYour order has shipped.\r\n")
	if err := w.Close(); err != nil {
		t.Fatalf("DATA: %v", err)
	}
	c.Quit()

	msgs := up.WaitMessages(t, 2, 30*time.Second)
	var orig, bounce *smtptest.Message
	for i := range msgs {
		switch msgs[i].From {
		case "app@example.com":
			orig = &msgs[i]
		case "":
			bounce = &msgs[i]
		}
	}
	if orig == nil || strings.Join(orig.To, " ") != "bob@example.net" || !bytes.Contains(orig.Data, []byte("Your order has shipped.")) {
		t.Errorf("original delivered as %+v", orig)
	}
	if bounce == nil || strings.Join(bounce.To, " ") != "app@example.com" {
		t.Fatalf("Postfix's bounce delivered as %+v", bounce)
	}
	for _, want := range []string{
		"Content-Type: multipart/report; report-type=delivery-status;",
		"Final-Recipient: rfc822; eve@example.org",
		"Action: failed",
		"Status: 5.7.1",
		"Diagnostic-Code: smtp; 550 5.7.1 Recipient not allowed for this user",
	} {
		if !bytes.Contains(bounce.Data, []byte(want)) {
			t.Errorf("bounce lacks %q:\n%s", want, bounce.Data)
		}
	}
	if bytes.Contains(bounce.Data, []byte("Final-Recipient: rfc822; bob@example.net")) {
		t.Errorf("bounce names the delivered recipient:\n%s", bounce.Data)
	}

	for _, from := range []string{"app@example.com", ""} {
		line := r.waitLog("accepted", map[string]string{"from": from}, 5*time.Second)
		if line["user"] != postfixUser || line["rcpts"] != float64(1) {
			t.Errorf("message from <%s> logged as %v", from, line)
		}
	}
	line := r.waitLog("rejected", map[string]string{"reason": "recipient_not_allowed"}, 5*time.Second)
	if line["user"] != postfixUser || line["to"] != "eve@example.org" {
		t.Errorf("refused recipient logged as %v", line)
	}
	// Postfix checked smarthost's certificate against the test CA.
	if log, _ := os.ReadFile(maillog); !bytes.Contains(log, []byte("Verified TLS connection established to 127.0.0.1")) {
		t.Errorf("no verified TLS connection in Postfix's log:\n%s", log)
	}
}

// startPostfix runs a private Postfix null client: smtpd on a loopback
// port for mynetworks, everything relayed to relayAddr with AUTH as the
// postfix user over STARTTLS verified against the test CA, nothing
// delivered locally. It returns smtpd's address and the path of its log;
// the instance is stopped when the test ends.
func startPostfix(t *testing.T, master, relayAddr string, pki *testpki.PKI) (addr, maillog string) {
	t.Helper()
	dir := t.TempDir()
	// Postfix's daemons run as the postfix user and must reach their
	// directories under the test's, which are private.
	for d := dir; d != os.TempDir() && d != filepath.Dir(d); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dirs, err := postfixtest.Layout(dir)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	caFile, passwd := filepath.Join(dirs.Etc, "ca.pem"), filepath.Join(dirs.Etc, "sasl_passwd")
	if err := os.WriteFile(caFile, ca, 0o644); err != nil {
		t.Fatal(err)
	}
	relayHost := "[127.0.0.1]:" + portOf(t, relayAddr)
	if err := os.WriteFile(passwd, []byte(relayHost+" "+postfixUser+":"+postfixPassword+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = l.Addr().String()
	l.Close()
	maillog = filepath.Join(dir, "maillog")
	// A null client of the application's domain: its own bounces come
	// from MAILER-DAEMON@example.com. The relay's certificate is for
	// localhost; the relayhost is an address.
	mainCF := postfixtest.MainCF(dirs, dir, maillog, "app1.example.com", "example.com", relayHost, fmt.Sprintf(`myorigin = $mydomain
smtpd_peername_lookup = no
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:%s
smtp_sasl_security_options = noanonymous
smtp_tls_security_level = verify
smtp_tls_verify_cert_match = localhost
smtp_tls_CAfile = %s
smtp_tls_loglevel = 1
`, passwd, caFile))
	if err := postfixtest.WriteConfig(dirs.Etc, mainCF, postfixtest.MasterCF(addr)); err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(filepath.Join(dir, "master.out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := postfixtest.Command(master, dirs)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		stopPostfix(t, cmd.Process.Pid, exited)
		if t.Failed() {
			t.Logf("Postfix log %s:\n%s\n%s", maillog, tail(maillog, 60), tail(out.Name(), 20))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := greet(addr); err == nil {
			return addr, maillog
		}
		select {
		case <-exited:
			t.Fatalf("Postfix's master exited at start:\n%s\n%s", tail(out.Name(), 20), tail(maillog, 20))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("Postfix's smtpd at %s did not greet:\n%s", addr, tail(maillog, 20))
		}
	}
}

// stopPostfix stops master by its PID, then any of its daemons still in
// its session, so that no process outlives the test.
func stopPostfix(t *testing.T, pid int, exited chan struct{}) {
	syscall.Kill(pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(pid, syscall.SIGKILL)
		<-exited
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := inSession(pid)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("Postfix processes %v still running", left)
			return
		}
		for _, p := range left {
			syscall.Kill(p, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// inSession returns the processes of session sid.
func inSession(sid int) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the command name, which may hold ')': state, ppid,
		// pgrp, session.
		f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
		if len(f) > 3 && f[3] == strconv.Itoa(sid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// greet reads an SMTP greeting, says EHLO and QUIT.
func greet(addr string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("probe.example.com"); err != nil {
		return err
	}
	return c.Quit()
}

func portOf(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}
