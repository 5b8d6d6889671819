#!/usr/bin/env bash
# bench/compare.sh: Tally against its references, in one run, on the same
# PostgreSQL and Redis.
#
# References: pgbench tpcb-like (scale 10), a pgbench script updating one
# hot row, pgbench select-only, redis-benchmark GET (10,000 random keys, no
# pipelining), and a no-op gRPC call (grpc.health.v1 Check) made by
# `tally bench --scenario noop` through the same client and concurrency as
# the Tally scenarios. Then Tally's scenarios against a tallyd built from
# this checkout, started on free ports against a fresh database (with Redis,
# and a second tallyd without Redis for balance-nocache). A CHECKPOINT runs
# before each database scenario. Every figure is the median of RUNS runs;
# each Tally figure is printed as a ratio to its reference.
#
# Usage (from the repository root):
#   bench/compare.sh                      # full: RUNS=3 DURATION=20
#   RUNS=1 DURATION=10 bench/compare.sh   # quick
#
# Environment:
#   RUNS (3)  DURATION (20, seconds per measurement)  WARMUP (5, seconds)
#   CLIENTS (32)  ACCOUNTS (10000)  CONNS (1, gRPC connections of tally bench)
#   TALLYDS (1)  tallyd replicas with Redis, all on the bench database; tally
#                bench spreads its connections over them (CONNS is raised to
#                TALLYDS) and sums their CPU and batch statistics. Unless
#                TALLY_POOL_CONNS_MAX is set, each gets 32/TALLYDS connections,
#                so the shared server's max_connections is not exhausted.
#   PGHOST (127.0.0.1) PGPORT (5432) PGUSER (postgres)
#   REDIS_HOST (127.0.0.1) REDIS_PORT (6379) REDIS_DB (9)
#   SCENARIOS (all: "charge-uniform charge-hot transfer-uniform balance-cached mixed balance-nocache";
#                with VIA=pgbouncer the write scenarios: "charge-uniform charge-hot transfer-uniform")
#   VIA (direct)  pgbouncer: start a PgBouncer in transaction pooling mode
#                (go run ./bench/pgbouncer; Debian's pgbouncer, as user
#                postgres) in front of PGHOST:PGPORT, and run every tallyd
#                through it with --database-pooler transaction. Migrations,
#                the API key, pgbench and tally bench's PostgreSQL
#                statistics stay direct. PGBOUNCER_POOL_SIZE (20): its
#                default_pool_size (server connections of the bench database).
#   SKIP_REFS=1  skip the pgbench/redis-benchmark references (sweeps of Tally settings)
#   BIG=1        afterwards, load bench/history.sql into the bench database
#                (HISTORY_ACCOUNTS=1000000 accounts, HISTORY_PER=5 transfers
#                each: 10,000,000 entries) and measure charge-uniform again
#   WAITS=1      sample pg_stat_activity of the bench database 5 times a second
#                during each Tally scenario and print what its sessions wait on
#   OUT_DIR      keep raw results here (default: a temporary directory, removed)
#   LOAD_MAX (1.5)  refuse to run when the 1-minute load average at the start
#                is above this: figures from a busy machine are not comparable
#                (see docs/PERFORMANCE.md, Noise). FORCE=1 runs anyway; the
#                report then says "forced" next to the load average.
#   PG_TEST_FSYNC  pg_test_fsync to run once at the start (-s 1, stopped
#                after its fdatasync figure, a few seconds); default: the
#                one on the PATH or in /usr/lib/postgresql/15/bin; skipped
#                when absent. Its test file goes in a temporary directory;
#                the report says whether that is on the data directory's
#                file system.
#   Any tallyd flag as TALLY_<FLAG> (e.g. TALLY_BATCH_WAIT_MAX=1ms,
#   TALLY_BATCH_ITEMS_MAX=64, TALLY_BATCH_WORKERS_MAX=2, TALLY_POOL_CONNS_MAX=16).
#
# It leaves the machine as it found it: the databases it creates are
# dropped, the Redis keys it wrote are deleted (one by one: nothing is
# flushed), and the processes it started are stopped, on any exit. It never
# changes a server setting; tallyd itself refuses to start if
# synchronous_commit or fsync is off.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${RUNS:-3}"
DURATION="${DURATION:-20}"
DURATION="${DURATION%s}"
WARMUP="${WARMUP:-5}"
WARMUP="${WARMUP%s}"
CLIENTS="${CLIENTS:-32}"
ACCOUNTS="${ACCOUNTS:-10000}"
CONNS="${CONNS:-1}"
TALLYDS="${TALLYDS:-1}"
[ "$TALLYDS" -ge 1 ] 2>/dev/null || { echo "compare.sh: TALLYDS must be >= 1" >&2; exit 2; }
[ "$CONNS" -ge "$TALLYDS" ] || CONNS="$TALLYDS"   # at least one connection per tallyd
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DB="${REDIS_DB:-9}"
VIA="${VIA:-direct}"
PGBOUNCER_POOL_SIZE="${PGBOUNCER_POOL_SIZE:-20}"
case "$VIA" in
  direct) SCENARIOS="${SCENARIOS:-charge-uniform charge-hot transfer-uniform balance-cached mixed balance-nocache}" ;;
  pgbouncer) SCENARIOS="${SCENARIOS:-charge-uniform charge-hot transfer-uniform}" ;;
  *) echo "compare.sh: VIA must be direct or pgbouncer, not $VIA" >&2; exit 2 ;;
