package main

import (
	"flag"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/tallyledger/tally/internal/flagenv"
)

// The Kubernetes manifests under deploy/ are examples no cluster runs here,
// so this test parses every one of them and checks the facts that would
// otherwise only break in production: probes on tallyd's real paths and
// ports, a grace period that covers the drain, a PDB that selects the pods,
// and environment variables that tallyd actually reads.

const deployDir = "../../deploy"

// k8sObject is the part of a Kubernetes object this test looks at.
type k8sObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name   string            `json:"name"`
		Labels map[string]string `json:"labels"`
	} `json:"metadata"`
	Spec struct {
		// Deployment, Job
		Replicas *int `json:"replicas"`
		Selector struct {
			MatchLabels map[string]string `json:"matchLabels"`
		} `json:"selector"`
		Strategy struct {
			RollingUpdate struct {
				MaxUnavailable any `json:"maxUnavailable"`
			} `json:"rollingUpdate"`
		} `json:"strategy"`
		Template struct {
			Metadata struct {
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
			Spec podSpec `json:"spec"`
		} `json:"template"`
		// Service
		ClusterIP   string            `json:"clusterIP"`
		SvcSelector map[string]string `json:"-"`
		Ports       []struct {
			Name       string `json:"name"`
			Port       int    `json:"port"`
			TargetPort any    `json:"targetPort"`
		} `json:"ports"`
		// PodDisruptionBudget
		MaxUnavailable any `json:"maxUnavailable"`
		MinAvailable   any `json:"minAvailable"`
	} `json:"spec"`
	// Kustomization
	Resources []string `json:"resources"`
	raw       map[string]any
	file      string
}

type podSpec struct {
	TerminationGracePeriodSeconds *int        `json:"terminationGracePeriodSeconds"`
	Containers                    []container `json:"containers"`
	InitContainers                []container `json:"initContainers"`
}

type probe struct {
	HTTPGet *struct {
		Path string `json:"path"`
		Port any    `json:"port"`
	} `json:"httpGet"`
	PeriodSeconds    int `json:"periodSeconds"`
	FailureThreshold int `json:"failureThreshold"`
}

type container struct {
	Name  string   `json:"name"`
	Image string   `json:"image"`
	Args  []string `json:"args"`
	Ports []struct {
		Name          string `json:"name"`
		ContainerPort int    `json:"containerPort"`
	} `json:"ports"`
	Env []struct {
		Name      string  `json:"name"`
		Value     *string `json:"value"`
		ValueFrom *struct {
			SecretKeyRef *struct {
				Name string `json:"name"`
				Key  string `json:"key"`
			} `json:"secretKeyRef"`
		} `json:"valueFrom"`
	} `json:"env"`
	StartupProbe   *probe `json:"startupProbe"`
	ReadinessProbe *probe `json:"readinessProbe"`
	LivenessProbe  *probe `json:"livenessProbe"`
	Lifecycle      struct {
		PreStop *struct {
			Sleep *struct {
				Seconds int `json:"seconds"`
			} `json:"sleep"`
		} `json:"preStop"`
	} `json:"lifecycle"`
}

// docSep splits a multi-document YAML file.
var docSep = regexp.MustCompile(`(?m)^---\s*$`)

