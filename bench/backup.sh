#!/usr/bin/env bash
# Tenant backups (issue 11), against the running test cluster (make cluster):
#   1. backup and restore of one 100k-row tenant against COPY (SELECT ... WHERE tenant) TO a file
#      and DELETE + COPY FROM of the same rows (both server side, as superuser), interleaved;
#   2. a 1,000-row tenant of a 10M-row table (work proportional to the tenant);
#   3. the restore time (RTO) of a 1M-row tenant;
#   4. what change capture costs writers: a simple-update transaction (pgbench -N's, on protected
#      tables, as an application role) with capture off and on, interleaved.
# Usage: bench/backup.sh [rounds] [seconds per pgbench round]
# (BK_SECTIONS=4 runs only the writers' part, e.g. with more rounds.)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cluster.sh env)"
ROUNDS=${1:-3}
SECS=${2:-10}
DB=pg_tenancy_bench_backup
DIR=${PGT_ROOT:-/tmp/pg_tenancy}/bench-backups
mkdir -p "$DIR" && chown postgres:postgres "$DIR"
KEY=${DIR}/master-key
[ -s "$KEY" ] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$KEY"; chown postgres "$KEY"; chmod 600 "$KEY"; }
PGB=/usr/lib/postgresql/15/bin/pgbench
SECTIONS=${BK_SECTIONS:-1234}
section() { [[ $SECTIONS == *$1* ]]; }

if [ "$(psql -X -qAt -d "$DB" -c "SELECT count(*) FROM bk.big" 2>/dev/null)" != 10000000 ]; then
    echo "bench: loading (once): 1M rows over 10 tenants, a 10M-row table, pgbench-like tables"
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "DROP ROLE IF EXISTS bench_bk_app" -c "CREATE DATABASE $DB"
    psql -X -q -d "$DB" -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE EXTENSION pg_tenancy;
ALTER DATABASE $DB SET pg_tenancy.master_key_file = '$KEY';
ALTER DATABASE $DB SET pg_tenancy.backup_dir = '$DIR';
CREATE ROLE bench_bk_app LOGIN;
CREATE SCHEMA bk;
GRANT USAGE ON SCHEMA bk TO bench_bk_app;
SELECT count(*) FROM generate_series(1, 10) i, tenancy.create_tenant('t' || i, 'Tenant ' || i) t;
SELECT tenancy.create_tenant('big', 'Big') IS NOT NULL, tenancy.create_tenant('small', 'Small') IS NOT NULL;
SELECT count(*) FROM generate_series(1, 10) i, tenancy.grant_tenant('bench_bk_app', 't' || i, 'read_write') g;
-- 1. ten tenants of 100k rows
CREATE TABLE bk.orders (tenant_id text NOT NULL, id bigint NOT NULL, item text, amount numeric(12,2),
                        created timestamptz, PRIMARY KEY (tenant_id, id));
INSERT INTO bk.orders SELECT 't' || (i % 10 + 1), i, 'item number ' || i, i % 997 * 1.25, now() - i * interval '1 second'
  FROM generate_series(1, 1000000) i;
SELECT count(*) FROM tenancy.protect('bk.orders');
-- 2, 3. 10M rows: 'big' has 1M, 'small' 1,000, the rest 9M over other ids (not tenants here:
-- the table holds them, a backup of 'small' must not read them)
CREATE TABLE bk.big (tenant_id text NOT NULL, id bigint NOT NULL, v text, PRIMARY KEY (tenant_id, id));
INSERT INTO bk.big SELECT CASE WHEN i <= 1000000 THEN 'big' WHEN i <= 1001000 THEN 'small' ELSE 'x' || (i % 900) END,
                          i, md5(i::text) FROM generate_series(1, 10000000) i;
SELECT count(*) FROM tenancy.protect('bk.big');
-- 4. pgbench -N's tables, protected
CREATE TABLE bk.acc (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(NULL::text), aid int NOT NULL,
                     abalance int NOT NULL DEFAULT 0, filler char(84), PRIMARY KEY (tenant_id, aid));
CREATE TABLE bk.hist (tenant_id text NOT NULL, aid int, delta int, mtime timestamp, filler char(22));
INSERT INTO bk.acc SELECT 't' || t, a, 0, '' FROM generate_series(1, 10) t, generate_series(1, 100000) a;
SELECT count(*) FROM tenancy.protect('bk.acc');
SELECT count(*) FROM tenancy.protect('bk.hist', create_index => true);
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA bk TO bench_bk_app;
VACUUM ANALYZE;
SQL
fi

ms() { # run SQL in one psql session with \timing; print the milliseconds of the last statement
    psql -X -q -d "$DB" -v ON_ERROR_STOP=1 -c '\timing on' "$@" | awk '/^Time:/ { t = $2 } END { print t }'
}
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

if section 1; then
echo "== 1. one 100k-row tenant (t1): backup and restore against COPY of the same rows (its rows of every"
echo "   protected table: bk.orders and bk.acc hold 100k each), $ROUNDS rounds, interleaved"
TABLES="bk.orders bk.acc bk.hist bk.big"
copy_out_sql=(); copy_in_sql=(-c "BEGIN")
for t in $TABLES; do
    copy_out_sql+=(-c "COPY (SELECT * FROM $t WHERE tenant_id = 't1') TO '$DIR/copy-t1-$t.txt'")
    copy_in_sql+=(-c "DELETE FROM $t WHERE tenant_id = 't1'" -c "COPY $t FROM '$DIR/copy-t1-$t.txt'")
