package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"smarthost/internal/testpki"
)

// upstreamState is the state of the upstream "up" as /api/upstreams and
// /metrics report it: the API's state and up, and the value of
// smarthost_upstream_up, -1 when that series is absent.
func upstreamState(t *testing.T, r *relay) (state string, up bool, metric float64, stateMetric map[string]float64) {
	t.Helper()
	req, _ := http.NewRequest("GET", r.http+"/api/upstreams", nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ups []struct {
		Name  string `json:"name"`
		State string `json:"state"`
		Up    bool   `json:"up"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ups); err != nil || len(ups) != 1 || ups[0].Name != "up" {
		t.Fatalf("/api/upstreams: %+v, %v", ups, err)
	}
	_, fams := scrapeMetrics(t, r)
	metric = -1
	if v, ok := series(fams, "smarthost_upstream_up", map[string]string{"upstream": "up"}); ok {
		metric = v
	}
	stateMetric = map[string]float64{}
	for _, s := range []string{"unknown", "up", "down"} {
		if v, ok := series(fams, "smarthost_upstream_state", map[string]string{"upstream": "up", "state": s}); ok {
			stateMetric[s] = v
		}
	}
	return ups[0].State, ups[0].Up, metric, stateMetric
}

// TestUpstreamStateUnknownThenDown: a fresh relay reports its upstream
// unknown, neither up nor down; after the first message finds the
// upstream refusing connections, with no other upstream to take it, the
// upstream is reported down at once.
func TestUpstreamStateUnknownThenDown(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	refusing, _ := reserveAddr(t) // bound, not listening: connections are refused
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: refusing}))

	state, up, metric, states := upstreamState(t, r)
	if state != "unknown" || up || metric != -1 || states["unknown"] != 1 || states["up"] != 0 || states["down"] != 0 {
		t.Fatalf("fresh relay: state %q, up %v, smarthost_upstream_up %v, smarthost_upstream_state %v; want unknown, no up series",
			state, up, metric, states)
	}

	s := connect(t, r.addr, pki)
	if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
		t.Fatal(err)
	}
	s.close()
	deadline := time.Now().Add(15 * time.Second)
	for {
		state, up, metric, states = upstreamState(t, r)
		if state == "down" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a refused connection: state %q, up %v; want down:\n%s", state, up, tail(r.logPath, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if up || metric != 0 || states["down"] != 1 || states["unknown"] != 0 {
		t.Errorf("down: up %v, smarthost_upstream_up %v, smarthost_upstream_state %v", up, metric, states)
	}
	r.stop()
}
