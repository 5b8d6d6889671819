#!/usr/bin/env bash
# bench/usage.sh: SummarizeUsage on a month of 10,000,000 charges.
#
# Creates a fresh database on the local PostgreSQL, fills its spend rollups
# with bench/usage.sql (what it generates, and that it does not generate the
# transfers themselves, is explained there), starts a tallyd built from this
# checkout with --usage-dimensions product,team,sku, and times SummarizeUsage
# with `tally bench-usage` (one untimed first call, then REPEATS timed calls
# per query). Run by hand, never by `go test`.
#
# Usage (from the repository root):
#   bench/usage.sh
#   CHARGES=10000000 ACCOUNTS=10000 DAYS=30 COMBOS=5 REPEATS=5 bench/usage.sh
#
# Environment: PGHOST (127.0.0.1) PGPORT (5432) PGUSER (postgres), CHARGES,
# ACCOUNTS, DAYS, COMBOS (1-8 product/team/sku combinations per account and
# day), MONTH (2026-10-01), REPEATS (5).
#
# It drops its database and stops its tallyd on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
CHARGES="${CHARGES:-10000000}"
ACCOUNTS="${ACCOUNTS:-10000}"
DAYS="${DAYS:-30}"
COMBOS="${COMBOS:-5}"
MONTH="${MONTH:-2026-10-01}"
REPEATS="${REPEATS:-5}"

WORK="$(mktemp -d /tmp/tally-usage-bench.XXXXXX)"
DB="tally_usage_bench_$$_$(date +%s)"
TALLYD_PID=""
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d postgres -c "$1"; }
cleanup() {
  set +e
  if [ -n "$TALLYD_PID" ]; then
    kill -TERM "$TALLYD_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$TALLYD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$TALLYD_PID" 2>/dev/null
  fi
  sql "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || log "could not drop database $DB"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "load average $(cut -d' ' -f1-3 /proc/loadavg)"
go build -o "$WORK/tallyd" ./cmd/tallyd
go build -o "$WORK/tally" ./cmd/tally
sql "CREATE DATABASE \"$DB\""
URL="postgres://$PGUSER@$PGHOST:$PGPORT/$DB?sslmode=disable"
"$WORK/tallyd" migrate --database-url "$URL" >/dev/null 2>&1
KEY="$("$WORK/tallyd" keys create --database-url "$URL" --name usage-bench --role viewer --quiet)"

log "filling the rollups: $CHARGES charges, $ACCOUNTS accounts, $DAYS days, $COMBOS combinations per account and day"
start=$(date +%s)
psql -X -q -d "$DB" -v charges="$CHARGES" -v accounts="$ACCOUNTS" -v days="$DAYS" -v combos="$COMBOS" \
  -v month="$MONTH" -f bench/usage.sql 2>&1 | sed "s/^/  /" >&2
log "filled in $(( $(date +%s) - start )) s"

"$WORK/tallyd" serve --database-url "$URL" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 \
  --usage-dimensions product,team,sku --log-level info >"$WORK/tallyd.log" 2>&1 &
TALLYD_PID=$!
line=""
for _ in $(seq 150); do
  line="$(grep -m1 '"tallyd serving"' "$WORK/tallyd.log" || true)"
  [ -n "$line" ] && break
  kill -0 "$TALLYD_PID" 2>/dev/null || break
  sleep 0.2
done
[ -n "$line" ] || { echo "usage.sh: tallyd did not start:" >&2; cat "$WORK/tallyd.log" >&2; exit 1; }
ADDR="$(sed -E 's/.*"grpc_addr":"([^"]+)".*/\1/' <<<"$line")"

TO="$(date -u -d "$MONTH + 1 month" +%F)"
ACCT="c$(printf '%031x' 0 | sed -E 's/^(.{7})(.{4})(.{4})(.{4})/\1-\2-\3-\4-/')"
log "load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$WORK/tally" bench-usage --addr "$ADDR" --api-key "$KEY" --from "$MONTH" --to "$TO" \
  --external-ref bench-usage-0 --account "$ACCT" --repeats "$REPEATS"
log "load average $(cut -d' ' -f1-3 /proc/loadavg)"
