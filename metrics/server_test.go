package metrics

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
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
