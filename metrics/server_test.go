package metrics

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"smarthost/queue"
)

// startServer runs s on 127.0.0.1:0 and returns its base URL and the
// channel that receives Serve's result.
func startServer(t *testing.T, s *Server) (string, <-chan error) {
	t.Helper()
	s.Address = "127.0.0.1:0"
	if s.Logger == nil {
		s.Logger = slog.New(slog.DiscardHandler)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve() }()
	t.Cleanup(func() { s.Close() })
	return "http://" + s.Addr().String(), served
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func TestServerProbes(t *testing.T) {
	var ready atomic.Bool
	base, _ := startServer(t, &Server{Ready: ready.Load})

	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
	if code, body := get(t, base+"/readyz"); code != 503 || body != "not ready\n" {
		t.Errorf("/readyz before ready = %d %q", code, body)
	}
	ready.Store(true)
	if code, _ := get(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz when ready = %d", code)
	}
	ready.Store(false) // shutting down
	if code, _ := get(t, base+"/readyz"); code != 503 {
		t.Errorf("/readyz when shutting down = %d", code)
	}
	// No collectors and no API configured: those paths do not exist.
	for _, p := range []string{"/metrics", "/api/queue", "/"} {
		if code, _ := get(t, base+p); code != 404 {
			t.Errorf("%s = %d, want 404", p, code)
		}
	}
	resp, err := http.Post(base+"/healthz", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 405 {
		t.Errorf("POST /healthz = %d, want 405", resp.StatusCode)
	}
}

func TestServerRoutesMetricsAndAPI(t *testing.T) {
	api, _ := newTestAPI("")
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "smarthost_up 1\n") })
	base, _ := startServer(t, &Server{API: api, Metrics: metrics})

	if code, body := get(t, base+"/metrics"); code != 200 || body != "smarthost_up 1\n" {
		t.Errorf("/metrics = %d %q", code, body)
	}
	// Over a real socket the client is on loopback, so no token is needed.
	if code, body := get(t, base+"/api/queue"); code != 200 || !strings.Contains(body, `"id": "0001aaaa"`) {
		t.Errorf("/api/queue = %d %q", code, body)
	}
}

func TestServerShutdown(t *testing.T) {
	s := &Server{}
	base, served := startServer(t, s)
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Fatalf("/healthz = %d", code)
	}
	addr := s.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("Serve after Shutdown = %v, want nil", err)
		}
	case <-ctx.Done():
		t.Fatal("Serve did not return after Shutdown")
	}
	// The port is free again.
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("port not released: %v", err)
	}
	ln.Close()
}

// TestServerShutdownBeforeServe covers a start that fails after Listen:
// the port must still be released.
func TestServerShutdownBeforeServe(t *testing.T) {
	s := &Server{Address: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	addr := s.Addr().String()
	if err := s.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("port not released: %v", err)
	}
	ln.Close()
	if err := s.Serve(); err != nil {
		t.Errorf("Serve after Shutdown = %v, want nil", err)
	}
}

func TestServerListenPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := &Server{Address: ln.Addr().String()}
	err = s.Listen()
	if err == nil {
		s.Close()
		t.Fatal("Listen on a port in use succeeded")
	}
	if !strings.Contains(err.Error(), "address already in use") || !strings.Contains(err.Error(), ln.Addr().String()) {
		t.Errorf("error = %v, want it to name the address and say it is in use", err)
	}
	if s.Addr() != nil {
		t.Errorf("Addr = %v after a failed Listen", s.Addr())
	}
}

func TestServerServeBeforeListen(t *testing.T) {
	if err := (&Server{}).Serve(); err == nil {
		t.Error("Serve before Listen succeeded")
	}
	if err := (&Server{}).Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown before Listen = %v", err)
	}
}

