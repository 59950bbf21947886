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

// deployment is the subset of a Deployment the tests look at.
type deployment struct {
	Spec struct {
		Replicas int `yaml:"replicas"`
		Selector struct {
			MatchLabels map[string]string `yaml:"matchLabels"`
		} `yaml:"selector"`
		Strategy struct {
			Type          string         `yaml:"type"`
			RollingUpdate map[string]any `yaml:"rollingUpdate"`
		} `yaml:"strategy"`
		Template podTemplate `yaml:"template"`
	} `yaml:"spec"`
}

// TestChartPostgres renders the chart with queue.backend postgres and
// three replicas: a Deployment whose pods hold no queue of their own
// (no claim, no volume that outlives the pod), the connection string
// from the operator's Secret in the variable config.toml names, a
// disruption budget over the replicas, and valid manifests.
func TestChartPostgres(t *testing.T) {
	out, err := helmTemplate(t, "-f", "testdata/values-postgres.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rel := release(splitDocuments(t, out))
	kinds := map[string]int{}
	for _, o := range rel {
		kinds[o.kind()]++
	}
	// No StatefulSet, no headless Service for one.
	want := map[string]int{"ConfigMap": 1, "Secret": 1, "Service": 1, "Deployment": 1, "PodDisruptionBudget": 1, "NetworkPolicy": 1}
	if !reflect.DeepEqual(kinds, want) {
		t.Errorf("rendered kinds %v, want %v", kinds, want)
	}
	t.Run("schemas", func(t *testing.T) { kubeconform(t, out, len(rel)) })

	var dep deployment
	decodeInto(t, rel.get(t, "Deployment", fullname), &dep)
	pod := dep.Spec.Template
	if dep.Spec.Replicas != 3 {
		t.Errorf("replicas %d, want 3", dep.Spec.Replicas)
	}
	if !subset(dep.Spec.Selector.MatchLabels, pod.Metadata.Labels) {
		t.Errorf("selector %v does not pick the pod labels %v", dep.Spec.Selector.MatchLabels, pod.Metadata.Labels)
	}
	// A rollout starts a new pod before it stops an old one.
	if dep.Spec.Strategy.Type != "RollingUpdate" || dep.Spec.Strategy.RollingUpdate["maxUnavailable"] != 0 {
		t.Errorf("strategy %+v, want RollingUpdate with maxUnavailable 0", dep.Spec.Strategy)
	}
	if len(pod.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
	}
	ctr := pod.Spec.Containers[0]
	if ctr.SecurityContext["readOnlyRootFilesystem"] != true {
		t.Errorf("container securityContext %v: want a read-only root filesystem", ctr.SecurityContext)
	}

	for _, v := range pod.Spec.Volumes {
		if v.PersistentVolumeClaim != nil {
			t.Errorf("volume %s is a PersistentVolumeClaim: the queue is in the database", v.Name)
		}
		if v.ConfigMap == nil && v.Secret == nil && v.EmptyDir == nil {
			t.Errorf("volume %s %+v: want only the ConfigMap, Secrets and emptyDirs", v.Name, v)
		}
	}
	mounts := map[string]string{}
	for _, m := range ctr.VolumeMounts {
		mounts[m.MountPath] = m.Name
	}
	if name, ok := mounts[queueMount]; ok {
		t.Errorf("%s mounts %q: no queue volume with postgres", queueMount, name)
	}

	configText, _ := dig(rel.get(t, "ConfigMap", fullname), "data", "config.toml").(string)
	var cfg podConfig
	if _, err := toml.Decode(configText, &cfg); err != nil {
		t.Fatalf("config.toml: %v\n%s", err, configText)
	}
	if cfg.Queue.Backend != "postgres" || cfg.Queue.DSNEnv == "" || cfg.Queue.Path != "" {
		t.Errorf("[queue] %+v: want backend postgres, dsn_env and no path\n%s", cfg.Queue, configText)
	}
	// The variable dsn_env names comes from the operator's Secret, once;
	// the chart's own Secret (envFrom) does not set it.
	var fromSecret []string
	for _, e := range ctr.Env {
		if e.Name != cfg.Queue.DSNEnv {
			continue
		}
		if e.Value != "" || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
			t.Errorf("%s = %+v: want it from a secretKeyRef", e.Name, e)
			continue
		}
		fromSecret = append(fromSecret, e.ValueFrom.SecretKeyRef.Name+"/"+e.ValueFrom.SecretKeyRef.Key)
	}
	if !slices.Equal(fromSecret, []string{"smarthost-queue-app/uri"}) {
		t.Errorf("%s from %q, want the key uri of the Secret smarthost-queue-app", cfg.Queue.DSNEnv, fromSecret)
	}
	env := secretEnv(t, rel.get(t, "Secret", fullname))
	if _, ok := env[cfg.Queue.DSNEnv]; ok {
		t.Errorf("the chart's Secret sets %s too", cfg.Queue.DSNEnv)
	}

	t.Run("check-config", func(t *testing.T) {
		root := t.TempDir()
		writePodFiles(t, root, chartCase{tlsSecret: fullname + "-tls"})
		env[cfg.Queue.DSNEnv] = "postgres://smarthost@smarthost-queue-rw.mail.svc:5432/app?sslmode=require"
		got, err := checkConfig(t, configText, root, env)
		if err != nil || !strings.Contains(got, ": OK (1 listeners, 1 users, 0 DKIM keys, 1 upstreams, 1 routes)") {
			t.Errorf("smarthost check-config: %v\n%s\nconfig:\n%s", err, got, configText)
		}
	})

	t.Run("services", func(t *testing.T) {
		var svc service
		decodeInto(t, rel.get(t, "Service", fullname), &svc)
		if !subset(svc.Spec.Selector, pod.Metadata.Labels) {
			t.Errorf("selector %v does not pick the pods %v", svc.Spec.Selector, pod.Metadata.Labels)
		}
		ports := map[string]bool{}
		for _, p := range ctr.Ports {
			ports[p.Name] = true
		}
		for _, p := range svc.Spec.Ports {
			if !ports[p.TargetPort] {
				t.Errorf("port %s targets %q, which no container port is named", p.Name, p.TargetPort)
			}
		}
	})

	t.Run("disruption budget", func(t *testing.T) {
		pdb := rel.get(t, "PodDisruptionBudget", fullname)
		sel, _ := dig(pdb, "spec", "selector", "matchLabels").(map[string]any)
		if !subset(stringMap(sel), pod.Metadata.Labels) {
			t.Errorf("selector %v does not pick the pods %v", sel, pod.Metadata.Labels)
		}
		if spec := dig(pdb, "spec").(map[string]any); spec["maxUnavailable"] != 1 {
			t.Errorf("spec %v: want maxUnavailable 1", spec)
		}
	})

	t.Run("network policy", func(t *testing.T) {
		var np networkPolicy
		decodeInto(t, rel.get(t, "NetworkPolicy", fullname), &np)
		var egress []string
		dbRules := 0
		for _, rule := range np.Spec.Egress {
			for _, p := range rule.Ports {
				egress = append(egress, p.Protocol+"/"+strconv.Itoa(p.Port))
				if p.Port == 5432 {
					dbRules++
					if len(rule.To) != 1 {
						t.Errorf("egress to the database goes to %v, want the values' databaseTo", rule.To)
					}
				}
			}
		}
		slices.Sort(egress)
		if want := []string{"TCP/465", "TCP/53", "TCP/5432", "UDP/53"}; !slices.Equal(egress, want) {
			t.Errorf("egress to %v, want %v", egress, want)
		}
		if dbRules != 1 {
			t.Errorf("%d egress rules to the database, want 1", dbRules)
		}
	})
}

