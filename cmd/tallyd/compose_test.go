package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// There is no container engine here, so docker-compose.yml's "ha" profile
// (Patroni, etcd, HAProxy, PgBouncer, tallyd behind them) must be correct
// by reading: this test reads it and checks what would otherwise only
// break on someone else's machine.

const (
	composeFile  = "../../docker-compose.yml"
	composeHADir = "../../deploy/ha"
)

type composeService struct {
	Profiles    []string          `json:"profiles"`
	Image       string            `json:"image"`
	Build       any               `json:"build"`
	Command     any               `json:"command"`
	Environment map[string]string `json:"environment"`
	Volumes     []string          `json:"volumes"`
	DependsOn   any               `json:"depends_on"`
}

func loadCompose(t *testing.T) map[string]composeService {
	t.Helper()
	b, err := os.ReadFile(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Services map[string]composeService `json:"services"`
		Volumes  map[string]any            `json:"volumes"`
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	// Every named volume a service mounts is declared.
	for name, svc := range doc.Services {
		for _, v := range svc.Volumes {
			src, _, _ := strings.Cut(v, ":")
			if strings.HasPrefix(src, ".") {
				if _, err := os.Stat(filepath.Join("../..", src)); err != nil {
					t.Errorf("service %s mounts %s, which does not exist", name, src)
				}
				continue
			}
			if _, ok := doc.Volumes[src]; !ok {
				t.Errorf("service %s mounts volume %s, which is not declared", name, src)
			}
		}
	}
	return doc.Services
}

func TestComposeHAProfile(t *testing.T) {
	svcs := loadCompose(t)
	want := []string{"etcd1", "etcd2", "etcd3", "patroni1", "patroni2", "haproxy", "ha-db-init", "pgbouncer", "tally-init-ha", "tallyd-ha"}
	for _, name := range want {
		svc, ok := svcs[name]
		if !ok {
			t.Errorf("the ha profile lacks service %s", name)
			continue
		}
		if len(svc.Profiles) != 1 || svc.Profiles[0] != "ha" {
			t.Errorf("service %s has profiles %v, want [ha] (it must not start with a plain `docker compose up`)", name, svc.Profiles)
		}
		if m, ok := svc.Build.(map[string]any); ok {
			if df, _ := m["dockerfile"].(string); df != "" {
				if _, err := os.Stat(filepath.Join("../..", df)); err != nil {
					t.Errorf("service %s builds from %s, which does not exist", name, df)
				}
			}
		}
	}
	// tallyd goes through PgBouncer with the pooler setting; its
	// migrations go direct (HAProxy), never through PgBouncer.
	td := svcs["tallyd-ha"].Environment
	if !strings.Contains(td["TALLY_DATABASE_URL"], "@pgbouncer:6432/") || td["TALLY_DATABASE_POOLER"] != "transaction" {
		t.Errorf("tallyd-ha: database URL %q pooler %q: want PgBouncer with TALLY_DATABASE_POOLER=transaction",
			td["TALLY_DATABASE_URL"], td["TALLY_DATABASE_POOLER"])
	}
	if u := svcs["tally-init-ha"].Environment["TALLY_DATABASE_URL"]; !strings.Contains(u, "@haproxy:5000/") {
		t.Errorf("tally-init-ha migrates through %q: want HAProxy's primary port, not the pooler", u)
	}
	// Each Patroni node names itself and is reached under its own name.
	for _, n := range []string{"patroni1", "patroni2"} {
		env := svcs[n].Environment
		if env["PATRONI_NAME"] != n || env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"] != n+":5432" || env["PATRONI_RESTAPI_CONNECT_ADDRESS"] != n+":8008" {
			t.Errorf("%s: PATRONI_NAME %q, connect addresses %q %q", n, env["PATRONI_NAME"],
				env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"], env["PATRONI_RESTAPI_CONNECT_ADDRESS"])
		}
	}
	for _, n := range []string{"etcd1", "etcd2", "etcd3"} {
		env := svcs[n].Environment
		if env["ETCD_NAME"] != n || !strings.Contains(env["ETCD_ADVERTISE_CLIENT_URLS"], n+":2379") ||
			!strings.Contains(env["ETCD_INITIAL_CLUSTER"], n+"=http://"+n+":2380") {
			t.Errorf("%s: ETCD_NAME %q, advertised %q, cluster %q", n, env["ETCD_NAME"], env["ETCD_ADVERTISE_CLIENT_URLS"], env["ETCD_INITIAL_CLUSTER"])
		}
	}
}

func TestComposeHAPatroniSettings(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(composeHADir, "patroni.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Etcd3 struct {
			Hosts string `json:"hosts"`
		} `json:"etcd3"`
		Bootstrap struct {
			DCS struct {
				TTL          int   `json:"ttl"`
				LoopWait     int   `json:"loop_wait"`
				RetryTimeout int   `json:"retry_timeout"`
				SyncMode     bool  `json:"synchronous_mode"`
				SyncStrict   bool  `json:"synchronous_mode_strict"`
				LagMax       int64 `json:"maximum_lag_on_failover"`
				PostgreSQL   struct {
					UsePgRewind bool              `json:"use_pg_rewind"`
					Parameters  map[string]string `json:"parameters"`
				} `json:"postgresql"`
			} `json:"dcs"`
		} `json:"bootstrap"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("patroni.yml: %v", err)
	}
	d := cfg.Bootstrap.DCS
	if d.LoopWait+2*d.RetryTimeout > d.TTL {
		t.Errorf("loop_wait %d + 2 x retry_timeout %d > ttl %d: Patroni refuses it", d.LoopWait, d.RetryTimeout, d.TTL)
	}
	if !d.SyncMode {
		t.Error("synchronous_mode is off: a failover could lose acknowledged charges")
	}
	if !d.PostgreSQL.UsePgRewind || d.PostgreSQL.Parameters["wal_log_hints"] != "on" {
		t.Error("pg_rewind needs use_pg_rewind and wal_log_hints = on, or the old primary cannot rejoin")
	}
	if d.PostgreSQL.Parameters["synchronous_commit"] != "on" || d.PostgreSQL.Parameters["fsync"] != "on" {
		t.Errorf("durability settings %v: tallyd refuses synchronous_commit or fsync off", d.PostgreSQL.Parameters)
	}
	if got := strings.Count(cfg.Etcd3.Hosts, ":2379"); got != 3 {
		t.Errorf("etcd3 hosts %q: want the three members", cfg.Etcd3.Hosts)
	}
}

func TestComposeHAPgBouncerAndHAProxy(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(composeHADir, "pgbouncer.ini"))
	if err != nil {
		t.Fatal(err)
	}
	ini := string(b)
	for _, want := range []string{`(?m)^pool_mode = transaction$`, `(?m)^tally = host=haproxy port=5000 `, `(?m)^listen_port = 6432$`} {
		if !regexp.MustCompile(want).MatchString(ini) {
			t.Errorf("pgbouncer.ini lacks %s", want)
		}
	}
	cfgPath := filepath.Join(composeHADir, "haproxy.cfg")
	b, err = os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"bind *:5000", "option httpchk OPTIONS /primary", "on-marked-down shutdown-sessions",
		"server patroni1 patroni1:5432", "server patroni2 patroni2:5432"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("haproxy.cfg lacks %q", want)
		}
	}
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Log("haproxy not installed: its own syntax check skipped")
		return
	}
	// The node names only resolve inside compose's network: HAProxy
	// warns about them and must still call the file valid.
	out, err := exec.Command("haproxy", "-c", "-f", cfgPath).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Configuration file is valid") {
		t.Errorf("haproxy -c: %v\n%s", err, out)
	}
}
