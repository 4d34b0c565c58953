# Shared by bench/run.sh and bench/audit.sh.

# summarize NAME: reads lines "pg_tenancy baseline" (one per round) and prints the means and the
# median of the per-round ratios with their range. This machine's speed drifts by +-20% from
# one run to the next, so each round's ratio compares neighbours; the median is the figure.
summarize() {
    awk -v n="$1" '
        { p += $1; b += $2; r[NR] = $1 / $2 }
        END {
            for (i = 1; i <= NR; i++) for (j = i + 1; j <= NR; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
            med = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
            printf "%-34s %11.0f %11.0f %8.3f   [%.3f .. %.3f]\n", n, p / NR, b / NR, med, r[1], r[NR] }'
}

# summarize3 NAME: reads lines "protected policy where" (tps, one per round) and prints the
# medians and the medians of the per-round ratios protected/WHERE and protected/policy.
summarize3() {
    awk -v n="$1" '
        function median(a, k,   i, j, t) {
            for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
            return (k % 2) ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
        }
        { p[NR] = $1; q[NR] = $2; b[NR] = $3; rb[NR] = $1 / $3; rq[NR] = $1 / $2 }
        END {
            printf "%-34s %9.0f %9.0f %9.0f %10.3f %10.3f\n", n, median(p, NR), median(q, NR), median(b, NR), median(rb, NR), median(rq, NR) }'
}

# load_once DB: 1M rows over 1,000 tenants in b.prot (protected), b.pol (hand-written policy)
# and b.plain (unprotected), rebuilt when missing or made by another build of the extension.
load_once() {
    local db=$1 here
    here=$(dirname "${BASH_SOURCE[0]}")
    local sql_md5
    sql_md5=$(cat "$(/usr/lib/postgresql/15/bin/pg_config --sharedir)"/extension/pg_tenancy--*.sql "$here/setup.sql" | md5sum | cut -c1-32)
    if [ "$(psql -X -qAt -d "$db" -c "SELECT sql_md5 FROM b.meta" 2>/dev/null)" != "$sql_md5" ] \
       || [ "$(psql -X -qAt -d "$db" -c "SELECT count(*) FROM b.pol" 2>/dev/null)" != 1000000 ]; then
        echo "bench: loading 1M rows over 1,000 tenants, three times (once)"
        psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "DROP ROLE IF EXISTS bench_app" \
             -c "DROP ROLE IF EXISTS bench_owner" -c "CREATE DATABASE $db"
        psql -X -q -d "$db" -f "$here/setup.sql" >/dev/null
        psql -X -q -d "$db" -c "CREATE TABLE b.meta AS SELECT '$sql_md5'::text AS sql_md5"
    fi
}

# prewarm DB: the benchmark tables and their indexes in shared buffers (the hot path is measured
# in memory, not through the kernel's page cache).
prewarm() {
    psql -X -q -d "$1" -c "CREATE EXTENSION IF NOT EXISTS pg_prewarm" \
         -c "SELECT sum(pg_prewarm(c.oid)) >= 0 AS prewarmed FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'b' AND c.relkind IN ('r', 'i')" >/dev/null
}
