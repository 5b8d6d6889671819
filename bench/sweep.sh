#!/usr/bin/env bash
# bench/sweep.sh: how Tally's write figures move with the group-commit
# settings and the client count. One fresh database; for each tallyd
# setting a tallyd is started (on free ports, with Redis), and each scenario
# is run at each client count. The accounts are set up once and reused.
#
#   bench/sweep.sh
#   SETTINGS='--batch-wait-max=200us' CLIENTS_LIST='8 32 128' bench/sweep.sh   # client count
#
# Environment: SETTINGS ('|'-separated tallyd flag sets; default: a batch
# window, batch size and batch worker sweep), SCENARIOS (charge-uniform
# charge-hot), CLIENTS_LIST (32), DURATION (10), WARMUP (3), ACCOUNTS
# (10000), PGHOST/PGPORT/PGUSER, REDIS_HOST/REDIS_PORT/REDIS_DB, OUT_DIR.
# Like compare.sh it leaves nothing behind: database dropped, Redis keys
# deleted one by one, processes stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"; DURATION="${DURATION%s}"
WARMUP="${WARMUP:-3}"; WARMUP="${WARMUP%s}"
ACCOUNTS="${ACCOUNTS:-10000}"
SCENARIOS="${SCENARIOS:-charge-uniform charge-hot}"
CLIENTS_LIST="${CLIENTS_LIST:-32}"
DEFAULT_SETTINGS='--batch-wait-max=200us|--batch-wait-max=50us|--batch-wait-max=1ms|--batch-wait-max=2ms'
DEFAULT_SETTINGS+='|--batch-items-max=1|--batch-items-max=16|--batch-items-max=64'
DEFAULT_SETTINGS+='|--batch-workers-max=1|--batch-workers-max=2|--batch-workers-max=8'
SETTINGS="${SETTINGS:-$DEFAULT_SETTINGS}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DB="${REDIS_DB:-9}"

WORK="$(mktemp -d /tmp/tally-sweep.XXXXXX)"
RES="${OUT_DIR:-$WORK/results}"
mkdir -p "$RES"
TAG="$$_$(date +%s)"
BENCH_DB="tally_sweep_$TAG"
DB_CREATED=0
TALLYD_PID=""
CHILD=""

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
rcli() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$REDIS_DB" "$@"; }
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "${DB:-postgres}" -c "$1"; }
fgwait() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=""; return "$rc"; }

stop_tallyd() {
  [ -n "$TALLYD_PID" ] || return 0
  kill -TERM "$TALLYD_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$TALLYD_PID" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$TALLYD_PID" 2>/dev/null || true
  TALLYD_PID=""
}

cleanup() {
  set +e
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
  stop_tallyd
  if [ "$DB_CREATED" = 1 ]; then
    DB="$BENCH_DB" sql "SELECT 'tally:bal:' || account_id FROM accounts" 2>/dev/null |
      awk '{print "DEL " $0}' | rcli >/dev/null 2>&1
    sql "DROP DATABASE IF EXISTS \"$BENCH_DB\" WITH (FORCE)" >/dev/null 2>&1 || log "could not drop $BENCH_DB"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "load average $(cut -d' ' -f1-3 /proc/loadavg); building"
mkdir -p "$WORK/bin"
fgwait go build -o "$WORK/bin/tallyd" ./cmd/tallyd
fgwait go build -o "$WORK/bin/tally" ./cmd/tally
sql "CREATE DATABASE \"$BENCH_DB\""
DB_CREATED=1
DB_URL="postgres://$PGUSER@$PGHOST:$PGPORT/$BENCH_DB?sslmode=disable"
# Authentication is on: an admin key for `tally bench` (TALLY_API_KEY).
"$WORK/bin/tallyd" migrate --database-url "$DB_URL" >/dev/null 2>&1
TALLY_API_KEY="$("$WORK/bin/tallyd" keys create --database-url "$DB_URL" --name bench --role admin --quiet)"
export TALLY_API_KEY

printf '%-34s %-16s %7s %9s %8s %8s %8s %7s %6s  %s\n' setting scenario clients "ops/s" "p50 ms" "p99 ms" "max ms" batch cpu errors |
  tee "$RES/sweep.txt"
IFS='|' read -r -a sets <<<"$SETTINGS"
for set in "${sets[@]}"; do
  read -r -a flags <<<"$set"
  logf="$WORK/tallyd.log"
  # One key drives all the load, so the per-key rate limit is off.
  "$WORK/bin/tallyd" serve --database-url "$DB_URL" --migrate --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
    --rate-limit-per-key 0 --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB" "${flags[@]}" >"$logf" 2>&1 &
  TALLYD_PID=$!
  line=""
  for _ in $(seq 150); do
    line="$(grep -m1 '"tallyd serving"' "$logf" || true)"
    [ -n "$line" ] && break
    kill -0 "$TALLYD_PID" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$line" ] || { echo "tallyd did not start:" >&2; cat "$logf" >&2; exit 1; }
  grpc="$(jq -r .grpc_addr <<<"$line")"
  http="$(jq -r .http_addr <<<"$line")"
  for sc in $SCENARIOS; do
    for clients in $CLIENTS_LIST; do
      sql "CHECKPOINT" >/dev/null
      out="$RES/$(tr -c 'a-zA-Z0-9=._-' '_' <<<"$set").$sc.$clients.json"
      fgwait "$WORK/bin/tally" bench --addr "$grpc" --scenario "$sc" --clients "$clients" --accounts "$ACCOUNTS" \
        --duration "${DURATION}s" --warmup "${WARMUP}s" --seed "sweep-$TAG" --server-pid "$TALLYD_PID" \
        --server-http "$http" --json --quiet >"$out"
      jq -r --arg set "$set" '[$set, .scenario, .clients, (.throughput_ops_s|floor), (.latency.p50_ms*10|floor/10),
        (.latency.p99_ms*10|floor/10), (.latency.max_ms|floor), (.server.batch_items_avg*10|floor/10),
        (.server.cpu_cores*100|floor/100), (.errors|tostring)] | @tsv' "$out" |
        awk -F'\t' '{printf "%-34s %-16s %7s %9s %8s %8s %8s %7s %6s  %s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9,$10}' |
        tee -a "$RES/sweep.txt"
    done
  done
  stop_tallyd
done
log "load average $(cut -d' ' -f1-3 /proc/loadavg)"
