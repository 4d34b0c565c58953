#!/usr/bin/env bash
# The hot path, three ways, server side (bench/hotpath.sql), then set_tenant() against set_config()
# (bench/set_tenant_cost.sql). Usage: bench/hotpath.sh [rounds]
# Needs the cluster from scripts/cluster.sh (make bench starts it).
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh
eval "$(../scripts/cluster.sh env)"
DB=pg_tenancy_bench
load_once "$DB"
prewarm "$DB"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); PostgreSQL $(psql -X -qAt -d postgres -c 'SHOW server_version')"
psql -X -q -U bench_app -d "$DB" -v rounds="${1:-15}" -f hotpath.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'
psql -X -q -U bench_app -d "$DB" -v rounds="${1:-15}" -f set_tenant_cost.sql 2>&1 | grep -v -e '^psql:.*WARNING' -e '^DETAIL'
