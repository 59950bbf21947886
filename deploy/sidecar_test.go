package deploy

import (
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
)

// TestSidecar checks the sidecar example: valid manifests, a
// configuration smarthost accepts, an application container that
// submits to the trusted loopback listener of its own Pod, and a queue
// in PostgreSQL rather than in the Pod, so deleting the Pod loses no mail.
func TestSidecar(t *testing.T) {
	data, err := os.ReadFile("sidecar/smarthost-sidecar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rel := release(splitDocuments(t, data))
	kubeconform(t, data, 3)

	env := secretEnv(t, rel.get(t, "Secret", "billing-smarthost"))
	configText, _ := dig(rel.get(t, "ConfigMap", "billing-smarthost"), "data", "config.toml").(string)
	var cfg podConfig
	if _, err := toml.Decode(configText, &cfg); err != nil {
		t.Fatalf("config.toml: %v", err)
	}
	got, err := checkConfig(t, configText, t.TempDir(), env)
	if err != nil || !strings.Contains(got, ": OK (1 listeners, 0 users, 0 DKIM keys, 1 upstreams, 1 routes)") {
		t.Errorf("smarthost check-config: %v\n%s", err, got)
	}

	var dep struct {
		Spec struct {
			Template podTemplate `yaml:"template"`
		} `yaml:"spec"`
	}
	decodeInto(t, rel.get(t, "Deployment", "billing"), &dep)
	pod := dep.Spec.Template.Spec

	// smarthost is a native sidecar: started before the application and
	// stopped after it.
	if len(pod.InitContainers) != 1 || pod.InitContainers[0].Name != "smarthost" || pod.InitContainers[0].RestartPolicy != "Always" {
		t.Fatalf("init containers %+v: want smarthost with restartPolicy Always", pod.InitContainers)
	}
	sh := pod.InitContainers[0]
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want the application alone", len(pod.Containers))
	}
	app := pod.Containers[0]

	// The application's SMTP settings point at the listener, which is
	// plain SMTP without AUTH for loopback alone.
	appEnv := map[string]string{}
	for _, e := range app.Env {
		appEnv[e.Name] = e.Value
	}
	if len(cfg.Listen) != 1 {
		t.Fatalf("%d listeners, want 1", len(cfg.Listen))
	}
	l := cfg.Listen[0]
	if l.Address != "127.0.0.1:2525" || l.TLS != "none" || l.Auth != "none" || !slices.Equal(l.TrustedNetworks, []string{"127.0.0.1/32"}) {
		t.Errorf("listener %+v: want 127.0.0.1:2525, tls none, auth none, trusted 127.0.0.1/32", l)
	}
	if addr := appEnv["SMTP_HOST"] + ":" + appEnv["SMTP_PORT"]; addr != l.Address {
		t.Errorf("the application sends to %s, smarthost listens on %s", addr, l.Address)
	}

	ports := map[string]int{}
	for _, p := range sh.Ports {
		ports[p.Name] = p.ContainerPort
	}
	if cfg.HTTP.Address != "0.0.0.0:"+strconv.Itoa(ports["smarthost-http"]) {
		t.Errorf("[http] address %q, container port %d", cfg.HTTP.Address, ports["smarthost-http"])
	}
	if cfg.HTTP.AdminTokenEnv == "" || env[cfg.HTTP.AdminTokenEnv] == "" {
		t.Errorf("admin_token_env %q is not in the Secret", cfg.HTTP.AdminTokenEnv)
	}
	for _, u := range cfg.Upstream {
		if u.PasswordEnv != "" && env[u.PasswordEnv] == "" {
			t.Errorf("upstream %s: password_env %s is not in the Secret", u.Name, u.PasswordEnv)
		}
	}
	if len(sh.EnvFrom) != 1 || sh.EnvFrom[0].SecretRef.Name != "billing-smarthost" {
		t.Errorf("envFrom %+v", sh.EnvFrom)
	}
	for name, p := range map[string]*probe{"startup": sh.StartupProbe, "liveness": sh.LivenessProbe, "readiness": sh.ReadinessProbe} {
		if p == nil || p.HTTPGet.Port != "smarthost-http" || (p.HTTPGet.Path != "/healthz" && p.HTTPGet.Path != "/readyz") {
			t.Errorf("%s probe %+v", name, p)
		}
	}
	if !reflect.DeepEqual(sh.SecurityContext["readOnlyRootFilesystem"], true) || !reflect.DeepEqual(sh.SecurityContext["allowPrivilegeEscalation"], false) {
		t.Errorf("securityContext %v", sh.SecurityContext)
	}

	mounts := map[string]string{}
	for _, m := range sh.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	volumes := map[string]volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	if len(sh.Args) != 3 || sh.Args[0] != "serve" || sh.Args[1] != "-config" {
		t.Fatalf("args %q", sh.Args)
	}
	if v := volumes[mounts[filepath.Dir(sh.Args[2])]]; v.ConfigMap == nil || v.ConfigMap.Name != "billing-smarthost" {
		t.Errorf("%s is not in the ConfigMap's volume", sh.Args[2])
	}
	// The queue is shared by every replica in PostgreSQL, its DSN in the
	// Secret; no queue file lives in the Pod.
	if cfg.Queue.Backend != "postgres" || cfg.Queue.Path != "" {
		t.Errorf("[queue] %+v: want backend postgres and no path", cfg.Queue)
	}
	if cfg.Queue.DSNEnv == "" || env[cfg.Queue.DSNEnv] == "" {
		t.Errorf("[queue] dsn_env %q is not in the Secret", cfg.Queue.DSNEnv)
	}
	for _, v := range pod.Volumes {
		if v.PersistentVolumeClaim != nil {
			t.Errorf("volume %s is a PersistentVolumeClaim: the queue is in the database", v.Name)
		}
	}
}
