#!/usr/bin/env bash
# Run the pg_regress expected-output suites in pg_test/ against the running test cluster. Each
# suite sets up what it uses (pg_test/fixtures/setup.sql, app.sql) and tears it down
# (teardown.sql, which drops the extension and the regress roles), so the order does not matter:
# the schedule runs once in its order and once reversed, each in a fresh database.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cluster.sh env)"
PGXS=$(dirname "$(/usr/lib/postgresql/15/bin/pg_config --pgxs)")
tests=$(sed -e 's/#.*//' pg_test/schedule | xargs)
reversed=$(printf '%s\n' $tests | tac | xargs)
status=0
run() { # $1 = output directory, rest = suites
    local out=$1; shift
    rm -rf "$out" && mkdir -p "$out"
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS pg_tenancy_regress" -c "CREATE DATABASE pg_tenancy_regress"
    local rc=0
    "$PGXS/../test/regress/pg_regress" \
        --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
        --inputdir=pg_test --outputdir="$out" --dbname=pg_tenancy_regress "$@" || rc=$?
    if [ $rc -ne 0 ]; then
        [ -f "$out/regression.diffs" ] && cat "$out/regression.diffs"
        status=$rc
    fi
}
run target/regress $tests
echo "== the same suites in reverse order (each sets up and tears down what it uses)"
run target/regress-reversed $reversed
left=$(psql -X -qAt -d postgres -c "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'regress\_%'")
if [ "$left" != 0 ]; then echo "regress suites left $left roles behind"; status=1; fi
exit $status