// adminRequest sends one request to the listener at base with the given
// Host (the URL's own when ""), headers and bearer token, and returns
// the status and body.
func adminRequest(t *testing.T, base, method, path, host string, header map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, base+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// TestAPIRefusesWebPagesWithoutToken: without a token, a page in a
// browser on the relay's host reaches the API from loopback, but under
// the attacker's name (DNS rebinding) or with Origin or Sec-Fetch-Site
// (CSRF). Over a real socket, against a real queue, none of those reads
// an address or changes anything; the names a tool uses still work.
func TestAPIRefusesWebPagesWithoutToken(t *testing.T) {
	store, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "secret-rcpt@example.net"}}}
	if err := store.Put(context.Background(), m, []byte("Subject: hi\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "smarthost_up 1\n") })
	base, _ := startServer(t, &Server{API: &API{Queue: store, Logger: slog.New(slog.DiscardHandler)}, Metrics: metrics})
	port := strings.TrimPrefix(base, "http://127.0.0.1:")

	refused := []struct {
		name, method, path, host string
		header                   map[string]string
	}{
		{"rebound name", "GET", "/api/queue", "attacker.example:" + port, nil},
		{"rebound name without port", "GET", "/api/queue/" + m.ID, "attacker.example", nil},
		{"name that embeds an address", "GET", "/api/queue", "127.0.0.1.nip.io:" + port, nil},
		{"name under localhost's", "GET", "/api/queue", "localhost.attacker.example:" + port, nil},
		{"public address", "GET", "/api/queue", "192.0.2.7:" + port, nil},
		{"simple cross-origin POST", "POST", "/api/queue/" + m.ID + "/hold", "", map[string]string{"Origin": "http://attacker.example", "Content-Type": "text/plain"}},
		{"cross-origin DELETE", "DELETE", "/api/queue/" + m.ID, "", map[string]string{"Origin": "http://attacker.example"}},
		{"opaque origin", "POST", "/api/queue/flush", "", map[string]string{"Origin": "null"}},
		{"same-origin page", "POST", "/api/queue/" + m.ID + "/retry", "", map[string]string{"Origin": base}},
		{"cross-site fetch", "GET", "/api/queue", "", map[string]string{"Sec-Fetch-Site": "cross-site"}},
		{"rebound DELETE", "DELETE", "/api/queue/" + m.ID, "attacker.example:" + port, nil},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			code, body := adminRequest(t, base, tt.method, tt.path, tt.host, tt.header)
			if code != http.StatusForbidden {
				t.Errorf("status = %d, want 403: %s", code, body)
			}
			if strings.Contains(body, "secret-rcpt") {
				t.Errorf("refused answer shows the recipient: %s", body)
			}
		})
	}
	got, err := store.Get(m.ID)
	if err != nil {
		t.Fatalf("message gone after the refused requests: %v", err)
	}
	if got.Held {
		t.Error("message held by a refused request")
	}

	// What smarthost queue and an administrator's curl send.
	for _, host := range []string{"", "localhost:" + port, "LocalHost:" + port, "localhost", "[::1]:" + port, "[::1]", "127.0.0.2:" + port, "[::ffff:127.0.0.1]:" + port} {
		code, body := adminRequest(t, base, "GET", "/api/queue", host, map[string]string{"Sec-Fetch-Site": "none"})
		if code != 200 || !strings.Contains(body, "secret-rcpt@example.net") {
			t.Errorf("Host %q: %d %s", host, code, body)
		}
	}
	if code, body := adminRequest(t, base, "POST", "/api/queue/"+m.ID+"/hold", "localhost:"+port, nil); code != 200 {
		t.Errorf("hold from a tool: %d %s", code, body)
	}

	// The probes and metrics are not the admin API: they show no mail.
	for _, path := range []string{"/healthz", "/readyz", "/metrics"} {
		if code, body := adminRequest(t, base, "GET", path, "attacker.example:"+port, map[string]string{"Origin": "http://attacker.example"}); code != 200 {
			t.Errorf("%s under another name: %d %s", path, code, body)
		}
	}
}

