package deploy

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"go.yaml.in/yaml/v3"
)

// The pod's paths, as the chart and the image lay them out.
const (
	configMount = "/etc/smarthost/config"
	queueMount  = "/var/lib/smarthost"
	tlsMount    = "/etc/smarthost/tls"
	dkimMount   = "/etc/smarthost/dkim"
	fullname    = "relay-smarthost" // release "relay", chart "smarthost"
)

// chartCase is one way of installing the chart.
type chartCase struct {
	name  string
	args  []string       // helm template flags
	kinds map[string]int // the manifests it must produce
	// The Secret the pod's environment comes from, and whether the chart
	// makes it.
	secret     string
	makeSecret bool
	// env is the environment of an existingSecret, for check-config.
	env         map[string]string
	persistence bool
	tlsSecret   string            // "" when no listener serves TLS
	dkimKeys    map[string]string // DKIM key files in the Secret: name → "rsa" | "ed25519"
	checkOutput string            // what check-config prints after "OK "
	// NetworkPolicy: the upstream ports in its egress, nil for no policy.
	upstreamPorts []int
}

var chartCases = []chartCase{
	{
		name:        "defaults",
		kinds:       map[string]int{"ConfigMap": 1, "Secret": 1, "Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1},
		secret:      fullname,
		makeSecret:  true,
		persistence: true,
		tlsSecret:   fullname + "-tls",
		checkOutput: "(1 listeners, 1 users, 0 DKIM keys, 1 upstreams, 1 routes)",
	},
	{
		name: "every option",
		args: []string{"-f", "testdata/values-full.yaml"},
		kinds: map[string]int{"ConfigMap": 1, "Secret": 1, "Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1,
			"NetworkPolicy": 1, "ServiceMonitor": 1, "PrometheusRule": 1},
		secret:        fullname,
		makeSecret:    true,
		persistence:   true,
		tlsSecret:     "relay-example-com-tls",
		dkimKeys:      map[string]string{"example.com.key": "rsa", "example.com.ed25519.key": "ed25519"},
		checkOutput:   "(3 listeners, 2 users, 2 DKIM keys, 2 upstreams, 2 routes)",
		upstreamPorts: []int{465, 587},
	},
	{
		name:          "raw config",
		args:          []string{"-f", "testdata/values-raw.yaml"},
		kinds:         map[string]int{"ConfigMap": 1, "Service": 2, "StatefulSet": 1, "NetworkPolicy": 1},
		secret:        "smarthost-env",
		env:           map[string]string{"SMARTHOST_ADMIN_TOKEN": "from the existing Secret"},
		checkOutput:   "(1 listeners, 0 users, 0 DKIM keys, 1 upstreams, 1 routes)",
		upstreamPorts: []int{587},
	},
}

// Subsets of the Kubernetes types, with the fields the tests look at.
type (
	container struct {
		Name          string   `yaml:"name"`
		Image         string   `yaml:"image"`
		RestartPolicy string   `yaml:"restartPolicy"`
		Args          []string `yaml:"args"`
		Env           []struct {
			Name      string `yaml:"name"`
			Value     string `yaml:"value"`
			ValueFrom *struct {
				ResourceFieldRef *struct {
					Resource string `yaml:"resource"`
				} `yaml:"resourceFieldRef"`
				SecretKeyRef *struct {
					Name string `yaml:"name"`
					Key  string `yaml:"key"`
				} `yaml:"secretKeyRef"`
			} `yaml:"valueFrom"`
		} `yaml:"env"`
		EnvFrom []struct {
			SecretRef struct {
				Name string `yaml:"name"`
			} `yaml:"secretRef"`
		} `yaml:"envFrom"`
		Ports []struct {
			Name          string `yaml:"name"`
			ContainerPort int    `yaml:"containerPort"`
		} `yaml:"ports"`
		LivenessProbe   *probe         `yaml:"livenessProbe"`
		ReadinessProbe  *probe         `yaml:"readinessProbe"`
		StartupProbe    *probe         `yaml:"startupProbe"`
		Resources       map[string]any `yaml:"resources"`
		SecurityContext map[string]any `yaml:"securityContext"`
		VolumeMounts    []struct {
			Name      string `yaml:"name"`
			MountPath string `yaml:"mountPath"`
			ReadOnly  bool   `yaml:"readOnly"`
		} `yaml:"volumeMounts"`
	}
	probe struct {
		HTTPGet struct {
			Path string `yaml:"path"`
			Port string `yaml:"port"`
		} `yaml:"httpGet"`
	}
	volume struct {
		Name      string `yaml:"name"`
		ConfigMap *struct {
			Name string `yaml:"name"`
		} `yaml:"configMap"`
		Secret *struct {
			SecretName string `yaml:"secretName"`
		} `yaml:"secret"`
		EmptyDir              map[string]any `yaml:"emptyDir"`
		PersistentVolumeClaim map[string]any `yaml:"persistentVolumeClaim"`
	}
	podSpec struct {
		AutomountServiceAccountToken  *bool          `yaml:"automountServiceAccountToken"`
		EnableServiceLinks            *bool          `yaml:"enableServiceLinks"`
		TerminationGracePeriodSeconds int            `yaml:"terminationGracePeriodSeconds"`
		SecurityContext               map[string]any `yaml:"securityContext"`
		InitContainers                []container    `yaml:"initContainers"`
		Containers                    []container    `yaml:"containers"`
		Volumes                       []volume       `yaml:"volumes"`
	}
	podTemplate struct {
		Metadata struct {
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"metadata"`
		Spec podSpec `yaml:"spec"`
	}
	statefulSet struct {
		Spec struct {
			Replicas    int    `yaml:"replicas"`
			ServiceName string `yaml:"serviceName"`
			Selector    struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"selector"`
			Template             podTemplate `yaml:"template"`
			VolumeClaimTemplates []struct {
				Metadata struct {
					Name string `yaml:"name"`
				} `yaml:"metadata"`
				Spec struct {
					AccessModes []string `yaml:"accessModes"`
					Resources   struct {
						Requests map[string]string `yaml:"requests"`
					} `yaml:"resources"`
				} `yaml:"spec"`
			} `yaml:"volumeClaimTemplates"`
		} `yaml:"spec"`
	}
	service struct {
		Metadata struct {
			Name   string            `yaml:"name"`
			Labels map[string]string `yaml:"labels"`
		} `yaml:"metadata"`
		Spec struct {
			Type                     string            `yaml:"type"`
			ClusterIP                string            `yaml:"clusterIP"`
			Selector                 map[string]string `yaml:"selector"`
			ExternalTrafficPolicy    string            `yaml:"externalTrafficPolicy"`
			LoadBalancerSourceRanges []string          `yaml:"loadBalancerSourceRanges"`
			Ports                    []struct {
				Name       string `yaml:"name"`
				Port       int    `yaml:"port"`
				TargetPort string `yaml:"targetPort"`
			} `yaml:"ports"`
		} `yaml:"spec"`
	}
	networkPolicy struct {
		Spec struct {
			PodSelector struct {
				MatchLabels map[string]string `yaml:"matchLabels"`
			} `yaml:"podSelector"`
			PolicyTypes []string `yaml:"policyTypes"`
			Ingress     []struct {
				Ports []policyPort `yaml:"ports"`
				From  []any        `yaml:"from"`
			} `yaml:"ingress"`
			Egress []struct {
				Ports []policyPort `yaml:"ports"`
				To    []any        `yaml:"to"`
			} `yaml:"egress"`
		} `yaml:"spec"`
	}
	policyPort struct {
		Port     int    `yaml:"port"`
		Protocol string `yaml:"protocol"`
	}
)

// podConfig is what the tests read from config.toml.
type podConfig struct {
	Queue struct {
		Path    string `toml:"path"`
		Backend string `toml:"backend"`
		DSNEnv  string `toml:"dsn_env"`
	} `toml:"queue"`
	TLS struct {
		CertFile string `toml:"cert_file"`
		KeyFile  string `toml:"key_file"`
	} `toml:"tls"`
	Listen []struct {
		Name            string   `toml:"name"`
		Address         string   `toml:"address"`
		TLS             string   `toml:"tls"`
		Auth            string   `toml:"auth"`
		TrustedNetworks []string `toml:"trusted_networks"`
	} `toml:"listen"`
	Upstream []struct {
		Name        string `toml:"name"`
		PasswordEnv string `toml:"password_env"`
	} `toml:"upstream"`
	DKIM []struct {
		KeyFile string `toml:"key_file"`
	} `toml:"dkim"`
	HTTP struct {
		Address       string `toml:"address"`
		AdminTokenEnv string `toml:"admin_token_env"`
	} `toml:"http"`
}

// release is a rendered chart.
type release []object

func (r release) get(t *testing.T, kind, name string) object {
	t.Helper()
	for _, o := range r {
		if o.kind() == kind && o.name() == name {
			return o
		}
	}
	t.Fatalf("no %s %s rendered", kind, name)
	return nil
}

func (r release) has(kind string) bool {
	return slices.ContainsFunc(r, func(o object) bool { return o.kind() == kind })
}

// subset tells whether every label of sel is in labels: a selector that
// picks the pods (or Services) labelled so.
func subset(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// TestChart renders the chart in each case, checks every manifest
// against the Kubernetes and Prometheus Operator schemas, and checks
// that the parts fit: the configuration the pod reads, the ports, the
// mounts, the selectors, the probes and the security context.
func TestChart(t *testing.T) {
	for _, c := range chartCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			out, err := helmTemplate(t, c.args...)
			if err != nil {
				t.Fatal(err)
			}
			rel := release(splitDocuments(t, out))
			kinds := map[string]int{}
			for _, o := range rel {
				kinds[o.kind()]++
			}
			if !reflect.DeepEqual(kinds, c.kinds) {
				t.Errorf("rendered kinds %v, want %v", kinds, c.kinds)
			}
			t.Run("schemas", func(t *testing.T) { kubeconform(t, out, len(rel)) })

			var sts statefulSet
			decodeInto(t, rel.get(t, "StatefulSet", fullname), &sts)
			pod := sts.Spec.Template
			if len(pod.Spec.Containers) != 1 {
				t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
			}
			ctr := pod.Spec.Containers[0]
			ports := map[string]int{}
			for _, p := range ctr.Ports {
				ports[p.Name] = p.ContainerPort
			}
			mounts := map[string]string{}
			for _, m := range ctr.VolumeMounts {
				mounts[m.MountPath] = m.Name
			}
			volumes := map[string]volume{}
			for _, v := range pod.Spec.Volumes {
				volumes[v.Name] = v
			}

			configText, _ := dig(rel.get(t, "ConfigMap", fullname), "data", "config.toml").(string)
			var cfg podConfig
			if _, err := toml.Decode(configText, &cfg); err != nil {
				t.Fatalf("config.toml: %v\n%s", err, configText)
			}
			env := c.env
			if c.makeSecret {
				env = secretEnv(t, rel.get(t, "Secret", fullname))
			}

			t.Run("statefulset", func(t *testing.T) {
				checkStatefulSet(t, c, sts, ctr, mounts, volumes)
			})
			t.Run("config", func(t *testing.T) {
				checkPodConfig(t, c, cfg, ports, mounts, env)
			})
			t.Run("check-config", func(t *testing.T) {
				root := t.TempDir()
				writePodFiles(t, root, c)
				got, err := checkConfig(t, configText, root, env)
				if err != nil || !strings.Contains(got, ": OK "+c.checkOutput) {
					t.Errorf("smarthost check-config: %v\n%s\nconfig:\n%s", err, got, configText)
				}
			})
			// As in a CI job: no Secret mounted, no variable from one.
			t.Run("check-config -no-secrets", func(t *testing.T) {
				got, err := checkConfig(t, configText, t.TempDir(), nil, "-no-secrets")
				if err != nil || !strings.Contains(got, ": OK "+strings.TrimSuffix(c.checkOutput, ")")+", secrets not read)") {
					t.Errorf("smarthost check-config -no-secrets: %v\n%s\nconfig:\n%s", err, got, configText)
				}
			})
			t.Run("services", func(t *testing.T) {
				checkServices(t, c, rel, sts, ports)
			})
			t.Run("disruption budget", func(t *testing.T) {
				if !rel.has("PodDisruptionBudget") {
					return
				}
				pdb := rel.get(t, "PodDisruptionBudget", fullname)
				sel, _ := dig(pdb, "spec", "selector", "matchLabels").(map[string]any)
				if !subset(stringMap(sel), pod.Metadata.Labels) {
					t.Errorf("selector %v does not pick the pods %v", sel, pod.Metadata.Labels)
				}
				// minAvailable with one replica would block node drains.
				spec := dig(pdb, "spec").(map[string]any)
				if _, min := spec["minAvailable"]; !min && spec["maxUnavailable"] != 1 {
					t.Errorf("spec %v: want maxUnavailable 1 by default", spec)
				}
			})
			t.Run("network policy", func(t *testing.T) {
				if c.upstreamPorts == nil {
					if rel.has("NetworkPolicy") {
						t.Error("NetworkPolicy rendered without networkPolicy.enabled")
					}
					return
				}
				var np networkPolicy
				decodeInto(t, rel.get(t, "NetworkPolicy", fullname), &np)
				checkNetworkPolicy(t, c, np, pod.Metadata.Labels, ports)
			})
			t.Run("monitoring", func(t *testing.T) {
				if !rel.has("ServiceMonitor") {
					return
				}
				checkServiceMonitor(t, rel)
				checkPrometheusRule(t, rel.get(t, "PrometheusRule", fullname))
			})
		})
	}
}

