package metrics

import (
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"smarthost/queue"
	"smarthost/relay"
	"smarthost/relay/upstream"
	"smarthost/webhook"
)

// Metrics is smarthost's Prometheus instrumentation. It is the observer
// that the submission server (relay.Observer), the Deliverer
// (upstream.Observer) and the queue (queue.Observer) report to, and
// it reads the queue's and the upstreams' state at every scrape. Labels
// take bounded values only: listener and upstream names from the
// configuration, and fixed words for reason, result, outcome, state and
// kind; never an address or a queue ID.
//
// Create it with New; its methods are safe for concurrent use.
type Metrics struct {
	buildInfo          *prometheus.GaugeVec
	received           *prometheus.CounterVec
	rejected           *prometheus.CounterVec
	authFailures       *prometheus.CounterVec
	authBlocked        *prometheus.CounterVec
	connectionsOpen    *prometheus.GaugeVec
	connections        *prometheus.CounterVec
	connectionsRefused *prometheus.CounterVec
	userAccepted       *prometheus.CounterVec
	userRateLimited    *prometheus.CounterVec
	messageSize        prometheus.Histogram
	dkim               *prometheus.CounterVec
	finished           *prometheus.CounterVec
	bounces            *prometheus.CounterVec
	attempts           *prometheus.CounterVec
	deliveryDuration   *prometheus.HistogramVec
	transactionTime    *prometheus.HistogramVec
	reloads            *prometheus.CounterVec
	lastReload         prometheus.Gauge
	webhookPosts       *prometheus.CounterVec

	state *stateCollector
}

var (
	_ relay.Observer    = (*Metrics)(nil)
	_ upstream.Observer = (*Metrics)(nil)
	_ queue.Observer    = (*Metrics)(nil)
	_ webhook.Observer  = (*Metrics)(nil)
)

// Histogram buckets. Message sizes run from a one-line notification to
// the largest attachments providers take; a delivery may wait in the
// queue for hours, a transaction takes milliseconds to minutes.
var (
	sizeBuckets        = prometheus.ExponentialBuckets(1<<10, 4, 10) // 1 KiB … 256 MiB
	deliveryBuckets    = []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400}
	transactionBuckets = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}
)

// New creates the metrics and registers them, with the Go and process
// collectors, on reg. Use a registry of one's own (prometheus.NewRegistry),
// not the default one, so that two instances in one process, as in tests,
// do not collide.
func New(reg prometheus.Registerer) *Metrics {
	f := promauto.With(reg)
	m := &Metrics{
		buildInfo: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "smarthost_build_info",
			Help: "Always 1; the version label is the running smarthost's.",
		}, []string{"version"}),
		received: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_messages_received_total",
			Help: "Messages accepted (answered 250 and queued), by listener.",
		}, []string{"listener"}),
		rejected: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_messages_rejected_total",
			Help: "Commands or messages refused by the submission side, by listener and reason.",
		}, []string{"listener", "reason"}),
		authFailures: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_auth_failures_total",
			Help: "Failed AUTH attempts (wrong user or password), by listener.",
		}, []string{"listener"}),
		authBlocked: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_auth_blocked_total",
			Help: "AUTH attempts refused with 421 because the client address failed too often (auth_failures_per_ip), by listener.",
		}, []string{"listener"}),
		connectionsOpen: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "smarthost_connections_open",
			Help: "Client connections open now, by listener.",
		}, []string{"listener"}),
		connections: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_connections_total",
			Help: "Client connections admitted, by listener.",
		}, []string{"listener"}),
		connectionsRefused: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_connections_refused_total",
			Help: "Client connections turned away before SMTP, by listener and reason.",
		}, []string{"listener", "reason"}),
		userAccepted: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_user_messages_accepted_total",
			Help: "Messages accepted from a logged-in user, by user.",
		}, []string{"user"}),
		userRateLimited: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_user_rate_limited_total",
			Help: "MAIL or RCPT commands of a user refused for its rate_limit or recipient_limit, by user.",
		}, []string{"user"}),
		messageSize: f.NewHistogram(prometheus.HistogramOpts{
			Name:    "smarthost_message_size_bytes",
			Help:    "Stored size of accepted messages, added header fields and DKIM signature included.",
			Buckets: sizeBuckets,
		}),
		dkim: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_dkim_messages_total",
			Help: "Accepted messages by DKIM result: signed, or unsigned (no key for the From: domain, or signing off).",
		}, []string{"result"}),
		finished: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_messages_finished_total",
			Help: "Accepted messages (DSNs left out) that left the queue: delivered to every recipient, bounced (a recipient failed or expired), or deleted by an administrator.",
		}, []string{"outcome"}),
		bounces: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_bounces_total",
			Help: "DSNs generated, by kind: failed recipients, or a delay warning.",
		}, []string{"kind"}),
		attempts: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_delivery_attempts_total",
			Help: "Upstream transactions, one per message per upstream tried, by upstream and result; skipped: the upstream was down or at its rate limit.",
		}, []string{"upstream", "result"}),
		deliveryDuration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "smarthost_delivery_duration_seconds",
			Help:    "Time from acceptance to the upstream's 250, per delivered message (DSNs left out), by upstream.",
			Buckets: deliveryBuckets,
		}, []string{"upstream"}),
		transactionTime: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "smarthost_upstream_transaction_seconds",
			Help:    "Duration of one upstream transaction, from connecting or reusing a connection to the end of data, by upstream.",
			Buckets: transactionBuckets,
		}, []string{"upstream"}),
		reloads: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_config_reloads_total",
			Help: "Configuration reloads, by result.",
		}, []string{"result"}),
		lastReload: f.NewGauge(prometheus.GaugeOpts{
			Name: "smarthost_config_last_reload_success_timestamp_seconds",
			Help: "Unix time of the last successful configuration load, at start or by reload.",
		}),
		webhookPosts: f.NewCounterVec(prometheus.CounterOpts{
			Name: "smarthost_webhook_posts_total",
			Help: "Tries of webhook posts, by webhook and result: sent (answered 2xx), failed (tried again later), dropped (given up after 24h, or its webhook is no longer configured).",
		}, []string{"webhook", "result"}),
		state: newStateCollector(),
	}
	reg.MustRegister(m.state, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Series of the fixed label values exist from the start, so that
	// rate() and increase() see their first event.
	for _, r := range []string{"signed", "unsigned"} {
		m.dkim.WithLabelValues(r)
	}
	for _, o := range queue.FinishedOutcomes() {
		m.finished.WithLabelValues(string(o))
	}
	for _, k := range []queue.BounceKind{queue.BounceFailed, queue.BounceDelayed} {
		m.bounces.WithLabelValues(k.String())
	}
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	m.lastReload.SetToCurrentTime()
	return m
}

