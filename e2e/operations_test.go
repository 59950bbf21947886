package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/pires/go-proxyproto"
	"golang.org/x/crypto/bcrypt"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// TestShutdownFinishesTransaction (acceptance 2): on SIGTERM, /readyz
// turns 503 at once, an idle client is told 421 4.3.2, a transaction in
// the middle of DATA still completes with 250, the process exits 0, and
// the message is delivered, before the exit or after a restart.
func TestShutdownFinishesTransaction(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	dir := t.TempDir()
	config := writeConfig(t, relayConfig{Dir: dir, PKI: pki, UpstreamAddr: up.Addr()})
	r := startRelay(t, config)
	if code := readyz(t, r); code != http.StatusOK {
		t.Fatalf("/readyz before shutdown: %d", code)
	}

	idle := dialRaw(t, r.addr, pki)
	busy := dialRaw(t, r.addr, pki)
	busy.expect(250, "MAIL FROM:<app@example.com>")
	busy.expect(250, "RCPT TO:<bob@example.net>")
	busy.expect(354, "DATA")
	busy.write("From: app@example.com\r\nTo: bob@example.net\r\nSubject: slow\r\n\r\nfirst half\r\n")

	r.cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(10 * time.Second)
	for readyz(t, r) != http.StatusServiceUnavailable {
		if time.Now().After(deadline) {
			t.Fatal("/readyz did not turn 503 after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if code, msg := idle.read(); code != 421 || !strings.HasPrefix(msg, "4.3.2") {
		t.Errorf("idle client: %d %s, want 421 4.3.2", code, msg)
	}
	select {
	case <-r.exited:
		t.Fatal("exited with a transaction in progress")
	default:
	}

	busy.write("second half\r\n.\r\n")
	if code, msg := busy.read(); code != 250 || !queuedAs.MatchString(msg) {
		t.Fatalf("transaction in progress: %d %s", code, msg)
	}
	select {
	case <-r.exited:
	case <-time.After(20 * time.Second):
		t.Fatal("relay did not exit after the transaction")
	}
	if code := r.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	r.findLogOrFail("stopped")

	if len(up.Messages()) == 0 {
		// Not sent before the exit: it is in the queue for the next start.
		r2 := startRelay(t, config)
		up.WaitMessages(t, 1, 20*time.Second)
		r2.stop()
	}
	msgs := up.Messages()
	if len(msgs) != 1 || !strings.Contains(string(msgs[0].Data), "first half\r\nsecond half\r\n") {
		t.Fatalf("delivered: %+v", msgs)
	}
}

func readyz(t *testing.T, r *relay) int {
	t.Helper()
	resp, err := http.Get(r.http + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func (r *relay) findLogOrFail(msg string) map[string]any {
	r.t.Helper()
	line := r.findLog(msg)
	if line == nil {
		r.t.Fatalf("no %q in the log:\n%s", msg, tail(r.logPath, 40))
	}
	return line
}

// waitLogCount waits until n log lines have msg, and returns the last.
func (r *relay) waitLogCount(msg string, n int, timeout time.Duration) map[string]any {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var found []map[string]any
		for _, line := range r.logLines() {
			if line["msg"] == msg {
				found = append(found, line)
			}
		}
		if len(found) >= n {
			return found[len(found)-1]
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("%d log lines %q within %s, want %d:\n%s", len(found), msg, timeout, n, tail(r.logPath, 40))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// servedSerial is the serial of the certificate a new STARTTLS client
// sees.
func servedSerial(t *testing.T, addr string, pki *testpki.PKI) string {
	t.Helper()
	c, err := smtp.DialStartTLS(addr, pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Noop(); err != nil { // completes the handshake
		t.Fatal(err)
	}
	st, ok := c.TLSConnectionState()
	if !ok {
		t.Fatal("no TLS")
	}
	return st.PeerCertificates[0].SerialNumber.String()
}

func login(addr string, pki *testpki.PKI, user, password string) error {
	c, err := smtp.DialStartTLS(addr, pki.ClientTLS())
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Auth(sasl.NewPlainClient("", user, password))
}

// TestReloadCertificateAndConfig (acceptance 3): replacing the certificate
// files changes the certificate new STARTTLS clients see, without a
// restart; SIGHUP after adding a user lets that user log in; SIGHUP with a
// broken configuration keeps the running one.
func TestReloadCertificateAndConfig(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	secret := testpki.NewSecret(t, pki.CertFile, pki.KeyFile)
	served := *pki
	served.CertFile, served.KeyFile = secret.CertFile(), secret.KeyFile()
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	dir := t.TempDir()
	rc := relayConfig{Dir: dir, PKI: &served, UpstreamAddr: up.Addr()}
	config := writeConfig(t, rc)
	r := startRelay(t, config)

	first := pki.Cert.Leaf.SerialNumber.String()
	if got := servedSerial(t, r.addr, pki); got != first {
		t.Fatalf("served %s, want %s", got, first)
	}
	before := connect(t, r.addr, pki) // a session that outlives every change below
	defer before.close()

	rotated, certFile, keyFile := pki.Issue(t, "rotated", "localhost")
	secret.Update(certFile, keyFile)
	want := rotated.Leaf.SerialNumber.String()
	deadline := time.Now().Add(20 * time.Second)
	for servedSerial(t, r.addr, pki) != want {
		if time.Now().After(deadline) {
			t.Fatalf("the rotated certificate was not served:\n%s", tail(r.logPath, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.waitLog("TLS certificate loaded", map[string]string{"serial": want}, time.Second)

	// A new user, by SIGHUP.
	const newUser, newPassword = "second", "second-password"
	if err := login(r.addr, pki, newUser, newPassword); err == nil {
		t.Fatal("unknown user logged in")
	}
	rc.Extra = userTable(t, newUser, newPassword)
	writeConfig(t, rc)
	r.cmd.Process.Signal(syscall.SIGHUP)
	r.waitLogCount("configuration reloaded", 1, 10*time.Second)
	if err := login(r.addr, pki, newUser, newPassword); err != nil {
		t.Fatalf("new user after SIGHUP: %v", err)
	}

	// A broken configuration: the running one stays, and the log says why.
	rc.Extra = userTable(t, newUser, newPassword) + "\n[[route]]\nfrom_domain = \"example.org\"\nupstreams = [\"missing\"]\n"
	writeConfig(t, rc)
	r.cmd.Process.Signal(syscall.SIGHUP)
	line := r.waitLogCount("configuration reload failed", 1, 10*time.Second)
	if problems := fmt.Sprint(line["problems"]); !strings.Contains(problems, `route[1].upstreams[0]: no [[upstream]] is named "missing"`) {
		t.Errorf("problems logged: %s", problems)
	}
	for _, u := range []struct{ name, password string }{{userName, userPassword}, {newUser, newPassword}} {
		if err := login(r.addr, pki, u.name, u.password); err != nil {
			t.Errorf("%s after a failed reload: %v", u.name, err)
		}
	}
	if got := servedSerial(t, r.addr, pki); got != want {
		t.Errorf("certificate after a failed reload: %s, want %s", got, want)
	}

	if _, err := before.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
		t.Fatalf("session opened before the reloads: %v", err)
	}
	up.WaitMessages(t, 1, 20*time.Second)
	r.stop()
}

// userTable is a [[user]] table for the configuration's Extra.
func userTable(t *testing.T, name, password string) string {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("\n[[user]]\nname = %q\npassword_hash = %q\nallowed_from = [\"*@example.com\"]\n", name, hash)
}

// TestProxyProtocolEndToEnd (acceptance 5): behind a PROXY-protocol hop,
// the client is seen with the address of the header: inside
// trusted_networks it submits without AUTH, and Received: names it;
// outside, it is refused.
func TestProxyProtocolEndToEnd(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	config := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), Extra: `
[[listen]]
name = "behind-lb"
address = "127.0.0.1:0"
tls = "none"
auth = "none"
trusted_networks = ["10.1.2.0/24"]
proxy_protocol = true
proxy_trusted = ["127.0.0.1/32"]
`})
	r := startRelay(t, config)
	if len(r.addrs) != 2 {
		t.Fatalf("listeners %v", r.addrs)
	}
	addr := r.addrs[1]

	dial := func(version byte, client string) net.Conn {
		t.Helper()
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(20 * time.Second))
		h := proxyproto.HeaderProxyFromAddrs(version, &net.TCPAddr{IP: net.ParseIP(client), Port: 50123}, conn.RemoteAddr())
		if _, err := h.WriteTo(conn); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	for i, tt := range []struct {
		version byte
		client  string
	}{{1, "10.1.2.3"}, {2, "10.1.2.77"}} {
		c := smtp.NewClient(dial(tt.version, tt.client))
		rcpt := fmt.Sprintf("r%d@example.net", i)
		if err := c.SendMail("app@example.com", []string{rcpt}, strings.NewReader(testMsg)); err != nil {
			t.Fatalf("v%d from %s: %v", tt.version, tt.client, err)
		}
		c.Quit()
		msgs := up.WaitMessages(t, i+1, 20*time.Second)
		if data := string(msgs[i].Data); !strings.Contains(data, "(["+tt.client+"])") {
			t.Errorf("v%d: Received: does not name %s:\n%s", tt.version, tt.client, data)
		}
		r.waitLog("accepted", map[string]string{"listener": "behind-lb", "client_ip": tt.client}, 5*time.Second)
	}

	for _, v := range []byte{1, 2} {
		conn := dial(v, "192.0.2.7")
		line, err := io.ReadAll(conn)
		if err != nil {
			t.Fatal(err)
		}
		if s := string(line); !strings.HasPrefix(s, "554 ") || !strings.Contains(s, "5.7.1") {
			t.Errorf("v%d from 192.0.2.7: %q, want 554 5.7.1", v, s)
		}
	}
	r.waitLog("connection refused", map[string]string{"listener": "behind-lb", "client_ip": "192.0.2.7"}, 5*time.Second)

	// The balancer itself, without a header, is not served.
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(conn, "EHLO lb.test\r\n")
	if data, _ := io.ReadAll(conn); len(data) != 0 {
		t.Errorf("served without a PROXY header: %q", data)
	}
	r.stop()
}