func checkStatefulSet(t *testing.T, c chartCase, sts statefulSet, ctr container, mounts map[string]string, volumes map[string]volume) {
	pod := sts.Spec.Template
	if sts.Spec.Replicas != 1 {
		t.Errorf("replicas %d, want 1", sts.Spec.Replicas)
	}
	if !subset(sts.Spec.Selector.MatchLabels, pod.Metadata.Labels) {
		t.Errorf("selector %v does not pick the pod labels %v", sts.Spec.Selector.MatchLabels, pod.Metadata.Labels)
	}
	// Kubernetes' default grace period, above the relay's 25 s
	// shutdown_timeout, so SIGKILL never cuts a graceful stop short.
	if pod.Spec.TerminationGracePeriodSeconds != 30 {
		t.Errorf("terminationGracePeriodSeconds %d, want 30", pod.Spec.TerminationGracePeriodSeconds)
	}
	if p := pod.Spec.AutomountServiceAccountToken; p == nil || *p {
		t.Error("the service account token is mounted")
	}
	if p := pod.Spec.EnableServiceLinks; p == nil || *p {
		t.Error("service links are on")
	}
	// The pods roll when the configuration changes.
	if sum := pod.Metadata.Annotations["checksum/config"]; !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(sum) {
		t.Errorf("checksum/config annotation %q", sum)
	}

	want := map[string]any{
		"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
		"seccompProfile": map[string]any{"type": "RuntimeDefault"},
	}
	for k, v := range want {
		if !reflect.DeepEqual(pod.Spec.SecurityContext[k], v) {
			t.Errorf("pod securityContext.%s = %v, want %v", k, pod.Spec.SecurityContext[k], v)
		}
	}
	want = map[string]any{
		"runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true,
		"allowPrivilegeEscalation": false, "capabilities": map[string]any{"drop": []any{"ALL"}},
		"seccompProfile": map[string]any{"type": "RuntimeDefault"},
	}
	for k, v := range want {
		if !reflect.DeepEqual(ctr.SecurityContext[k], v) {
			t.Errorf("container securityContext.%s = %v, want %v", k, ctr.SecurityContext[k], v)
		}
	}

	if ctr.Image != "registry.example.com/smarthost:0.1.0" {
		t.Errorf("image %q", ctr.Image)
	}
	configPath := configMount + "/config.toml"
	if !slices.Equal(ctr.Args, []string{"serve", "-config", configPath}) {
		t.Errorf("args %q", ctr.Args)
	}
	env := map[string][]string{} // name → each value, or "from " + the resource
	for _, e := range ctr.Env {
		v := e.Value
		if e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil {
			v = "from " + e.ValueFrom.ResourceFieldRef.Resource
		}
		env[e.Name] = append(env[e.Name], v)
	}
	if !slices.Equal(env["SMARTHOST_CONFIG"], []string{configPath}) {
		t.Errorf("env %v lacks SMARTHOST_CONFIG=%s, which `smarthost queue` in the pod needs", env, configPath)
	}
	// The Go runtime knows the container's memory limit, unless the
	// values set GOMEMLIMIT themselves (values-full.yaml does).
	wantLimit := []string{"from limits.memory"}
	if c.name == "every option" {
		wantLimit = []string{"400MiB"}
	}
	if !slices.Equal(env["GOMEMLIMIT"], wantLimit) {
		t.Errorf("GOMEMLIMIT %q, want %q", env["GOMEMLIMIT"], wantLimit)
	}
	if len(ctr.EnvFrom) != 1 || ctr.EnvFrom[0].SecretRef.Name != c.secret {
		t.Errorf("envFrom %+v, want the Secret %s", ctr.EnvFrom, c.secret)
	}
	for name, p := range map[string]*probe{"liveness": ctr.LivenessProbe, "readiness": ctr.ReadinessProbe, "startup": ctr.StartupProbe} {
		path := "/healthz"
		if name == "readiness" {
			path = "/readyz"
		}
		if p == nil || p.HTTPGet.Path != path || p.HTTPGet.Port != "http" {
			t.Errorf("%s probe %+v, want GET %s on port http", name, p, path)
		}
	}
	if ctr.Resources["requests"] == nil || dig(ctr.Resources, "limits", "memory") == nil {
		t.Errorf("resources %v: want requests and a memory limit", ctr.Resources)
	}

	if v := volumes[mounts[configMount]]; v.ConfigMap == nil || v.ConfigMap.Name != fullname {
		t.Errorf("%s is not the ConfigMap %s: %+v", configMount, fullname, v)
	}
	if mounts[queueMount] != "queue" {
		t.Fatalf("%s mounts %q, want the queue volume", queueMount, mounts[queueMount])
	}
	if c.persistence {
		vct := sts.Spec.VolumeClaimTemplates
		if len(vct) != 1 || vct[0].Metadata.Name != "queue" || !slices.Equal(vct[0].Spec.AccessModes, []string{"ReadWriteOnce"}) ||
			vct[0].Spec.Resources.Requests["storage"] == "" {
			t.Errorf("volumeClaimTemplates %+v, want one ReadWriteOnce claim named queue", vct)
		}
		if _, dup := volumes["queue"]; dup {
			t.Error("a pod volume shadows the queue's claim")
		}
	} else if v, ok := volumes["queue"]; !ok || v.EmptyDir == nil || len(sts.Spec.VolumeClaimTemplates) != 0 {
		t.Errorf("without persistence the queue should be an emptyDir: %+v", v)
	}
	if c.tlsSecret != "" {
		if v := volumes[mounts[tlsMount]]; v.Secret == nil || v.Secret.SecretName != c.tlsSecret {
			t.Errorf("%s is not the Secret %s: %+v", tlsMount, c.tlsSecret, v)
		}
	} else if _, ok := mounts[tlsMount]; ok {
		t.Errorf("%s mounted without a TLS listener", tlsMount)
	}
	if c.dkimKeys != nil {
		if v := volumes[mounts[dkimMount]]; v.Secret == nil {
			t.Errorf("%s is not a Secret: %+v", dkimMount, v)
		}
	}
}

