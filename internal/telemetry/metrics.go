// Package telemetry holds tallyd's Prometheus metrics and OpenTelemetry
// tracing. It instruments at the boundaries: gRPC interceptors and a stats
// handler, collectors that read the PostgreSQL pool's, the cache's and group
// commit's own counters at scrape time, and one hook called per committed
// batch. Nothing here is on the path that decides an outcome.
package telemetry

import (
	"context"
	"net/http"
	"strings"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/tallyledger/tally/cache"
	"github.com/tallyledger/tally/ledger"
	tallyv1 "github.com/tallyledger/tally/proto/tally/v1"
	"github.com/tallyledger/tally/topup"
)

// RPCLatencyBuckets are the buckets (seconds) of grpc_server_handling_seconds:
// a charge takes about a millisecond idle and tens of milliseconds at full
// load; the tail reaches the call timeout.
var RPCLatencyBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// Metrics is the set of tallyd's metrics on one private registry, so that
// several servers (tests) never share counters.
type Metrics struct {
	reg           *prometheus.Registry
	grpc          *grpcprom.ServerMetrics
	chargedUnits  *prometheus.CounterVec
	chargeAmount  *prometheus.HistogramVec
	refundedUnits *prometheus.CounterVec
	replays       *prometheus.CounterVec
	rejections    *prometheus.CounterVec
	batchSize     prometheus.Histogram
}

// NewMetrics registers tallyd's metrics, plus the Go runtime and process
// collectors, on reg.
func NewMetrics(reg *prometheus.Registry) *Metrics {
	m := &Metrics{
		reg: reg,
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets(RPCLatencyBuckets))),
		chargedUnits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_charged_minor_units_total",
			Help: "Sum of the amounts of committed charges (Charge, CaptureHold and charges in SubmitBatch; replays not counted), in the currency's minor units.",
		}, []string{"currency"}),
		chargeAmount: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tally_charge_amount_minor_units",
			Help:    "Amounts of committed charges (Charge, CaptureHold and charges in SubmitBatch; replays not counted), in the currency's minor units.",
			Buckets: prometheus.ExponentialBuckets(1, 10, 10), // 1 .. 10^9
		}, []string{"currency"}),
		refundedUnits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_refunded_minor_units_total",
			Help: "Sum of the amounts of committed refunds (replays not counted), in the currency's minor units.",
		}, []string{"currency"}),
		replays: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_idempotent_replays_total",
			Help: "Calls answered with the stored outcome of an idempotency key already used (a posting or a recorded rejection).",
		}, []string{"method"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tally_rpc_rejections_total",
			Help: "Calls answered with an error, by method, gRPC code and google.rpc.ErrorInfo reason (UNSPECIFIED when the status has none).",
		}, []string{"method", "code", "reason"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tally_batch_size_items",
			Help:    "Calls group-committed per PostgreSQL transaction (committed batches only).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 11), // 1 .. 1024
		}),
	}
	reg.MustRegister(m.grpc, m.chargedUnits, m.chargeAmount, m.refundedUnits, m.replays, m.rejections, m.batchSize,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the registry the metrics live on.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus text format (or
// OpenMetrics, with exemplars, when the scraper asks for it).
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, EnableOpenMetrics: true})
}

// exemplar attaches the trace id of a sampled call to its latency sample,
// so a slow bucket links to a trace (only when tracing is on).
func exemplar(ctx context.Context) prometheus.Labels {
	if sc := trace.SpanContextFromContext(ctx); sc.IsSampled() {
		return prometheus.Labels{"trace_id": sc.TraceID().String()}
	}
	return nil
}

// UnaryInterceptors returns the interceptors to put outermost in the gRPC
// chain: request counts and latency by method and code, then the outcome
// counters (charges, replays, rejections).
func (m *Metrics) UnaryInterceptors() []grpc.UnaryServerInterceptor {
	return []grpc.UnaryServerInterceptor{
		m.grpc.UnaryServerInterceptor(grpcprom.WithExemplarFromContext(exemplar)),
		m.outcomeUnary,
	}
}

