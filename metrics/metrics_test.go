package metrics

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"smarthost/queue"
	"smarthost/relay"
	"smarthost/relay/upstream"
	"smarthost/webhook"
)

// fakeQueue is a QueueState with fixed answers.
type fakeQueue struct {
	stats     queue.Stats
	err       error
	recovered int
}

func (q fakeQueue) Stats() (queue.Stats, error) { return q.stats, q.err }
func (q fakeQueue) Recovered() int              { return q.recovered }

// fakeWebhooks is a WebhookState with fixed answers.
type fakeWebhooks struct {
	n      int
	oldest time.Time
	err    error
}

func (w fakeWebhooks) WebhookBacklog() (int, time.Time, error) { return w.n, w.oldest, w.err }

// scrape answers GET /metrics through the listener's routes and parses it.
func scrape(t *testing.T, reg *prometheus.Registry, logger *slog.Logger) map[string]*dto.MetricFamily {
	t.Helper()
	srv := &Server{Metrics: Handler(reg, logger)}
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", rec.Code, rec.Body)
	}
	if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("Content-Type %q, want the text format", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("parsing the scrape: %v", err)
	}
	return fams
}

// value returns the value of the series of name with exactly labels
// (name=value pairs), failing if there is none.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no metric %s", name)
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
series:
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(want) {
			continue
		}
		for _, l := range m.GetLabel() {
			if want[l.GetName()] != l.GetValue() {
				continue series
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

func TestObserverCounts(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SetVersion("v1.2.3")
	m.InitLabels([]string{"submission"}, []string{"ses"})
	m.InitUsers([]string{"billing", "cron"})

	var ro relay.Observer = m
	ro.ConnectionOpened("submission")
	ro.ConnectionOpened("submission")
	ro.ConnectionClosed("submission")
	ro.ConnectionRefused("submission", "untrusted_network")
	ro.Accepted("submission", 3000, true)
	ro.Accepted("submission", 100, false)
	ro.Rejected("submission", "sender_not_allowed")
	ro.Rejected("submission", "sender_not_allowed")
	ro.AuthFailed("submission")
	ro.AuthBlocked("submission")
	ro.UserAccepted("billing")
	ro.UserAccepted("billing")
	ro.UserRateLimited("billing")

	var do upstream.Observer = m
	do.Transaction("ses", queue.OutcomeDeferred, 2*time.Second)
	do.Transaction("ses", queue.OutcomeDelivered, 300*time.Millisecond)
	do.Delivered("ses", 90*time.Second)
	do.Skipped("ses")

	var qo queue.Observer = m
	qo.Finished(queue.Message{ID: "a"}, queue.OutcomeDelivered)
	qo.Finished(queue.Message{ID: "b"}, queue.OutcomeBounced)
	qo.Finished(queue.Message{ID: "c", DSN: true}, queue.OutcomeDelivered) // not counted
	qo.DSNQueued(queue.BounceFailed)
	m.ConfigReloaded(errors.New("bad"))

	f := scrape(t, reg, nil)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"smarthost_build_info", []string{"version", "v1.2.3"}, 1},
		{"smarthost_connections_total", []string{"listener", "submission"}, 2},
		{"smarthost_connections_open", []string{"listener", "submission"}, 1},
		{"smarthost_connections_refused_total", []string{"listener", "submission", "reason", "untrusted_network"}, 1},
		{"smarthost_connections_refused_total", []string{"listener", "submission", "reason", "max_connections"}, 0},
		{"smarthost_messages_received_total", []string{"listener", "submission"}, 2},
		{"smarthost_message_size_bytes", nil, 2},
		{"smarthost_dkim_messages_total", []string{"result", "signed"}, 1},
		{"smarthost_dkim_messages_total", []string{"result", "unsigned"}, 1},
		{"smarthost_messages_rejected_total", []string{"listener", "submission", "reason", "sender_not_allowed"}, 2},
		{"smarthost_messages_rejected_total", []string{"listener", "submission", "reason", "auth_required"}, 0},
		{"smarthost_auth_failures_total", []string{"listener", "submission"}, 1},
		{"smarthost_auth_blocked_total", []string{"listener", "submission"}, 1},
		{"smarthost_user_messages_accepted_total", []string{"user", "billing"}, 2},
		{"smarthost_user_messages_accepted_total", []string{"user", "cron"}, 0},
		{"smarthost_user_rate_limited_total", []string{"user", "billing"}, 1},
		{"smarthost_user_rate_limited_total", []string{"user", "cron"}, 0},
		{"smarthost_delivery_attempts_total", []string{"upstream", "ses", "result", "deferred"}, 1},
		{"smarthost_delivery_attempts_total", []string{"upstream", "ses", "result", "delivered"}, 1},
		{"smarthost_delivery_attempts_total", []string{"upstream", "ses", "result", "skipped"}, 1},
		{"smarthost_delivery_attempts_total", []string{"upstream", "ses", "result", "failed"}, 0},
		{"smarthost_upstream_transaction_seconds", []string{"upstream", "ses"}, 2},
		{"smarthost_delivery_duration_seconds", []string{"upstream", "ses"}, 1},
		{"smarthost_messages_finished_total", []string{"outcome", "delivered"}, 1},
		{"smarthost_messages_finished_total", []string{"outcome", "bounced"}, 1},
		{"smarthost_messages_finished_total", []string{"outcome", "deleted"}, 0},
		{"smarthost_bounces_total", []string{"kind", "failed"}, 1},
		{"smarthost_bounces_total", []string{"kind", "delayed"}, 0},
		{"smarthost_config_reloads_total", []string{"result", "failure"}, 1},
		{"smarthost_config_reloads_total", []string{"result", "success"}, 0},
	}
	for _, c := range checks {
		if got := value(t, f, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	h := f["smarthost_delivery_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleSum() != 90 {
		t.Errorf("delivery duration sum %v, want 90", h.GetSampleSum())
	}
	if s := f["smarthost_message_size_bytes"].GetMetric()[0].GetHistogram().GetSampleSum(); s != 3100 {
		t.Errorf("message size sum %v, want 3100", s)
	}
	if ts := value(t, f, "smarthost_config_last_reload_success_timestamp_seconds"); time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("last reload success at %v: want the start, a failed reload leaves it", ts)
	}
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if _, ok := f[name]; !ok {
			t.Errorf("no %s: Go and process collectors missing", name)
		}
	}
}

