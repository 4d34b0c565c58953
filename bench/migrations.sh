#!/usr/bin/env bash
# Migrations by cohort (issue 12): bench/migrations.sql in a database of its own with 1,000
# tenants. Usage: bench/migrations.sh [rounds]. Needs the cluster from scripts/cluster.sh.
set -euo pipefail
cd "$(dirname "$0")"
eval "$(../scripts/cluster.sh env)"
DB=pg_tenancy_migbench
if [ "$(psql -X -qAt -d "$DB" -c "SELECT count(*) FROM tenancy.tenants WHERE id LIKE 'm%'" 2>/dev/null)" != 1000 ]; then
    echo "bench: 1,000 tenants, 10 rows each (once)"
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "DROP ROLE IF EXISTS mb_app" \
         -c "DROP ROLE IF EXISTS mb_owner" -c "CREATE DATABASE $DB" -c "CREATE ROLE mb_app" -c "CREATE ROLE mb_owner"
    psql -X -q -d "$DB" -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE EXTENSION pg_tenancy;
SELECT count(tenancy.create_tenant(format('m%s', lpad(i::text, 4, '0')))) FROM generate_series(1, 1000) i;
SELECT count(tenancy.grant_tenant('mb_app', format('m%s', lpad(i::text, 4, '0')), 'read_write')) FROM generate_series(1, 1000) i;
CREATE SCHEMA mb AUTHORIZATION mb_owner;
SET ROLE mb_owner;
CREATE TABLE mb.orders (tenant_id text NOT NULL, id int, v int NOT NULL DEFAULT 0, PRIMARY KEY (tenant_id, id));
SELECT count(*) FROM tenancy.protect('mb.orders');
GRANT USAGE ON SCHEMA mb TO mb_app;
GRANT SELECT, UPDATE ON mb.orders TO mb_app;
RESET ROLE;
INSERT INTO mb.orders (tenant_id, id) SELECT format('m%s', lpad(i::text, 4, '0')), j FROM generate_series(1, 1000) i, generate_series(1, 10) j;
VACUUM ANALYZE mb.orders;
SQL
fi
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); PostgreSQL $(psql -X -qAt -d postgres -c 'SHOW server_version')"
psql -X -q -d "$DB" -c "ALTER DATABASE $DB SET bench.rounds = '${1:-5}'" >/dev/null
psql -X -q -d "$DB" -f migrations.sql
