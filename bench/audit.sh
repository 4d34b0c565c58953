#!/usr/bin/env bash
# Audit benchmarks (issue: "Audit"), in one run:
#  1. pgbench select-only (-S) and simple-update (-N) on ordinary pgbench tables, on a cluster
#     with pg_tenancy preloaded (and installed in the database) versus a twin cluster without
#     it; interleaved rounds (order alternating), median ratio.
#  2. the cost of one recorded denial (bench/audit_denial.sql).
# Usage: bench/audit.sh [seconds per run]. Needs pg_tenancy installed (make bench does it).
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh
SECS=${1:-${BENCH_AUDIT_SECONDS:-4}}
ROUNDS=${BENCH_AUDIT_ROUNDS:-11}
CLIENTS=${BENCH_AUDIT_CLIENTS:-1}
SCALE=${BENCH_SCALE:-5}
TXNS=${BENCH_AUDIT_TXNS:-50000}
CPU_ROUNDS=${BENCH_AUDIT_CPU_ROUNDS:-7}
BIN=/usr/lib/postgresql/15/bin
DB=pg_tenancy_pgbench
eval "$(../scripts/cluster.sh env)"
# Two fresh clusters made the same way (scripts/cluster.sh), one with pg_tenancy preloaded and
# installed in the database, one without: nothing but pg_tenancy differs between them.
PRE_ROOT=/tmp/pg_tenancy_bench_preload; PRE_PORT=$((PGPORT - 2))
NP_ROOT=/tmp/pg_tenancy_bench_nopreload; NP_PORT=$((PGPORT - 3))
PRE="-h $PRE_ROOT/sock -p $PRE_PORT"
NP="-h $NP_ROOT/sock -p $NP_PORT"
cleanup() {
    PGT_ROOT=$PRE_ROOT PGT_PORT=$PRE_PORT ../scripts/cluster.sh destroy
    PGT_ROOT=$NP_ROOT PGT_PORT=$NP_PORT ../scripts/cluster.sh destroy
}
trap cleanup EXIT
cleanup
PGT_ROOT=$PRE_ROOT PGT_PORT=$PRE_PORT PGT_PRELOAD=1 ../scripts/cluster.sh start >/dev/null
PGT_ROOT=$NP_ROOT PGT_PORT=$NP_PORT PGT_PRELOAD=0 ../scripts/cluster.sh start >/dev/null

for side in "$PRE" "$NP"; do
    # shellcheck disable=SC2086
    psql -X -q $side -U postgres -d postgres -c "CREATE DATABASE $DB"
    # shellcheck disable=SC2086
    "$BIN/pgbench" $side -U postgres -i -q -s "$SCALE" "$DB" >/dev/null 2>&1
done
# shellcheck disable=SC2086
psql -X -q $PRE -U postgres -d "$DB" -c "CREATE EXTENSION pg_tenancy"
# shellcheck disable=SC2086
[ "$(psql -X -qAt $PRE -U postgres -d "$DB" -c 'SHOW shared_preload_libraries')" = "pg_tenancy" ]
# shellcheck disable=SC2086
[ "$(psql -X -qAt $NP -U postgres -d "$DB" -c 'SHOW shared_preload_libraries')" = "" ]

tps() { # tps SIDE MODE
    local out
    # shellcheck disable=SC2086
    out=$("$BIN/pgbench" $1 -U postgres -n -M prepared "$2" -c "$CLIENTS" -j "$CLIENTS" -T "$SECS" "$DB" 2>&1) \
        || { echo "$out" >&2; exit 1; }
    echo "$out" | awk '/^tps = / {print $3; exit}'
}