func checkPodConfig(t *testing.T, c chartCase, cfg podConfig, ports map[string]int, mounts map[string]string, env map[string]string) {
	// Probes and Prometheus reach the pod's address, and the relay
	// requires a token for the admin API beyond loopback.
	if cfg.HTTP.Address != "0.0.0.0:"+strconv.Itoa(ports["http"]) || ports["http"] != 9090 {
		t.Errorf("[http] address %q, container port http %d; want 0.0.0.0:9090 on both", cfg.HTTP.Address, ports["http"])
	}
	if cfg.HTTP.AdminTokenEnv != "SMARTHOST_ADMIN_TOKEN" || env["SMARTHOST_ADMIN_TOKEN"] == "" {
		t.Errorf("[http] admin_token_env %q; the Secret must hold SMARTHOST_ADMIN_TOKEN", cfg.HTTP.AdminTokenEnv)
	}
	if filepath.Dir(cfg.Queue.Path) != queueMount {
		t.Errorf("[queue] path %q is not on the queue volume %s", cfg.Queue.Path, queueMount)
	}
	smtpPorts := 0
	for name := range ports {
		if name != "http" {
			smtpPorts++
		}
	}
	if len(cfg.Listen) != smtpPorts {
		t.Errorf("%d listeners, %d SMTP container ports", len(cfg.Listen), smtpPorts)
	}
	needTLS := false
	for _, l := range cfg.Listen {
		// A container port named as the listener, on its port: the
		// Service's targetPort finds the listener through it.
		if want := ":" + strconv.Itoa(ports[l.Name]); l.Address != want {
			t.Errorf("listener %s at %q, its container port is %d", l.Name, l.Address, ports[l.Name])
		}
		needTLS = needTLS || l.TLS != "none"
	}
	if needTLS != (c.tlsSecret != "") {
		t.Errorf("TLS listeners %v, TLS Secret %q", needTLS, c.tlsSecret)
	}
	if needTLS && (cfg.TLS.CertFile != tlsMount+"/tls.crt" || cfg.TLS.KeyFile != tlsMount+"/tls.key") {
		t.Errorf("[tls] %+v: want the kubernetes.io/tls Secret's files under %s", cfg.TLS, tlsMount)
	}
	for _, d := range cfg.DKIM {
		if filepath.Dir(d.KeyFile) != dkimMount || mounts[dkimMount] == "" {
			t.Errorf("DKIM key %q is not in the mounted %s", d.KeyFile, dkimMount)
		}
	}
	for _, u := range cfg.Upstream {
		if u.PasswordEnv != "" && env[u.PasswordEnv] == "" {
			t.Errorf("upstream %s: password_env %s is not in the Secret", u.Name, u.PasswordEnv)
		}
	}
}

