#!/usr/bin/env bash
# bench/reconcile.sh: how long `tally reconcile` takes over a big ledger, and
# how much it slows charges while it runs.
#
# Loads bench/history.sql with base 0 (so the history reconciles exactly):
# ACCOUNTS_BIG accounts (1,000,000) with PER (5) transfers each, 10,000,000
# entries. Then, against a tallyd built from this checkout (with Redis):
#   1. charge-uniform alone for DURATION seconds: the reference throughput;
#   2. `tally reconcile` alone: its wall time (target: under 5 minutes);
#   3. `tally reconcile` again with charge-uniform running during it: the
#      charge throughput while reconciling, as a ratio to (1) (target: no
#      more than a 30% drop, ratio >= 0.7). The charge run lasts 80% of the
#      reconcile time measured in (2), so it falls inside the reconcile.
#
# Usage: bench/reconcile.sh            (ACCOUNTS_BIG=1000000 PER=5 DURATION=30)
#        ACCOUNTS_BIG=100000 bench/reconcile.sh   (quick)
# Environment: PGHOST PGPORT PGUSER, REDIS_HOST REDIS_PORT REDIS_DB (9),
# CLIENTS (32), ACCOUNTS (10000, of the charge scenario).
# It drops its database, deletes the Redis keys it wrote and stops what it
# started, on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCOUNTS_BIG="${ACCOUNTS_BIG:-1000000}"
PER="${PER:-5}"
DURATION="${DURATION:-30}"
CLIENTS="${CLIENTS:-32}"
ACCOUNTS="${ACCOUNTS:-10000}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DB="${REDIS_DB:-9}"
for tool in psql redis-cli jq go; do
  command -v "$tool" >/dev/null || { echo "reconcile.sh: $tool not found" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/tally-reconcile.XXXXXX)"
DB="tally_recbench_$$_$(date +%s)"
PIDS=()
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "${1}" -c "$2"; }
rcli() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$REDIS_DB" "$@"; }
cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null
  done
  # Only bench accounts were read or charged, so only they can be cached.
  sql "$DB" "SELECT 'tally:bal:' || account_id FROM accounts WHERE external_ref <> 'bench-history'" 2>/dev/null |
    awk '{print "DEL " $0}' | rcli >/dev/null 2>&1
  sql postgres "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "load average $(cut -d" " -f1-3 /proc/loadavg); building"
go build -o "$WORK/tallyd" ./cmd/tallyd
go build -o "$WORK/tally" ./cmd/tally
sql postgres "CREATE DATABASE \"$DB\""
URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB?sslmode=disable"
"$WORK/tallyd" migrate --database-url "$URL" >/dev/null 2>&1
TALLY_API_KEY="$("$WORK/tallyd" keys create --database-url "$URL" --name bench --role admin --quiet)"
export TALLY_API_KEY

log "loading $ACCOUNTS_BIG accounts, $((ACCOUNTS_BIG * PER * 2)) entries (bench/history.sql, base 0)"
start=$(date +%s)
psql -X -q -d "$DB" -v accounts="$ACCOUNTS_BIG" -v per="$PER" -v base=0 -f bench/history.sql >"$WORK/history.log" 2>&1 ||
  { cat "$WORK/history.log" >&2; exit 1; }
log "  loaded in $(( $(date +%s) - start ))s: $(sql "$DB" "SELECT pg_size_pretty(pg_database_size(current_database()))")"
# Flush the load's dirty pages now, so no checkpoint lands inside a measurement.
sql "$DB" "CHECKPOINT"

"$WORK/tallyd" serve --database-url "$URL" --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$REDIS_DB" \
  --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --rate-limit-per-key 0 >"$WORK/tallyd.log" 2>&1 &
PIDS+=("$!")
line=""
for _ in $(seq 150); do
  line="$(grep -m1 '"tallyd serving"' "$WORK/tallyd.log" || true)"
  [ -n "$line" ] && break
  sleep 0.2
done
[ -n "$line" ] || { cat "$WORK/tallyd.log" >&2; exit 1; }
export TALLY_ADDR
TALLY_ADDR="$(jq -r .grpc_addr <<<"$line")"

bench() { "$WORK/tally" bench --scenario charge-uniform --clients "$CLIENTS" --accounts "$ACCOUNTS" --seed recbench \
  --duration "$1s" --warmup 5s --json; }

log "1. charge-uniform alone, ${DURATION}s"
bench "$DURATION" >"$WORK/alone.json"
alone1="$(jq .throughput_ops_s "$WORK/alone.json")"
log "  $alone1 charges/s"

log "2. tally reconcile alone"
start=$(date +%s.%N)
"$WORK/tally" reconcile --json >"$WORK/rec1.json" 2>"$WORK/rec1.err" || true
rec_alone="$(echo "$(date +%s.%N) - $start" | bc)"
if [ -s "$WORK/rec1.json" ]; then
  log "  $(jq -r '"\(.accounts_checked) accounts, ok=\(.ok), \(.findings|length) findings"' "$WORK/rec1.json") in ${rec_alone}s"
else
  log "  reconcile failed after ${rec_alone}s:"; tail -3 "$WORK/rec1.err" >&2
fi

window="$(printf '%.0f' "$(echo "$rec_alone * 0.8 - 5" | bc)")"
[ "$window" -ge 5 ] || window=5
log "3. tally reconcile with charge-uniform running (${window}s measured inside it)"
start=$(date +%s.%N)
"$WORK/tally" reconcile --json >"$WORK/rec2.json" 2>"$WORK/rec2.err" &
rpid=$!
PIDS+=("$rpid")
bench "$window" >"$WORK/during.json"
wait "$rpid" || true
rec_during="$(echo "$(date +%s.%N) - $start" | bc)"
during="$(jq .throughput_ops_s "$WORK/during.json")"
[ -s "$WORK/rec2.json" ] || { log "  reconcile failed:"; tail -3 "$WORK/rec2.err" >&2; }

# The reference again, after: the mean of both sides of the reconcile runs,
# so background work after the load (autovacuum) weighs on both.
log "4. charge-uniform alone again, ${DURATION}s"
bench "$DURATION" >"$WORK/alone2.json"
alone2="$(jq .throughput_ops_s "$WORK/alone2.json")"
alone="$(echo "scale=1; ($alone1 + $alone2) / 2" | bc)"

printf '\n%-44s %s\n' "reconcile, $ACCOUNTS_BIG accounts (alone)" "${rec_alone}s (target: < 300s)"
printf '%-44s %s\n' "reconcile while charging" "${rec_during}s, ok=$(jq .ok "$WORK/rec2.json" 2>/dev/null)"
printf '%-44s %s\n' "load average at the end" "$(cut -d" " -f1-3 /proc/loadavg)"
printf '%-44s %s/s (before %s, after %s)\n' "charge-uniform alone" "$alone" "$alone1" "$alone2"
printf '%-44s %s/s = %s of alone (target: >= 0.70)\n' "charge-uniform during reconcile" "$during" \
  "$(echo "scale=2; $during / $alone" | bc)"