esac
SKIP_REFS="${SKIP_REFS:-0}"
WAITS="${WAITS:-0}"
BIG="${BIG:-0}"
HISTORY_ACCOUNTS="${HISTORY_ACCOUNTS:-1000000}"
HISTORY_PER="${HISTORY_PER:-5}"
PGBENCH="${PGBENCH:-$(command -v pgbench || echo /usr/lib/postgresql/15/bin/pgbench)}"
PG_TEST_FSYNC="${PG_TEST_FSYNC:-$(command -v pg_test_fsync || echo /usr/lib/postgresql/15/bin/pg_test_fsync)}"
LOAD_MAX="${LOAD_MAX:-1.5}"
FORCE="${FORCE:-0}"

for tool in psql "$PGBENCH" redis-cli redis-benchmark jq go; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found (apt-get install postgresql-client redis-tools jq)" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/tally-compare.XXXXXX)"
RES="${OUT_DIR:-$WORK/results}"
mkdir -p "$RES"
TAG="$$_$(date +%s)"
BENCH_DB="tally_bench_$TAG"
REF_DB="pgbench_ref_$TAG"
REDIS_REF_PREFIX="tally-compare:$TAG:key:"
PIDS=()
DBS=()

# forget PID: drops a process that has ended from PIDS, so the exit trap
# never signals a recycled pid.
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
rcli() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$REDIS_DB" "$@"; }
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "${DB:-postgres}" -c "$1"; }

# fgwait CMD...: runs CMD in the background and waits for it, so that a
# signal reaches the trap at once instead of after CMD ends.
CHILD=""
fgwait() {
  "$@" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}

