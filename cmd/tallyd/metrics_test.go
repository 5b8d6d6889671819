package main

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/api"
	"github.com/tallyledger/tally/api/client"
	"github.com/tallyledger/tally/auth"
	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/internal/localsvc"
	"github.com/tallyledger/tally/internal/tallytest"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/store"
)

// withAdminKey makes an admin key in the database at url.
func withAdminKey(t *testing.T, url string) string {
	t.Helper()
	st, err := store.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	k, err := auth.CreateKey(context.Background(), st, "admin-"+tallytest.RandomSuffix(), auth.RoleAdmin, "")
	if err != nil {
		t.Fatal(err)
	}
	return k.Key.String()
}

// startServe runs serve() in the background until the test ends and returns
// its addresses.
func startServe(t *testing.T, c serveConfig) (grpcAddr, httpAddr string, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan [2]string, 1)
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, c, quietLog(), func(g, h string) { ready <- [2]string{g, h} })
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	select {
	case a := <-ready:
		return a[0], a[1], stop
	case err := <-done:
		t.Fatalf("serve exited before it was ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("serve not ready within 60s")
	}
	return "", "", stop
}

// scrape reads /metrics and parses it.
func scrape(t *testing.T, httpAddr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return fams
}

// value returns the value of the series of family name whose labels include
// want (a counter, gauge, or a histogram's sample count), and whether such a
// series exists.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
	var sum float64
	found := false
metrics:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue metrics
			}
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Untyped != nil:
			sum += m.GetUntyped().GetValue()
		}
	}
	return sum, found
}