done
copy_in_sql+=(-c "COMMIT")
total_ms() { psql -X -q -d "$DB" -v ON_ERROR_STOP=1 -c '\timing on' "$@" | awk '/^Time:/ { s += $2 } END { print s }'; }
: > /tmp/bk_ratios
for r in $(seq "$ROUNDS"); do
    copy_out=$(total_ms "${copy_out_sql[@]}")
    backup=$(ms -c "SELECT tenancy.backup('t1')")
    delete_copy=$(total_ms "${copy_in_sql[@]}")
    b=$(psql -X -qAt -d "$DB" -c "SELECT id FROM tenancy.backups WHERE tenant = 't1' ORDER BY created_at DESC LIMIT 1")
    restore=$(ms -c "CALL tenancy.restore('t1', '$b')")
    echo "round $r: COPY out $copy_out ms, backup $backup ms; DELETE + COPY in $delete_copy ms, restore $restore ms"
    echo "$copy_out $backup $delete_copy $restore" >> /tmp/bk_ratios
done
awk '{ printf "%f %f\n", $1 / $2, $3 / $4 }' /tmp/bk_ratios > /tmp/bk_r2
echo "median speed ratios: backup = $(cut -d' ' -f1 /tmp/bk_r2 | median)x COPY out (target >= 0.7), restore = $(cut -d' ' -f2 /tmp/bk_r2 | median)x DELETE + COPY in (target >= 0.5)"
rm -f "$DIR"/t1/*.pgtb
fi

if section 2; then
echo "== 2. a 1,000-row tenant of a 10M-row table (target: backup under 100 ms)"
for r in $(seq "$ROUNDS"); do
    echo "round $r: backup $(ms -c "SELECT tenancy.backup('small')") ms, COPY out $(ms -c "COPY (SELECT * FROM bk.big WHERE tenant_id = 'small') TO '$DIR/copy-small.txt'") ms"
done
b=$(psql -X -qAt -d "$DB" -c "SELECT id FROM tenancy.backups WHERE tenant = 'small' ORDER BY created_at DESC LIMIT 1")
echo "restore of 'small': $(ms -c "CALL tenancy.restore('small', '$b')") ms"
fi

if section 3; then
echo "== 3. RTO of a 1M-row tenant ('big', in the 10M-row table)"
t_backup=$(ms -c "SELECT tenancy.backup('big')")
b=$(psql -X -qAt -d "$DB" -c "SELECT id FROM tenancy.backups WHERE tenant = 'big' ORDER BY created_at DESC LIMIT 1")
t_verify=$(ms -c "SELECT tenancy.verify_backup('$b') IS NOT NULL")
t_restore=$(ms -c "CALL tenancy.restore('big', '$b')")
echo "backup $t_backup ms, verify $t_verify ms, restore (pause, stage, verify, swap, resume) $t_restore ms (runbook RTO: 2 hours)"
psql -X -qAt -d "$DB" -c "SELECT pg_size_pretty(archive_bytes) || ' archive for ' || row_count || ' rows' FROM tenancy.backups WHERE id = '$b'"
rm -f "$DIR"/big/*.pgtb "$DIR"/small/*.pgtb
fi

if section 4; then
echo "== 4. writers: simple-update transactions on protected tables, 2 clients, ${SECS} s per round, capture off/on interleaved"
cat > /tmp/bk_simple_update.sql <<'PGB'
\set aid random(1, 100000)
\set t random(1, 10)
\set delta random(-5000, 5000)
BEGIN;
SELECT tenancy.set_tenant('t' || :t);
UPDATE bk.acc SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM bk.acc WHERE aid = :aid;
INSERT INTO bk.hist (tenant_id, aid, delta, mtime) VALUES (DEFAULT, :aid, :delta, CURRENT_TIMESTAMP);
END;
PGB
tps() { "$PGB" -n -h "$PGHOST" -p "$PGPORT" -U bench_bk_app -c 2 -j 2 -T "$SECS" -M prepared -f /tmp/bk_simple_update.sql "$DB" 2>/dev/null | awk '/^tps/ { print $3 }'; }
: > /tmp/bk_writers
for r in $(seq "$ROUNDS"); do
    psql -X -qAt -d "$DB" -c "SELECT tenancy.disable_change_capture()" >/dev/null
    off=$(tps)
    psql -X -qAt -d "$DB" -c "SELECT tenancy.enable_change_capture()" >/dev/null
    on=$(tps)
    echo "round $r: capture off $off tps, on $on tps"
    echo "$on $off" >> /tmp/bk_writers
done
psql -X -qAt -d "$DB" -c "SELECT tenancy.disable_change_capture()" -c "TRUNCATE tenancy.changes" >/dev/null
echo "median ratio capture on/off: $(awk '{ print $1 / $2 }' /tmp/bk_writers | median) (target >= 0.95)"
fi
