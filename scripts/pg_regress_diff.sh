#!/usr/bin/env bash
# PostgreSQL 15's own regression suite, run twice: against a plain cluster and against one with
# shared_preload_libraries = 'pg_tenancy' (and no CREATE EXTENSION). The library must be
# invisible to every statement it does not refuse, so every test must get the same verdict on
# both, and for the tests that pass on the plain cluster, the same output.
#
# The suite comes from Debian's source package postgresql-15 (15.18; scripts/deps.sh downloads
# it once). 15.18's tests run against the installed 15.x server: a handful fail on both clusters
# from version and environment skew, which is why verdicts are compared between the two
# clusters rather than against the expected files.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=/usr/lib/postgresql/15/bin
INC=$($BIN/pg_config --includedir-server)
PGXS=$(dirname "$($BIN/pg_config --pgxs)")
SRC_TARBALL=target/pg15-src/postgresql-15_15.18.orig.tar.bz2
WORK=${PGT_REGRESS_WORK:-/tmp/pg_tenancy-pgregress}
PORT_PLAIN=${PGT_REGRESS_PORT_PLAIN:-5497}
PORT_PRELOAD=${PGT_REGRESS_PORT_PRELOAD:-5498}
as_pg() { sudo -u postgres "$@"; }

[ -s "$SRC_TARBALL" ] || { echo "pg_regress_diff: $SRC_TARBALL is missing (run scripts/deps.sh)" >&2; exit 2; }

# 1. the suite and its C modules, built against the installed server's headers
SUITE=$WORK/postgresql-15.18
if [ ! -s "$SUITE/src/test/regress/regress.so" ]; then
    rm -rf "$WORK" && mkdir -p "$WORK"
    tar xjf "$SRC_TARBALL" -C "$WORK" postgresql-15.18/src/test/regress postgresql-15.18/contrib/spi
    R=$SUITE/src/test/regress
    for m in "$R/regress.c" "$SUITE/contrib/spi/autoinc.c" "$SUITE/contrib/spi/refint.c"; do
        gcc -O2 -shared -fPIC -I"$INC" "$m" -o "$R/$(basename "${m%.c}").so"
    done
fi
chown -R postgres:postgres "$WORK"

# 2. two throwaway clusters, identical but for the preload
cluster() { # name port preload
    local data=$WORK/$1 sock=$WORK/$1-sock
    if as_pg "$BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null
    fi
    rm -rf "$data" "$sock" && mkdir -p "$sock" && chown postgres:postgres "$sock"
    as_pg "$BIN/initdb" -D "$data" -A trust -U postgres --no-sync >/dev/null
    cat >>"$data/postgresql.conf" <<CONF
listen_addresses = ''
port = $2
unix_socket_directories = '$sock'
fsync = off
max_connections = 100
shared_preload_libraries = '$3'
CONF
    as_pg "$BIN/pg_ctl" -D "$data" -l "$WORK/$1.log" -w start >/dev/null
}
stop_all() {
    for c in plain preload; do
        as_pg "$BIN/pg_ctl" -D "$WORK/$c" -m immediate -w stop >/dev/null 2>&1 || true
    done
}
trap stop_all EXIT

run_suite() { # name port
    local out=$WORK/$1-out
    rm -rf "$out" && mkdir -p "$out" && chown postgres:postgres "$out"
    # pg_regress exits non-zero when any test fails; the verdicts are what we compare
    (cd "$SUITE/src/test/regress" && as_pg "$PGXS/../test/regress/pg_regress" \
        --inputdir=. --outputdir="$out" --bindir=$BIN --dlpath=. \
        --host="$WORK/$1-sock" --port="$2" --user=postgres \
        --schedule=parallel_schedule --max-connections=20 >"$out/summary.txt" 2>&1) || true
    # "test name ... ok|FAILED|failed (ignored)" and "     name ... ok" lines -> "name verdict"
    sed -nE 's/^(test|ok|not ok)? *[0-9]*[ -]*([a-z0-9_]+) +\.\.\. +(ok|FAILED|failed \(ignored\)).*/\2 \3/p;
             s/^ +([a-z0-9_]+) +\.\.\. +(ok|FAILED|failed \(ignored\)).*/\1 \2/p' "$out/summary.txt" \
        | sort -u >"$out/verdicts.txt"
}

cluster plain "$PORT_PLAIN" ""
cluster preload "$PORT_PRELOAD" "${PGT_REGRESS_LIB:-pg_tenancy}"
as_pg "$BIN/psql" -X -q -h "$WORK/preload-sock" -p "$PORT_PRELOAD" -d postgres -Atc \
    "SELECT count(*) FROM pg_settings WHERE name = 'pg_tenancy.guard'" | grep -qx 1 \
    || { echo "pg_regress_diff: the preloaded cluster did not load pg_tenancy" >&2; exit 1; }

start=$(date +%s)
run_suite plain "$PORT_PLAIN"
run_suite preload "$PORT_PRELOAD"
n=$(wc -l <"$WORK/plain-out/verdicts.txt")
if [ "$n" -lt 150 ]; then
    echo "pg_regress_diff: only $n verdicts parsed; see $WORK/plain-out/summary.txt" >&2
    exit 1
fi

status=0
if ! diff -u "$WORK/plain-out/verdicts.txt" "$WORK/preload-out/verdicts.txt" >"$WORK/verdicts.diff"; then
    echo "pg_regress_diff: verdicts differ between the plain and the preloaded cluster:"
    cat "$WORK/verdicts.diff"
    status=1
fi
# For tests that pass on both, the outputs are the expected file on both: nothing to compare.
# For tests that fail on both (version skew), compare the outputs themselves.
while read -r t v; do
    [ "$v" = ok ] && continue
    a=$WORK/plain-out/results/$t.out b=$WORK/preload-out/results/$t.out
    if [ -f "$a" ] && [ -f "$b" ] && ! diff -q "$a" "$b" >/dev/null; then
        echo "pg_regress_diff: $t fails on both clusters, with different output:"
        diff -u "$a" "$b" | head -40
        status=1
    fi
done <"$WORK/plain-out/verdicts.txt"
failing=$(grep -vc ' ok$' "$WORK/plain-out/verdicts.txt" || true)
echo "pg_regress_diff: $n tests, $failing failing on the plain cluster too (version skew), $(( $(date +%s) - start )) s;" \
     "$([ $status = 0 ] && echo 'no verdict or output changes with pg_tenancy preloaded' || echo 'DIFFERENCES above')"
exit $status