// loadManifests parses every YAML file under deploy/; a file that does not
// parse fails the test.
func loadManifests(t *testing.T) []*k8sObject {
	t.Helper()
	var objs []*k8sObject
	err := filepath.WalkDir(deployDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() && path == composeHADir {
			return filepath.SkipDir // docker-compose's configs, checked by TestComposeHAProfile
		}
		if err != nil || d.IsDir() || !(strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for i, doc := range docSep.Split(string(b), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			o := &k8sObject{file: filepath.ToSlash(path)}
			if err := yaml.UnmarshalStrict([]byte(doc), &o.raw); err != nil {
				t.Errorf("%s document %d: %v", path, i, err)
				continue
			}
			if err := yaml.Unmarshal([]byte(doc), o); err != nil {
				t.Errorf("%s document %d: %v", path, i, err)
				continue
			}
			spec, _ := o.raw["spec"].(map[string]any)
			if sel, ok := spec["selector"].(map[string]any); ok && o.Kind == "Service" {
				o.Spec.SvcSelector = map[string]string{}
				for k, v := range sel {
					o.Spec.SvcSelector[k], _ = v.(string)
				}
			}
			if o.Kind == "" || o.APIVersion == "" {
				t.Errorf("%s document %d: no kind/apiVersion", path, i)
			}
			objs = append(objs, o)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) == 0 {
		t.Fatalf("no manifests under %s", deployDir)
	}
	return objs
}

func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

func find(t *testing.T, objs []*k8sObject, kind, name string) *k8sObject {
	t.Helper()
	for _, o := range objs {
		if o.Kind == kind && (name == "" || o.Metadata.Name == name) {
			return o
		}
	}
	t.Fatalf("no %s %q under %s", kind, name, deployDir)
	return nil
}

// serveDefaults returns the flag set of `tallyd serve` with its defaults.
func serveDefaults() *flag.FlagSet {
	var c serveConfig
	return newFlagSet(&c)
}

func portOf(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return n
}

// envValue returns the literal value of env var name in c, or def.
func envValue(c container, name, def string) string {
	for _, e := range c.Env {
		if e.Name == name && e.Value != nil {
			return *e.Value
		}
	}
	return def
}

// flagEnvNames maps TALLY_* variables to the flag names of fs.
func flagEnvNames(fs *flag.FlagSet) map[string]string {
	m := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { m[flagenv.EnvName(f.Name)] = f.Name })
	return m
}

func TestDeployManifests(t *testing.T) {
	objs := loadManifests(t)
	fs := serveDefaults()
	def := func(name string) string { return fs.Lookup(name).DefValue }

	// Kustomization: every resource it lists exists and parses.
	kz := find(t, objs, "Kustomization", "")
	if len(kz.Resources) == 0 {
		t.Errorf("%s lists no resources", kz.file)
	}
	for _, r := range kz.Resources {
		p := filepath.Join(filepath.Dir(kz.file), r)
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s: resource %s: %v", kz.file, r, err)
		}
	}

	dep := find(t, objs, "Deployment", "tallyd")
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 3 {
		t.Errorf("Deployment replicas = %v, want 3", dep.Spec.Replicas)
	}
	podLabels := dep.Spec.Template.Metadata.Labels
	if len(dep.Spec.Selector.MatchLabels) == 0 || !subset(dep.Spec.Selector.MatchLabels, podLabels) {
		t.Errorf("Deployment selector %v does not select its pod labels %v", dep.Spec.Selector.MatchLabels, podLabels)
	}
	ps := dep.Spec.Template.Spec
	if len(ps.Containers) != 1 {
		t.Fatalf("Deployment has %d containers, want 1", len(ps.Containers))
	}
	c := ps.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "serve" {
		t.Errorf("tallyd container args = %v, want serve", c.Args)
	}

	// Ports: the container ports are the ports tallyd listens on, whether
	// from its defaults or from the env the manifest sets.
	grpcPort := portOf(t, envValue(c, "TALLY_GRPC_ADDR", def("grpc-addr")))
	httpPort := portOf(t, envValue(c, "TALLY_HTTP_ADDR", def("http-addr")))
	if grpcPort != portOf(t, def("grpc-addr")) || httpPort != portOf(t, def("http-addr")) {
		t.Errorf("manifest ports %d/%d differ from tallyd's defaults %s/%s", grpcPort, httpPort, def("grpc-addr"), def("http-addr"))
	}
	// Probes and other pods must reach the ports: not loopback (the
	// default), and then tallyd serves plaintext only with --insecure.
	for _, name := range []string{"TALLY_GRPC_ADDR", "TALLY_HTTP_ADDR"} {
		if a := envValue(c, name, ""); a == "" || isLoopback(a) {
			t.Errorf("%s = %q: other pods and the kubelet could not reach it", name, a)
		}
	}
	if envValue(c, "TALLY_TLS_CERT", "") == "" && envValue(c, "TALLY_INSECURE", "") != "true" {
		t.Errorf("no TALLY_TLS_CERT/TALLY_TLS_KEY and no TALLY_INSECURE: tallyd refuses plaintext on a non-loopback address")
	}
	named := map[string]int{}
	for _, p := range c.Ports {
		named[p.Name] = p.ContainerPort
	}
	if named["grpc"] != grpcPort || named["http"] != httpPort {
		t.Errorf("container ports %v, want grpc=%d http=%d", named, grpcPort, httpPort)
	}
	resolve := func(port any) int {
		switch p := port.(type) {
		case string:
			return named[p]
		case float64:
			return int(p)
		}
		return 0
	}

	// Probes: readiness on /readyz (PostgreSQL answers), liveness and
	// startup on /livez (the process answers; a database outage must not
	// restart the pods), all on tallyd's HTTP port; the startup budget
	// covers --startup-timeout.
	checkProbe := func(what string, p *probe, path string) {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s probe missing or not httpGet", what)
			return
		}
		if p.HTTPGet.Path != path || resolve(p.HTTPGet.Port) != httpPort {
			t.Errorf("%s probe on %s port %v, want %s on %d", what, p.HTTPGet.Path, p.HTTPGet.Port, path, httpPort)
		}
	}
	checkProbe("readiness", c.ReadinessProbe, "/readyz")
	checkProbe("liveness", c.LivenessProbe, "/livez")
	checkProbe("startup", c.StartupProbe, "/livez")
	startupTimeout := mustDuration(t, envValue(c, "TALLY_STARTUP_TIMEOUT", def("startup-timeout")))
	if c.StartupProbe != nil {
		budget := time.Duration(c.StartupProbe.PeriodSeconds*c.StartupProbe.FailureThreshold) * time.Second
		if budget < startupTimeout {
			t.Errorf("startup probe budget %s < --startup-timeout %s: pods would be killed while waiting for PostgreSQL", budget, startupTimeout)
		}
	}
	if p := c.LivenessProbe; p != nil && time.Duration(p.PeriodSeconds*p.FailureThreshold)*time.Second < livenessOutageMin {
		t.Errorf("liveness probe gives up after %ds: a PostgreSQL failover would restart every replica", p.PeriodSeconds*p.FailureThreshold)
	}

	// Grace period: preStop sleep + drain timeout must fit, or the kubelet
	// SIGKILLs calls tallyd is still draining.
	drain := mustDuration(t, envValue(c, "TALLY_DRAIN_TIMEOUT", def("drain-timeout")))
	var preStop time.Duration
	if c.Lifecycle.PreStop != nil && c.Lifecycle.PreStop.Sleep != nil {
		preStop = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	}
	if ps.TerminationGracePeriodSeconds == nil {
		t.Errorf("Deployment sets no terminationGracePeriodSeconds")
	} else if grace := time.Duration(*ps.TerminationGracePeriodSeconds) * time.Second; grace < preStop+drain+shutdownMarginMin {
		t.Errorf("terminationGracePeriodSeconds %s < preStop %s + --drain-timeout %s + margin %s", grace, preStop, drain, shutdownMarginMin)
	}

	// Every TALLY_* variable is a flag of the command the container runs.
	serveEnv := flagEnvNames(fs)
	checkEnv(t, "Deployment tallyd", c, serveEnv, true)

	// Migration: a Job running `tallyd migrate` with the database URL.
	job := find(t, objs, "Job", "")
	if len(job.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("migration Job has %d containers", len(job.Spec.Template.Spec.Containers))
	}
	jc := job.Spec.Template.Spec.Containers[0]
	if len(jc.Args) == 0 || jc.Args[0] != "migrate" {
		t.Errorf("migration Job args = %v, want migrate", jc.Args)
	}
	checkEnv(t, "migration Job", jc, migrateEnvNames(), true)

	// Service: headless, selects the pods, exposes the gRPC port.
	svc := find(t, objs, "Service", "")
	if svc.Spec.ClusterIP != "None" {
		t.Errorf("Service clusterIP = %q, want None (headless, for client-side gRPC balancing)", svc.Spec.ClusterIP)
	}
	if len(svc.Spec.SvcSelector) == 0 || !subset(svc.Spec.SvcSelector, podLabels) {
		t.Errorf("Service selector %v does not select pods %v", svc.Spec.SvcSelector, podLabels)
	}
	gotGRPC := false
	for _, p := range svc.Spec.Ports {
		if p.Port == grpcPort && resolve(p.TargetPort) == grpcPort {
			gotGRPC = true
		}
	}
	if !gotGRPC {
		t.Errorf("Service does not expose gRPC port %d", grpcPort)
	}

	// PDB: selects the Deployment's pods and keeps at least 2 of 3.
	pdb := find(t, objs, "PodDisruptionBudget", "")
	if len(pdb.Spec.Selector.MatchLabels) == 0 || !subset(pdb.Spec.Selector.MatchLabels, podLabels) {
		t.Errorf("PDB selector %v does not select the Deployment's pods %v", pdb.Spec.Selector.MatchLabels, podLabels)
	}
	if !equalLabels(pdb.Spec.Selector.MatchLabels, dep.Spec.Selector.MatchLabels) {
		t.Errorf("PDB selector %v differs from the Deployment's %v", pdb.Spec.Selector.MatchLabels, dep.Spec.Selector.MatchLabels)
	}
	if v, ok := pdb.Spec.MaxUnavailable.(float64); !ok || v != 1 || pdb.Spec.MinAvailable != nil {
		t.Errorf("PDB maxUnavailable=%v minAvailable=%v, want maxUnavailable 1", pdb.Spec.MaxUnavailable, pdb.Spec.MinAvailable)
	}

	// Secrets referenced exist in the example.
	secrets := map[string]bool{}
	for _, o := range objs {
		if o.Kind == "Secret" {
			secrets[o.Metadata.Name] = true
		}
	}
	for _, cc := range []container{c, jc} {
		for _, e := range cc.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && !secrets[e.ValueFrom.SecretKeyRef.Name] {
				t.Errorf("%s: env %s refers to Secret %q, not in secret.example.yaml", cc.Name, e.Name, e.ValueFrom.SecretKeyRef.Name)
			}
		}
	}
}

