// Package metrics serves smarthost's [http] listener: the health and
// readiness probes, the queue administration API under /api/, and the
// place where the Prometheus collectors are exposed at /metrics.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/net/netutil"
)

// Server is the [http] listener. Set the fields, call Listen to bind
// Address, then Serve; Shutdown or Close stop it.
type Server struct {
	// Address is the host:port to bind; port 0 picks a free port.
	Address string
	// Ready answers /readyz: 200 while it returns true, 503 otherwise
	// (starting, or shutting down). Nil means always ready.
	Ready func() bool
	// API serves /api/…; nil leaves the admin API out.
	API *API
	// Metrics serves GET /metrics when set: the Prometheus collectors'
	// handler. Nil answers 404.
	Metrics http.Handler
	// Logger receives the HTTP server's own errors. Default slog.Default().
	Logger *slog.Logger
	// MaxConnections caps the connections open at once; more wait in the
	// kernel's listen backlog until one closes, so that idle or hostile
	// clients cannot take every file descriptor of the process (and with
	// them the SMTP listeners'). Default DefaultMaxConnections.
	MaxConnections int

	mu  sync.Mutex
	ln  net.Listener
	srv *http.Server
}

// DefaultMaxConnections is the default of Server.MaxConnections.
const DefaultMaxConnections = 256

// Bounds of every request: the endpoints answer small requests at once,
// so anything slower or bigger is a stuck or hostile client. With
// MaxConnections they bound what the listener can hold: a connection is
// released at the latest readHeaderTimeout after it opened without a
// request, or idleTimeout after its last answer.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = time.Minute
	idleTimeout       = 2 * time.Minute
	// maxHeaderBytes leaves room for a bearer token and a browser's
	// cookies, a thirty-second of net/http's 1 MB default.
	maxHeaderBytes = 32 << 10
)

// Handler returns the routes of the listener, for tests and for serving
// on a listener of one's own.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeText(w, http.StatusOK, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if s.Ready != nil && !s.Ready() {
			writeText(w, http.StatusServiceUnavailable, "not ready\n")
			return
		}
		writeText(w, http.StatusOK, "ready\n")
	})
	if s.Metrics != nil {
		mux.Handle("GET /metrics", s.Metrics)
	}
	if s.API != nil {
		mux.Handle("/api/", s.API)
	}
	return mux
}

func writeText(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	w.Write([]byte(body))
}

// Listen binds Address, so that a port in use fails the start rather than
// a background goroutine.
func (s *Server) Listen() error {
	if s.Logger == nil {
		s.Logger = slog.Default()
	}
	limit := s.MaxConnections
	if limit <= 0 {
		limit = DefaultMaxConnections
	}
	ln, err := net.Listen("tcp", s.Address)
	if err != nil {
		return err // names the address: "listen tcp 127.0.0.1:9090: bind: …"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ln = acceptLogger{Listener: netutil.LimitListener(ln, limit), log: s.Logger}
	s.srv = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// What net/http logs here is mostly about clients' requests;
		// failed accepts, which are the process's own, acceptLogger
		// reports at warn.
		ErrorLog: slog.NewLogLogger(s.Logger.Handler(), slog.LevelDebug),
	}
	return nil
}

// acceptLogger reports failed accepts at warn: running out of file
// descriptors stops the relay from answering probes and the admin API,
// and an operator must see it. http.Server retries them with a backoff
// of up to a second, so there is at most about one line a second.
type acceptLogger struct {
	net.Listener
	log *slog.Logger
}

func (l acceptLogger) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil && !errors.Is(err, net.ErrClosed) {
		l.log.Warn("accept failed", "listener", "http", "error", err)
	}
	return c, err
}

// Addr returns the bound address, or nil before Listen.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Serve answers requests until Shutdown or Close, then returns nil.
func (s *Server) Serve() error {
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.mu.Unlock()
	if srv == nil {
		return errors.New("http: Serve called before Listen")
	}
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("http: %w", err)
	}
	return nil
}

// Shutdown stops accepting, lets requests in progress finish until ctx
// ends, and closes idle connections.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Shutdown(ctx)
	// Serve may not have started, and then the listener is not the
	// server's to close; closing it again otherwise is harmless.
	ln.Close()
	return err
}

// Close stops the server at once, dropping requests in progress.
func (s *Server) Close() error {
	s.mu.Lock()
	srv, ln := s.srv, s.ln
	s.mu.Unlock()
	if srv == nil {
		return nil
	}
	err := srv.Close()
	ln.Close()
	return err
}