// StreamInterceptors is UnaryInterceptors for streaming calls.
func (m *Metrics) StreamInterceptors() []grpc.StreamServerInterceptor {
	return []grpc.StreamServerInterceptor{
		m.grpc.StreamServerInterceptor(grpcprom.WithExemplarFromContext(exemplar)),
		func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			err := h(srv, ss)
			m.observeError(methodName(info.FullMethod), err)
			return err
		},
	}
}

// InitializeGRPC creates every method's series at zero, so rates and alerts
// work before the first call of a method.
func (m *Metrics) InitializeGRPC(s *grpc.Server) { m.grpc.InitializeMetrics(s) }

// ObserveBatch records the size of one committed group-commit batch. It is
// ledger.BatchConfig.OnBatch.
func (m *Metrics) ObserveBatch(items int) { m.batchSize.Observe(float64(items)) }

func methodName(full string) string {
	if i := strings.LastIndexByte(full, '/'); i >= 0 {
		return full[i+1:]
	}
	return full
}

// replayed is every response message with a replayed flag (TransferResult,
// HoldResult, SubmitBatchResponse).
type replayed interface{ GetReplayed() bool }

func (m *Metrics) outcomeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	method := methodName(info.FullMethod)
	if err != nil {
		m.observeError(method, err)
		return resp, err
	}
	if r, ok := resp.(replayed); ok && r.GetReplayed() {
		m.replays.WithLabelValues(method).Inc()
		return resp, err
	}
	switch r := resp.(type) {
	case *tallyv1.TransferResult:
		m.observeTransfer(r.GetTransfer())
	case *tallyv1.HoldResult: // a capture's charge
		m.observeTransfer(r.GetTransfer())
	case *tallyv1.SubmitBatchResponse:
		if !r.GetApplied() {
			break // an ATOMIC batch that failed wrote nothing
		}
		for _, res := range r.GetResults() {
			if t := res.GetTransfer(); t != nil && !t.GetReplayed() {
				m.observeTransfer(t.GetTransfer())
			}
			if h := res.GetHold(); h != nil && !h.GetReplayed() {
				m.observeTransfer(h.GetTransfer())
			}
		}
	}
	return resp, err
}

// observeTransfer counts the money of a transfer just committed by a call
// (not a replay): charges and refunds, by currency.
func (m *Metrics) observeTransfer(t *tallyv1.Transfer) {
	if t == nil {
		return
	}
	cur, amount := t.GetCurrency(), float64(t.GetAmount())
	switch t.GetKind() {
	case tallyv1.TransferKind_TRANSFER_KIND_CHARGE:
		m.chargedUnits.WithLabelValues(cur).Add(amount)
		m.chargeAmount.WithLabelValues(cur).Observe(amount)
	case tallyv1.TransferKind_TRANSFER_KIND_REFUND:
		m.refundedUnits.WithLabelValues(cur).Add(amount)
	}
}

// observeError counts a failed call by its ErrorInfo reason, and as a replay
// when it is the recorded rejection of a key used before.
func (m *Metrics) observeError(method string, err error) {
	if err == nil {
		return
	}
	st := status.Convert(err)
	reason := "UNSPECIFIED"
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			if info.GetReason() != "" {
				reason = info.GetReason()
			}
			if info.GetMetadata()["replayed"] == "true" {
				m.replays.WithLabelValues(method).Inc()
			}
			break
		}
	}
	m.rejections.WithLabelValues(method, st.Code().String(), reason).Inc()
}

// RegisterPool exports the PostgreSQL pool's statistics, read at scrape time.
func (m *Metrics) RegisterPool(stat func() *pgxpool.Stat) {
	m.reg.MustRegister(&poolCollector{stat: stat})
}