func checkServices(t *testing.T, c chartCase, rel release, sts statefulSet, ports map[string]int) {
	var main, headless service
	decodeInto(t, rel.get(t, "Service", fullname), &main)
	decodeInto(t, rel.get(t, "Service", sts.Spec.ServiceName), &headless)
	labels := sts.Spec.Template.Metadata.Labels
	for _, s := range []service{main, headless} {
		if !subset(s.Spec.Selector, labels) {
			t.Errorf("Service %s selector %v does not pick the pods %v", s.Metadata.Name, s.Spec.Selector, labels)
		}
		for _, p := range s.Spec.Ports {
			if _, ok := ports[p.TargetPort]; !ok {
				t.Errorf("Service %s port %s targets %q, which no container port is named", s.Metadata.Name, p.Name, p.TargetPort)
			}
		}
	}
	if headless.Spec.ClusterIP != "None" || headless.Metadata.Name == fullname {
		t.Errorf("StatefulSet serviceName %q: want a headless Service of its own", sts.Spec.ServiceName)
	}
	servicePorts := map[string]int{}
	for _, p := range main.Spec.Ports {
		servicePorts[p.Name] = p.Port
	}
	wantPorts := map[string]int{"submission": 587, "http": 9090}
	switch c.name {
	case "every option":
		wantPorts = map[string]int{"submission": 587, "submissions": 465, "cluster": 25, "http": 9090}
		if main.Spec.Type != "LoadBalancer" || main.Spec.ExternalTrafficPolicy != "Local" || len(main.Spec.LoadBalancerSourceRanges) != 1 {
			t.Errorf("Service spec %+v: want the LoadBalancer of the values", main.Spec)
		}
	case "raw config":
		wantPorts = map[string]int{"cluster": 25, "http": 9090}
	}
	if !reflect.DeepEqual(servicePorts, wantPorts) {
		t.Errorf("Service ports %v, want %v", servicePorts, wantPorts)
	}
	for _, p := range headless.Spec.Ports {
		if p.Name == "http" {
			// A ServiceMonitor would then scrape every pod twice.
			t.Error("the headless Service has the http port")
		}
	}
}

