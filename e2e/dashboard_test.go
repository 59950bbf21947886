package e2e

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"smarthost/internal/testpki"
)

// metricName finds metric names of smarthost and of the Go and process
// collectors in PromQL, and in the text around the alert rules.
var metricName = regexp.MustCompile(`\b(?:smarthost|go|process)_[a-zA-Z0-9_]+`)

// TestDashboardAndAlertsUseLiveMetrics: every metric that the Grafana
// dashboard (deploy/grafana/smarthost.json) and the alert rules
// (deploy/prometheus/alerts.yaml) name is in a live scrape of the binary
// (on a bbolt queue, and on a PostgreSQL one), and every smarthost_
// metric of those scrapes is on the dashboard.
//
// The scrape is taken right after the start, before any mail: the relay
// creates each labelled series at zero when it starts (listeners,
// upstreams, reasons, results), since a labelled metric with no series
// yet is absent from a scrape, and rate() or increase() in an alert
// would then miss its first event. A name missing here is therefore
// either not a metric of the relay or one it does not show until it
// happens; both are faults of the dashboard, the rules or the relay.
// A histogram is exposed as its _bucket, _sum and _count series.
func TestDashboardAndAlertsUseLiveMetrics(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	down, _ := reserveAddr(t)
	// With a webhook, whose metrics then exist.
	hook, _ := webhookConfig(t, "billing", "http://"+down+"/hook")
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: down, Extra: hook}))
	// smarthost_upstream_up exists once a delivery has tried the upstream.
	s := connect(t, r.addr, pki)
	if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	s.close()
	_, fams := scrapeMetrics(t, r)
	for deadline := time.Now().Add(15 * time.Second); fams["smarthost_upstream_up"] == nil; _, fams = scrapeMetrics(t, r) {
		if time.Now().After(deadline) {
			t.Fatal("no smarthost_upstream_up after a delivery attempt")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A relay on a PostgreSQL queue shows the database's metrics too.
	q := newSharedQueue(t, false)
	pg := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: down, QueueExtra: q.config("")}))
	_, pgFams := scrapeMetrics(t, pg)
	for name, f := range pgFams {
		fams[name] = f
	}

	// series maps each name a query may use to its family.
	series := map[string]string{}
	for name, f := range fams {
		series[name] = name
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				series[name+s] = name
			}
		case dto.MetricType_SUMMARY:
			for _, s := range []string{"_sum", "_count"} {
				series[name+s] = name
			}
		}
	}

	dashboard := dashboardQueries(t, "../deploy/grafana/smarthost.json")
	alerts, err := os.ReadFile("../deploy/prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	onDashboard := map[string]bool{}
	for file, text := range map[string]string{"grafana/smarthost.json": strings.Join(dashboard, "\n"), "prometheus/alerts.yaml": string(alerts)} {
		names := metricName.FindAllString(text, -1)
		if len(names) == 0 {
			t.Errorf("deploy/%s names no metric", file)
		}
		for _, n := range names {
			fam, ok := series[n]
			if !ok {
				t.Errorf("deploy/%s names %s, which is not in a scrape of the relay", file, n)
				continue
			}
			if strings.HasPrefix(file, "grafana") {
				onDashboard[fam] = true
			}
		}
	}

	var missing []string
	for name := range fams {
		if strings.HasPrefix(name, "smarthost_") && !onDashboard[name] {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("metrics of the relay that no dashboard panel shows: %s", strings.Join(missing, ", "))
	}
}

// dashboardQueries returns the PromQL of a Grafana dashboard: the
// queries of its panels (rows' nested panels included) and of its
// template variables.
func dashboardQueries(t *testing.T, path string) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var model map[string]any
	if err := json.Unmarshal(data, &model); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []string
	var walk func(v any, key string)
	walk = func(v any, key string) {
		switch x := v.(type) {
		case map[string]any:
			for k, v := range x {
				walk(v, k)
			}
		case []any:
			for _, v := range x {
				walk(v, key)
			}
		case string:
			// expr: a panel's query; query and definition: a variable's.
			if key == "expr" || key == "query" || key == "definition" {
				out = append(out, x)
			}
		}
	}
	walk(model["panels"], "")
	walk(model["templating"], "")
	return out
}