// Bounds the manifest test holds the Deployment to.
const (
	// shutdownMarginMin is the least slack between the end of the drain
	// and the kubelet's SIGKILL (closing listeners, the pool, the log).
	shutdownMarginMin = 5 * time.Second
	// livenessOutageMin is the least PostgreSQL outage the liveness probe
	// must ride out (/healthz is 503 while PostgreSQL is down).
	livenessOutageMin = 60 * time.Second
)

func checkEnv(t *testing.T, what string, c container, known map[string]string, needDB bool) {
	t.Helper()
	hasDB := false
	for _, e := range c.Env {
		if !strings.HasPrefix(e.Name, "TALLY_") {
			t.Errorf("%s: env %s is not a TALLY_ variable", what, e.Name)
			continue
		}
		if _, ok := known[e.Name]; !ok {
			t.Errorf("%s: env %s is not a flag of the command (tallyd would ignore it)", what, e.Name)
		}
		if e.Name == "TALLY_DATABASE_URL" {
			hasDB = true
			if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
				t.Errorf("%s: TALLY_DATABASE_URL must come from a Secret", what)
			}
		}
	}
	if needDB && !hasDB {
		t.Errorf("%s: no TALLY_DATABASE_URL", what)
	}
}

// migrateEnvNames are the variables `tallyd migrate` reads.
func migrateEnvNames() map[string]string {
	return flagEnvNames(newMigrateFlagSet(new(string)))
}

func mustDuration(t *testing.T, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("duration %q: %v", s, err)
	}
	return d
}

func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func equalLabels(a, b map[string]string) bool { return subset(a, b) && subset(b, a) }