func checkNetworkPolicy(t *testing.T, c chartCase, np networkPolicy, podLabels map[string]string, ports map[string]int) {
	if !subset(np.Spec.PodSelector.MatchLabels, podLabels) {
		t.Errorf("podSelector %v does not pick the pods %v", np.Spec.PodSelector.MatchLabels, podLabels)
	}
	if !slices.Equal(np.Spec.PolicyTypes, []string{"Ingress", "Egress"}) {
		t.Errorf("policyTypes %v", np.Spec.PolicyTypes)
	}
	var ingress []int
	for _, rule := range np.Spec.Ingress {
		if len(rule.Ports) == 0 {
			t.Error("an ingress rule without ports opens every port")
		}
		for _, p := range rule.Ports {
			ingress = append(ingress, p.Port)
		}
	}
	var want []int
	for _, p := range ports {
		want = append(want, p)
	}
	slices.Sort(ingress)
	slices.Sort(want)
	if !slices.Equal(ingress, want) {
		t.Errorf("ingress to ports %v, want the container ports %v", ingress, want)
	}
	var egress []string
	for _, rule := range np.Spec.Egress {
		if len(rule.Ports) == 0 {
			t.Error("an egress rule without ports opens every port")
		}
		for _, p := range rule.Ports {
			egress = append(egress, p.Protocol+"/"+strconv.Itoa(p.Port))
		}
	}
	wantEgress := []string{"UDP/53", "TCP/53"}
	for _, p := range c.upstreamPorts {
		wantEgress = append(wantEgress, "TCP/"+strconv.Itoa(p))
	}
	slices.Sort(egress)
	slices.Sort(wantEgress)
	if !slices.Equal(egress, wantEgress) {
		t.Errorf("egress to %v, want %v", egress, wantEgress)
	}
	if c.name == "every option" {
		if len(np.Spec.Ingress) != 2 || len(np.Spec.Ingress[0].From) != 1 || len(np.Spec.Ingress[1].From) != 1 || len(np.Spec.Egress[0].To) != 1 {
			t.Errorf("the sources and DNS servers of the values are not in the policy: %+v", np.Spec)
		}
	}
}

