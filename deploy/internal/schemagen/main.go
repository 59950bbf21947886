// Command schemagen writes the JSON schemas that kubeconform checks the
// chart and the sidecar example against, so that the check needs no
// network: one standalone, strict schema per kind, named as kubeconform's
// {{ .ResourceKind }}{{ .KindSuffix }}.json template expects.
//
// The Kubernetes schemas come from the OpenAPI v2 document in the
// k8s.io/kubernetes module (api/openapi-spec/swagger.json), the
// monitoring.coreos.com ones from the CRDs in the prometheus-operator
// module; both are fetched through the Go module proxy at the pinned
// versions below. The conversion follows openapi2jsonschema's
// --kubernetes --stand-alone --strict mode, which kubeconform's published
// schemas use: every $ref inlined, additionalProperties false on every
// object that lists its properties, optional fields nullable,
// int-or-string and quantities accepting numbers, descriptions dropped.
//
//	go run ./internal/schemagen -out testdata/schemas
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Pinned sources. Kubernetes is the oldest minor release still
// supported upstream, so that the manifests use no field a supported
// cluster lacks.
const (
	kubernetesModule      = "k8s.io/kubernetes@v1.35.1"
	prometheusOperatorMod = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
)

// kubeKinds are the built-in kinds the manifests use, by OpenAPI name.
var kubeKinds = []string{
	"io.k8s.api.core.v1.ConfigMap",
	"io.k8s.api.core.v1.Secret",
	"io.k8s.api.core.v1.Service",
	"io.k8s.api.apps.v1.StatefulSet",
	"io.k8s.api.apps.v1.Deployment",
	"io.k8s.api.policy.v1.PodDisruptionBudget",
	"io.k8s.api.networking.v1.NetworkPolicy",
}

// crdFiles are the CustomResourceDefinitions of the monitoring kinds.
var crdFiles = []string{
	"example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
	"example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
}

const objectMeta = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

func main() {
	out := flag.String("out", "testdata/schemas", "directory to write the schemas into")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "schemagen:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	kubeDir, err := moduleDir(kubernetesModule)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(filepath.Join(kubeDir, "api/openapi-spec/swagger.json"))
	if err != nil {
		return err
	}
	var doc struct {
		Definitions map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("swagger.json: %w", err)
	}
	conv := &converter{defs: doc.Definitions}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	for _, name := range kubeKinds {
		def, ok := conv.defs[name].(map[string]any)
		if !ok {
			return fmt.Errorf("%s: no such definition", name)
		}
		schema := conv.expand(def, nil)
		if conv.err != nil {
			return fmt.Errorf("%s: %w", name, conv.err)
		}
		gvk, err := groupVersionKind(def)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		pinKind(schema, gvk)
		if err := write(out, gvk, schema); err != nil {
			return err
		}
	}

	promDir, err := moduleDir(prometheusOperatorMod)
	if err != nil {
		return err
	}
	metaDef, ok := conv.defs[objectMeta].(map[string]any)
	if !ok {
		return fmt.Errorf("%s: no such definition", objectMeta)
	}
	meta := conv.expand(metaDef, nil)
	if conv.err != nil {
		return fmt.Errorf("%s: %w", objectMeta, conv.err)
	}
	for _, file := range crdFiles {
		schema, gvk, err := crdSchema(filepath.Join(promDir, file), "v1")
		if err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		// A CRD's schema says only "metadata: object"; the API server
		// checks it as ObjectMeta, so the check does too.
		schema["properties"].(map[string]any)["metadata"] = meta
		pinKind(schema, gvk)
		if err := write(out, gvk, schema); err != nil {
			return err
		}
	}
	return nil
}

// moduleDir downloads a module through the Go module proxy (or finds it
// in the module cache) and returns its directory.
func moduleDir(modVersion string) (string, error) {
	cmd := exec.Command("go", "mod", "download", "-json", modVersion)
	cmd.Stderr = os.Stderr
	outBytes, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w", modVersion, err)
	}
	var info struct{ Dir, Error string }
	if err := json.Unmarshal(outBytes, &info); err != nil {
		return "", fmt.Errorf("go mod download %s: %w", modVersion, err)
	}
	if info.Error != "" || info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: %s", modVersion, info.Error)
	}
	return info.Dir, nil
}

// gvk is a kind with its API group and version.
type gvk struct{ Group, Version, Kind string }

func (g gvk) apiVersion() string {
	if g.Group == "" {
		return g.Version
	}
	return g.Group + "/" + g.Version
}

// fileName is kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}.json:
// the lower-case kind, the first label of the group, and the version.
func (g gvk) fileName() string {
	name := strings.ToLower(g.Kind)
	if g.Group != "" {
		name += "-" + strings.ToLower(strings.Split(g.Group, ".")[0])
	}
	return name + "-" + strings.ToLower(g.Version) + ".json"
}

func groupVersionKind(def map[string]any) (gvk, error) {
	list, _ := def["x-kubernetes-group-version-kind"].([]any)
	if len(list) != 1 {
		return gvk{}, fmt.Errorf("want one x-kubernetes-group-version-kind, have %d", len(list))
	}
	m := list[0].(map[string]any)
	return gvk{Group: m["group"].(string), Version: m["version"].(string), Kind: m["kind"].(string)}, nil
}

// pinKind makes apiVersion and kind required and fixed, as the API server
// routes a document by them.
func pinKind(schema map[string]any, g gvk) {
	props := schema["properties"].(map[string]any)
	props["apiVersion"] = map[string]any{"type": "string", "enum": []any{g.apiVersion()}}
	props["kind"] = map[string]any{"type": "string", "enum": []any{g.Kind}}
	req, _ := schema["required"].([]any)
	for _, k := range []string{"apiVersion", "kind"} {
		if !slices.Contains(req, any(k)) {
			req = append(req, k)
		}
	}
	schema["required"] = req
}

