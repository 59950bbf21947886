package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// queueEntry is a message as GET /api/queue and `smarthost queue -json
// list` show it.
type queueEntry struct {
	ID       string `json:"id"`
	Attempts int    `json:"attempts"`
	Held     bool   `json:"held"`
	InFlight bool   `json:"in_flight"`
	DSN      bool   `json:"dsn"`
}

// api calls the admin API with the bearer token and decodes the answer
// into out, if not nil.
func api(t *testing.T, r *relay, method, path string, out any) {
	t.Helper()
	req, err := http.NewRequest(method, r.http+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, resp.StatusCode, body)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, path, err, body)
		}
	}
}

func queueByID(t *testing.T, r *relay) map[string]queueEntry {
	t.Helper()
	var list []queueEntry
	api(t, r, http.MethodGet, "/api/queue", &list)
	out := map[string]queueEntry{}
	for _, m := range list {
		out[m.ID] = m
	}
	return out
}

// scrapeMetrics returns the raw text of /metrics and its parse.
func scrapeMetrics(t *testing.T, r *relay) ([]byte, map[string]*dto.MetricFamily) {
	t.Helper()
	resp, err := http.Get(r.http + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v\n%s", resp.StatusCode, err, raw)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, raw)
	}
	return raw, fams
}

// series returns the value of name{labels}: a counter's or gauge's value,
// a histogram's sample count. ok is false when there is no such series.
func series(fams map[string]*dto.MetricFamily, name string, labels map[string]string) (v float64, ok bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(labels) {
			continue
		}
		for _, l := range m.GetLabel() {
			if want, ok := labels[l.GetName()]; !ok || want != l.GetValue() {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// TestMetricsAfterWorkload runs a scripted workload through the binary
// and checks every counter it moves, exactly, on a live scrape: accepted,
// refused by policy, delivered, deferred then delivered, bounced with a
// DSN, deleted by an administrator and held. The books balance: received
// = delivered + bounced + deleted + still queued. promtool then checks
// the same scrape.
func TestMetricsAfterWorkload(t *testing.T) {
	t.Parallel()
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found: `make test` installs it (Debian package prometheus)")
	}
	pki := testpki.New(t)
	// later@ is deferred once, stuck@ always, bounce@ refused for good;
	// everyone else, the DSN's recipient included, is taken.
	var mu sync.Mutex
	deferred := map[string]bool{}
	up := startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		mu.Lock()
		defer mu.Unlock()
		local, _, _ := strings.Cut(to, "@")
		switch {
		case local == "bounce":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
		case strings.HasPrefix(local, "stuck"), local == "later" && !deferred[to]:
			deferred[to] = true
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try again later"}
		}
		return nil
	}})
	// A retry only when the test asks for one, so that every attempt is
	// one the test knows of.
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), RetryMin: "1h", RetryMax: "2h", MaxAge: "24h"})
	r := startRelay(t, cfg)
	const listener = "127.0.0.1:0" // a listener is named by its configured address

	// Refused by policy: MAIL before AUTH, a wrong password, a sender the
	// user may not use, a recipient we cannot relay to.
	c, err := smtp.DialStartTLS(r.addr, pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Mail("app@example.com", nil); !isCode(err, 530) {
		t.Fatalf("MAIL before AUTH: %v, want 530", err)
	}
	c.Close()
	c, err = smtp.DialStartTLS(r.addr, pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", userName, "wrong password")); !isCode(err, 535) {
		t.Fatalf("AUTH with a wrong password: %v, want 535", err)
	}
	c.Close()

	s := connect(t, r.addr, pki)
	if _, err := s.send("boss@elsewhere.example", []string{"a@example.net"}, "Subject: x\r\n\r\nx\r\n"); !isCode(err, 553) {
		t.Fatalf("sender not allowed: %v, want 553", err)
	}
	if err := s.c.Mail("app@example.com", nil); err != nil {
		t.Fatal(err)
	}
	if err := s.c.Rcpt("josé@example.net", nil); !isCode(err, 501) {
		t.Fatalf("non-ASCII recipient: %v, want 501", err)
	}
	if err := s.c.Reset(); err != nil {
		t.Fatal(err)
	}

	// Accepted: six messages.
	ids := map[string]string{}
	for _, name := range []string{"ok1", "ok2", "later", "bounce", "stuck-deleted", "stuck-held"} {
		to := []string{name + "@example.net"}
		if name == "ok2" {
			to = []string{"b@example.net", "c@example.net"}
		}
		msg := fmt.Sprintf("From: app@example.com\r\nTo: %s\r\nSubject: %s\r\n\r\nbody of %s\r\n", to[0], name, name)
		id, err := s.send("app@example.com", to, msg)
		if err != nil {
			t.Fatalf("send %s: %v", name, err)
		}
		ids[name] = id
	}
	s.close()

	// First attempts: ok1, ok2 delivered, bounce refused and its DSN
	// delivered, the others deferred and waiting an hour.
	testwait.For(t, 20*time.Second, "the first attempts", func() bool {
		if len(dsnsTo(up.Messages(), "app@example.com")) != 1 {
			return false
		}
		q := queueByID(t, r)
		for _, name := range []string{"later", "stuck-deleted", "stuck-held"} {
			if m, ok := q[ids[name]]; !ok || m.Attempts != 1 || m.InFlight {
				return false
			}
		}
		return len(q) == 3
	})
	api(t, r, http.MethodPost, "/api/queue/"+ids["later"]+"/retry", nil)
	api(t, r, http.MethodDelete, "/api/queue/"+ids["stuck-deleted"], nil)
	api(t, r, http.MethodPost, "/api/queue/"+ids["stuck-held"]+"/hold", nil)
	testwait.For(t, 20*time.Second, "later delivered on its retry", func() bool {
		q := queueByID(t, r)
		return len(q) == 1 && q[ids["stuck-held"]].Held
	})
	testwait.For(t, 10*time.Second, "the client connections closed", func() bool {
		_, f := scrapeMetrics(t, r)
		v, _ := series(f, "smarthost_connections_open", map[string]string{"listener": listener})
		return v == 0
	})

	raw, f := scrapeMetrics(t, r)
	l := func(kv ...string) map[string]string {
		m := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	want := []struct {
		name   string
		labels map[string]string
		value  float64
	}{
		{"smarthost_messages_received_total", l("listener", listener), 6},
		{"smarthost_messages_rejected_total", l("listener", listener, "reason", "auth_required"), 1},
		{"smarthost_messages_rejected_total", l("listener", listener, "reason", "sender_not_allowed"), 1},
		{"smarthost_messages_rejected_total", l("listener", listener, "reason", "bad_recipient"), 1},
		{"smarthost_messages_rejected_total", l("listener", listener, "reason", "bad_header"), 0},
		{"smarthost_auth_failures_total", l("listener", listener), 1},
		{"smarthost_auth_blocked_total", l("listener", listener), 0},
		{"smarthost_connections_total", l("listener", listener), 3},
		{"smarthost_connections_open", l("listener", listener), 0},
		{"smarthost_connections_refused_total", l("listener", listener, "reason", "untrusted_network"), 0},
		{"smarthost_message_size_bytes", l(), 6},
		{"smarthost_dkim_messages_total", l("result", "unsigned"), 6},
		{"smarthost_dkim_messages_total", l("result", "signed"), 0},
		{"smarthost_messages_finished_total", l("outcome", "delivered"), 3},
		{"smarthost_messages_finished_total", l("outcome", "bounced"), 1},
		{"smarthost_messages_finished_total", l("outcome", "deleted"), 1},
		{"smarthost_bounces_total", l("kind", "failed"), 1},
		{"smarthost_bounces_total", l("kind", "delayed"), 0},
		// ok1, ok2, later's retry and the DSN; later, both stuck; bounce.
		{"smarthost_delivery_attempts_total", l("upstream", "up", "result", "delivered"), 4},
		{"smarthost_delivery_attempts_total", l("upstream", "up", "result", "deferred"), 3},
		{"smarthost_delivery_attempts_total", l("upstream", "up", "result", "failed"), 1},
		{"smarthost_delivery_attempts_total", l("upstream", "up", "result", "skipped"), 0},
		{"smarthost_upstream_transaction_seconds", l("upstream", "up"), 8},
		{"smarthost_delivery_duration_seconds", l("upstream", "up"), 3}, // DSNs left out
		{"smarthost_upstream_up", l("upstream", "up"), 1},
		{"smarthost_upstream_rate_limited_total", l("upstream", "up"), 0},
		{"smarthost_queue_messages", l("state", "queued"), 0},
		{"smarthost_queue_messages", l("state", "held"), 1},
		{"smarthost_queue_messages", l("state", "in_flight"), 0},
		{"smarthost_queue_recovered_messages", l(), 0},
		{"smarthost_config_reloads_total", l("result", "success"), 0},
		{"smarthost_config_reloads_total", l("result", "failure"), 0},
	}
	for _, w := range want {
		got, ok := series(f, w.name, w.labels)
		if !ok {
			t.Errorf("no series %s%v", w.name, w.labels)
		} else if got != w.value {
			t.Errorf("%s%v = %v, want %v", w.name, w.labels, got, w.value)
		}
	}
	if age, _ := series(f, "smarthost_queue_oldest_message_age_seconds", l()); age <= 0 || age > 120 {
		t.Errorf("oldest message age %v s, want the held message's few seconds", age)
	}
	if info := f["smarthost_build_info"]; info == nil || len(info.GetMetric()) != 1 || info.GetMetric()[0].GetGauge().GetValue() != 1 {
		t.Errorf("smarthost_build_info: %v", info)
	}

	// The books balance: what was received was delivered, bounced,
	// deleted, or is still queued (DSNs left out of both sides).
	received, _ := series(f, "smarthost_messages_received_total", l("listener", listener))
	var finished float64
	for _, o := range []string{"delivered", "bounced", "deleted"} {
		v, _ := series(f, "smarthost_messages_finished_total", l("outcome", o))
		finished += v
	}
	queued := 0
	for _, m := range queueByID(t, r) {
		if !m.DSN {
			queued++
		}
	}
	if received != finished+float64(queued) {
		t.Errorf("received %v != finished %v + still queued %d", received, finished, queued)
	}

	// promtool, the reference linter, on the same live scrape.
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(raw)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}

	// Every family the relay exposes is one of ours or a Go or process
	// collector's: nothing is registered globally by a library.
	var names []string
	for name := range f {
		if !strings.HasPrefix(name, "smarthost_") && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	if len(names) > 0 {
		t.Errorf("unexpected metric families: %v", names)
	}
}

// isCode reports whether err is an SMTP reply with the given code.
func isCode(err error, code int) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se) && se.Code == code
}