func checkServiceMonitor(t *testing.T, rel release) {
	sm := rel.get(t, "ServiceMonitor", fullname)
	sel := stringMap(dig(sm, "spec", "selector", "matchLabels").(map[string]any))
	endpoints := dig(sm, "spec", "endpoints").([]any)
	if len(endpoints) != 1 || dig(endpoints[0], "port") != "http" || dig(endpoints[0], "path") != "/metrics" {
		t.Fatalf("endpoints %v, want /metrics on port http", endpoints)
	}
	if dig(sm, "metadata", "labels", "release") != "kube-prometheus-stack" {
		t.Error("monitoring.serviceMonitor.labels not applied")
	}
	// Exactly one selected Service has the http port: each pod is
	// scraped once.
	scraped := 0
	for _, o := range rel {
		if o.kind() != "Service" {
			continue
		}
		var s service
		decodeInto(t, o, &s)
		if !subset(sel, s.Metadata.Labels) {
			continue
		}
		for _, p := range s.Spec.Ports {
			if p.Name == "http" {
				scraped++
			}
		}
	}
	if scraped != 1 {
		t.Errorf("the ServiceMonitor finds port http on %d Services, want 1", scraped)
	}
}

// checkPrometheusRule compares the rendered rules with alerts.yaml, with
// the values' additionalAlertLabels added to every alert.
func checkPrometheusRule(t *testing.T, pr object) {
	data, err := os.ReadFile("prometheus/alerts.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Groups []map[string]any `yaml:"groups"`
	}
	if err := yaml.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	alerts := 0
	for _, g := range file.Groups {
		for _, r := range g["rules"].([]any) {
			rule := r.(map[string]any)
			if _, ok := rule["alert"]; ok {
				rule["labels"].(map[string]any)["team"] = "mail"
				alerts++
			}
		}
	}
	var want []any
	for _, g := range file.Groups {
		want = append(want, g)
	}
	got := dig(pr, "spec", "groups")
	if alerts == 0 || !reflect.DeepEqual(got, want) {
		gotYAML, _ := yaml.Marshal(got)
		t.Errorf("PrometheusRule groups differ from prometheus/alerts.yaml (with team: mail):\n%s", gotYAML)
	}
	if dig(pr, "metadata", "labels", "release") != "kube-prometheus-stack" {
		t.Error("monitoring.prometheusRule.labels not applied")
	}
}