func TestStateCollector(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	m.state.now = func() time.Time { return now }
	m.SetQueue(fakeQueue{stats: queue.Stats{Queued: 5, Held: 2, InFlight: 1, Oldest: now.Add(-90 * time.Second)}, recovered: 3})
	m.SetUpstreams(func() []upstream.State {
		return []upstream.State{
			{Name: "ses", State: upstream.StateUp, Up: true, RateLimitWaited: 1500 * time.Millisecond, RateLimited: 4},
			{Name: "backup", State: upstream.StateDown, Up: false},
			{Name: "spare", State: upstream.StateUnknown, Up: false},
		}
	})
	f := scrape(t, reg, nil)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"smarthost_queue_messages", []string{"state", "queued"}, 5},
		{"smarthost_queue_messages", []string{"state", "held"}, 2},
		{"smarthost_queue_messages", []string{"state", "in_flight"}, 1},
		{"smarthost_queue_oldest_message_age_seconds", nil, 90},
		{"smarthost_queue_recovered_messages", nil, 3},
		{"smarthost_upstream_up", []string{"upstream", "ses"}, 1},
		{"smarthost_upstream_up", []string{"upstream", "backup"}, 0},
		{"smarthost_upstream_state", []string{"upstream", "ses", "state", "up"}, 1},
		{"smarthost_upstream_state", []string{"upstream", "ses", "state", "unknown"}, 0},
		{"smarthost_upstream_state", []string{"upstream", "backup", "state", "down"}, 1},
		{"smarthost_upstream_state", []string{"upstream", "backup", "state", "up"}, 0},
		{"smarthost_upstream_state", []string{"upstream", "spare", "state", "unknown"}, 1},
		{"smarthost_upstream_state", []string{"upstream", "spare", "state", "down"}, 0},
		{"smarthost_upstream_rate_limit_wait_seconds_total", []string{"upstream", "ses"}, 1.5},
		{"smarthost_upstream_rate_limited_total", []string{"upstream", "ses"}, 4},
	}
	for _, c := range checks {
		if got := value(t, f, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	// Not contacted yet: neither up nor down.
	if n := len(f["smarthost_upstream_up"].GetMetric()); n != 2 {
		t.Errorf("%d upstream_up series, want 2: none for the unknown upstream", n)
	}

	// A reload replaces the Deliverer: the next scrape reads the new one,
	// and an upstream it no longer has is gone.
	m.SetUpstreams(func() []upstream.State { return []upstream.State{{Name: "ses", State: upstream.StateUp, Up: true}} })
	m.SetQueue(fakeQueue{})
	f = scrape(t, reg, nil)
	if n := len(f["smarthost_upstream_up"].GetMetric()); n != 1 {
		t.Errorf("%d upstream_up series after the reload, want 1", n)
	}
	if got := value(t, f, "smarthost_queue_oldest_message_age_seconds"); got != 0 {
		t.Errorf("oldest age of an empty queue = %v, want 0", got)
	}
}

// TestStateCollectorStore reads a real queue file.
func TestStateCollectorStore(t *testing.T) {
	st, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	received := time.Now().Add(-time.Hour).Round(0)
	var ids []string
	for i := range 3 {
		m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "x@example.net"}}, Received: received.Add(time.Duration(i) * time.Minute)}
		if err := st.Put(context.Background(), m, []byte("x\r\n")); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := st.Hold(ids[2]); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SetQueue(st)
	f := scrape(t, reg, nil)
	if q, h := value(t, f, "smarthost_queue_messages", "state", "queued"), value(t, f, "smarthost_queue_messages", "state", "held"); q != 2 || h != 1 {
		t.Errorf("queued %v held %v, want 2 and 1", q, h)
	}
	if age := value(t, f, "smarthost_queue_oldest_message_age_seconds"); age < 3600 || age > 3700 {
		t.Errorf("oldest age %v, want about an hour", age)
	}
}

