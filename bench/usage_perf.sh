#!/usr/bin/env bash
# Where the CPU goes with per-tenant statistics and limits on versus off (issue 14), measured
# with perf rather than throughput (rounds on this machine vary more than the effect): pgbench
# select-only with both clients in one tenant (the case where two backends share a tenant's
# counters), and bench/usage.sh's simple-update with the context set in each transaction (1,000
# tenants), the same rate-limited and capped plan, `perf record -a` over the whole machine for
# each side. Prints, for each side, the share of all CPU samples in pg_tenancy.so and in the
# statistics and limits code (pg_tenancy::stats, and the executor hooks that call it), and the
# top pg_tenancy symbols with statistics on.
# Usage: bench/usage_perf.sh [seconds]   (run bench/usage.sh once before: it loads the data)
set -euo pipefail
cd "$(dirname "$0")"
eval "$(../scripts/cluster.sh env)"
SECS=${1:-10}
DB=pg_tenancy_bench
PGB=/usr/lib/postgresql/15/bin/pgbench
command -v perf >/dev/null || { echo "usage_perf: perf is not installed"; exit 1; }
[ "$(psql -X -qAt -d "$DB" -c "SELECT count(*) FROM tenancy.tenants WHERE plan = 'bench_limited'" 2>/dev/null)" -gt 0 ] \
    || { echo "usage_perf: run bench/usage.sh first (it loads $DB)"; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

setting() {
    psql -X -q -d "$DB" -c "ALTER ROLE bench_app IN DATABASE $DB SET pg_tenancy.track_stats = $1" \
                        -c "ALTER ROLE bench_app IN DATABASE $DB SET pg_tenancy.enforce_limits = $1" >/dev/null
}
side() { # side on|off SCRIPT [env]
    setting "$1"
    env "${@:3}" "$PGB" -n -M prepared -U bench_app -c 2 -j 2 -T $((SECS + 2)) -f "$2" "$DB" > "$OUT/pgbench.$1" 2>&1 &
    local pgb=$!
    sleep 1
    perf record -q -a -F 2000 -o "$OUT/perf.$1" -- sleep "$SECS" >/dev/null 2>&1
    wait $pgb
    perf report -q -i "$OUT/perf.$1" --no-children --sort dso,symbol --percent-limit 0 2>/dev/null > "$OUT/report.$1"
    local tps so stats
    tps=$(awk '/^tps = / { print $3; exit }' "$OUT/pgbench.$1")
    so=$(awk '$2 == "pg_tenancy.so" { gsub("%", "", $1); s += $1 } END { printf "%.2f", s }' "$OUT/report.$1")
    stats=$(awk '$2 == "pg_tenancy.so" && /stats::|begin_statement|executor_(start|run|end)|client::/ { gsub("%", "", $1); s += $1 } END { printf "%.2f", s }' "$OUT/report.$1")
    printf "%-4s tps %8.0f   pg_tenancy.so %5s%% of all CPU samples   statistics, limits and their hooks %5s%%\n" "$1" "$tps" "$so" "$stats"
}

echo "machine: $(nproc) cores; pgbench 2 clients, ${SECS}s per side, perf -a at 2 kHz"
for what in select update; do
    if [ $what = select ]; then
        echo "== select-only, both clients in tenant t0042 (session context)"
        args=(sql/stmt_prot.sql PGOPTIONS="-c pg_tenancy.tenant=t0042")
    else
        [ -f /tmp/usage_update.sql ] || { echo "(run bench/usage.sh first: it writes /tmp/usage_update.sql)"; continue; }
        echo "== simple-update, context set in each transaction (1,000 tenants)"
        args=(/tmp/usage_update.sql)
    fi
    side off "${args[@]}"
    side on "${args[@]}"
    echo "top pg_tenancy symbols with statistics on (share of all CPU samples):"
    awk '$2 == "pg_tenancy.so" && n++ < 10 { print "  " $0 }' "$OUT/report.on"
done
setting on
psql -X -q -d "$DB" -c "ALTER ROLE bench_app IN DATABASE $DB RESET ALL" >/dev/null
