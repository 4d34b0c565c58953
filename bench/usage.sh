#!/usr/bin/env bash
# What per-tenant usage statistics and plan limits cost (issue 14): pgbench select-only and
# simple-update on protected tables as the application role, with pg_tenancy.track_stats and
# pg_tenancy.enforce_limits on (every tenant on a plan with a statement rate and a concurrency
# cap that never refuse, so the token bucket and the cap are taken on every statement) versus
# off, in the same run, rounds interleaved (the order alternates), median of per-round ratios.
# Then the same with 10,000 more tenants holding places in the usage memory.
# Usage: bench/usage.sh [rounds] [seconds per pgbench run]   (target: on/off >= 0.98)
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh
eval "$(../scripts/cluster.sh env)"
# a fresh server: places in the usage memory are kept for the life of the server, and other
# databases' tenants (the scenario tests') would take them
../scripts/cluster.sh restart >/dev/null
ROUNDS=${1:-7}
SECS=${2:-5}
CLIENTS=${BENCH_CLIENTS:-2}
DB=pg_tenancy_bench
PGB=/usr/lib/postgresql/15/bin/pgbench

load_once "$DB"
psql -X -q -d "$DB" -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
INSERT INTO tenancy.plans (name, statements_per_second, burst, max_concurrent)
VALUES ('bench_limited', 1e9, 1e9, 1000) ON CONFLICT (name) DO NOTHING;
UPDATE tenancy.tenants SET plan = 'bench_limited' WHERE id LIKE 't%' AND plan <> 'bench_limited';
CREATE TABLE IF NOT EXISTS b.uacc (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(NULL::text),
                                   aid int NOT NULL, abalance int NOT NULL DEFAULT 0, filler char(84),
                                   PRIMARY KEY (tenant_id, aid));
CREATE TABLE IF NOT EXISTS b.uhist (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(NULL::text),
                                    aid int, delta int, mtime timestamp, filler char(22));
SQL
if [ "$(psql -X -qAt -d "$DB" -c "SELECT count(*) FROM b.uacc")" != 100000 ]; then
    psql -X -q -d "$DB" -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
TRUNCATE b.uacc, b.uhist;
INSERT INTO b.uacc SELECT 't' || lpad(t::text, 4, '0'), a, 0, '' FROM generate_series(0, 999) t, generate_series(1, 100) a;
SELECT count(*) FROM tenancy.protect('b.uacc');
SELECT count(*) FROM tenancy.protect('b.uhist', create_index => true);
GRANT SELECT, INSERT, UPDATE ON b.uacc, b.uhist TO bench_app;
VACUUM ANALYZE b.uacc;
SQL
fi
prewarm "$DB"

cat > /tmp/usage_update.sql <<'PGB'
\set t random(0, 999)
\set aid random(1, 100)
\set delta random(-5000, 5000)
BEGIN;
SELECT tenancy.set_tenant('t' || lpad(:t::text, 4, '0'));
UPDATE b.uacc SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM b.uacc WHERE aid = :aid;
INSERT INTO b.uhist (aid, delta, mtime) VALUES (:aid, :delta, CURRENT_TIMESTAMP);
END;
PGB

setting() { # on|off
    psql -X -q -d "$DB" -c "ALTER ROLE bench_app IN DATABASE $DB SET pg_tenancy.track_stats = $1" \
                        -c "ALTER ROLE bench_app IN DATABASE $DB SET pg_tenancy.enforce_limits = $1" >/dev/null
}
tps() { # tps SCRIPT [env]
    env "${@:2}" "$PGB" -n -M prepared -U bench_app -c "$CLIENTS" -j "$CLIENTS" -T "$SECS" -f "$1" "$DB" 2>/dev/null \
        | awk '/^tps = / { print $3; exit }'
}
pair() { # pair NAME SCRIPT [env]: "on off" per round, the order alternating
    local name=$1 script=$2 results="" on off
    shift 2
    for r in $(seq "$ROUNDS"); do
        if [ $((r % 2)) = 1 ]; then
            setting on; on=$(tps "$script" "$@"); setting off; off=$(tps "$script" "$@")
        else
            setting off; off=$(tps "$script" "$@"); setting on; on=$(tps "$script" "$@")
        fi
        results+="$on $off"$'\n'
    done
    echo -n "$results" | summarize "$name"
}

echo "machine: $(nproc) cores; pgbench: $CLIENTS clients, ${SECS}s per run, prepared, $ROUNDS rounds, on/off interleaved"
echo "places in use before: $(psql -X -qAt -d "$DB" -c "SELECT tracked FROM tenancy.stats_status()")"
printf "%-34s %11s %11s %8s   %s\n" "benchmark (tps)" "stats on" "stats off" "on/off" "[range]"
pair "select-only, session context" sql/stmt_prot.sql PGOPTIONS="-c pg_tenancy.tenant=t0042"
pair "select-only, context in txn" sql/point_prot.sql
pair "simple-update, context in txn" /tmp/usage_update.sql

echo "== with 10,000 more tenants holding places in the usage memory"
if [ "$(psql -X -qAt -d "$DB" -c "SELECT count(*) FROM tenancy.tenants WHERE id LIKE 'u10k-%'")" != 10000 ]; then
    psql -X -q -d "$DB" -c "INSERT INTO tenancy.tenants (id, name) SELECT 'u10k-' || g, 'n' FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING" >/dev/null
fi
seq 1 10000 | awk '{ printf "SELECT tenancy.set_tenant('"'"'u10k-%d'"'"', true);\nSELECT 1;\n", $1 }' > /tmp/usage_10k.sql
psql -X -q -d "$DB" -f /tmp/usage_10k.sql >/dev/null
echo "places in use: $(psql -X -qAt -d "$DB" -c "SELECT tracked FROM tenancy.stats_status()")"
pair "select-only, session context" sql/stmt_prot.sql PGOPTIONS="-c pg_tenancy.tenant=t0042"
pair "simple-update, context in txn" /tmp/usage_update.sql
setting on
psql -X -q -d "$DB" -c "ALTER ROLE bench_app IN DATABASE $DB RESET ALL" >/dev/null
