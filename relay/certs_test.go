package relay

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// logBuffer collects log output written from several goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func serialOf(t *testing.T, c *tls.Certificate) string {
	t.Helper()
	if c == nil || c.Leaf == nil {
		t.Fatal("no certificate")
	}
	return c.Leaf.SerialNumber.String()
}

func servedSerial(t *testing.T, r *CertReloader) string {
	t.Helper()
	c, err := r.GetCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return serialOf(t, c)
}

// TestCertReloaderRotation: a Secret update is picked up by the watcher
// and served to new STARTTLS clients, while a connection made before it
// keeps working.
func TestCertReloaderRotation(t *testing.T) {
	pki := testpki.New(t)
	secret := testpki.NewSecret(t, pki.CertFile, pki.KeyFile)
	var logs logBuffer
	r, err := NewCertReloader(secret.CertFile(), secret.KeyFile())
	if err != nil {
		t.Fatal(err)
	}
	r.Interval = 20 * time.Millisecond
	r.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	r.Start()
	defer r.Close()

	env := startServer(t, func(s *Server) {
		s.TLSConfig = &tls.Config{GetCertificate: r.GetCertificate, MinVersion: tls.VersionTLS12}
	})
	before := dial(t, env.addrs[0])
	before.login(pki)
	oldSerial := before.conn.(*tls.Conn).ConnectionState().PeerCertificates[0].SerialNumber.String()
	if oldSerial != serialOf(t, &pki.Cert) {
		t.Fatalf("served %s, want %s", oldSerial, serialOf(t, &pki.Cert))
	}

	next, certFile, keyFile := pki.Issue(t, "next", "localhost")
	secret.Update(certFile, keyFile)
	newSerial := serialOf(t, &next)
	testwait.For(t, 20*time.Second, "the new certificate", func() bool { return servedSerial(t, r) == newSerial })

	after := dial(t, env.addrs[0])
	after.login(pki)
	if got := after.conn.(*tls.Conn).ConnectionState().PeerCertificates[0].SerialNumber.String(); got != newSerial {
		t.Errorf("new client got %s, want %s", got, newSerial)
	}
	if code, msg := before.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Errorf("connection made before the rotation: %d %s", code, msg)
	}
	if !strings.Contains(logs.String(), "serial="+newSerial) {
		t.Errorf("no load logged:\n%s", logs.String())
	}
}

// TestCertReloaderBadPair: a pair that does not load leaves the current
// certificate in service, is reported once, and a good pair later is
// picked up.
func TestCertReloaderBadPair(t *testing.T) {
	pki := testpki.New(t)
	secret := testpki.NewSecret(t, pki.CertFile, pki.KeyFile)
	var logs logBuffer
	r, err := NewCertReloader(secret.CertFile(), secret.KeyFile())
	if err != nil {
		t.Fatal(err)
	}
	r.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	oldSerial := servedSerial(t, r)

	// A new certificate with the old key, as when one file of a rotation
	// is written before the other.
	next, certFile, keyFile := pki.Issue(t, "next", "localhost")
	secret.Update(certFile, pki.KeyFile)
	for range 3 {
		if err := r.Reload(); err == nil || !strings.Contains(err.Error(), "private key does not match") {
			t.Fatalf("Reload = %v", err)
		}
	}
	if got := servedSerial(t, r); got != oldSerial {
		t.Errorf("serving %s after a bad pair, want the old %s", got, oldSerial)
	}
	if n := strings.Count(logs.String(), "TLS certificate not reloaded"); n != 1 {
		t.Errorf("%d failure lines, want 1:\n%s", n, logs.String())
	}

	// Not PEM at all.
	garbage := filepath.Join(t.TempDir(), "garbage")
	os.WriteFile(garbage, []byte("not a certificate"), 0o600)
	secret.Update(garbage, keyFile)
	if err := r.Reload(); err == nil {
		t.Fatal("Reload accepted garbage")
	}
	if got := servedSerial(t, r); got != oldSerial {
		t.Errorf("serving %s after garbage, want the old %s", got, oldSerial)
	}

	secret.Update(certFile, keyFile)
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := servedSerial(t, r); got != serialOf(t, &next) {
		t.Errorf("serving %s, want the new %s", got, serialOf(t, &next))
	}

	// Other files, as after a configuration reload: a bad pair keeps the
	// current files, a good one replaces them.
	if err := r.SetFiles(garbage, keyFile); err == nil {
		t.Fatal("SetFiles accepted garbage")
	}
	if err := r.Reload(); err != nil {
		t.Fatalf("the current files were dropped: %v", err)
	}
	if err := r.SetFiles(pki.CertFile, pki.KeyFile); err != nil {
		t.Fatal(err)
	}
	if got := servedSerial(t, r); got != oldSerial {
		t.Errorf("serving %s after SetFiles, want %s", got, oldSerial)
	}
	secret.Update(pki.CertFile, pki.KeyFile) // no longer watched
	os.WriteFile(pki.CertFile, bytes.Repeat([]byte("x"), 10), 0o600)
	if err := r.Reload(); err == nil {
		t.Error("Reload does not look at the files set by SetFiles")
	}
}

func TestNewCertReloaderErrors(t *testing.T) {
	pki := testpki.New(t)
	if _, err := NewCertReloader(filepath.Join(t.TempDir(), "missing.crt"), pki.KeyFile); err == nil {
		t.Error("missing certificate file accepted")
	}
	_, _, otherKey := pki.Issue(t, "other", "localhost")
	if _, err := NewCertReloader(pki.CertFile, otherKey); err == nil {
		t.Error("mismatched key accepted")
	}
}