// /metrics after a credit, a charge, its replay, a rejected charge, an
// unauthenticated call and cached balance reads shows every metric family
// with exactly those counts.
func TestMetricsAfterCalls(t *testing.T) {
	requireRedis(t)
	url := newDB(t)
	key := withAdminKey(t, url)
	c := baseConfig(url)
	c.redisURL = tallytest.RedisURL()
	grpcAddr, httpAddr, _ := startServe(t, c)

	cl, err := client.New(client.Config{Addr: grpcAddr, APIKey: key, Policy: client.Policy{RetryAttemptsMax: 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cur := "M" + strings.ToUpper(tallytest.RandomSuffix()[:6])
	a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Credit(ctx, &tallyv1.CreditRequest{AccountId: a.GetAccountId(), Amount: 1000, IdempotencyKey: "credit-1"}); err != nil {
		t.Fatal(err)
	}
	charge := &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 250, IdempotencyKey: "charge-1"}
	first, err := cl.Charge(ctx, charge)
	if err != nil || first.GetReplayed() {
		t.Fatalf("charge: %v %v", first, err)
	}
	if r, err := cl.Charge(ctx, charge); err != nil || !r.GetReplayed() {
		t.Fatalf("replay: %v %v", r, err)
	}
	_, err = cl.Charge(ctx, &tallyv1.ChargeRequest{AccountId: a.GetAccountId(), Amount: 1_000_000, IdempotencyKey: "charge-2"})
	if info, _ := api.ErrorInfo(err); info.GetReason() != "INSUFFICIENT_FUNDS" {
		t.Fatalf("overdraft: %v", err)
	}
	if _, err := cl.Refund(ctx, &tallyv1.RefundRequest{TransferId: first.GetTransfer().GetTransferId(), Amount: 50, IdempotencyKey: "refund-1"}); err != nil {
		t.Fatalf("refund: %v", err)
	}
	// A fresh account has nothing cached: a miss, then a hit.
	b, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: cur})
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []tallyv1.BalanceSource{tallyv1.BalanceSource_BALANCE_SOURCE_STORE, tallyv1.BalanceSource_BALANCE_SOURCE_CACHE} {
		bal, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: b.GetAccountId()})
		if err != nil || bal.GetSource() != want {
			t.Fatalf("balance read %d: %v from %v, want %v", i, err, bal.GetSource(), want)
		}
	}
	anon, err := client.New(client.Config{Addr: grpcAddr, Policy: client.Policy{RetryAttemptsMax: 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	if _, err := anon.GetAccount(ctx, &tallyv1.GetAccountRequest{AccountId: a.GetAccountId()}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("call without a key: %v", err)
	}

	fams := scrape(t, httpAddr)
	type check struct {
		name   string
		labels map[string]string
		ok     func(float64) bool
		want   string
	}
	eq := func(n float64) func(float64) bool { return func(v float64) bool { return v == n } }
	atLeast := func(n float64) func(float64) bool { return func(v float64) bool { return v >= n } }
	charge3 := map[string]string{"grpc_method": "Charge", "grpc_service": "tally.v1.LedgerService"}
	for _, ck := range []check{
		// Per-RPC counts and latency by code.
		{"grpc_server_handled_total", map[string]string{"grpc_method": "Charge", "grpc_code": "OK"}, eq(2), "2"},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "Charge", "grpc_code": "FailedPrecondition"}, eq(1), "1"},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "GetAccount", "grpc_code": "Unauthenticated"}, eq(1), "1"},
		{"grpc_server_handled_total", map[string]string{"grpc_method": "Transfer", "grpc_code": "OK"}, eq(0), "0 (initialized)"},
		{"grpc_server_handling_seconds", charge3, eq(3), "3 observations"},
		{"grpc_server_started_total", charge3, eq(3), "3"},
		// Charge amounts by currency: the first charge only.
		{"tally_charged_minor_units_total", map[string]string{"currency": cur}, eq(250), "250"},
		{"tally_charge_amount_minor_units", map[string]string{"currency": cur}, eq(1), "1 observation"},
		{"tally_refunded_minor_units_total", map[string]string{"currency": cur}, eq(50), "50"},
		// Replays and rejections.
		{"tally_idempotent_replays_total", map[string]string{"method": "Charge"}, eq(1), "1"},
		{"tally_rpc_rejections_total", map[string]string{"method": "Charge", "code": "FailedPrecondition", "reason": "INSUFFICIENT_FUNDS"}, eq(1), "1"},
		{"tally_rpc_rejections_total", map[string]string{"method": "GetAccount", "code": "Unauthenticated", "reason": "UNAUTHENTICATED"}, eq(1), "1"},
		// Cache.
		{"tally_cache_hits_total", nil, eq(1), "1"},
		{"tally_cache_misses_total", nil, eq(1), "1"},
		{"tally_cache_errors_total", nil, eq(0), "0"},
		{"tally_cache_bypassed_total", nil, eq(0), "0"},
		{"tally_cache_breaker_state", map[string]string{"state": "closed"}, eq(1), "1"},
		{"tally_cache_breaker_state", map[string]string{"state": "open"}, eq(0), "0"},
		// PostgreSQL pool.
		{"tally_pg_pool_max_conns", nil, eq(float64(store.PoolConnsMaxDefault)), "--pool-conns-max"},
		{"tally_pg_pool_total_conns", nil, atLeast(1), ">= 1"},
		{"tally_pg_pool_acquired_conns", nil, eq(0), "0 between calls"},
		{"tally_pg_pool_idle_conns", nil, atLeast(1), ">= 1"},
		{"tally_pg_pool_acquires_total", nil, atLeast(5), ">= 5"},
		{"tally_pg_pool_acquire_seconds_total", nil, atLeast(0), "present"},
		{"tally_pg_pool_empty_acquires_total", nil, atLeast(0), "present"},
		{"tally_pg_pool_new_conns_total", nil, atLeast(1), ">= 1"},
		// Group commit: credit, charge, replay, overdraft and refund, one
		// batch each.
		{"tally_batch_size_items", nil, eq(5), "5 batches"},
		{"tally_batches_total", nil, eq(5), "5"},
		{"tally_batch_items_total", nil, eq(5), "5"},
		{"tally_batch_queue_items", nil, eq(0), "0"},
		{"tally_batch_queue_items_max", nil, eq(8192), "8192"},
		// Runtime.
		{"go_goroutines", nil, atLeast(1), ">= 1"},
	} {
		v, found := value(fams, ck.name, ck.labels)
		if !found || !ck.ok(v) {
			t.Errorf("%s%v = %v (present %v), want %s", ck.name, ck.labels, v, found, ck.want)
		}
	}
	if h := fams["tally_batch_size_items"].GetMetric()[0].GetHistogram(); h.GetSampleSum() != 5 {
		t.Errorf("tally_batch_size_items sum %v, want 5 (one call per batch)", h.GetSampleSum())
	}

	// Every metric the example alerts in docs/OPERATIONS.md use exists.
	doc, err := os.ReadFile("../../docs/OPERATIONS.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```yaml\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(blocks) < 2 {
		t.Fatalf("docs/OPERATIONS.md: %d yaml blocks, want the scrape config and the alerts", len(blocks))
	}
	used := map[string]bool{}
	for _, b := range blocks {
		for _, n := range regexp.MustCompile(`\b(?:tally|grpc_server)_[a-z_]+`).FindAll(b[1], -1) {
			used[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(string(n), "_bucket"), "_count"), "_sum")] = true
		}
	}
	if len(used) < 5 {
		t.Fatalf("only %d metric names in the docs' alerts: %v", len(used), used)
	}
	for n := range used {
		if _, ok := fams[n]; !ok {
			t.Errorf("docs/OPERATIONS.md alerts use %s, which /metrics does not serve", n)
		}
	}
}

func requireRedis(t *testing.T) {
	t.Helper()
	c, err := cache.New(cache.Config{URL: tallytest.RedisURL(), OpTimeout: time.Second, Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if s := c.Status(); s.State != cache.StateOK {
		if os.Getenv("CI") != "" {
			t.Fatalf("shared Redis %s not usable: %s", tallytest.RedisURL(), s.Detail)
		}
		t.Skipf("shared Redis %s not usable: %s", tallytest.RedisURL(), s.Detail)
	}
}

type readyBody struct {
	Status       string              `json:"status"`
	Ready        bool                `json:"ready"`
	Dependencies map[string]depState `json:"dependencies"`
}

func getReady(t *testing.T, h http.Handler, path string) (int, readyBody) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	var b readyBody
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		t.Fatalf("%s: %d %q: %v", path, rec.Code, rec.Body.String(), err)
	}
	return rec.Code, b
}