// RegisterCache exports the cache's counters and breaker state.
func (m *Metrics) RegisterCache(stats func() cache.Stats) {
	m.reg.MustRegister(&cacheCollector{stats: stats})
}

// RegisterBatcher exports group commit's counters and queue depth.
func (m *Metrics) RegisterBatcher(stats func() ledger.BatchStats, queueItemsMax int) {
	m.reg.MustRegister(&batchCollector{stats: stats, queueMax: float64(queueItemsMax)})
}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

type poolCollector struct{ stat func() *pgxpool.Stat }

var (
	poolAcquired     = desc("tally_pg_pool_acquired_conns", "PostgreSQL connections in use.")
	poolIdle         = desc("tally_pg_pool_idle_conns", "PostgreSQL connections idle in the pool.")
	poolTotal        = desc("tally_pg_pool_total_conns", "PostgreSQL connections open (acquired, idle and being opened).")
	poolConstructing = desc("tally_pg_pool_constructing_conns", "PostgreSQL connections being opened.")
	poolMax          = desc("tally_pg_pool_max_conns", "Most PostgreSQL connections the pool opens (--pool-conns-max).")
	poolAcquires     = desc("tally_pg_pool_acquires_total", "Successful connection acquisitions.")
	poolAcquireSecs  = desc("tally_pg_pool_acquire_seconds_total", "Total time spent acquiring connections (successful acquisitions).")
	poolEmpty        = desc("tally_pg_pool_empty_acquires_total", "Acquisitions that had to wait because no connection was idle.")
	poolEmptySecs    = desc("tally_pg_pool_empty_acquire_wait_seconds_total", "Total time waited by acquisitions that found no idle connection.")
	poolCanceled     = desc("tally_pg_pool_canceled_acquires_total", "Acquisitions given up because their context ended.")
	poolNewConns     = desc("tally_pg_pool_new_conns_total", "PostgreSQL connections opened.")
)

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{poolAcquired, poolIdle, poolTotal, poolConstructing, poolMax,
		poolAcquires, poolAcquireSecs, poolEmpty, poolEmptySecs, poolCanceled, poolNewConns} {
		ch <- d
	}
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stat()
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	counter := func(d *prometheus.Desc, v float64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v)
	}
	gauge(poolAcquired, float64(s.AcquiredConns()))
	gauge(poolIdle, float64(s.IdleConns()))
	gauge(poolTotal, float64(s.TotalConns()))
	gauge(poolConstructing, float64(s.ConstructingConns()))
	gauge(poolMax, float64(s.MaxConns()))
	counter(poolAcquires, float64(s.AcquireCount()))
	counter(poolAcquireSecs, s.AcquireDuration().Seconds())
	counter(poolEmpty, float64(s.EmptyAcquireCount()))
	counter(poolEmptySecs, s.EmptyAcquireWaitTime().Seconds())
	counter(poolCanceled, float64(s.CanceledAcquireCount()))
	counter(poolNewConns, float64(s.NewConnsCount()))
}

type cacheCollector struct{ stats func() cache.Stats }

var (
	cacheHits     = desc("tally_cache_hits_total", "Cached balance reads served from Redis.")
	cacheMisses   = desc("tally_cache_misses_total", "Cached balance reads that found no usable entry in Redis (read from PostgreSQL).")
	cacheErrors   = desc("tally_cache_errors_total", "Redis calls that failed or timed out (reads and writes).")
	cacheBypassed = desc("tally_cache_bypassed_total", "Redis calls skipped because the circuit breaker was not closed.")
	cacheBreaker  = desc("tally_cache_breaker_state", "1 for the cache circuit breaker's current state (closed, half-open, open), 0 for the others.", "state")
)

func (c *cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{cacheHits, cacheMisses, cacheErrors, cacheBypassed, cacheBreaker} {
		ch <- d
	}
}