func stringMap(m map[string]any) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		s, _ := v.(string)
		out[k] = s
	}
	return out
}

// secretEnv decodes a rendered Secret into the environment it gives.
func secretEnv(t *testing.T, s object) map[string]string {
	t.Helper()
	env := map[string]string{}
	data, _ := dig(s, "data").(map[string]any)
	for k, v := range data {
		b, err := base64.StdEncoding.DecodeString(v.(string))
		if err != nil {
			t.Fatalf("Secret key %s: %v", k, err)
		}
		env[k] = string(b)
	}
	stringData, _ := dig(s, "stringData").(map[string]any)
	for k, v := range stringMap(stringData) {
		env[k] = v
	}
	return env
}

// writePodFiles creates, under root, the files a pod of case c has from
// its Secrets: the serving certificate and the DKIM keys.
func writePodFiles(t *testing.T, root string, c chartCase) {
	t.Helper()
	if c.tlsSecret != "" {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(1),
			Subject:      pkix.Name{CommonName: "relay.example.com"},
			DNSNames:     []string{"relay.example.com"},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(time.Hour),
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(root, tlsMount, "tls.crt"), "CERTIFICATE", der)
		writePEM(t, filepath.Join(root, tlsMount, "tls.key"), "PRIVATE KEY", keyDER)
	}
	for name, algo := range c.dkimKeys {
		var signer any
		var err error
		switch algo {
		case "rsa":
			signer, err = rsa.GenerateKey(rand.Reader, 1024)
		case "ed25519":
			_, signer, err = ed25519.GenerateKey(rand.Reader)
		}
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalPKCS8PrivateKey(signer)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(root, dkimMount, name), "PRIVATE KEY", der)
	}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestChartRefusesBadValues: values that would give a pod that cannot
// start, or a relay that is not what the values say, fail at render time
// with a message that names the key.
func TestChartRefusesBadValues(t *testing.T) {
	// Values as YAML: --set on a list element would replace the element.
	cases := []struct {
		name   string
		values string
		want   string
	}{
		{"listener name", "settings: {listen: [{name: Submission_Port, port: 587, containerPort: 2587}]}", "must be a port name"},
		{"listener without ports", "settings: {listen: [{name: submission, port: 587}]}", "needs port"},
		{"listener address", "settings: {listen: [{name: submission, port: 587, containerPort: 2587, address: ':25'}]}", "set by the chart from containerPort"},
		{"no listener", "settings: {listen: []}", "at least one listener"},
		{"password not in the Secret", "settings: {upstream: [{name: a, address: 'a.example:465', tls: implicit, username: u, password_env: NOPE}]}",
			"password_env NOPE is not a key of secret.env"},
		{"DKIM key without its Secret", "settings: {dkim: [{domain: example.com, selector: s1, key_file: example.com.key}]}", "dkim.secretName, which is not set"},
		{"http table", "settings: {http: {address: '127.0.0.1:9090'}}", "set by the chart"},
		{"queue path", "settings: {queue: {path: /tmp/q}}", "settings.queue.path is set by the chart"},
		{"raw config without token", "config: 'hostname = \"x.example\"'", "admin_token_env"},
		{"environment name", "secret: {env: {BAD-NAME: x}}", "is not an environment variable name"},
		{"token in env", "secret: {env: {SMARTHOST_ADMIN_TOKEN: x}}", "set secret.adminToken"},
		// Replicas on bbolt each keep their own queue and rate_limit
		// windows: only an explicit acknowledgement allows it.
		{"bbolt replicas", "replicas: 2", "set queue.bbolt.acceptPerReplicaQueuesAndLimits: true"},
		{"bbolt replicas not acknowledged", "replicas: 2\nqueue: {bbolt: {acceptPerReplicaQueuesAndLimits: false}}", "acceptPerReplicaQueuesAndLimits"},
		{"postgres without a DSN", "queue: {backend: postgres}", "needs queue.postgres.existingSecret"},
		{"postgres without a key", "queue: {backend: postgres, postgres: {existingSecret: db, key: ''}}", "needs queue.postgres.key"},
		{"unknown backend", "queue: {backend: mysql}", `queue.backend "mysql": want bbolt or postgres`},
		{"queue backend in settings", "settings: {queue: {backend: postgres}}", "settings.queue.backend is set by the chart"},
		{"queue dsn in settings", "queue: {backend: postgres, postgres: {existingSecret: db}}\nsettings: {queue: {dsn_env: DB}}", "settings.queue.dsn_env is set by the chart"},
		{"raw config without the DSN", "queue: {backend: postgres, postgres: {existingSecret: db}}\nconfig: '[http]\n  admin_token_env = \"SMARTHOST_ADMIN_TOKEN\"'", "dsn_env = \"SMARTHOST_QUEUE_DSN\""},
	}
	// The defaults have a listener that requires AUTH, and no user.
	if out, err := helmTemplateBare(t); err == nil || !strings.Contains(err.Error(), "settings.listen submission requires AUTH and settings.user is empty") {
		t.Errorf("the defaults, with no user: %v\n%s", err, out)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "values.yaml")
			if err := os.WriteFile(path, []byte(c.values), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := helmTemplate(t, "-f", path)
			if err == nil {
				t.Fatalf("rendered:\n%s", out)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want it to say %q", err, c.want)
			}
		})
	}
}

