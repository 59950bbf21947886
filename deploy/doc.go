// Package deploy holds the tests of smarthost's deployment files: the
// Helm chart (helm/smarthost), the sidecar example (sidecar/), the
// Prometheus alert rules (prometheus/) and the Grafana dashboard
// (grafana/). It is a module of its own, so that the tools and parsers
// the checks need stay out of the relay's go.mod; `make test` runs it.
//
// The chart is rendered with a pinned Helm and the manifests are checked
// with a pinned kubeconform, both run with `go run pkg@version` through
// the Go module proxy. kubeconform reads the JSON schemas kept in
// testdata/schemas, so the check needs no other network; regenerate them
// after changing the pinned sources in internal/schemagen:
//
//go:generate go run ./internal/schemagen -out testdata/schemas
package deploy
