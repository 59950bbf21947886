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
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
	"smarthost/metrics"
	"smarthost/queue"
	"smarthost/relay"
	"smarthost/relay/upstream"
	"smarthost/webhook"
)

// loadFromFlags parses a command's -config flag and loads that file. On
// failure it has reported the problems and returns the exit code.
func loadFromFlags(command string, args []string, stderr io.Writer) (*config.Config, int) {
	fs := flag.NewFlagSet(command, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath(), "configuration file (env SMARTHOST_CONFIG)")
	if err := fs.Parse(args); err != nil {
		return nil, 2
	}
	cfg, err := config.Load(*path)
	if err != nil {
		printConfigErrors(stderr, *path, err)
		return nil, 1
	}
	return cfg, 0
}

func runCheckConfig(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", defaultConfigPath(), "configuration file (env SMARTHOST_CONFIG)")
	noSecrets := fs.Bool("no-secrets", false, "validate everything but read no secret (no password, key, token or DSN variable or file)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var read config.SecretFilter
	if *noSecrets {
		read = config.NoSecrets
	}
	cfg, err := config.LoadFiltered(*path, read)
	if err != nil {
		printConfigErrors(stderr, *path, err)
		return 1
	}
	unread := ""
	if *noSecrets {
		unread = ", secrets not read"
	}
	fmt.Fprintf(stdout, "%s: OK (%d listeners, %d users, %d DKIM keys, %d upstreams, %d routes%s)\n",
		cfg.Path, len(cfg.Listeners), len(cfg.Users), len(cfg.DKIM), len(cfg.Upstreams), len(cfg.Routes), unread)
	for _, w := range cfg.Warnings {
		fmt.Fprintf(stdout, "  warning: %s\n", w.Error())
	}
	return 0
}

func printConfigErrors(w io.Writer, path string, err error) {
	var errs config.Errors
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
	for _, w := range cfg.Warnings {
		logger.Warn("configuration: "+w.Msg, "key", w.Key)
	}
	// Signals are caught from before the start, so that one sent as soon
	// as the start is logged is handled rather than fatal.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	inst, err := start(cfg, logger)
	var damaged *queue.DamagedError
	if errors.As(err, &damaged) {
		// One line, with what to do: the file is left as it is.
		problem := damaged.Problem
		if damaged.More > 0 {
			problem += fmt.Sprintf(" (and %d more)", damaged.More)
		}
		logger.Error("queue file damaged; not started", "path", damaged.Path, "problem", problem, "fix", salvageHint(damaged.Path))
		return 1
	}
	if err != nil {
		logger.Error("start failed", "error", err)
		return 1
	}
	logger.Info("smarthost started", "version", buildVersion(), "listeners", inst.addrs(), "http", inst.httpAddr(),
		"queue", queueName(cfg), "queued", inst.queued())
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGHUP {
				inst.reload(cfg.Path)
				continue
			}
			timeout := inst.shutdownTimeout()
			logger.Info("shutting down", "signal", sig.String(), "timeout", timeout.String())
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
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
			ctx, cancel := context.WithTimeout(context.Background(), inst.shutdownTimeout())
			inst.shutdown(ctx)
			cancel()
			return 1
		}
	}
}