pair() { # pair NAME MODE: ROUNDS rounds, order alternating, median of (preloaded / not) ratios
    local name=$1 mode=$2 results="" a b
    for r in $(seq "$ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then a=$(tps "$PRE" "$mode"); b=$(tps "$NP" "$mode")
        else b=$(tps "$NP" "$mode"); a=$(tps "$PRE" "$mode"); fi
        results+="$a $b"$'\n'
    done
    echo -n "$results" | summarize "$name"
}

# Backend CPU per transaction: the postmaster's cutime+cstime (clock ticks of children that
# exited) across a fixed number of transactions on one connection, whose backend exits at the
# end of the run. Less sensitive than tps to the machine's scheduling noise.
ticks() { awk '{print $16 + $17}' "/proc/$(head -1 "$1/data/postmaster.pid")/stat"; }
cpu_run() { # cpu_run ROOT SIDE MODE -> clock ticks used by the backend
    local before after
    before=$(ticks "$1")
    # shellcheck disable=SC2086
    "$BIN/pgbench" $2 -U postgres -n -M prepared "$3" -c 1 -t "$TXNS" "$DB" >/dev/null 2>&1
    sleep 0.3
    after=$(ticks "$1")
    echo $((after - before))
}
cpu_pair() { # cpu_pair NAME MODE
    local name=$1 mode=$2 results="" a b
    for r in $(seq "$CPU_ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then a=$(cpu_run "$PRE_ROOT" "$PRE" "$mode"); b=$(cpu_run "$NP_ROOT" "$NP" "$mode")
        else b=$(cpu_run "$NP_ROOT" "$NP" "$mode"); a=$(cpu_run "$PRE_ROOT" "$PRE" "$mode"); fi
        results+="$a $b"$'\n'
    done
    echo -n "$results" | awk -v n="$name" -v t="$TXNS" -v hz="$(getconf CLK_TCK)" '
        { p += $1; b += $2; r[NR] = $2 / $1 }
        END {
            for (i = 1; i <= NR; i++) for (j = i + 1; j <= NR; j++) if (r[j] < r[i]) { x = r[i]; r[i] = r[j]; r[j] = x }
            med = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
            printf "%-34s %9.1f us %8.1f us %8.3f   [%.3f .. %.3f]\n", n, p / NR / hz * 1e6 / t, b / NR / hz * 1e6 / t, med, r[1], r[NR] }'
}

# warm both (caches, the extension's per-backend state) before anything is timed
for side in "$PRE" "$NP"; do
    # shellcheck disable=SC2086
    "$BIN/pgbench" $side -U postgres -n -M prepared -S -c 1 -T 2 "$DB" >/dev/null 2>&1
done
echo "audit overhead: pgbench scale $SCALE, $CLIENTS client(s), ${SECS}s per run, prepared, $ROUNDS rounds (order alternating)"
printf "%-34s %11s %11s %8s   %s\n" "benchmark (tps)" "preloaded" "without" "median" "[range of round ratios]"
pair "select-only (-S)" -S
pair "simple-update (-N)" -N
echo
echo "backend CPU per transaction (user+system), $TXNS transactions per run, $CPU_ROUNDS rounds; ratio = without / preloaded:"
printf "%-34s %12s %11s %8s   %s\n" "benchmark (CPU)" "preloaded" "without" "median" "[range of round ratios]"
cpu_pair "select-only (-S)" -S
cpu_pair "simple-update (-N)" -N
if command -v perf >/dev/null 2>&1; then
    # Where the preloaded backend's time goes: the share of samples in pg_tenancy's own code.
    # shellcheck disable=SC2086
    "$BIN/pgbench" $PRE -U postgres -n -M prepared -S -c 1 -T 8 "$DB" >/dev/null 2>&1 &
    sleep 2
    # shellcheck disable=SC2086
    BPID=$(psql -X -qAt $PRE -U postgres -d postgres -c "SELECT pid FROM pg_stat_activity WHERE datname = '$DB' AND backend_type = 'client backend' LIMIT 1")
    perf record -q -p "$BPID" -o /tmp/pg_tenancy_bench.perf -- sleep 4 >/dev/null 2>&1 || true
    wait
    SHARE=$(perf report -q -i /tmp/pg_tenancy_bench.perf --sort dso 2>/dev/null | awk '/pg_tenancy.so/ {print $1}')
    echo "perf, select-only on the preloaded cluster: ${SHARE:-0%} of the backend's CPU samples are in pg_tenancy.so"
    rm -f /tmp/pg_tenancy_bench.perf
fi
echo
echo "cost of one recorded denial (bench/audit_denial.sql):"
# shellcheck disable=SC2086
psql -X -q $PRE -U postgres -d "$DB" -f audit_denial.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'
