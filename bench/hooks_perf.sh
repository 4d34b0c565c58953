#!/usr/bin/env bash
# Target 4 of the hot path (issue 13): what pg_tenancy's hooks cost a statement on an
# unprotected table in a database with protected ones. Throughput cannot resolve it, so perf
# does: one backend of bench_app runs N iterations of one primary-key SELECT on b.plain plus
# COMMIT (a PL/pgSQL procedure, no client round trip), `perf record -e cpu-clock` on that
# backend; prints the time per iteration under perf, the share of its samples in
# pg_tenancy.so, and that share in microseconds per statement (the executor and permission
# hooks) and per transaction (the transaction callback).
# Usage: bench/hooks_perf.sh [iterations] [runs]   (needs the cluster of scripts/cluster.sh)
set -euo pipefail
cd "$(dirname "$0")"
. ./lib.sh
eval "$(../scripts/cluster.sh env)"
N=${1:-200000}
RUNS=${2:-3}
HZ=5000
DB=pg_tenancy_bench
command -v perf >/dev/null || { echo "hooks_perf: perf is not installed"; exit 1; }
load_once "$DB"
prewarm "$DB"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for run in $(seq "$RUNS"); do
    coproc PSQL { psql -X -q -At -U bench_app -d "$DB" 2>&1; }
    cat >&"${PSQL[1]}" <<'SQL'
CREATE OR REPLACE PROCEDURE pg_temp.loop(n int) LANGUAGE plpgsql AS $$
DECLARE x text; r int;
BEGIN
  FOR i IN 1..n LOOP
    r := 1 + (i * 31) % 1000;
    SELECT payload INTO x FROM b.plain WHERE tenant_id = 't0042' AND id = r;
    COMMIT;
  END LOOP;
END $$;
CALL pg_temp.loop(3000);
SELECT 'PID ' || pg_backend_pid();
SQL
    pid=
    while read -r line <&"${PSQL[0]}"; do case "$line" in PID*) pid=${line#PID }; break;; esac; done
    perf record -e cpu-clock -F "$HZ" -p "$pid" -o "$OUT/perf.data" >/dev/null 2>&1 &
    perf_pid=$!
    sleep 0.5
    echo "CALL pg_temp.loop($N); SELECT 'DONE';" >&"${PSQL[1]}"
    while read -r line <&"${PSQL[0]}"; do case "$line" in DONE*) break;; esac; done
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    echo '\q' >&"${PSQL[1]}"
    wait "$PSQL_PID" 2>/dev/null || true
    perf report -i "$OUT/perf.data" --no-children --sort dso,sym -g none -F sample,dso,sym 2>/dev/null | grep -v '^#' > "$OUT/report"
    awk -v n="$N" -v hz="$HZ" -v run="$run" '
        NF >= 3 { total += $1; if ($2 == "pg_tenancy.so") { ours += $1; if ($0 ~ /on_xact/) xact += $1 } }
        END {
            us = 1e6 / hz / n
            printf "run %d: %.2f us per iteration under perf; pg_tenancy.so %d of %d samples (%.2f%%): %.3f us per statement in the hooks, %.3f us per transaction in the transaction callback\n",
                run, total * us, ours, total, 100 * ours / total, (ours - xact) * us, xact * us
        }' "$OUT/report"
done
