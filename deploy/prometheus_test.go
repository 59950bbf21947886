package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"testing"

	"go.yaml.in/yaml/v3"
)

// promtool is Debian's (package prometheus), which `make test` installs.
func promtool(t *testing.T, args ...string) {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found: `make test` installs it (Debian package prometheus)")
	}
	out, err := exec.Command(path, args...).CombinedOutput()
	if err != nil {
		t.Errorf("promtool %v: %v\n%s", args, err, out)
	}
}

// TestAlertRules checks the rules file and runs its unit tests: each
// alert fires on the series that should raise it, with its annotations
// as written, and stays quiet on a near miss.
func TestAlertRules(t *testing.T) {
	promtool(t, "check", "rules", "prometheus/alerts.yaml")
	promtool(t, "test", "rules", "prometheus/alerts_test.yaml")
}

// TestAlertRulesShape: every alert waits (for:), has a severity that
// routing can rely on, and says what happened and what to look at.
func TestAlertRulesShape(t *testing.T) {
	data, err := os.ReadFile("prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Groups []struct {
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				For         string            `yaml:"for"`
				Labels      map[string]string `yaml:"labels"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	alerts := map[string]bool{}
	for _, g := range file.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				t.Errorf("rule %q is not an alert", r.Expr)
				continue
			}
			alerts[r.Alert] = true
			if r.For == "" {
				t.Errorf("%s: no for:", r.Alert)
			}
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: severity %q", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: want summary and description annotations", r.Alert)
			}
		}
	}
	for _, a := range []string{"SmarthostQueueGrowing", "SmarthostOldestMessageTooOld", "SmarthostUpstreamDown",
		"SmarthostHighBounceRate", "SmarthostAuthFailureSpike", "SmarthostConfigReloadFailed", "SmarthostWebhookBacklogOld", "SmarthostWebhookFailing", "SmarthostUserRateLimited"} {
		if !alerts[a] {
			t.Errorf("no alert %s", a)
		}
	}
}

// TestChartCarriesAlertRules: the chart cannot read files outside its
// directory, so it keeps a copy of the rules; it must be the same.
func TestChartCarriesAlertRules(t *testing.T) {
	a, err := os.ReadFile("prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("helm/smarthost/files/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Error("helm/smarthost/files/alerts.yaml differs from prometheus/alerts.yaml: copy it over")
	}
}