// salvageHint says what to do with a damaged queue file at path.
func salvageHint(path string) string {
	ext := filepath.Ext(path)
	out := strings.TrimSuffix(path, ext) + "-salvaged" + ext
	return fmt.Sprintf("keep a copy of %s, run `smarthost queue salvage -path %s -out %s`, then start with [queue] path = %q",
		path, path, out, out)
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
	log   *slog.Logger
	store queue.Backend
	sched *queue.Scheduler
	hooks *webhook.Dispatcher
	// delivery lives as long as the instance; a reload changes its
	// configuration in place (SetConfig).
	delivery *upstream.Deliverer
	shared   *upstream.Cluster   // the upstreams' state in the queue's database; nil with bbolt
	certs    *relay.CertReloader // nil without [tls]
	srv      *relay.Server
	http     *metrics.Server
	ready    atomic.Bool // /readyz: everything is up and not shutting down
	failed   chan error  // a component stopped on its own

	reloadMu sync.Mutex     // one reload at a time; guards cfg and secretFailure
	cfg      *config.Config // in effect: the last one reloaded, with the values that need a restart kept
	// secretFailure is the failure to read the secret files last logged,
	// to log each once.
	secretFailure string
	stopSecrets   chan struct{} // closed to stop watchSecrets
	secretsDone   chan struct{} // closed when watchSecrets returns
	// onReload, if set, is told the outcome of every reload, nil for
	// success, for the smarthost_config_reloads_total and
	// smarthost_config_last_reload_success_timestamp_seconds metrics.
	onReload func(err error)
	// initUsers, if set, creates the metrics series of the users a
	// reload adds.
	initUsers func(names []string)
}

// shutdownTimeout is the configured shutdown_timeout.
func (in *instance) shutdownTimeout() time.Duration {
	in.reloadMu.Lock()
	defer in.reloadMu.Unlock()
	if in.cfg == nil || in.cfg.ShutdownTimeout <= 0 {
		return config.DefaultShutdownTimeout
	}
	return in.cfg.ShutdownTimeout
}

// newDeliverer builds the delivery side, for the life of the process,
// with cfg's upstreams and routes in effect; with shared, the upstreams'
// rate limits and up/down state are the cluster's.
func newDeliverer(cfg *config.Config, logger *slog.Logger, shared *upstream.Cluster) *upstream.Deliverer {
	d := upstream.NewDeliverer()
	if shared != nil {
		d.NewHealth, d.NewRateWindow = shared.Health, shared.RateWindow
	}
	d.Hostname = cfg.Hostname
	// An upstream marked down stays skipped on the operator's retry
	// timing, so that it never holds mail back much longer than the
	// queue's own backoff would.
	d.DownFor = min(cfg.Queue.RetryMin, d.DownFor)
	d.MaxDownFor = min(cfg.Queue.RetryMax, d.MaxDownFor)
	d.Logger = logger
	d.SetConfig(deliveryConfig(cfg))
	return d
}

// deliveryConfig is what of cfg a reload changes in the Deliverer.
func deliveryConfig(cfg *config.Config) upstream.Config {
	return upstream.Config{
		Upstreams:      cfg.Upstreams,
		Routes:         cfg.Routes,
		CommandTimeout: cfg.Queue.UpstreamCommandTimeout,
		DataTimeout:    cfg.Queue.UpstreamDataTimeout,
	}
}

// newSigner builds the DKIM signer of a configuration, nil when it has no
// keys.
func newSigner(cfg *config.Config) (*dkim.Signer, error) {
	if len(cfg.DKIM) == 0 {
		return nil, nil
	}
	s, err := dkim.New(cfg.DKIM, nil)
	if err != nil {
		return nil, fmt.Errorf("dkim: %w", err)
	}
	return s, nil
}

