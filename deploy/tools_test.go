package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// The tools, pinned. `go run pkg@version` builds them from the Go module
// proxy without touching any go.mod, and caches the executables, so only
// the first run of a machine pays for the build (Helm: about 3 minutes
// on two cores).
const (
	helmPkg        = "helm.sh/helm/v3/cmd/helm@v3.22.0"
	kubeconformPkg = "github.com/yannh/kubeconform/cmd/kubeconform@v0.7.0"
)

// schemaLocation is where kubeconform finds the schema of a kind: the
// files schemagen wrote, never the network.
const schemaLocation = "testdata/schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json"

// smarthostBin is the relay binary, built from the repository once.
var smarthostBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "smarthost-deploy-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := func() int {
		defer os.RemoveAll(dir)
		smarthostBin = filepath.Join(dir, "smarthost")
		steps := []struct {
			what string
			cmd  *exec.Cmd
		}{
			{"smarthost", exec.Command("go", "build", "-o", smarthostBin, "./cmd/smarthost")},
			{helmPkg, exec.Command("go", "run", helmPkg, "version", "--short")},
			{kubeconformPkg, exec.Command("go", "run", kubeconformPkg, "-v")},
		}
		steps[0].cmd.Dir = ".."
		// Built one after the other before any test, so that parallel
		// tests do not build the same tool at once.
		for _, s := range steps {
			start := time.Now()
			var stderr bytes.Buffer
			s.cmd.Stdout, s.cmd.Stderr = io.Discard, &stderr
			if err := s.cmd.Run(); err != nil {
				fmt.Fprintf(os.Stderr, "building %s: %v\n%s", s.what, err, stderr.Bytes())
				return 1
			}
			if took := time.Since(start); took > 10*time.Second {
				fmt.Fprintf(os.Stderr, "deploy: built %s in %s\n", s.what, took.Round(time.Second))
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

// goRun runs a pinned tool and returns its standard output; the error
// carries its standard error.
func goRun(t *testing.T, pkg string, args ...string) ([]byte, error) {
	t.Helper()
	cmd := exec.Command("go", append([]string{"run", pkg}, args...)...)
	// Helm's own files go to the test's directory, not $HOME.
	home := t.TempDir()
	cmd.Env = append(os.Environ(),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w\n%s", pkg, strings.Join(args, " "), err, stderr.Bytes())
	}
	return out, nil
}

// helmTemplate renders the chart with the release name "relay" in the
// namespace "mail", with a user (testdata/values-user.yaml) under args.
func helmTemplate(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	return helmTemplateBare(t, append([]string{"-f", "testdata/values-user.yaml"}, args...)...)
}

// helmTemplateBare renders the chart with args alone.
func helmTemplateBare(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	return goRun(t, helmPkg, append([]string{"template", "relay", "helm/smarthost", "--namespace", "mail"}, args...)...)
}

// object is one Kubernetes manifest, decoded.
type object map[string]any

func (o object) kind() string { s, _ := o["kind"].(string); return s }

func (o object) name() string {
	s, _ := dig(o, "metadata", "name").(string)
	return s
}

// dig walks maps by key.
func dig(v any, keys ...string) any {
	for _, k := range keys {
		var m map[string]any
		switch x := v.(type) {
		case map[string]any:
			m = x
		case object:
			m = x
		default:
			return nil
		}
		v = m[k]
	}
	return v
}

// decodeInto converts a decoded value into a typed one through YAML. The
// types name only the fields a test looks at; kubeconform checks the rest.
func decodeInto(t *testing.T, v any, out any) {
	t.Helper()
	data, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, out); err != nil {
		t.Fatalf("decoding %T: %v\n%s", out, err, data)
	}
}

// splitDocuments decodes a stream of YAML documents, skipping empty ones.
func splitDocuments(t *testing.T, data []byte) []object {
	t.Helper()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var out []object
	for {
		// A plain map, so that the nested ones are plain maps too.
		var m map[string]any
		err := dec.Decode(&m)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("decoding manifests: %v", err)
		}
		if m != nil {
			out = append(out, object(m))
		}
	}
}

// kubeconformReport is kubeconform's -output json -summary.
type kubeconformReport struct {
	Resources []struct {
		Filename, Kind, Name, Status, Msg string
	} `json:"resources"`
	Summary struct {
		Valid, Invalid, Errors, Skipped int
	} `json:"summary"`
}

// kubeconform checks the manifests in data against the strict schemas
// and fails the test unless every one of want documents is valid.
func kubeconform(t *testing.T, data []byte, want int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "manifests.yaml")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := goRun(t, kubeconformPkg, "-strict", "-summary", "-output", "json", "-verbose",
		"-schema-location", schemaLocation, path)
	var rep kubeconformReport
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		t.Fatalf("kubeconform: %v; output %s (%v)", jerr, out, err)
	}
	for _, r := range rep.Resources {
		if r.Status != "statusValid" {
			t.Errorf("kubeconform: %s %s: %s %s", r.Kind, r.Name, r.Status, r.Msg)
		}
	}
	if s := rep.Summary; s.Valid != want || s.Invalid+s.Errors+s.Skipped != 0 {
		t.Errorf("kubeconform: %d valid, %d invalid, %d errors, %d skipped; want %d valid", s.Valid, s.Invalid, s.Errors, s.Skipped, want)
	}
	if err != nil && !t.Failed() {
		t.Errorf("kubeconform: %v", err)
	}
}

// checkConfig runs `smarthost check-config` on a configuration written
// for a pod, with the pod's directories moved under root, and returns its
// output. env holds the variables the pod would get; args are more flags.
func checkConfig(t *testing.T, config, root string, env map[string]string, args ...string) (string, error) {
	t.Helper()
	for _, dir := range []string{"/etc/smarthost/", "/var/lib/smarthost"} {
		config = strings.ReplaceAll(config, `"`+dir, `"`+root+dir)
	}
	path := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(smarthostBin, append([]string{"check-config", "-config", path}, args...)...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}