// TestChartLint runs helm lint --strict, which also renders NOTES.txt.
func TestChartLint(t *testing.T) {
	for _, values := range [][]string{{"-f", "testdata/values-user.yaml"}, {"-f", "testdata/values-full.yaml"}, {"-f", "testdata/values-raw.yaml"}, {"-f", "testdata/values-postgres.yaml"}} {
		out, err := goRun(t, helmPkg, append([]string{"lint", "--strict", "helm/smarthost"}, values...)...)
		if err != nil {
			t.Errorf("helm lint %v: %v\n%s", values, err, out)
		}
	}
}

// TestChartSecretToken: the admin token is generated when not given; a
// rendering without the cluster (helm template) makes a long random one,
// and a given one is used as is.
func TestChartSecretToken(t *testing.T) {
	token := func(args ...string) string {
		out, err := helmTemplate(t, append(args, "--show-only", "templates/secret.yaml")...)
		if err != nil {
			t.Fatal(err)
		}
		return secretEnv(t, splitDocuments(t, out)[0])["SMARTHOST_ADMIN_TOKEN"]
	}
	a, b := token(), token()
	if len(a) < 32 || a == b || !regexp.MustCompile(`^[A-Za-z0-9]+$`).MatchString(a) {
		t.Errorf("generated tokens %q and %q: want long, random, alphanumeric", a, b)
	}
	if got := token("--set", "secret.adminToken=given-token"); got != "given-token" {
		t.Errorf("token %q, want the given one", got)
	}
}

// TestChartMemoryLimit: GOMEMLIMIT follows the container's memory limit,
// and is left out when there is none.
func TestChartMemoryLimit(t *testing.T) {
	for _, c := range []struct {
		name   string
		values string
		want   []string
	}{
		{"limit", "resources: {limits: {memory: 768Mi}}", []string{"limits.memory"}},
		{"no limit", "resources: {limits: null}", nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "values.yaml")
			if err := os.WriteFile(path, []byte(c.values), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := helmTemplate(t, "-f", path, "--show-only", "templates/statefulset.yaml")
			if err != nil {
				t.Fatal(err)
			}
			var sts statefulSet
			decodeInto(t, release(splitDocuments(t, out)).get(t, "StatefulSet", fullname), &sts)
			var got []string
			for _, e := range sts.Spec.Template.Spec.Containers[0].Env {
				if e.Name == "GOMEMLIMIT" && e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil {
					got = append(got, e.ValueFrom.ResourceFieldRef.Resource)
				} else if e.Name == "GOMEMLIMIT" {
					got = append(got, e.Value)
				}
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("GOMEMLIMIT from %q, want %q", got, c.want)
			}
		})
	}
}

// TestChartProviderEgress: an upstream given only by provider, as the
// README recommends, gets its provider's port in the NetworkPolicy, and
// the chart knows the port of every provider profile of the relay.
func TestChartProviderEgress(t *testing.T) {
	t.Parallel()
	src, err := os.ReadFile("../relay/upstream/providers.go")
	if err != nil {
		t.Fatal(err)
	}
	profiles := regexp.MustCompile(`Name: "([a-z0-9-]+)", Address: "[^"]*:([0-9]+)"`).FindAllStringSubmatch(string(src), -1)
	if len(profiles) < 5 {
		t.Fatalf("found %d provider profiles in providers.go", len(profiles))
	}
	for _, p := range profiles {
		out, err := helmTemplate(t, "--set", "networkPolicy.enabled=true",
			"--set-json", `settings.upstream=[{"name":"p","provider":"`+p[1]+`","region":"eu-west-1","username":"u","password_env":"P"}]`,
			"--set-json", `settings.route=[{"from_domain":"*","upstreams":["p"]}]`, "--set", "secret.env.P=secret")
		if err != nil {
			t.Fatalf("%s: %v", p[1], err)
		}
		var np networkPolicy
		for _, o := range splitDocuments(t, out) {
			if o.kind() == "NetworkPolicy" {
				decodeInto(t, o, &np)
			}
		}
		found := false
		for _, rule := range np.Spec.Egress {
			for _, port := range rule.Ports {
				if strconv.Itoa(port.Port) == p[2] {
					found = true
				}
			}
		}
		if !found {
			t.Errorf("provider %s: no egress to its port %s: %+v", p[1], p[2], np.Spec.Egress)
		}
	}
}