// start opens the queue, binds the HTTP and SMTP listeners and starts
// delivery.
func start(cfg *config.Config, logger *slog.Logger) (*instance, error) {
	if cfg.SecretsSkipped {
		return nil, errors.New("the configuration was loaded without its secrets")
	}
	var tlsConfig *tls.Config
	var certs *relay.CertReloader
	if cfg.TLSCertFile != "" {
		// Read through GetCertificate, so that a renewed certificate is
		// served to new clients without a restart.
		var err error
		if certs, err = relay.NewCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile); err != nil {
			return nil, err
		}
		certs.Logger = logger
		tlsConfig = &tls.Config{GetCertificate: certs.GetCertificate, MinVersion: tls.VersionTLS12}
	}
	signer, err := newSigner(cfg)
	if err != nil {
		return nil, err
	}
	// One registry per instance, not Prometheus' global one: every part
	// reports to m, and /metrics serves reg.
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	m.SetVersion(buildVersion())
	m.InitLabels(listenerNames(cfg.Listeners), upstreamNames(cfg.Upstreams))
	m.InitUsers(userNames(cfg.Users))
	// The queue is opened (and checked) before anything is logged, so that
	// a damaged file makes one line.
	store, err := openQueue(cfg, logger, m)
	if err != nil {
		return nil, err
	}
	if signer != nil {
		logger.Info("DKIM signing on", "keys", len(cfg.DKIM), "domains", dkimDomains(cfg.DKIM))
	} else {
		logger.Info("DKIM signing off: no [[dkim]] keys; messages are relayed unsigned")
	}
	m.SetQueue(store)
	if n := store.Recovered(); n > 0 {
		logger.Warn("resuming deliveries interrupted by a crash; these may be delivered twice", "messages", n)
	}
	shared, err := sharedState(store, cfg.Queue.Lease, logger)
	if err != nil {
		store.Close()
		return nil, err
	}
	deliverer := newDeliverer(cfg, logger, shared)
	deliverer.Observer = m
	inst := &instance{log: logger, store: store, shared: shared, delivery: deliverer, certs: certs, cfg: cfg, failed: make(chan error, 3)}
	inst.onReload = m.ConfigReloaded
	inst.initUsers = m.InitUsers
	m.SetUpstreams(deliverer.UpstreamStates)
	sched := queue.NewScheduler(store, deliverer.Deliver)
	sched.Workers = cfg.Queue.Workers
	sched.RetryMin, sched.RetryMax = cfg.Queue.RetryMin, cfg.Queue.RetryMax
	sched.MaxAge = cfg.Queue.MaxAge
	sched.DelayWarning = cfg.Queue.DelayWarning
	sched.HistoryRetention = cfg.HistoryRetention
	sched.Logger = logger
	if cfg.Queue.Bounce {
		b := &upstream.Bouncer{Hostname: cfg.Hostname, MaxAge: cfg.Queue.MaxAge}
		sched.Bounce = b.Bounce
	} else {
		logger.Info("bounces off ([queue] bounce = false): senders are not told about failed or expired mail")
	}
	inst.sched = sched
	hooks := webhook.NewDispatcher(store, cfg.Webhooks)
	hooks.RetryMin, hooks.RetryMax = cfg.Queue.RetryMin, cfg.Queue.RetryMax
	hooks.Logger, hooks.Observer = logger, m
	inst.hooks = hooks
	m.SetWebhooks(store, webhookNames(cfg.Webhooks))

	token := ""
	if cfg.AdminTokenEnv != "" {
		token = os.Getenv(cfg.AdminTokenEnv)
	}
	inst.http = &metrics.Server{
		Address:        cfg.HTTPAddress,
		MaxConnections: cfg.HTTPMaxConnections,
		// Not ready while shutting down, nor while the queue cannot be
		// written: a relay that answers 452 to everything is no use.
		Ready: func() bool { return inst.ready.Load() && store.Writable() },
		API: &metrics.API{
			Queue:     adminQueue{store, deliverer},
			Upstreams: deliverer.UpstreamStates,
			Token:     token,
			Logger:    logger,
		},
		Metrics: metrics.Handler(reg, logger),
		Logger:  logger,
	}
	if err := inst.http.Listen(); err != nil {
		inst.closeStorage()
		return nil, fmt.Errorf("[http] address: %w", err)
	}
	if token == "" && !isLoopbackListen(inst.http.Addr()) {
		logger.Warn("the admin API answers only loopback clients: no [http] admin_token_env is set", "http", inst.http.Addr().String())
	}

	srv := relay.NewServer(store)
	srv.Hostname = cfg.Hostname
	srv.Listeners = cfg.Listeners
	srv.TLSConfig = tlsConfig
	srv.Users = cfg.Users
	srv.Limits = cfg.Limits
	srv.Signer = signer
	srv.Routable = deliverer.Routable
	srv.RcptRoutable = deliverer.RcptRoutable
	srv.Logger = logger
	srv.Observer = m
	if shared != nil {
		// The users' and clients' windows count the messages of every
		// replica, as the upstreams' do.
		srv.NewRateWindow = shared.RateWindow
	}
	if err := srv.Listen(); err != nil {
		inst.http.Close()
		inst.closeStorage()
		return nil, err
	}
	inst.srv = srv
	go func() {
		if err := sched.Run(); err != nil {
			inst.failed <- fmt.Errorf("scheduler: %w", err)
		}
	}()
	go func() {
		if err := hooks.Run(); err != nil && !errors.Is(err, webhook.ErrDispatcherClosed) {
			inst.failed <- fmt.Errorf("webhooks: %w", err)
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
	if certs != nil {
		certs.Start()
	}
	inst.stopSecrets, inst.secretsDone = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(inst.secretsDone)
		inst.watchSecrets(secretInterval, inst.stopSecrets)
	}()
	inst.ready.Store(true)
	return inst, nil
}

