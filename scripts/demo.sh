#!/usr/bin/env bash
# Run the tour against the throwaway cluster and say how to connect to it.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cluster.sh env)"
DB=pg_tenancy_demo
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "DROP ROLE IF EXISTS demo_app" \
     -c "DROP ROLE IF EXISTS demo_owner" 2>/dev/null || true
psql -X -q -d postgres -c "CREATE DATABASE $DB"
SECRET_FILE=${PGT_ROOT:-/tmp/pg_tenancy}/demo-jwt-secret
[ -s "$SECRET_FILE" ] || head -c 48 /dev/urandom | base64 > "$SECRET_FILE"
chown postgres:postgres "$SECRET_FILE" && chmod 600 "$SECRET_FILE"
MASTER_KEY_FILE=${PGT_ROOT:-/tmp/pg_tenancy}/demo-master-key   # stands in for Vault
[ -s "$MASTER_KEY_FILE" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$MASTER_KEY_FILE"
chown postgres:postgres "$MASTER_KEY_FILE" && chmod 600 "$MASTER_KEY_FILE"
BACKUP_DIR=${PGT_ROOT:-/tmp/pg_tenancy}/demo-backups
mkdir -p "$BACKUP_DIR" && chown postgres:postgres "$BACKUP_DIR"
psql -X -d "$DB" -v DBNAME="$DB" -v SECRET_FILE="$SECRET_FILE" -v MASTER_KEY_FILE="$MASTER_KEY_FILE" \
     -v BACKUP_DIR="$BACKUP_DIR" -f demo/tour.sql
cat <<MSG

The demo cluster is running with pg_tenancy preloaded. Connect with:
    psql -h $PGHOST -p $PGPORT -U postgres $DB          # superuser
    psql -h $PGHOST -p $PGPORT -U demo_app $DB          # the application role
Stop it with: make stop   (or scripts/cluster.sh destroy to remove it)
MSG