// TestAPIWithTokenIgnoresHostAndOrigin: with a token, which a page
// cannot know, the API serves any name and origin, as behind a proxy.
func TestAPIWithTokenIgnoresHostAndOrigin(t *testing.T) {
	api, _ := newTestAPI("s3cret-token")
	base, _ := startServer(t, &Server{API: api})
	code, _ := adminRequest(t, base, "GET", "/api/queue", "relay.example.com", map[string]string{"Authorization": "Bearer s3cret-token", "Origin": "https://ops.example.com"})
	if code != 200 {
		t.Errorf("with the token: %d", code)
	}
	code, _ = adminRequest(t, base, "GET", "/api/queue", "relay.example.com", map[string]string{"Origin": "https://ops.example.com"})
	if code != 401 {
		t.Errorf("without the token: %d, want 401", code)
	}
}

// openFiles counts this process's open file descriptors.
func openFiles(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	return len(entries)
}

// dialIdle opens n connections to addr that send nothing.
func dialIdle(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conns[i] = c
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns
}

// sendGet writes a GET for path to c.
func sendGet(t *testing.T, c net.Conn, path string) {
	t.Helper()
	if _, err := io.WriteString(c, "GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
}

// statusLine reads the status line of an answer on c, "" if none came
// within wait.
func statusLine(t *testing.T, c net.Conn, wait time.Duration) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(wait))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return ""
		}
		t.Fatal(err)
	}
	return strings.TrimSpace(line)
}

// TestServerMaxConnections: connections beyond MaxConnections wait in
// the kernel's backlog, holding no descriptor of the process, and are
// served once a connection closes.
func TestServerMaxConnections(t *testing.T) {
	const limit, flood = 8, 300
	s := &Server{MaxConnections: limit}
	base, _ := startServer(t, s)
	addr := s.Addr().String()

	before := openFiles(t)
	held := dialIdle(t, addr, limit)
	sendGet(t, held[0], "/healthz")
	if line := statusLine(t, held[0], 10*time.Second); line != "HTTP/1.1 200 OK" {
		t.Fatalf("a connection within the limit: %q", line)
	}
	waiting := dialIdle(t, addr, flood)
	// Over the limit, a request waits unanswered…
	sendGet(t, waiting[0], "/healthz")
	if line := statusLine(t, waiting[0], 500*time.Millisecond); line != "" {
		t.Fatalf("a connection over the limit was answered: %q", line)
	}
	// …and the server holds no descriptor for it: each connection costs
	// the test one for its own end, the server one for each it accepted.
	if n := openFiles(t) - before; n > limit+flood+limit+4 {
		t.Errorf("%d descriptors for %d connections: the server holds more than its %d", n, limit+flood, limit)
	}
	// Once the held connections close, it is served.
	for _, c := range held {
		c.Close()
	}
	if line := statusLine(t, waiting[0], 10*time.Second); line != "HTTP/1.1 200 OK" {
		t.Fatalf("after the held connections closed: %q", line)
	}
	for _, c := range waiting {
		c.Close()
	}
	if code, _ := get(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
}

// TestServerRequestBounds: a header section over 32 KiB is refused with
// 431, and an admin API request with a body over 64 KiB with 413 before
// it acts.
func TestServerRequestBounds(t *testing.T) {
	api, admin := newTestAPI("")
	base, _ := startServer(t, &Server{API: api})

	req, err := http.NewRequest("GET", base+"/api/queue", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Padding", strings.Repeat("a", 64<<10))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("64 KiB header: %d, want 431", resp.StatusCode)
	}
	req.Header.Set("X-Padding", strings.Repeat("a", 16<<10))
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("16 KiB header: %d, want 200", resp.StatusCode)
	}

	resp, err = http.Post(base+"/api/queue/flush", "application/octet-stream", strings.NewReader(strings.Repeat("x", 1<<20)))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !strings.Contains(string(body), "request body over 65536 bytes") {
		t.Errorf("1 MiB body: %d %s, want 413", resp.StatusCode, body)
	}
	if calls := admin.Calls(); slices.Contains(calls, "flush") {
		t.Errorf("a refused request reached the queue: %v", calls)
	}
	resp, err = http.Post(base+"/api/queue/flush", "text/plain", strings.NewReader("small"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("small body: %d, want 200", resp.StatusCode)
	}
}
