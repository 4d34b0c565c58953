#!/usr/bin/env bash
# pg_tenancy benchmarks. Prints, for each pair, the protected (or pg_tenancy) throughput as a
# ratio of a baseline measured in the same run. Usage: bench/run.sh [seconds per run]
# Needs the cluster from scripts/cluster.sh (make bench starts it).
set -euo pipefail
cd "$(dirname "$0")"
eval "$(../scripts/cluster.sh env)"
SECS=${1:-${BENCH_SECONDS:-15}}
CLIENTS=${BENCH_CLIENTS:-4}
DB=pg_tenancy_bench
PGBENCH=/usr/lib/postgresql/15/bin/pgbench

if [ "$(psql -X -qAt -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" != 1 ] \
   || [ "$(psql -X -qAt -d $DB -c "SELECT count(*) FROM b.prot" 2>/dev/null)" != 1000000 ]; then
    echo "bench: loading 1M rows over 1,000 tenants (once)"
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "DROP ROLE IF EXISTS bench_app" \
         -c "DROP ROLE IF EXISTS bench_owner" -c "CREATE DATABASE $DB"
    psql -X -q -d $DB -f setup.sql >/dev/null
fi

tps() { # tps SCRIPT [extra env]
    local out
    out=$(env "${@:2}" "$PGBENCH" -n -M prepared -U bench_app -c "$CLIENTS" -j 2 -T "$SECS" -f "sql/$1" "$DB" 2>&1) \
        || { echo "$out" >&2; exit 1; }
    echo "$out" | awk '/^tps = / {print $3; exit}'
}

pair() { # pair NAME PROTECTED BASELINE [env for protected]
    local name=$1 p=$2 b=$3; shift 3
    # A B A B: interleaved so drift on a shared machine hits both sides alike
    local p1 b1 p2 b2
    p1=$(tps "$p" "$@"); b1=$(tps "$b"); p2=$(tps "$p" "$@"); b2=$(tps "$b")
    awk -v n="$name" -v p1="$p1" -v p2="$p2" -v b1="$b1" -v b2="$b2" 'BEGIN {
        p = (p1 + p2) / 2; b = (b1 + b2) / 2;
        printf "%-34s %12.0f %12.0f %8.3f\n", n, p, b, p / b }'
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); PostgreSQL $(psql -X -qAt -d postgres -c 'SHOW server_version')"
echo "pgbench: $CLIENTS clients, 2 threads, ${SECS}s per run, prepared protocol, each side run twice interleaved"
printf "%-34s %12s %12s %8s\n" "benchmark" "pg_tenancy" "baseline" "ratio"
pair "point lookup, context in txn" point_prot.sql point_plain.sql
pair "1,000-row range, context in txn" range_prot.sql range_plain.sql
pair "point lookup, session context" stmt_prot.sql stmt_plain.sql PGOPTIONS="-c pg_tenancy.tenant=t0042"
pair "set_tenant() vs set_config()" set_tenant.sql set_config.sql
