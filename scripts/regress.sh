#!/usr/bin/env bash
# Run the pg_regress expected-output suites in pg_test/ against the running test cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cluster.sh env)"
PGXS=$(dirname "$(/usr/lib/postgresql/15/bin/pg_config --pgxs)")
OUT=target/regress
rm -rf "$OUT" && mkdir -p "$OUT"
tests=$(sed -e 's/#.*//' pg_test/schedule | xargs)
# a fresh database for every run (roles are cluster-wide: the suites drop theirs at the end)
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS pg_tenancy_regress" -c "CREATE DATABASE pg_tenancy_regress"
status=0
"$PGXS/../test/regress/pg_regress" \
    --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
    --inputdir=pg_test --outputdir="$OUT" --dbname=pg_tenancy_regress \
    $tests || status=$?
if [ $status -ne 0 ] && [ -f "$OUT/regression.diffs" ]; then
    cat "$OUT/regression.diffs"
fi
exit $status
