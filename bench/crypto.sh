#!/usr/bin/env bash
# Encryption benchmark (issue #3): bench/crypto.sql against pgcrypto, in a database of its own.
# Usage: bench/crypto.sh   (BENCH_CRYPTO_4K_ROWS, default 1,000,000: rows of 4 KiB values)
# Needs the cluster from scripts/cluster.sh (make bench starts it; run.sh calls this script).
set -euo pipefail
cd "$(dirname "$0")"
eval "$(../scripts/cluster.sh env)"
DB=pg_tenancy_bench_crypto
if [ "$(psql -X -qAt -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql -X -q -d postgres -c "CREATE DATABASE $DB"
fi
psql -X -q -d $DB -c "DROP EXTENSION IF EXISTS pg_tenancy CASCADE" -c "CREATE EXTENSION pg_tenancy" \
     -c "SELECT tenancy.create_tenant('t0001', 'Bench tenant')" >/dev/null 2>&1 \
  || { echo "crypto.sh: could not prepare $DB" >&2; exit 1; }
KEY=${PGT_ROOT:-/tmp/pg_tenancy}/bench-master-key
[ -s "$KEY" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$KEY"
chown postgres:postgres "$KEY" && chmod 600 "$KEY"
echo "AES-256-GCM implementation: $(PGOPTIONS="-c pg_tenancy.master_key_file=$KEY" psql -X -qAt -d $DB -c 'SELECT tenancy.cipher_implementation()')"
PGOPTIONS="-c pg_tenancy.master_key_file=$KEY" psql -X -q -d "$DB" -v rows4k="${BENCH_CRYPTO_4K_ROWS:-1000000}" -f crypto.sql
