package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"smarthost/dkim"
	"smarthost/metrics"
	"smarthost/queue"
	"smarthost/relay"
)

// shutdownTimeout bounds a graceful stop, under Kubernetes' 30 s grace.
const shutdownTimeout = 25 * time.Second

// loadFromFlags parses a command's -config flag and loads that file. On
// failure it has reported the problems and returns the exit code.
func loadFromFlags(command string, args []string, stderr io.Writer) (*Config, int) {
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath(), "configuration file (env SMARTHOST_CONFIG)")
	if err := fs.Parse(args); err != nil {
		return nil, 2
	}
	cfg, err := LoadConfig(*path)
	if err != nil {
		printConfigErrors(stderr, *path, err)
		return nil, 1
	}
	return cfg, 0
}

func runCheckConfig(args []string, stdout, stderr io.Writer) int {
	cfg, code := loadFromFlags("check-config", args, stderr)
	if cfg == nil {
		return code
	}
	fmt.Fprintf(stdout, "%s: OK (%d listeners, %d users, %d DKIM keys, %d upstreams, %d routes)\n",
		cfg.Path, len(cfg.Listeners), len(cfg.Users), len(cfg.DKIM), len(cfg.Upstreams), len(cfg.Routes))
	return 0
}

func printConfigErrors(w io.Writer, path string, err error) {
	var errs ConfigErrors
	if errors.As(err, &errs) {
		fmt.Fprintf(w, "%s: %d problem(s):\n", path, len(errs))
		for _, e := range errs {
			fmt.Fprintf(w, "  %s\n", e.Error())
		}
		return
	}
	fmt.Fprintf(w, "%s: %v\n", path, err)
}

func runServe(args []string, stdout, stderr io.Writer) int {
	cfg, code := loadFromFlags("serve", args, stderr)
	if cfg == nil {
		return code
	}
	logger := newLogger(cfg.LogFormat, cfg.LogLevel, stderr)
	// Signals are caught from before the start, so that one sent as soon
	// as the start is logged is handled rather than fatal.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	inst, err := start(cfg, logger)
	if err != nil {
		logger.Error("start failed", "error", err)
		return 1
	}
	logger.Info("smarthost started", "version", buildVersion(), "listeners", inst.addrs(), "http", inst.httpAddr(),
		"queue", cfg.Queue.Path, "queued", inst.queued())
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				logger.Warn("SIGHUP received; configuration reload is not supported by this version, restart to apply changes")
				continue
			}
			logger.Info("shutting down", "signal", sig.String())
			ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
			err := inst.shutdown(ctx)
			cancel()
			if err != nil {
				logger.Error("shutdown", "error", err)
				return 1
			}
			logger.Info("stopped")
			return 0
		case err := <-inst.failed:
			logger.Error("server failed", "error", err)
			ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
			inst.shutdown(ctx)
			cancel()
			return 1
		}
	}
}

