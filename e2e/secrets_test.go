package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// secretMount is a password file laid out as the kubelet mounts a
// Secret: "password" links to "..data/password", and an update swaps the
// "..data" link to a new directory in one rename.
type secretMount struct {
	t   *testing.T
	dir string
	n   int
}

func newSecretMount(t *testing.T, password string) *secretMount {
	m := &secretMount{t: t, dir: t.TempDir()}
	m.update(password)
	if err := os.Symlink(filepath.Join("..data", "password"), m.path()); err != nil {
		t.Fatal(err)
	}
	return m
}

func (m *secretMount) path() string { return filepath.Join(m.dir, "password") }

func (m *secretMount) update(password string) {
	m.t.Helper()
	m.n++
	version := fmt.Sprintf("..v%d", m.n)
	if err := os.Mkdir(filepath.Join(m.dir, version), 0o700); err != nil {
		m.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(m.dir, version, "password"), []byte(password), 0o600); err != nil {
		m.t.Fatal(err)
	}
	tmp := filepath.Join(m.dir, "..data_tmp")
	if err := os.Symlink(version, tmp); err != nil {
		m.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(m.dir, "..data")); err != nil {
		m.t.Fatal(err)
	}
}

// TestUpstreamPasswordRotation (acceptance 5): the upstream's password
// changes and the relay's password_file, mounted as a Kubernetes Secret,
// is updated; the next message is delivered with the new password without
// a restart or a signal, through a new login. Then again with SIGHUP. The
// passwords never reach the log.
func TestUpstreamPasswordRotation(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	const first, second, third = "rotation-pw-one", "rotation-pw-two", "rotation-pw-three"
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: first})
	secret := newSecretMount(t, first+"\n")
	config := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr()})
	text, err := os.ReadFile(config)
	if err != nil {
		t.Fatal(err)
	}
	withFile := strings.Replace(string(text), `password_env = "`+upPassEnv+`"`, fmt.Sprintf("password_file = %q", secret.path()), 1)
	if err := os.WriteFile(config, []byte(withFile), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startRelay(t, config)

	send := func(rcpt string) {
		t.Helper()
		s := connect(t, r.addr, pki)
		defer s.close()
		if _, err := s.send("app@example.com", []string{rcpt}, testMsg); err != nil {
			t.Fatal(err)
		}
	}
	send("one@example.net")
	up.WaitMessages(t, 1, 20*time.Second)

	up.SetPassword(second)
	secret.update(second + "\n")
	r.waitLog("upstream secrets reloaded", map[string]string{"upstreams": "[up]"}, 20*time.Second)
	send("two@example.net")
	if got := up.WaitMessages(t, 2, 20*time.Second); got[1].To[0] != "two@example.net" {
		t.Errorf("second message: %+v", got[1])
	}
	// The pooled connection logged in with the old password is not reused.
	if n := len(up.AuthAttempts()); n < 2 {
		t.Errorf("%d logins after the rotation, want a new one", n)
	}

	up.SetPassword(third)
	secret.update(third + "\n")
	r.cmd.Process.Signal(syscall.SIGHUP)
	r.waitLogCount("configuration reloaded", 1, 10*time.Second)
	send("three@example.net")
	up.WaitMessages(t, 3, 20*time.Second)

	log, err := os.ReadFile(r.logPath)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(log), "rotation-pw") {
		t.Errorf("a password was logged:\n%s", tail(r.logPath, 40))
	}
	r.stop()
}