// Handler serves the metrics gathered from g in the Prometheus text
// format. A collector that fails is logged and left out of the answer,
// rather than failing the whole scrape.
func Handler(g prometheus.Gatherer, logger *slog.Logger) http.Handler {
	if logger == nil {
		logger = slog.Default()
	}
	return promhttp.HandlerFor(g, promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(logger.Handler(), slog.LevelError),
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// SetVersion sets smarthost_build_info's version label.
func (m *Metrics) SetVersion(version string) {
	m.buildInfo.Reset()
	m.buildInfo.WithLabelValues(version).Set(1)
}

// InitLabels creates the series of the configured listeners and upstreams
// at zero, so that they are there before their first event.
func (m *Metrics) InitLabels(listeners, upstreams []string) {
	for _, l := range listeners {
		m.received.WithLabelValues(l)
		m.authFailures.WithLabelValues(l)
		m.authBlocked.WithLabelValues(l)
		m.connectionsOpen.WithLabelValues(l)
		m.connections.WithLabelValues(l)
		for _, r := range relay.RejectReasons() {
			m.rejected.WithLabelValues(l, string(r))
		}
		for _, r := range relay.RefuseReasons() {
			m.connectionsRefused.WithLabelValues(l, string(r))
		}
	}
	for _, u := range upstreams {
		for _, r := range queue.TransactionOutcomes() {
			m.attempts.WithLabelValues(u, string(r))
		}
		m.deliveryDuration.WithLabelValues(u)
		m.transactionTime.WithLabelValues(u)
	}
}

// InitUsers creates the series of the configured users at zero. Users
// come from the configuration, so the label is a bounded set; a user a
// reload removes keeps its series until the process ends.
func (m *Metrics) InitUsers(users []string) {
	for _, u := range users {
		m.userAccepted.WithLabelValues(u)
		m.userRateLimited.WithLabelValues(u)
	}
}

// SetQueue makes the queue gauges read q at every scrape; every
// queue.Backend is one.
func (m *Metrics) SetQueue(q QueueState) { m.state.setQueue(q) }

// SetWebhooks makes the webhook gauges read w at every scrape (every
// queue.Backend is one), and creates the series of the posts of the
// webhooks named at zero.
func (m *Metrics) SetWebhooks(w WebhookState, names []string) {
	for _, n := range names {
		for _, r := range webhook.Results() {
			m.webhookPosts.WithLabelValues(n, string(r))
		}
	}
	m.state.setWebhooks(w)
}

// WebhookPosted implements webhook.Observer.
func (m *Metrics) WebhookPosted(endpoint string, result webhook.Result) {
	m.webhookPosts.WithLabelValues(endpoint, string(result)).Inc()
}

// SetUpstreams makes the upstream gauges and counters read states at every
// scrape: the current Deliverer's UpstreamStates, set again when a reload
// replaces the Deliverer.
func (m *Metrics) SetUpstreams(states func() []upstream.State) { m.state.setUpstreams(states) }

// ConfigReloaded counts a configuration reload: err nil for one that took
// effect, else one that was rejected.
func (m *Metrics) ConfigReloaded(err error) {
	if err != nil {
		m.reloads.WithLabelValues("failure").Inc()
		return
	}
	m.reloads.WithLabelValues("success").Inc()
	m.lastReload.SetToCurrentTime()
}

// ConnectionOpened implements relay.Observer.
func (m *Metrics) ConnectionOpened(listener string) {
	m.connections.WithLabelValues(listener).Inc()
	m.connectionsOpen.WithLabelValues(listener).Inc()
}

// ConnectionClosed implements relay.Observer.
func (m *Metrics) ConnectionClosed(listener string) {
	m.connectionsOpen.WithLabelValues(listener).Dec()
}

// ConnectionRefused implements relay.Observer.
func (m *Metrics) ConnectionRefused(listener string, reason relay.Reason) {
	m.connectionsRefused.WithLabelValues(listener, string(reason)).Inc()
}

// Accepted implements relay.Observer.
func (m *Metrics) Accepted(listener string, size int, signed bool) {
	m.received.WithLabelValues(listener).Inc()
	m.messageSize.Observe(float64(size))
	result := "unsigned"
	if signed {
		result = "signed"
	}
	m.dkim.WithLabelValues(result).Inc()
}

// Rejected implements relay.Observer.
func (m *Metrics) Rejected(listener string, reason relay.Reason) {
	m.rejected.WithLabelValues(listener, string(reason)).Inc()
}

// AuthFailed implements relay.Observer.
func (m *Metrics) AuthFailed(listener string) { m.authFailures.WithLabelValues(listener).Inc() }

// AuthBlocked implements relay.Observer.
func (m *Metrics) AuthBlocked(listener string) { m.authBlocked.WithLabelValues(listener).Inc() }

// UserAccepted implements relay.Observer.
func (m *Metrics) UserAccepted(user string) { m.userAccepted.WithLabelValues(user).Inc() }

// UserRateLimited implements relay.Observer.
func (m *Metrics) UserRateLimited(user string) { m.userRateLimited.WithLabelValues(user).Inc() }

// Transaction implements upstream.Observer.
func (m *Metrics) Transaction(upstream string, result queue.Outcome, took time.Duration) {
	m.attempts.WithLabelValues(upstream, string(result)).Inc()
	m.transactionTime.WithLabelValues(upstream).Observe(took.Seconds())
}

// Skipped implements upstream.Observer.
func (m *Metrics) Skipped(upstream string) {
	m.attempts.WithLabelValues(upstream, string(queue.OutcomeSkipped)).Inc()
}

// Delivered implements upstream.Observer.
func (m *Metrics) Delivered(upstream string, sinceAccepted time.Duration) {
	m.deliveryDuration.WithLabelValues(upstream).Observe(max(sinceAccepted, 0).Seconds())
}

// Finished implements queue.Observer: DSNs are left out, so that received
// = delivered + bounced + deleted + still queued holds for what clients
// submitted.
func (m *Metrics) Finished(msg queue.Message, outcome queue.Outcome) {
	if msg.DSN {
		return
	}
	m.finished.WithLabelValues(string(outcome)).Inc()
}

// DSNQueued implements queue.Observer.
func (m *Metrics) DSNQueued(kind queue.BounceKind) {
	m.bounces.WithLabelValues(kind.String()).Inc()
}

// QueueState is what the queue gauges read at every scrape; every
// queue.Backend implements it.
type QueueState interface {
	// Stats returns the queue's size by state and its oldest message,
	// without reading every message.
	Stats() (queue.Stats, error)
	// Recovered returns how many deliveries were found interrupted at
	// start.
	Recovered() int
}

// WebhookState is what the webhook gauges read at every scrape; every
// queue.Backend implements it.
type WebhookState interface {
	// WebhookBacklog counts the posts waiting and tells when the event of
	// the oldest happened (zero when none waits).
	WebhookBacklog() (n int, oldest time.Time, err error)
}

// stateCollector reads the queue's and the upstreams' state when scraped,
// so that gauges are never stale and counters kept by the Deliverer are
// not counted twice.
type stateCollector struct {
	now func() time.Time

	mu        sync.Mutex
	queue     QueueState
	upstreams func() []upstream.State
	webhooks  WebhookState

	queueMessages  *prometheus.Desc
	oldestAge      *prometheus.Desc
	recovered      *prometheus.Desc
	upstreamUp     *prometheus.Desc
	upstreamState  *prometheus.Desc
	rateLimitWait  *prometheus.Desc
	rateLimitedCnt *prometheus.Desc
	tokenExpiry    *prometheus.Desc

	dbConnections    *prometheus.Desc
	dbMaxConnections *prometheus.Desc
	dbAcquires       *prometheus.Desc
	dbAcquireWaits   *prometheus.Desc
	dbAcquireWait    *prometheus.Desc
	leaseTakeovers   *prometheus.Desc

	webhookPending   *prometheus.Desc
	webhookOldestAge *prometheus.Desc
}

// queueDatabase is a queue kept in a database that replicas share: the
// PostgreSQL backend.
type queueDatabase interface {
	DatabaseStats() queue.DatabaseStats
}

func newStateCollector() *stateCollector {
	return &stateCollector{
		now: time.Now,
		queueMessages: prometheus.NewDesc("smarthost_queue_messages",
			"Messages in the queue, DSNs included, by state: queued (waiting for an attempt), held, in_flight (an attempt in progress).",
			[]string{"state"}, nil),
		oldestAge: prometheus.NewDesc("smarthost_queue_oldest_message_age_seconds",
			"Age of the oldest message in the queue, held ones included; 0 when the queue is empty.",
			nil, nil),
		recovered: prometheus.NewDesc("smarthost_queue_recovered_messages",
			"Deliveries found interrupted when the queue was opened: these messages may reach their recipients twice.",
			nil, nil),
		upstreamUp: prometheus.NewDesc("smarthost_upstream_up",
			"1 while the upstream is used, 0 while it is left out after failing; absent until the first delivery reaches it or fails to (see smarthost_upstream_state).",
			[]string{"upstream"}, nil),
		upstreamState: prometheus.NewDesc("smarthost_upstream_state",
			"1 for the upstream's current state, 0 for the others: unknown (not contacted yet), up or down.",
			[]string{"upstream", "state"}, nil),
		rateLimitWait: prometheus.NewDesc("smarthost_upstream_rate_limit_wait_seconds_total",
			"Time deliveries spent waiting for a slot under the upstream's rate limit.",
			[]string{"upstream"}, nil),
		rateLimitedCnt: prometheus.NewDesc("smarthost_upstream_rate_limited_total",
			"Deliveries that passed the upstream by, and were deferred if no other took them, because its rate limit had no slot soon enough.",
			[]string{"upstream"}, nil),
		tokenExpiry: prometheus.NewDesc("smarthost_upstream_token_expiry_seconds",
			"Unix time at which the OAuth2 access token cached for the upstream expires; it is renewed before then. Absent while no token with an expiry is cached.",
			[]string{"upstream"}, nil),
		dbConnections: prometheus.NewDesc("smarthost_queue_db_connections",
			"Connections to the queue's database, by state: in_use or idle (PostgreSQL backend).",
			[]string{"state"}, nil),
		dbMaxConnections: prometheus.NewDesc("smarthost_queue_db_max_connections",
			"Most connections this replica opens to the queue's database.",
			nil, nil),
		dbAcquires: prometheus.NewDesc("smarthost_queue_db_acquires_total",
			"Connections taken from the pool of the queue's database.",
			nil, nil),
		dbAcquireWaits: prometheus.NewDesc("smarthost_queue_db_acquire_waits_total",
			"Connections taken from the pool of the queue's database that had to wait for one: the pool is too small for the load.",
			nil, nil),
		dbAcquireWait: prometheus.NewDesc("smarthost_queue_db_acquire_wait_seconds_total",
			"Time spent waiting for a connection to the queue's database.",
			nil, nil),
		leaseTakeovers: prometheus.NewDesc("smarthost_queue_lease_takeovers_total",
			"Messages this replica took over from another whose claim lapsed (it died, or lost the database); each may reach its recipients twice.",
			nil, nil),
		webhookPending: prometheus.NewDesc("smarthost_webhook_pending",
			"Webhook posts waiting to be taken by their endpoint, in flight and failed ones included.",
			nil, nil),
		webhookOldestAge: prometheus.NewDesc("smarthost_webhook_oldest_pending_age_seconds",
			"Time since the event of the oldest webhook post still waiting; 0 when none waits.",
			nil, nil),
	}
}

func (c *stateCollector) setQueue(q QueueState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.queue = q
}

func (c *stateCollector) setWebhooks(w WebhookState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.webhooks = w
}

func (c *stateCollector) setUpstreams(f func() []upstream.State) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.upstreams = f
}

// Describe implements prometheus.Collector.
func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.queueMessages, c.oldestAge, c.recovered, c.upstreamUp, c.upstreamState, c.rateLimitWait, c.rateLimitedCnt, c.tokenExpiry,
		c.dbConnections, c.dbMaxConnections, c.dbAcquires, c.dbAcquireWaits, c.dbAcquireWait, c.leaseTakeovers, c.webhookPending, c.webhookOldestAge} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	q, upstreams, webhooks := c.queue, c.upstreams, c.webhooks
	c.mu.Unlock()

	if webhooks != nil {
		n, oldest, err := webhooks.WebhookBacklog()
		if err != nil {
			ch <- prometheus.NewInvalidMetric(c.webhookPending, err)
		} else {
			ch <- prometheus.MustNewConstMetric(c.webhookPending, prometheus.GaugeValue, float64(n))
			age := 0.0
			if !oldest.IsZero() {
				age = max(c.now().Sub(oldest).Seconds(), 0)
			}
			ch <- prometheus.MustNewConstMetric(c.webhookOldestAge, prometheus.GaugeValue, age)
		}
	}

	if q != nil {
		st, err := q.Stats()
		if err != nil {
			ch <- prometheus.NewInvalidMetric(c.queueMessages, err)
		} else {
			ch <- prometheus.MustNewConstMetric(c.queueMessages, prometheus.GaugeValue, float64(st.Queued), "queued")
			ch <- prometheus.MustNewConstMetric(c.queueMessages, prometheus.GaugeValue, float64(st.Held), "held")
			ch <- prometheus.MustNewConstMetric(c.queueMessages, prometheus.GaugeValue, float64(st.InFlight), "in_flight")
			age := 0.0
			if !st.Oldest.IsZero() {
				age = max(c.now().Sub(st.Oldest).Seconds(), 0)
			}
			ch <- prometheus.MustNewConstMetric(c.oldestAge, prometheus.GaugeValue, age)
		}
		ch <- prometheus.MustNewConstMetric(c.recovered, prometheus.GaugeValue, float64(q.Recovered()))
		if db, ok := q.(queueDatabase); ok {
			st := db.DatabaseStats()
			ch <- prometheus.MustNewConstMetric(c.dbConnections, prometheus.GaugeValue, float64(st.InUse), "in_use")
			ch <- prometheus.MustNewConstMetric(c.dbConnections, prometheus.GaugeValue, float64(st.Connections-st.InUse), "idle")
			ch <- prometheus.MustNewConstMetric(c.dbMaxConnections, prometheus.GaugeValue, float64(st.MaxConnections))
			ch <- prometheus.MustNewConstMetric(c.dbAcquires, prometheus.CounterValue, float64(st.Acquires))
			ch <- prometheus.MustNewConstMetric(c.dbAcquireWaits, prometheus.CounterValue, float64(st.Waited))
			ch <- prometheus.MustNewConstMetric(c.dbAcquireWait, prometheus.CounterValue, st.AcquireWait.Seconds())
			ch <- prometheus.MustNewConstMetric(c.leaseTakeovers, prometheus.CounterValue, float64(st.Takeovers))
		}
	}
	if upstreams != nil {
		for _, u := range upstreams() {
			for _, state := range []string{upstream.StateUnknown, upstream.StateUp, upstream.StateDown} {
				v := 0.0
				if u.State == state {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(c.upstreamState, prometheus.GaugeValue, v, u.Name, state)
			}
			// An upstream not contacted yet is neither: a 1 would hide
			// one that refuses every connection, a 0 would alert on an
			// idle backup.
			if u.State != upstream.StateUnknown {
				up := 0.0
				if u.Up {
					up = 1
				}
				ch <- prometheus.MustNewConstMetric(c.upstreamUp, prometheus.GaugeValue, up, u.Name)
			}
			ch <- prometheus.MustNewConstMetric(c.rateLimitWait, prometheus.CounterValue, u.RateLimitWaited.Seconds(), u.Name)
			ch <- prometheus.MustNewConstMetric(c.rateLimitedCnt, prometheus.CounterValue, float64(u.RateLimited), u.Name)
			if !u.TokenExpiry.IsZero() {
				ch <- prometheus.MustNewConstMetric(c.tokenExpiry, prometheus.GaugeValue, float64(u.TokenExpiry.UnixMilli())/1e3, u.Name)
			}
		}
	}
}