func write(dir string, g gvk, schema map[string]any) error {
	data, err := json.MarshalIndent(schema, "", " ")
	if err != nil {
		return err
	}
	path := filepath.Join(dir, g.fileName())
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("%s (%d bytes)\n", path, len(data)+1)
	return nil
}

// converter turns OpenAPI v2 definitions into standalone JSON schemas.
type converter struct {
	defs map[string]any
	err  error // the first problem met
}

// expand returns a strict copy of an OpenAPI schema with every $ref
// inlined. stack holds the definitions being expanded, to catch a
// recursive type, which a standalone schema cannot hold.
func (c *converter) expand(s map[string]any, stack []string) map[string]any {
	if ref, ok := s["$ref"].(string); ok {
		name := strings.TrimPrefix(ref, "#/definitions/")
		if slices.Contains(stack, name) {
			c.fail(fmt.Errorf("recursive definition %s", name))
			return map[string]any{}
		}
		def, ok := c.defs[name].(map[string]any)
		if !ok {
			c.fail(fmt.Errorf("unknown definition %s", name))
			return map[string]any{}
		}
		switch name {
		case "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
			return map[string]any{"oneOf": []any{
				map[string]any{"type": "string"}, map[string]any{"type": "integer"},
			}}
		case "io.k8s.apimachinery.pkg.api.resource.Quantity":
			// "cpu: 1" is a YAML number, and the API server takes it.
			return map[string]any{"oneOf": []any{
				map[string]any{"type": "string"}, map[string]any{"type": "number"},
			}}
		}
		return c.expand(def, append(stack, name))
	}
	out := copySchema(s, func(p map[string]any, required bool) map[string]any {
		ps := c.expand(p, stack)
		if !required {
			ps = nullable(ps)
		}
		return ps
	}, func(m map[string]any) map[string]any { return c.expand(m, stack) })
	strict(out)
	return out
}

// copySchema copies what of the schema s bears on validity: descriptions
// and x- hints (documentation and API-machinery hints) are dropped, each
// property goes through prop with whether s requires it, an items or
// additionalProperties schema through sub, and the rest is copied as it
// is.
func copySchema(s map[string]any, prop func(p map[string]any, required bool) map[string]any, sub func(map[string]any) map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range s {
		switch {
		case k == "description", strings.HasPrefix(k, "x-"):
		case k == "properties":
			props := map[string]any{}
			required, _ := s["required"].([]any)
			for name, p := range v.(map[string]any) {
				props[name] = prop(p.(map[string]any), slices.Contains(required, any(name)))
			}
			out[k] = props
		case k == "items", k == "additionalProperties":
			if m, ok := v.(map[string]any); ok {
				out[k] = sub(m)
			} else {
				out[k] = v
			}
		default:
			out[k] = v
		}
	}
	return out
}

func (c *converter) fail(err error) {
	if c.err == nil {
		c.err = err
	}
}

// strict forbids fields that the schema does not list, as the API
// server drops (and kubectl refuses) them.
func strict(s map[string]any) {
	if _, ok := s["properties"]; ok {
		if _, set := s["additionalProperties"]; !set {
			s["additionalProperties"] = false
		}
	}
}

// nullable lets an optional field be null, as "field:" with no value is
// in YAML and the API server accepts.
func nullable(s map[string]any) map[string]any {
	switch t := s["type"].(type) {
	case string:
		s["type"] = []any{t, "null"}
	case nil:
		for _, k := range []string{"oneOf", "anyOf"} {
			if alt, ok := s[k].([]any); ok {
				s[k] = append(slices.Clone(alt), map[string]any{"type": "null"})
			}
		}
	}
	return s
}

// crdSchema reads a CustomResourceDefinition and returns the strict
// schema of one of its versions.
func crdSchema(path, version string) (map[string]any, gvk, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, gvk{}, err
	}
	var crd struct {
		Spec struct {
			Group string `yaml:"group"`
			Names struct {
				Kind string `yaml:"kind"`
			} `yaml:"names"`
			Versions []struct {
				Name   string `yaml:"name"`
				Schema struct {
					OpenAPIV3Schema map[string]any `yaml:"openAPIV3Schema"`
				} `yaml:"schema"`
			} `yaml:"versions"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(data, &crd); err != nil {
		return nil, gvk{}, err
	}
	for _, v := range crd.Spec.Versions {
		if v.Name == version {
			return crdStrict(v.Schema.OpenAPIV3Schema, true),
				gvk{Group: crd.Spec.Group, Version: version, Kind: crd.Spec.Names.Kind}, nil
		}
	}
	return nil, gvk{}, fmt.Errorf("no version %s", version)
}

// crdStrict copies a structural CRD schema (which has no $ref) with
// descriptions dropped, optional fields nullable, and additional
// properties refused except where the CRD keeps unknown fields.
func crdStrict(s map[string]any, required bool) map[string]any {
	sub := func(m map[string]any) map[string]any { return crdStrict(m, true) }
	out := copySchema(s, crdStrict, sub)
	for _, k := range []string{"anyOf", "oneOf", "allOf"} {
		if v, ok := s[k].([]any); ok {
			var alts []any
			for _, a := range v {
				alts = append(alts, sub(a.(map[string]any)))
			}
			out[k] = alts
		}
	}
	if keep, _ := s["x-kubernetes-preserve-unknown-fields"].(bool); !keep {
		strict(out)
	}
	if !required {
		nullable(out)
	}
	return out
}
