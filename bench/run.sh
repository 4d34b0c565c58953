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

# Rebuild the data set when it is missing or was made by another build of the extension.
SQL_MD5=$(cat "$(/usr/lib/postgresql/15/bin/pg_config --sharedir)"/extension/pg_tenancy--*.sql | md5sum | cut -c1-32)
if [ "$(psql -X -qAt -d $DB -c "SELECT sql_md5 FROM b.meta" 2>/dev/null)" != "$SQL_MD5" ] \
   || [ "$(psql -X -qAt -d $DB -c "SELECT count(*) FROM b.prot" 2>/dev/null)" != 1000000 ]; then
    echo "bench: loading 1M rows over 1,000 tenants (once)"
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "DROP ROLE IF EXISTS bench_app" \
         -c "DROP ROLE IF EXISTS bench_owner" -c "CREATE DATABASE $DB"
    psql -X -q -d $DB -f setup.sql >/dev/null
    psql -X -q -d $DB -c "CREATE TABLE b.meta AS SELECT '$SQL_MD5'::text AS sql_md5"
fi

tps() { # tps SCRIPT [extra env]
    local out
    out=$(env "${@:2}" "$PGBENCH" -n -M prepared -U bench_app -c "$CLIENTS" -j 1 -T "$SECS" -f "sql/$1" "$DB" 2>&1) \
        || { echo "$out" >&2; exit 1; }
    echo "$out" | awk '/^tps = / {print $3; exit}'
}

pair() { # pair NAME PROTECTED BASELINE [env for protected]: ROUNDS back-to-back rounds
    local name=$1 p=$2 b=$3; shift 3
    local results=""
    for _ in $(seq "$ROUNDS"); do
        results+="$(tps "$p" "$@") $(tps "$b")"$'\n'
    done
    echo -n "$results" | summarize "$name"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); PostgreSQL $(psql -X -qAt -d postgres -c 'SHOW server_version')"
echo "pgbench: $CLIENTS client(s), ${SECS}s per run, prepared protocol, $ROUNDS rounds of (pg_tenancy, baseline)"
printf "%-34s %11s %11s %8s   %s\n" "benchmark" "tps" "base tps" "median" "[range of round ratios]"
pair "point lookup, context in txn" point_prot.sql point_plain.sql
pair "1,000-row range, context in txn" range_prot.sql range_plain.sql
pair "point lookup, session context" stmt_prot.sql stmt_plain.sql PGOPTIONS="-c pg_tenancy.tenant=t0042"
pair "set_tenant() vs set_config()" set_tenant.sql set_config.sql

echo
echo "server side only (PL/pgSQL loop, COMMIT per iteration, no network; bench/server_side.sql):"
psql -X -q -U bench_app -d "$DB" -f server_side.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'

echo
echo "encryption (bench/crypto.sh; best of 3 per line):"
bash ./crypto.sh

echo
bash ./audit.sh