// TestScrapeWithFailingQueue: a queue that cannot answer costs its own
// series only, and the failure is logged.
func TestScrapeWithFailingQueue(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SetVersion("v1")
	m.SetQueue(fakeQueue{err: errors.New("queue: stats: database not open")})
	var logs bytes.Buffer
	f := scrape(t, reg, slog.New(slog.NewTextHandler(&logs, nil)))
	if _, ok := f["smarthost_queue_messages"]; ok {
		t.Error("queue gauges served although the queue failed")
	}
	if value(t, f, "smarthost_build_info", "version", "v1") != 1 {
		t.Error("other metrics lost")
	}
	if !strings.Contains(logs.String(), "database not open") {
		t.Errorf("failure not logged: %q", logs.String())
	}
}

// fullRegistry is a registry on which every metric has its series: a
// version, one listener and upstream, a queue and an upstream state.
func fullRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.SetVersion("v1")
	m.InitLabels([]string{"submission"}, []string{"ses"})
	m.InitUsers([]string{"billing"})
	m.SetQueue(fakeQueue{})
	m.SetUpstreams(func() []upstream.State { return []upstream.State{{Name: "ses", State: upstream.StateUp, Up: true}} })
	m.SetWebhooks(fakeWebhooks{}, []string{"billing"})
	return reg
}

