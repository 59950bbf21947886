package deploy

import (
	"encoding/json"
	"os"
	"regexp"
	"testing"
)

type grafanaDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaPanel struct {
	ID          int                `json:"id"`
	Type        string             `json:"type"`
	Title       string             `json:"title"`
	Description string             `json:"description"`
	Datasource  *grafanaDatasource `json:"datasource"`
	GridPos     struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		Expr       string             `json:"expr"`
		RefID      string             `json:"refId"`
		Datasource *grafanaDatasource `json:"datasource"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"` // of a collapsed row
}

type grafanaDashboard struct {
	UID           string `json:"uid"`
	Title         string `json:"title"`
	SchemaVersion int    `json:"schemaVersion"`
	Inputs        []any  `json:"__inputs"`
	Templating    struct {
		List []struct {
			Name       string             `json:"name"`
			Type       string             `json:"type"`
			Query      any                `json:"query"`
			Datasource *grafanaDatasource `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
	Panels []grafanaPanel `json:"panels"`
}

// The data source is a dashboard variable, so that the same JSON works
// imported by hand and provisioned from a file.
const dashboardDatasource = "${datasource}"

// metricRef finds metric names in PromQL; the selector that must follow
// each keeps the panels to the chosen job and instances.
var (
	metricRef      = regexp.MustCompile(`\b(?:smarthost|go|process)_[a-z0-9_]+`)
	metricSelector = `{job=~"$job", instance=~"$instance"`
)

// TestDashboard checks the Grafana dashboard's model: it parses, every
// panel and query uses the data source variable, panels have unique IDs
// and do not overlap on the 24-column grid, and every metric in a query
// is filtered by the job and instance variables. Whether the metrics
// exist is checked against a live scrape by e2e/dashboard_test.go.
func TestDashboard(t *testing.T) {
	data, err := os.ReadFile("grafana/smarthost.json")
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("grafana/smarthost.json: %v", err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Errorf("uid %q, title %q, schemaVersion %d", d.UID, d.Title, d.SchemaVersion)
	}
	if len(d.Inputs) != 0 {
		t.Error("__inputs: the data source is a variable, not an import input")
	}

	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
		if v.Type == "query" && (v.Datasource == nil || v.Datasource.UID != dashboardDatasource) {
			t.Errorf("variable %s queries %+v", v.Name, v.Datasource)
		}
	}
	if vars["datasource"] != "datasource" || vars["job"] != "query" || vars["instance"] != "query" {
		t.Errorf("variables %v: want datasource, job and instance", vars)
	}

	ids := map[int]string{}
	cells := map[[2]int]string{}
	queries := 0
	var check func(p grafanaPanel)
	check = func(p grafanaPanel) {
		if prev, dup := ids[p.ID]; dup || p.ID == 0 {
			t.Errorf("panel %q: id %d already used by %q", p.Title, p.ID, prev)
		}
		ids[p.ID] = p.Title
		g := p.GridPos
		if g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q: gridPos %+v off the grid", p.Title, g)
		}
		for x := g.X; x < g.X+g.W; x++ {
			for y := g.Y; y < g.Y+g.H; y++ {
				if other, taken := cells[[2]int{x, y}]; taken {
					t.Errorf("panel %q overlaps %q at %d,%d", p.Title, other, x, y)
					return
				}
				cells[[2]int{x, y}] = p.Title
			}
		}
		for _, sub := range p.Panels {
			check(sub)
		}
		if p.Type == "row" {
			return
		}
		if p.Title == "" || p.Description == "" || len(p.Targets) == 0 {
			t.Errorf("panel %d %q: want a title, a description and queries", p.ID, p.Title)
		}
		if p.Datasource == nil || p.Datasource.UID != dashboardDatasource {
			t.Errorf("panel %q: data source %+v, want %s", p.Title, p.Datasource, dashboardDatasource)
		}
		refs := map[string]bool{}
		for _, q := range p.Targets {
			queries++
			if q.Expr == "" || q.RefID == "" || refs[q.RefID] {
				t.Errorf("panel %q: query %q with refId %q", p.Title, q.Expr, q.RefID)
			}
			refs[q.RefID] = true
			if q.Datasource == nil || q.Datasource.UID != dashboardDatasource {
				t.Errorf("panel %q: query data source %+v", p.Title, q.Datasource)
			}
			names := metricRef.FindAllStringIndex(q.Expr, -1)
			if len(names) == 0 {
				t.Errorf("panel %q: query %q names no metric", p.Title, q.Expr)
			}
			for _, loc := range names {
				if rest := q.Expr[loc[1]:]; len(rest) < len(metricSelector) || rest[:len(metricSelector)] != metricSelector {
					t.Errorf("panel %q: %s is not filtered by %s}", p.Title, q.Expr[loc[0]:loc[1]], metricSelector)
				}
			}
		}
	}
	for _, p := range d.Panels {
		check(p)
	}
	if queries == 0 {
		t.Error("no queries")
	}
}
