#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster with pg_tenancy preloaded, run as the postgres user
# (initdb and postgres refuse to run as root).
#   cluster.sh start   create (if needed) and start it; idempotent
#   cluster.sh stop    stop it
#   cluster.sh destroy stop it and remove its files
#   cluster.sh env     print the connection settings (PGHOST/PGPORT/PGUSER)
set -euo pipefail

BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=${PGT_ROOT:-/tmp/pg_tenancy}
PORT=${PGT_PORT:-5499}
# PGT_EXTRA_PRELOAD=pg_cron adds libraries after pg_tenancy (and points pg_cron at the postgres database).
# PGT_EXTRA_CONF='setting = value' adds a line to postgresql.conf when the cluster is created.
# PGT_PRELOAD=0 makes a cluster without shared_preload_libraries (the audit needs it; the
# rest must keep working without it, which tests and the audit benchmark check).
PRELOAD=${PGT_PRELOAD:-1}
DATA=$ROOT/data
SOCK=$ROOT/sock
LOG=$ROOT/server.log
as_pg() { sudo -u postgres "$@"; }

case "${1:-start}" in
start)
    mkdir -p "$ROOT" "$SOCK"
    chown postgres:postgres "$ROOT" "$SOCK"
    if [ ! -s "$DATA/PG_VERSION" ]; then
        as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres --no-sync >/dev/null
        cat >>"$DATA/postgresql.conf" <<CONF
# pg_tenancy test cluster
shared_preload_libraries = '$([ "$PRELOAD" = 1 ] && echo pg_tenancy)${PGT_EXTRA_PRELOAD:+,$PGT_EXTRA_PRELOAD}'
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
max_connections = 200
fsync = off
log_line_prefix = '%m [%p] %u@%d '
$([ -n "${PGT_EXTRA_PRELOAD:-}" ] && echo "cron.database_name = 'postgres'")
${PGT_EXTRA_CONF:-}
CONF
    fi
    # room for the benchmark's three 1M-row tables (bench/): its hot path is measured in memory;
    # commit timestamps for incremental backups (each captured change carries its commit time)
    for setting in "shared_buffers = '1GB'" "track_commit_timestamp = on"; do
        if ! grep -qF "$setting" "$DATA/postgresql.conf"; then
            echo "$setting" >>"$DATA/postgresql.conf"
            as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 && as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
        fi
    done
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w start >/dev/null
    fi
    echo "cluster: running on port $PORT (socket $SOCK), log $LOG"
    ;;
stop)
    if [ -d "$DATA" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    fi
    ;;
restart)
    "$0" stop
    "$0" start
    ;;
destroy)
    "$0" stop
    rm -rf "$ROOT"
    ;;
env)
    echo "export PGHOST=$SOCK PGPORT=$PORT PGUSER=postgres"
    ;;
*)
    echo "usage: $0 start|stop|restart|destroy|env" >&2
    exit 2
    ;;
esac