func newLogger(format string, level slog.Level, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// instance is a running relay: queue, scheduler, delivery, the
// submission server and the HTTP listener.
type instance struct {
	log       *slog.Logger
	store     *queue.Store
	sched     *queue.Scheduler
	deliverer *relay.Deliverer
	srv       *relay.Server
	http      *metrics.Server
	ready     atomic.Bool // /readyz: everything is up and not shutting down
	failed    chan error  // a component stopped on its own
}

// start opens the queue, binds the HTTP and SMTP listeners and starts
// delivery.
func start(cfg *Config, logger *slog.Logger) (*instance, error) {
	var tlsConfig *tls.Config
	if cfg.TLSCertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCertFile, cfg.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("tls certificate: %w", err)
		}
		tlsConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	// A nil *dkim.Signer in the relay.Signer interface would not be nil:
	// the field stays unset when there are no keys.
	var signer relay.Signer
	if len(cfg.DKIM) > 0 {
		s, err := dkim.New(cfg.DKIM, nil)
		if err != nil {
			return nil, fmt.Errorf("dkim: %w", err)
		}
		signer = s
		logger.Info("DKIM signing on", "keys", len(cfg.DKIM), "domains", dkimDomains(cfg.DKIM))
	} else {
		logger.Info("DKIM signing off: no [[dkim]] keys; messages are relayed unsigned")
	}
	store, err := queue.Open(cfg.Queue.Path, queue.Options{})
	if err != nil {
		return nil, err
	}
	if n := store.Recovered(); n > 0 {
		logger.Warn("resuming deliveries interrupted by a crash; these may be delivered twice", "messages", n)
	}
	deliverer := &relay.Deliverer{
		Hostname:  cfg.Hostname,
		Upstreams: cfg.Upstreams,
		Routes:    cfg.Routes,
		// An upstream marked down stays skipped on the operator's retry
		// timing, so that it never holds mail back much longer than the
		// queue's own backoff would.
		DownFor:    min(cfg.Queue.RetryMin, 30*time.Second),
		MaxDownFor: min(cfg.Queue.RetryMax, 5*time.Minute),
		Logger:     logger,
	}
	sched := &queue.Scheduler{
		Store:        store,
		Deliver:      deliverer.Deliver,
		Workers:      cfg.Queue.Workers,
		RetryMin:     cfg.Queue.RetryMin,
		RetryMax:     cfg.Queue.RetryMax,
		MaxAge:       cfg.Queue.MaxAge,
		DelayWarning: cfg.Queue.DelayWarning,
		Logger:       logger,
	}
	if cfg.Queue.Bounce {
		b := &relay.Bouncer{Hostname: cfg.Hostname, MaxAge: cfg.Queue.MaxAge}
		sched.Bounce = b.Bounce
	} else {
		logger.Info("bounces off ([queue] bounce = false): senders are not told about failed or expired mail")
	}
	inst := &instance{log: logger, store: store, sched: sched, deliverer: deliverer, failed: make(chan error, 3)}

	token := ""
	if cfg.AdminTokenEnv != "" {
		token = os.Getenv(cfg.AdminTokenEnv)
	}
	inst.http = &metrics.Server{
		Address: cfg.HTTPAddress,
		Ready:   inst.ready.Load,
		API: &metrics.API{
			Queue:     adminQueue{store, deliverer},
			Upstreams: deliverer.UpstreamStates,
			Token:     token,
			Logger:    logger,
		},
		Logger: logger,
	}
	if err := inst.http.Listen(); err != nil {
		store.Close()
		return nil, fmt.Errorf("[http] address: %w", err)
	}
	if token == "" && !isLoopbackListen(inst.http.Addr()) {
		logger.Warn("the admin API answers only loopback clients: no [http] admin_token_env is set", "http", inst.http.Addr().String())
	}

	srv := &relay.Server{
		Hostname:  cfg.Hostname,
		Listeners: cfg.Listeners,
		TLSConfig: tlsConfig,
		Users:     cfg.Users,
		Limits:    cfg.Limits,
		Queue:     store,
		Signer:    signer,
		Routable: func(from string) bool {
			_, ok := deliverer.Route(from)
			return ok
		},
		Logger: logger,
	}
	if err := srv.Listen(); err != nil {
		inst.http.Close()
		store.Close()
		return nil, err
	}
	inst.srv = srv
	go func() {
		if err := sched.Run(); err != nil {
			inst.failed <- fmt.Errorf("scheduler: %w", err)
		}
	}()
	go func() {
		if err := srv.Serve(); err != nil {
			inst.failed <- fmt.Errorf("smtp: %w", err)
		}
	}()
	go func() {
		if err := inst.http.Serve(); err != nil {
			inst.failed <- err
		}
	}()
	inst.ready.Store(true)
	return inst, nil
}

// isLoopbackListen reports whether a bound address is on loopback only.
func isLoopbackListen(a net.Addr) bool {
	ap, err := netip.ParseAddrPort(a.String())
	return err == nil && ap.Addr().Unmap().IsLoopback()
}

// httpAddr is the bound address of the HTTP listener, port 0 resolved.
func (in *instance) httpAddr() string {
	return in.http.Addr().String()
}

func (in *instance) addrs() []string {
	var out []string
	for _, a := range in.srv.Addrs() {
		out = append(out, a.String())
	}
	return out
}

func (in *instance) queued() int {
	n, _ := in.store.Len()
	return n
}

// dkimDomains names what each key signs for, in configuration order:
// "example.com" and, with subdomains, "*.example.com" too.
func dkimDomains(keys []dkim.Key) []string {
	var out []string
	for _, k := range keys {
		names := []string{k.Domain}
		if k.Subdomains {
			names = append(names, "*."+k.Domain)
		}
		for _, n := range names {
			if !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	return out
}

// shutdown stops in the order of STYLE.md: listeners and transactions,
// then deliveries (finished or left queued), then the database. /readyz
// turns 503 first and keeps answering while SMTP transactions finish.
func (in *instance) shutdown(ctx context.Context) error {
	in.ready.Store(false)
	var errs []error
	if err := in.srv.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("smtp: %w", err))
	}
	// The admin API stops before the queue it changes.
	if err := in.http.Shutdown(ctx); err != nil {
		in.http.Close()
		errs = append(errs, fmt.Errorf("http: %w", err))
	}
	if err := in.sched.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("scheduler: %w", err))
	}
	// Idle upstream connections are closed once no delivery can use them.
	in.deliverer.Close()
	if err := in.store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("queue: %w", err))
	}
	return errors.Join(errs...)
}

// adminQueue is the queue as the admin API sees it: a flush or a retry
// also lets down upstreams be probed at once, since the operator wants the
// mail to go now.
type adminQueue struct {
	*queue.Store
	deliverer *relay.Deliverer
}

func (a adminQueue) Flush() (int, error) {
	a.deliverer.ProbeNow()
	return a.Store.Flush()
}

func (a adminQueue) Retry(id string) error {
	a.deliverer.ProbeNow()
	return a.Store.Retry(id)
}