cleanup() {
  set +e
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
  done
  # Delete exactly the Redis keys this run wrote: the balance cache entries
  # of the bench database's accounts, and the redis-benchmark keys.
  if [[ " ${DBS[*]} " == *" $BENCH_DB "* ]]; then
    DB="$BENCH_DB" sql "SELECT 'tally:bal:' || account_id FROM accounts" 2>/dev/null |
      awk '{print "DEL " $0}' | rcli >/dev/null 2>&1
  fi
  seq -f "${REDIS_REF_PREFIX}%012g" 0 9999 | awk '{print "DEL " $0}' | rcli >/dev/null 2>&1
  for db in "${DBS[@]}"; do
    sql "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || log "could not drop database $db"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- load
loadavg() { cut -d" " -f1-3 /proc/loadavg; }
LOAD_START="$(loadavg)"
LOAD_NOTE="at most LOAD_MAX=$LOAD_MAX"
if awk -v l="${LOAD_START%% *}" -v m="$LOAD_MAX" 'BEGIN{exit !(l > m)}'; then
  if [ "$FORCE" != 1 ]; then
    echo "compare.sh: load average ${LOAD_START%% *} is above LOAD_MAX=$LOAD_MAX: the figures would not be comparable." >&2
    echo "compare.sh: wait for a quiet machine, or run with LOAD_MAX=<higher> or FORCE=1 (the report then says so)." >&2
    exit 3
  fi
  LOAD_NOTE="ABOVE LOAD_MAX=$LOAD_MAX: forced (FORCE=1), not comparable"
fi
log "load average $LOAD_START ($LOAD_NOTE)"

# fsync_rate: prints pg_test_fsync's fdatasync figure (one 8 kB write); run
# once, for at most a few seconds: it is stopped once that line is out. (Not
# in a subshell, so that the exit trap sees its pid.)
fsync_rate() {
  [ -x "$PG_TEST_FSYNC" ] || { echo "n/a (pg_test_fsync not installed)"; return; }
  local out="$WORK/pg_test_fsync.out" line="" same=no
  "$PG_TEST_FSYNC" -s 1 -f "$WORK/pg_test_fsync.file" >"$out" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 40); do
    line="$(grep -m1 -E '^[[:space:]]+fdatasync[[:space:]]+[0-9.]+ ops/sec' "$out" || true)"
    [ -n "$line" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
  local datadir; datadir="$(sql 'SHOW data_directory' 2>/dev/null || true)"
  [ -n "$datadir" ] && [ "$(stat -c %d "$WORK" 2>/dev/null)" = "$(stat -c %d "$datadir" 2>/dev/null || echo x)" ] && same=yes
  if [ -z "$line" ]; then echo "n/a (no fdatasync line from $PG_TEST_FSYNC)"; return; fi
  awk -v same="$same" -v dir="$WORK" '{printf "fdatasync %s ops/s, %s µs/op (one 8 kB write, -s 1; file in %s, on the data directory'"'"'s file system: %s)", $2, $4, dir, same}' <<<"$line"
}
fsync_rate >"$WORK/fsync.txt"
FSYNC="$(cat "$WORK/fsync.txt")"
log "pg_test_fsync: $FSYNC"

# ---------------------------------------------------------------- build
log "building tallyd and tally from $(git rev-parse --short HEAD 2>/dev/null || echo 'this checkout')"
mkdir -p "$WORK/bin"
fgwait go build -o "$WORK/bin/tallyd" ./cmd/tallyd
fgwait go build -o "$WORK/bin/tally" ./cmd/tally
TALLYD="$WORK/bin/tallyd"
TALLY="$WORK/bin/tally"
[ "$VIA" = pgbouncer ] && fgwait go build -o "$WORK/bin/pgbouncer" ./bench/pgbouncer

# ---------------------------------------------------------------- databases
pg_isready -h "$PGHOST" -p "$PGPORT" -q || { echo "compare.sh: PostgreSQL at $PGHOST:$PGPORT is not answering" >&2; exit 1; }
rcli ping >/dev/null || { echo "compare.sh: Redis at $REDIS_HOST:$REDIS_PORT is not answering" >&2; exit 1; }
sql "CREATE DATABASE \"$BENCH_DB\""
DBS+=("$BENCH_DB")
DB_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB?sslmode=disable"
# Authentication is on, as in production: migrate, make an admin key (the
# scenarios create and credit accounts), and hand it to `tally bench` through
# TALLY_API_KEY.
"$TALLYD" migrate --database-url "$DB_URL" >/dev/null 2>&1
TALLY_API_KEY="$("$TALLYD" keys create --database-url "$DB_URL" --name bench --role admin --quiet)"
export TALLY_API_KEY

# TALLYD_URL is the database as tallyd sees it: DB_URL, or through the
# PgBouncer of VIA=pgbouncer (migrated above, directly: tallyd refuses
# --migrate behind a transaction pooler).
TALLYD_URL="$DB_URL"
TALLYD_DB_FLAGS=(--migrate)
VIA_DESC="direct"
if [ "$VIA" = pgbouncer ]; then
  "$WORK/bin/pgbouncer" --target "$PGHOST:$PGPORT" --pool-mode transaction --pool-size "$PGBOUNCER_POOL_SIZE" \
    >"$WORK/pgbouncer.out" 2>"$WORK/pgbouncer.err" &
  PGB_PID=$!
  PIDS+=("$PGB_PID")
  PGB_ADDR=""
  for _ in $(seq 150); do
    PGB_ADDR="$(jq -r .addr "$WORK/pgbouncer.out" 2>/dev/null || true)"
    [ -n "$PGB_ADDR" ] && break
    kill -0 "$PGB_PID" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$PGB_ADDR" ] || { echo "compare.sh: PgBouncer did not start:" >&2; cat "$WORK/pgbouncer.err" >&2; exit 1; }
  TALLYD_URL="postgres://$PGUSER@$PGB_ADDR/$BENCH_DB?sslmode=disable"
  TALLYD_DB_FLAGS=(--database-pooler transaction)
  VIA_DESC="PgBouncer $(/usr/sbin/pgbouncer --version 2>/dev/null | awk 'NR == 1 {print $2}') at $PGB_ADDR, pool_mode=transaction default_pool_size=$PGBOUNCER_POOL_SIZE; tallyd --database-pooler transaction"
  log "PgBouncer (transaction pooling, $PGBOUNCER_POOL_SIZE server connections) at $PGB_ADDR"
fi

# start_tallyd NAME [extra flags]: starts tallyd on free ports (it binds :0
# and logs what it got); sets <NAME>_PID, <NAME>_GRPC, <NAME>_HTTP.
start_tallyd() {
  local name="$1"; shift
  local logf="$WORK/$name.log"
  # One key drives the whole load here, so the per-key rate limit (meant to
  # stop one runaway client) is off; authentication itself stays on.
  "$TALLYD" serve --database-url "$TALLYD_URL" "${TALLYD_DB_FLAGS[@]}" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --rate-limit-per-key 0 --log-level info "$@" >"$logf" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  local line=""
  for _ in $(seq 150); do
    line="$(grep -m1 '"tallyd serving"' "$logf" || true)"
    [ -n "$line" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ -z "$line" ]; then
    echo "compare.sh: tallyd ($name) did not start:" >&2; cat "$logf" >&2; exit 1
  fi
  printf -v "${name}_PID" '%s' "$pid"
  printf -v "${name}_GRPC" '%s' "$(jq -r .grpc_addr <<<"$line")"
  printf -v "${name}_HTTP" '%s' "$(jq -r .http_addr <<<"$line")"
  printf -v "${name}_LINE" '%s' "$line"
}

# stop_tallyd NAME: records the process's peak RSS (VmHWM) into
# RSS_<NAME> (the largest over its runs), then stops it. Each tallyd runs
# only during its own scenarios, so that its pooled connections never
# compete with pgbench's for max_connections.
RSS_CACHED=0
RSS_NOCACHE=0
for i in $(seq 2 "$TALLYDS"); do printf -v "RSS_CACHED$i" '%s' 0; done

# start_cached / stop_cached: the TALLYDS tallyds with Redis (CACHED,
# CACHED2, ...); CACHED_ALL_GRPC/HTTP/PID list them comma-separated.
start_cached() {
  local extra=() i g h p
  if [ "$TALLYDS" -gt 1 ] && [ -z "${TALLY_POOL_CONNS_MAX:-}" ]; then extra=(--pool-conns-max $((32 / TALLYDS))); fi
  start_tallyd CACHED --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB" "${extra[@]}"
  CACHED_ALL_GRPC="$CACHED_GRPC" CACHED_ALL_HTTP="$CACHED_HTTP" CACHED_ALL_PID="$CACHED_PID"
  for i in $(seq 2 "$TALLYDS"); do
    start_tallyd "CACHED$i" --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB" "${extra[@]}"
    g="CACHED${i}_GRPC" h="CACHED${i}_HTTP" p="CACHED${i}_PID"
    CACHED_ALL_GRPC+=",${!g}" CACHED_ALL_HTTP+=",${!h}" CACHED_ALL_PID+=",${!p}"
  done
}
stop_cached() {
  local i r
  stop_tallyd CACHED
  for i in $(seq 2 "$TALLYDS"); do
    stop_tallyd "CACHED$i"
    r="RSS_CACHED$i"
    [ "${!r}" -gt "$RSS_CACHED" ] && RSS_CACHED="${!r}"
  done
  return 0
}
stop_tallyd() {
  local name="$1" pidvar="${1}_PID" rssvar="RSS_${1}" pid rss
  pid="${!pidvar}"
  rss="$(awk '/VmHWM/{print $2*1024}' "/proc/$pid/status" 2>/dev/null || echo 0)"
  [ "${rss:-0}" -gt "${!rssvar}" ] && printf -v "$rssvar" '%s' "$rss"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

checkpoint() { sql "CHECKPOINT" >/dev/null; }

# ---------------------------------------------------------------- references
if [ "$SKIP_REFS" != 1 ]; then
  sql "CREATE DATABASE \"$REF_DB\""
  DBS+=("$REF_DB")
  log "pgbench -i -s 10 ($REF_DB)"
  fgwait "$PGBENCH" -i -s 10 -q "$REF_DB" >"$WORK/pgbench-init.log" 2>&1
  cat >"$WORK/hot.sql" <<'EOF'
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = 1;
EOF
  log "populating $((10000)) Redis keys ${REDIS_REF_PREFIX}*"
  seq -f "${REDIS_REF_PREFIX}%012g" 0 9999 | awk '{print "SET " $0 " 42"}' | rcli >/dev/null
fi

# pgbench_tps NAME ARGS...: one pgbench run; records its tps.
pgbench_run() {
  local name="$1" run="$2"; shift 2
  local try
  for try in 1 2 3 4 5; do
    checkpoint
    log "  $name: load average $(loadavg)"
    fgwait "$PGBENCH" -c "$CLIENTS" -j 2 -T "$DURATION" "$@" "$REF_DB" >"$WORK/$name.$run.log" 2>&1 && break
    # The PostgreSQL server is shared: other sessions can hold most of
    # max_connections for a while. Wait and try again.
    if grep -q 'too many clients' "$WORK/$name.$run.log" && [ "$try" -lt 5 ]; then
      log "  $name: PostgreSQL has too many clients; retrying in 15s"; sleep 15; continue
    fi
    cat "$WORK/$name.$run.log" >&2; exit 1
  done
  local tps lat
  tps="$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$WORK/$name.$run.log" | tail -1)"
  lat="$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$WORK/$name.$run.log")"
  jq -n --arg s "$name" --argjson t "$tps" --argjson l "${lat:-0}" \
    '{scenario:$s, throughput_ops_s:$t, latency:{avg_ms:$l}}' >"$RES/$name.$run.json"
  log "  $name: $tps tps"
}