// TestLint holds every smarthost_ metric to Prometheus' conventions (what
// promtool check metrics checks): HELP present, counters ending in
// _total, base units.
func TestLint(t *testing.T) {
	reg := fullRegistry()
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "smarthost_") && f.GetHelp() == "" {
			t.Errorf("%s has no HELP", f.GetName())
		}
	}
}

// TestAllNamesExposed checks the exposed names against the list the
// dashboard and alert rules are built on.
func TestAllNamesExposed(t *testing.T) {
	reg := fullRegistry()
	f := scrape(t, reg, nil)
	want := map[string]dto.MetricType{
		"smarthost_build_info":                                   dto.MetricType_GAUGE,
		"smarthost_messages_received_total":                      dto.MetricType_COUNTER,
		"smarthost_messages_rejected_total":                      dto.MetricType_COUNTER,
		"smarthost_auth_failures_total":                          dto.MetricType_COUNTER,
		"smarthost_auth_blocked_total":                           dto.MetricType_COUNTER,
		"smarthost_connections_open":                             dto.MetricType_GAUGE,
		"smarthost_connections_total":                            dto.MetricType_COUNTER,
		"smarthost_connections_refused_total":                    dto.MetricType_COUNTER,
		"smarthost_user_messages_accepted_total":                 dto.MetricType_COUNTER,
		"smarthost_user_rate_limited_total":                      dto.MetricType_COUNTER,
		"smarthost_message_size_bytes":                           dto.MetricType_HISTOGRAM,
		"smarthost_dkim_messages_total":                          dto.MetricType_COUNTER,
		"smarthost_queue_messages":                               dto.MetricType_GAUGE,
		"smarthost_queue_oldest_message_age_seconds":             dto.MetricType_GAUGE,
		"smarthost_messages_finished_total":                      dto.MetricType_COUNTER,
		"smarthost_bounces_total":                                dto.MetricType_COUNTER,
		"smarthost_delivery_attempts_total":                      dto.MetricType_COUNTER,
		"smarthost_delivery_duration_seconds":                    dto.MetricType_HISTOGRAM,
		"smarthost_upstream_transaction_seconds":                 dto.MetricType_HISTOGRAM,
		"smarthost_upstream_up":                                  dto.MetricType_GAUGE,
		"smarthost_upstream_state":                               dto.MetricType_GAUGE,
		"smarthost_upstream_rate_limit_wait_seconds_total":       dto.MetricType_COUNTER,
		"smarthost_upstream_rate_limited_total":                  dto.MetricType_COUNTER,
		"smarthost_queue_recovered_messages":                     dto.MetricType_GAUGE,
		"smarthost_config_reloads_total":                         dto.MetricType_COUNTER,
		"smarthost_config_last_reload_success_timestamp_seconds": dto.MetricType_GAUGE,
		"smarthost_webhook_posts_total":                          dto.MetricType_COUNTER,
		"smarthost_webhook_pending":                              dto.MetricType_GAUGE,
		"smarthost_webhook_oldest_pending_age_seconds":           dto.MetricType_GAUGE,
	}
	for name, typ := range want {
		fam, ok := f[name]
		if !ok {
			t.Errorf("%s not exposed", name)
			continue
		}
		if fam.GetType() != typ {
			t.Errorf("%s is a %v, want %v", name, fam.GetType(), typ)
		}
	}
	for name := range f {
		if _, ok := want[name]; strings.HasPrefix(name, "smarthost_") && !ok {
			t.Errorf("%s exposed but not in the agreed list", name)
		}
	}
}

// TestTwoInstances: New registers nothing globally, so two instances live
// side by side, each on its own registry.
func TestTwoInstances(t *testing.T) {
	a, b := prometheus.NewRegistry(), prometheus.NewRegistry()
	ma, _ := New(a), New(b)
	ma.Rejected("x", "loop")
	fa, fb := scrape(t, a, nil), scrape(t, b, nil)
	if value(t, fa, "smarthost_messages_rejected_total", "listener", "x", "reason", "loop") != 1 {
		t.Error("a lost its count")
	}
	if _, ok := fb["smarthost_messages_rejected_total"]; ok {
		t.Error("b sees a's count")
	}
}