// TestChartBboltReplicasAcknowledged: several bbolt replicas render once
// the operator acknowledges that each has its own queue and limits (the
// refusal without it is in TestChartRefusesBadValues): a StatefulSet of
// that many pods, each with its claim.
func TestChartBboltReplicasAcknowledged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "values.yaml")
	values := "replicas: 2\nqueue: {bbolt: {acceptPerReplicaQueuesAndLimits: true}}\n"
	if err := os.WriteFile(path, []byte(values), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := helmTemplate(t, "-f", path)
	if err != nil {
		t.Fatal(err)
	}
	rel := release(splitDocuments(t, out))
	kubeconform(t, out, len(rel))
	if rel.has("Deployment") {
		t.Error("a Deployment rendered with the bbolt backend")
	}
	var sts statefulSet
	decodeInto(t, rel.get(t, "StatefulSet", fullname), &sts)
	if sts.Spec.Replicas != 2 || len(sts.Spec.VolumeClaimTemplates) != 1 {
		t.Errorf("replicas %d, claim templates %d: want 2 replicas, each with its queue claim", sts.Spec.Replicas, len(sts.Spec.VolumeClaimTemplates))
	}
	configText, _ := dig(rel.get(t, "ConfigMap", fullname), "data", "config.toml").(string)
	var cfg podConfig
	if _, err := toml.Decode(configText, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Queue.Path != queueMount+"/queue.db" || cfg.Queue.Backend != "" {
		t.Errorf("[queue] %+v: want the bbolt file on the volume", cfg.Queue)
	}
}
