#!/usr/bin/env bash
# pg_tenancy benchmarks. Prints, for each pair, the protected (or pg_tenancy) throughput as a
# ratio of a baseline measured in the same run. Usage: bench/run.sh [seconds per run]
# Needs the cluster from scripts/cluster.sh (make bench starts it).
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh
eval "$(../scripts/cluster.sh env)"
SECS=${1:-${BENCH_SECONDS:-4}}
ROUNDS=${BENCH_ROUNDS:-7}
CLIENTS=${BENCH_CLIENTS:-1}
DB=pg_tenancy_bench
PGBENCH=/usr/lib/postgresql/15/bin/pgbench

load_once "$DB"
prewarm "$DB"

tps() { # tps SCRIPT [extra env]
    local out
    out=$(env "${@:2}" "$PGBENCH" -n -M prepared -U bench_app -c "$CLIENTS" -j 1 -T "$SECS" -f "sql/$1" "$DB" 2>&1) \
        || { echo "$out" >&2; exit 1; }
    echo "$out" | awk '/^tps = / {print $3; exit}'
}

pair() { # pair NAME PROTECTED BASELINE [env for both]: ROUNDS back-to-back rounds
    local name=$1 p=$2 b=$3; shift 3
    local results=""
    for _ in $(seq "$ROUNDS"); do
        results+="$(tps "$p" "$@") $(tps "$b" "$@")"$'\n'
    done
    echo -n "$results" | summarize "$name"
}

triple() { # triple NAME PROTECTED POLICY WHERE [env]: ROUNDS rounds of the three, order rotating
    local name=$1 p=$2 q=$3 b=$4; shift 4
    local results="" r=0
    for _ in $(seq "$ROUNDS"); do
        local tp tq tb
        case $((r % 3)) in
            0) tp=$(tps "$p" "$@"); tq=$(tps "$q" "$@"); tb=$(tps "$b" "$@") ;;
            1) tq=$(tps "$q" "$@"); tb=$(tps "$b" "$@"); tp=$(tps "$p" "$@") ;;
            2) tb=$(tps "$b" "$@"); tp=$(tps "$p" "$@"); tq=$(tps "$q" "$@") ;;
        esac
        results+="$tp $tq $tb"$'\n'
        r=$((r + 1))
    done
    echo -n "$results" | summarize3 "$name"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); PostgreSQL $(psql -X -qAt -d postgres -c 'SHOW server_version')"
echo "pgbench: $CLIENTS client(s), ${SECS}s per run, prepared protocol, $ROUNDS rounds, sides in rotating order"
printf "%-34s %9s %9s %9s %10s %10s\n" "benchmark (tps)" "protected" "policy" "WHERE" "prot/WHERE" "prot/pol"
triple "point lookup, context in txn" point_prot.sql point_pol.sql point_plain.sql
triple "1,000-row range, context in txn" range_prot.sql range_pol.sql range_plain.sql
triple "point lookup, session context" stmt_prot.sql stmt_pol.sql stmt_plain.sql \
    PGOPTIONS="-c pg_tenancy.tenant=t0042 -c app.tenant=t0042"
pair "set_tenant() vs set_config()" set_tenant.sql set_config.sql

echo
echo "server side only (PL/pgSQL loops, COMMIT per iteration, no network; bench/hotpath.sql):"
psql -X -q -U bench_app -d "$DB" -f hotpath.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'
echo "set_tenant() vs set_config() of the same setting and of an unverified one (bench/set_tenant_cost.sql):"
psql -X -q -U bench_app -d "$DB" -v rounds=15 -f set_tenant_cost.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'

echo
echo "encryption (bench/crypto.sh; best of 3 per line):"
bash ./crypto.sh

echo
bash ./audit.sh

echo
echo "backups (bench/backup.sh):"
bash ./backup.sh

echo
echo "usage statistics and limits (bench/usage.sh):"
bash ./usage.sh