// TestUpstreamTokenExpiry: the gauge is the Unix time at which each OAuth2
// upstream's cached token expires, and absent for the others.
func TestUpstreamTokenExpiry(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	expiry := time.Date(2030, 1, 1, 13, 0, 0, 500_000_000, time.UTC)
	m.SetUpstreams(func() []upstream.State {
		return []upstream.State{
			{Name: "gmail", Up: true, TokenExpiry: expiry},
			{Name: "ses", Up: true},
		}
	})
	f := scrape(t, reg, nil)
	if got, want := value(t, f, "smarthost_upstream_token_expiry_seconds", "upstream", "gmail"), float64(expiry.Unix())+0.5; got != want {
		t.Errorf("token expiry of gmail = %v, want %v", got, want)
	}
	if n := len(f["smarthost_upstream_token_expiry_seconds"].GetMetric()); n != 1 {
		t.Errorf("%d token expiry series, want 1: an upstream without a token has none", n)
	}
	if got := f["smarthost_upstream_token_expiry_seconds"].GetType(); got != dto.MetricType_GAUGE {
		t.Errorf("type %v, want a gauge", got)
	}
}

// TestWebhookMetrics: the posts by webhook and result, from the
// Dispatcher's reports, and the backlog read at every scrape.
func TestWebhookMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	m.state.now = func() time.Time { return now }
	m.SetWebhooks(fakeWebhooks{n: 7, oldest: now.Add(-90 * time.Minute)}, []string{"billing", "audit"})
	m.WebhookPosted("billing", webhook.Sent)
	m.WebhookPosted("billing", webhook.Failed)
	m.WebhookPosted("billing", webhook.Failed)
	m.WebhookPosted("audit", webhook.Dropped)
	f := scrape(t, reg, nil)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"smarthost_webhook_posts_total", []string{"webhook", "billing", "result", "sent"}, 1},
		{"smarthost_webhook_posts_total", []string{"webhook", "billing", "result", "failed"}, 2},
		{"smarthost_webhook_posts_total", []string{"webhook", "billing", "result", "dropped"}, 0},
		{"smarthost_webhook_posts_total", []string{"webhook", "audit", "result", "sent"}, 0},
		{"smarthost_webhook_posts_total", []string{"webhook", "audit", "result", "dropped"}, 1},
		{"smarthost_webhook_pending", nil, 7},
		{"smarthost_webhook_oldest_pending_age_seconds", nil, 5400},
	} {
		if got := value(t, f, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}

	m.SetWebhooks(fakeWebhooks{}, nil)
	f = scrape(t, reg, nil)
	if p, age := value(t, f, "smarthost_webhook_pending"), value(t, f, "smarthost_webhook_oldest_pending_age_seconds"); p != 0 || age != 0 {
		t.Errorf("empty outbox: pending %v, oldest age %v; want 0 and 0", p, age)
	}

	// A backlog that cannot be read costs its own series only, and is logged.
	m.SetWebhooks(fakeWebhooks{err: errors.New("queue: webhook backlog: database not open")}, nil)
	var logs bytes.Buffer
	f = scrape(t, reg, slog.New(slog.NewTextHandler(&logs, nil)))
	if _, ok := f["smarthost_webhook_pending"]; ok {
		t.Error("webhook gauges served although the backlog failed")
	}
	if value(t, f, "smarthost_webhook_posts_total", "webhook", "billing", "result", "sent") != 1 {
		t.Error("the counters were lost")
	}
	if !strings.Contains(logs.String(), "database not open") {
		t.Errorf("failure not logged: %q", logs.String())
	}
}