redis_run() {
  local run="$1" n
  n=$((DURATION * 40000))
  log "  redis-get: load average $(loadavg)"
  fgwait redis-benchmark -h "$REDIS_HOST" -p "$REDIS_PORT" --dbnum "$REDIS_DB" -c "$CLIENTS" -P 1 -r 10000 -n "$n" --csv \
    GET "${REDIS_REF_PREFIX}__rand_int__" >"$WORK/redis-get.$run.log" 2>&1
  local rps p99
  rps="$(tail -1 "$WORK/redis-get.$run.log" | tr -d '"' | cut -d, -f2)"
  p99="$(tail -1 "$WORK/redis-get.$run.log" | tr -d '"' | cut -d, -f7)"
  jq -n --argjson t "$rps" --argjson p "${p99:-0}" \
    '{scenario:"redis-get", throughput_ops_s:$t, latency:{p99_ms:$p}}' >"$RES/redis-get.$run.json"
  log "  redis-get: $rps rps"
}

# tally_run SCENARIO RUN [NAME]: one `tally bench` run against the right
# tallyd; its result is stored as NAME (default SCENARIO).
tally_run() {
  local sc="$1" run="$2" name="${3:-$1}" pid grpc http
  if [ "$sc" = balance-nocache ]; then
    pid="$NOCACHE_PID" grpc="$NOCACHE_GRPC" http="$NOCACHE_HTTP"
  else
    pid="$CACHED_ALL_PID" grpc="$CACHED_ALL_GRPC" http="$CACHED_ALL_HTTP"
  fi
  [ "$sc" = noop ] || checkpoint
  local sampler=""
  if [ "$WAITS" = 1 ] && [ "$sc" != noop ]; then
    # What the tallyd sessions wait on (CPU: active, not waiting), during
    # the measured window (tally bench logs "measuring" when it starts).
    (
      while ! grep -q measuring "$WORK/$name.$run.err" 2>/dev/null; do sleep 0.2; done
      while :; do
        DB="$BENCH_DB" sql "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'" 2>/dev/null
        sleep 0.2
      done >"$RES/$name.$run.waits"
    ) &
    sampler=$!
    PIDS+=("$sampler")
  fi
  fgwait "$TALLY" bench --addr "$grpc" --scenario "$sc" --clients "$CLIENTS" --conns "$CONNS" --accounts "$ACCOUNTS" \
    --duration "${DURATION}s" --warmup "${WARMUP}s" --seed "compare-$TAG" \
    --server-pid "$pid" --server-http "$http" --database-url "$DB_URL" --json >"$RES/$name.$run.json" 2>"$WORK/$name.$run.err" ||
    { cat "$WORK/$name.$run.err" >&2; exit 1; }
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true; forget "$sampler"; fi
  log "  $name: $(jq -r '"\(.throughput_ops_s|floor) ops/s p99 \(.latency.p99_ms) ms, \(.server.batch_items_avg*10|floor/10) items/batch, \(.cost.commits_per_s // 0|floor) commits/s, errors \(.errors) (load average at start \(.load_avg_1_at_start))"' "$RES/$name.$run.json")"
}

for run in $(seq "$RUNS"); do
  log "run $run/$RUNS (load average $(cut -d" " -f1-3 /proc/loadavg))"
  if [ "$SKIP_REFS" != 1 ]; then
    pgbench_run pgbench-tpcb "$run" -b tpcb-like
    pgbench_run pgbench-hot "$run" -f "$WORK/hot.sql"
    pgbench_run pgbench-select "$run" -S
    redis_run "$run"
  fi
  start_cached
  log "  tallyd with Redis ($TALLYDS): pid $CACHED_ALL_PID grpc $CACHED_ALL_GRPC"
  tally_run noop "$run"
  for sc in $SCENARIOS; do
    [ "$sc" = balance-nocache ] || tally_run "$sc" "$run"
  done
  stop_cached
  if [[ " $SCENARIOS " == *" balance-nocache "* ]]; then
    start_tallyd NOCACHE
    log "  tallyd without Redis: pid $NOCACHE_PID grpc $NOCACHE_GRPC"
    tally_run balance-nocache "$run"
    stop_tallyd NOCACHE
  fi
done

if [ "$BIG" = 1 ]; then
  log "loading history: $HISTORY_ACCOUNTS accounts, $((HISTORY_ACCOUNTS * HISTORY_PER * 2)) entries (bench/history.sql)"
  fgwait psql -X -q -d "$BENCH_DB" -v accounts="$HISTORY_ACCOUNTS" -v per="$HISTORY_PER" -f bench/history.sql >"$WORK/history.log" 2>&1 ||
    { cat "$WORK/history.log" >&2; exit 1; }
  log "  $(DB="$BENCH_DB" sql "SELECT (SELECT count(*) FROM accounts) || ' accounts, ' || (SELECT count(*) FROM entries) || ' entries, ' || pg_size_pretty(pg_database_size(current_database()))")"
  start_cached
  for run in $(seq "$RUNS"); do
    tally_run charge-uniform "$run" charge-uniform-big
  done
  stop_cached
fi

# ---------------------------------------------------------------- report
RSS_MAX=$((RSS_CACHED > RSS_NOCACHE ? RSS_CACHED : RSS_NOCACHE))

# median NAME JQ-EXPR: the median of EXPR over the runs of NAME ("" if none).
median() {
  local files=("$RES/$1".*.json)
  [ -e "${files[0]}" ] || { echo ""; return; }
  jq -s "[.[] | $2] | sort | .[(length-1)/2|floor]" "${files[@]}"
}
fmt() { [ -n "$1" ] && printf '%.0f' "$1" || printf 'n/a'; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}' || printf 'n/a'; }
verdict() { [ "$1" = n/a ] && { printf 'n/a'; return; }; awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN{ok = (op==">=") ? v>=t : v<=t; printf "%s", ok ? "met" : "MISSED"}'; }

T() { median "$1" .throughput_ops_s; }
# M NAME EXPR [DECIMALS]: the median of an optional figure, "n/a" when unknown.
M() {
  local v; v="$(median "$1" "($2) // empty")"
  [ -n "$v" ] && [ "$v" != null ] && printf "%.${3:-0}f" "$v" || printf 'n/a'
}
first() { jq -r "$2 // empty" "$RES/$1.1.json" 2>/dev/null || true; }
P99() { median "$1" .latency.p99_ms; }

cu=$(T charge-uniform) ch=$(T charge-hot) tu=$(T transfer-uniform) bc=$(T balance-cached) bn=$(T balance-nocache) mx=$(T mixed) noop=$(T noop)
tpcb=$(T pgbench-tpcb) hot=$(T pgbench-hot) sel=$(T pgbench-select) rget=$(T redis-get)
cu_p99=$(P99 charge-uniform)
big=$(T charge-uniform-big)
PG_SCOPE_DB="$(first "${SCENARIOS%% *}" .cost.pg_backends_scope)"; PG_SCOPE_DB="${PG_SCOPE_DB:-unknown}"
PG_SCOPE_ALL="$(first "${SCENARIOS%% *}" .cost.pg_server_scope)"; PG_SCOPE_ALL="${PG_SCOPE_ALL:-unknown (PostgreSQL not on this host)}"

{
echo
echo "== settings"
echo "machine:            $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average at start $LOAD_START ($LOAD_NOTE), now $(loadavg)"
echo "disk:               pg_test_fsync $FSYNC"
echo "postgres:           $(sql 'SHOW server_version') synchronous_commit=$(sql 'SHOW synchronous_commit') fsync=$(sql 'SHOW fsync') wal_sync_method=$(sql 'SHOW wal_sync_method') commit_delay=$(sql 'SHOW commit_delay') full_page_writes=$(sql 'SHOW full_page_writes') shared_buffers=$(sql 'SHOW shared_buffers') max_connections=$(sql 'SHOW max_connections')"
echo "redis:              $(rcli info server | tr -d '\r' | sed -n 's/^redis_version://p') appendonly=$(rcli config get appendonly | tail -1) (db $REDIS_DB)"
echo "tallyd:             $(jq -r '"batch_items_max=\(.batch_items_max) batch_wait_max=\(.batch_wait_max) batch_workers_max=\(.batch_workers_max) pool_conns_max=\(.pool_conns_max)"' <<<"$CACHED_LINE")"
echo "pgbench:            -c $CLIENTS -j 2 -T $DURATION, scale 10 (its connections are its pool)"
echo "tallyd replicas:    $TALLYDS (with Redis; balance-nocache uses one)"
echo "tallyd to postgres: $VIA_DESC"
echo "tally bench:        --clients $CLIENTS --conns $CONNS --accounts $ACCOUNTS --duration ${DURATION}s --warmup ${WARMUP}s"
echo "runs:               $RUNS (each figure is the median)"
echo
echo "== results (median of $RUNS)"
printf '%-28s %12s   %-30s %12s %8s %8s  %s\n' "Tally scenario" "ops/s" "reference" "ref ops/s" "ratio" "target" "verdict"
row() { # name value refname refvalue target op
  local r; r=$(ratio "$2" "$4")
  printf '%-28s %12s   %-30s %12s %8s %8s  %s\n' "$1" "$(fmt "$2")" "$3" "$(fmt "$4")" "$r" "${5:-}" "$( [ -n "${5:-}" ] && verdict "$r" "${5#≥ }" ">=" || echo "-")"
}
row charge-uniform "$cu" "pgbench tpcb-like" "$tpcb" "3"
row charge-hot "$ch" "pgbench single-hot-row update" "$hot" "5"
row balance-cached "$bc" "no-op gRPC (health Check)" "$noop" "0.6"
row balance-nocache "$bn" "pgbench select-only" "$sel" "0.5"
row transfer-uniform "$tu" "pgbench tpcb-like" "$tpcb" ""
row mixed "$mx" "pgbench tpcb-like" "$tpcb" ""
row balance-cached "$bc" "redis-benchmark GET" "$rget" ""
for sc in charge-uniform charge-hot transfer-uniform mixed; do  # every write scenario against the no-op call
  if [[ " $SCENARIOS " == *" $sc "* ]]; then row "$sc" "$(T "$sc")" "no-op gRPC (health Check)" "$noop" ""; fi
done
echo
printf '%-28s %12s   %s\n' "charge-uniform p99 latency" "$( [ -n "$cu_p99" ] && printf '%.1f ms' "$cu_p99" || echo n/a)" \
  "target <= 25 ms: $( [ -n "$cu_p99" ] && verdict "$cu_p99" 25 "<=" || echo n/a)"
printf '%-28s %12s   %s\n' "tallyd peak RSS" "$(awk -v b="$RSS_MAX" 'BEGIN{printf "%.1f MB", b/1e6}')" \
  "target <= 150 MB: $(verdict "$(awk -v b="$RSS_MAX" 'BEGIN{print b/1e6}')" 150 "<=")  (with Redis $(awk -v b="$RSS_CACHED" 'BEGIN{printf "%.1f", b/1e6}') MB, without $(awk -v b="$RSS_NOCACHE" 'BEGIN{printf "%.1f", b/1e6}') MB)"
if [ -n "$big" ]; then
  printf '%-28s %12s   %s\n' "charge-uniform, big db" "$(fmt "$big")" \
    "vs fresh: $(ratio "$big" "$cu")  (target: within 20%: $(verdict "$(ratio "$big" "$cu")" 0.8 ">="))"
fi
echo
echo "== per scenario (median of $RUNS): latency ms p50/p95/p99/max, batch items avg, server CPU cores, errors"
for sc in noop $SCENARIOS charge-uniform-big; do
  [ -e "$RES/$sc.1.json" ] || continue
  printf '%-18s %8s ops/s  p50 %6.2f p95 %6.2f p99 %7.2f max %8.2f  batch %5.1f  cpu %4.2f  errors %s\n' "$sc" \
    "$(fmt "$(T "$sc")")" "$(median "$sc" .latency.p50_ms)" "$(median "$sc" .latency.p95_ms)" "$(P99 "$sc")" \
    "$(median "$sc" .latency.max_ms)" "$(median "$sc" .server.batch_items_avg)" "$(median "$sc" .server.cpu_cores)" \
    "$(jq -cs 'map(.errors) | add' "$RES/$sc".*.json)$(jq -rs 'map(.balance_sources // {}) | reduce .[] as $m ({}; reduce ($m|to_entries[]) as $e (.; .[$e.key] += $e.value)) | if length > 0 then "  reads " + (to_entries | map("\(.key)=\(.value)") | join(" ")) else "" end' "$RES/$sc".*.json)"
done
echo
echo "== cost per scenario (median of $RUNS): CPU µs per operation of tallyd, of PostgreSQL and of tally bench"
echo "   pg-db:  $PG_SCOPE_DB"
echo "   pg-all: $PG_SCOPE_ALL"
echo "   items/batch: tallyd's tally_batch_size_items histogram (committed batches); commits/s: pg_stat_database.xact_commit"
echo "   of the bench database (reads' transactions included); x noop: ops/s over the no-op gRPC call's; load: 1-min load average as the window began"
printf '%-18s %8s %7s %8s %8s %8s %8s %11s %10s %6s\n' scenario ops/s "x noop" tallyd pg-db pg-all bench items/batch commits/s load
for sc in noop $SCENARIOS charge-uniform-big; do
  [ -e "$RES/$sc.1.json" ] || continue
  printf '%-18s %8s %7s %8s %8s %8s %8s %11s %10s %6s\n' "$sc" "$(fmt "$(T "$sc")")" "$(ratio "$(T "$sc")" "$noop")" \
    "$(M "$sc" .cost.tallyd_cpu_us_per_op)" "$(M "$sc" .cost.pg_backends_cpu_us_per_op)" "$(M "$sc" .cost.pg_server_cpu_us_per_op)" \
    "$(M "$sc" .cost.client_cpu_us_per_op)" "$(M "$sc" .cost.items_per_batch 1)" "$(M "$sc" .cost.commits_per_s)" "$(M "$sc" .load_avg_1_at_start 2)"
done
echo
echo "== sequential scans during the measured window, per table of the bench database (pg_stat_user_tables seq_scan, seq_tup_read rows), summed over the runs (RUNS=$RUNS)"
for sc in noop $SCENARIOS charge-uniform-big; do
  [ -e "$RES/$sc.1.json" ] || continue
  printf '%-18s %s\n' "$sc" "$(jq -rs '[.[] | .cost.seq_scans // {} | to_entries[]] | group_by(.key)
    | map("\(.[0].key) \(map(.value.seq_scan) | add) (\(map(.value.seq_tup_read) | add) rows)") | if length > 0 then join(", ") else "none" end' "$RES/$sc".*.json)"
done
if [ "$WAITS" = 1 ]; then
  echo
  echo "== what tallyd's PostgreSQL sessions were doing (share of non-idle samples, all runs)"
  for sc in $SCENARIOS charge-uniform-big; do
    [ -e "$RES/$sc.1.waits" ] || continue
    cat "$RES/$sc".*.waits 2>/dev/null | sort | uniq -c | sort -rn |
      awk -v sc="$sc" '{n[NR]=$1; w[NR]=$2; t+=$1} END{printf "%-18s", sc; for(i=1;i<=NR&&i<=5;i++) printf " %s %.0f%%", w[i], 100*n[i]/t; printf "  (%d samples)\n", t}'
  done
fi
} | tee "$RES/summary.txt"