func (c *cacheCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- prometheus.MustNewConstMetric(cacheHits, prometheus.CounterValue, float64(s.Hits))
	ch <- prometheus.MustNewConstMetric(cacheMisses, prometheus.CounterValue, float64(s.Misses))
	ch <- prometheus.MustNewConstMetric(cacheErrors, prometheus.CounterValue, float64(s.Errors))
	ch <- prometheus.MustNewConstMetric(cacheBypassed, prometheus.CounterValue, float64(s.Bypassed))
	for _, st := range []string{"closed", "half-open", "open"} {
		v := 0.0
		if s.Breaker == st {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(cacheBreaker, prometheus.GaugeValue, v, st)
	}
}

type batchCollector struct {
	stats    func() ledger.BatchStats
	queueMax float64
}

var (
	batchBatches  = desc("tally_batches_total", "Group-commit batches committed.")
	batchItems    = desc("tally_batch_items_total", "Calls in committed group-commit batches.")
	batchSplits   = desc("tally_batch_splits_total", "Failed batches retried in halves (a poisonous item, or a transient error).")
	batchPeak     = desc("tally_batch_items_peak", "Largest committed batch since start.")
	batchQueued   = desc("tally_batch_queue_items", "Calls waiting for a batch now.")
	batchQueueMax = desc("tally_batch_queue_items_max", "Calls that may wait for a batch before RESOURCE_EXHAUSTED (--batch-queue-items-max).")
)

func (c *batchCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{batchBatches, batchItems, batchSplits, batchPeak, batchQueued, batchQueueMax} {
		ch <- d
	}
}

func (c *batchCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- prometheus.MustNewConstMetric(batchBatches, prometheus.CounterValue, float64(s.Batches))
	ch <- prometheus.MustNewConstMetric(batchItems, prometheus.CounterValue, float64(s.Items))
	ch <- prometheus.MustNewConstMetric(batchSplits, prometheus.CounterValue, float64(s.Splits))
	ch <- prometheus.MustNewConstMetric(batchPeak, prometheus.GaugeValue, float64(s.ItemsPeak))
	ch <- prometheus.MustNewConstMetric(batchQueued, prometheus.GaugeValue, float64(s.Queued))
	ch <- prometheus.MustNewConstMetric(batchQueueMax, prometheus.GaugeValue, c.queueMax)
}

// RegisterTopUps exports the top-up workers' counters. A rise of
// tally_topup_unresolved_total is an alert: a top-up stays PENDING for a
// person (docs/OPERATIONS.md).
func (m *Metrics) RegisterTopUps(stats func() topup.Stats) {
	m.reg.MustRegister(&topupCollector{stats: stats})
}

type topupCollector struct{ stats func() topup.Stats }

var (
	topupSucceeded  = desc("tally_topup_succeeded_total", "Top-ups paid and credited by this process's workers.")
	topupFailed     = desc("tally_topup_failed_total", "Top-ups declined by the provider (FAILED; nothing charged).")
	topupRetried    = desc("tally_topup_retried_total", "Top-up attempts that ended with an unknown outcome and will be retried (after a look-up).")
	topupUnresolved = desc("tally_topup_unresolved_total", "Top-ups left PENDING after their last attempt, or paid but not credited: each needs a person.")
)

func (c *topupCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{topupSucceeded, topupFailed, topupRetried, topupUnresolved} {
		ch <- d
	}
}

func (c *topupCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	ch <- prometheus.MustNewConstMetric(topupSucceeded, prometheus.CounterValue, float64(s.Succeeded))
	ch <- prometheus.MustNewConstMetric(topupFailed, prometheus.CounterValue, float64(s.Failed))
	ch <- prometheus.MustNewConstMetric(topupRetried, prometheus.CounterValue, float64(s.Retried))
	ch <- prometheus.MustNewConstMetric(topupUnresolved, prometheus.CounterValue, float64(s.Unresolved))
}