// webhookNames are the webhooks' label values.
func webhookNames(eps []webhook.Endpoint) []string {
	out := make([]string, len(eps))
	for i, e := range eps {
		out[i] = e.Name
	}
	return out
}

// listenerNames and upstreamNames are the label values the metrics start
// with.
func listenerNames(ls []relay.Listener) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.Name
	}
	return out
}

func userNames(us []relay.User) []string {
	out := make([]string, len(us))
	for i, u := range us {
		out[i] = u.Name
	}
	return out
}

func upstreamNames(ups []upstream.Upstream) []string {
	out := make([]string, len(ups))
	for i, u := range ups {
		out[i] = u.Name
	}
	return out
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
// turns 503 first and keeps answering while SMTP transactions finish;
// deliveries go on meanwhile, so a message accepted during the drain may
// leave before the exit. When ctx ends, the connections still open are
// closed and the deliveries in flight interrupted, their messages kept
// for the next start: that is the deadline working, not a failure.
func (in *instance) shutdown(ctx context.Context) error {
	in.ready.Store(false)
	var errs []error
	if err := in.srv.Shutdown(ctx); err != nil {
		in.log.Warn("shutdown_timeout reached: closed the SMTP connections still open; their messages were not accepted")
	}
	// The admin API stops before the queue it changes. Its requests are
	// short, and it gets a moment even after the deadline.
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	if err := in.http.Shutdown(hctx); err != nil {
		in.http.Close()
	}
	cancel()
	if err := in.sched.Shutdown(ctx); err != nil {
		in.log.Warn("shutdown_timeout reached: interrupted the deliveries in flight; their messages stay queued")
	}
	// Posts in flight are left leased: another start posts them again.
	hctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	in.hooks.Shutdown(hctx)
	cancel()
	if in.certs != nil {
		in.certs.Close()
	}
	if in.stopSecrets != nil {
		close(in.stopSecrets)
		<-in.secretsDone
	}
	// Idle upstream connections are closed once no delivery can use them.
	in.delivery.Close()
	if err := in.closeStorage(); err != nil {
		errs = append(errs, fmt.Errorf("queue: %w", err))
	}
	return errors.Join(errs...)
}

// closeStorage closes the upstreams' shared state, then the queue it
// lives in.
func (in *instance) closeStorage() error {
	if in.shared != nil {
		in.shared.Close()
	}
	return in.store.Close()
}

// adminQueue is the queue as the admin API sees it: a flush or a retry
// also lets down upstreams be probed at once, since the operator wants the
// mail to go now.
type adminQueue struct {
	queue.Backend
	delivery *upstream.Deliverer
}

func (a adminQueue) Flush() (int, error) {
	a.delivery.ProbeNow()
	return a.Backend.Flush()
}

func (a adminQueue) Retry(id string) error {
	a.delivery.ProbeNow()
	return a.Backend.Retry(id)
}