// /readyz: 503 when PostgreSQL does not answer; 200 but "degraded" when
// only Redis is unreachable (reads go to PostgreSQL).
func TestReadyzPostgresDownVersusRedisDown(t *testing.T) {
	port, err := localsvc.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	dead := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	ctx := context.Background()
	good, err := store.Open(ctx, store.Config{URL: newDB(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	bad, err := store.Open(ctx, store.Config{URL: "postgres://postgres@" + dead + "/tally?sslmode=disable", ConnectTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	deadRedis, err := cache.New(cache.Config{URL: "redis://" + dead + "/0", Logger: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer deadRedis.Close()

	for _, tc := range []struct {
		name       string
		st         *store.Store
		bc         *cache.Cache
		code       int
		status     string
		pg, cached string
	}{
		{"all up, no cache", good, nil, 200, "ok", "ok", "disabled"},
		{"Redis down", good, deadRedis, 200, "degraded", "ok", "degraded"},
		{"PostgreSQL down", bad, nil, 503, "down", "down", "disabled"},
		{"both down", bad, deadRedis, 503, "down", "down", "degraded"},
	} {
		h := healthHandler(tc.st, tc.bc)
		for _, path := range []string{"/readyz", "/healthz"} {
			code, b := getReady(t, h, path)
			if code != tc.code || b.Status != tc.status || b.Ready != (tc.code == 200) ||
				b.Dependencies["postgres"].State != tc.pg || b.Dependencies["cache"].State != tc.cached {
				t.Errorf("%s %s: %d %+v, want %d %s postgres %s cache %s", tc.name, path, code, b, tc.code, tc.status, tc.pg, tc.cached)
			}
			if tc.pg == "down" && b.Dependencies["postgres"].Detail == "" {
				t.Errorf("%s %s: no detail for postgres down", tc.name, path)
			}
		}
		// Liveness never depends on the database: a failover must not
		// restart every replica.
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/livez", nil))
		if rec.Code != http.StatusOK {
			t.Errorf("%s /livez: %d, want 200", tc.name, rec.Code)
		}
	}
}

// otlpSink is a minimal OTLP/gRPC trace collector that keeps what it gets.
type otlpSink struct {
	coltracepb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.Span
}

func (s *otlpSink) Export(_ context.Context, r *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rs := range r.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			s.spans = append(s.spans, ss.GetSpans()...)
		}
	}
	return &coltracepb.ExportTraceServiceResponse{}, nil
}

func dbSystem(sp *tracepb.Span) string {
	for _, kv := range sp.GetAttributes() {
		if strings.HasPrefix(kv.GetKey(), "db.system") {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

// With --otlp-endpoint, a cached balance read is one trace: the server span
// of the call with the Redis and PostgreSQL spans beneath it. Without it,
// nothing is exported (the other tests run without it).
func TestTracingExportsRPCStoreAndCacheSpans(t *testing.T) {
	requireRedis(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sink := &otlpSink{}
	gs := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(gs, sink)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()

	url := newDB(t)
	key := withAdminKey(t, url)
	c := baseConfig(url)
	c.redisURL = tallytest.RedisURL()
	c.otlpEndpoint = "http://" + lis.Addr().String()
	grpcAddr, _, stop := startServe(t, c)
	cl, err := client.New(client.Config{Addr: grpcAddr, APIKey: key, Policy: client.Policy{RetryAttemptsMax: 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	a, err := cl.CreateAccount(ctx, &tallyv1.CreateAccountRequest{Currency: "USD"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.GetBalance(ctx, &tallyv1.GetBalanceRequest{AccountId: a.GetAccountId()}); err != nil {
		t.Fatal(err)
	}
	stop() // flushes the exporter

	sink.mu.Lock()
	defer sink.mu.Unlock()
	var root *tracepb.Span
	for _, sp := range sink.spans {
		if sp.GetName() == "tally.v1.LedgerService/GetBalance" && sp.GetKind() == tracepb.Span_SPAN_KIND_SERVER {
			root = sp
		}
	}
	if root == nil {
		names := []string{}
		for _, sp := range sink.spans {
			names = append(names, sp.GetName())
		}
		t.Fatalf("no GetBalance server span among %d spans: %v", len(sink.spans), names)
	}
	systems := map[string]int{}
	for _, sp := range sink.spans {
		if string(sp.GetTraceId()) == string(root.GetTraceId()) {
			systems[dbSystem(sp)]++
		}
	}
	t.Logf("%d spans exported; the GetBalance trace's spans by db system: %v", len(sink.spans), systems)
	if systems["redis"] == 0 || systems["postgresql"] == 0 {
		t.Fatalf("GetBalance trace has spans by db system %v, want redis and postgresql", systems)
	}
}
