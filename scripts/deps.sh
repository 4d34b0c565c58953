#!/usr/bin/env bash
# Install what building and testing pg_tenancy needs, skipping whatever is already there.
# Idempotent; safe to run on every `make demo` / `make test`.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGRX_VERSION=0.18.1
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-contrib postgresql-15-cron libclang-dev clang sudo pgbouncer)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "deps: installing cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "deps: pointing pgrx at $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# PostgreSQL 15's own regression suite (Debian's source package), for the differential run that
# checks the preloaded library changes no statement it does not refuse (scripts/pg_regress_diff.sh).
# 15.18 is the version whose source Debian serves; its tests run against the installed 15.x.
SRC_DIR=$(dirname "$0")/../target/pg15-src
SRC_TARBALL=$SRC_DIR/postgresql-15_15.18.orig.tar.bz2
if [ ! -s "$SRC_TARBALL" ]; then
    echo "deps: downloading the PostgreSQL 15 source package (regression suite)"
    if [ ! -s /etc/apt/sources.list.d/debian-src.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            > /etc/apt/sources.list.d/debian-src.sources
        apt-get update -qq
    fi
    mkdir -p "$SRC_DIR"
    (cd "$SRC_DIR" && apt-get source --download-only -qq postgresql-15=15.18-0+deb12u1 >/dev/null 2>&1) \
        || { apt-get update -qq && (cd "$SRC_DIR" && apt-get source --download-only -qq postgresql-15=15.18-0+deb12u1 >/dev/null); }
    [ -s "$SRC_TARBALL" ] || { echo "deps: could not download the PostgreSQL 15 source package" >&2; exit 1; }
fi

# Python driver and test runner for the multi-session scenarios, in a private venv.
VENV=${VENV:-$(dirname "$0")/../target/venv}
if [ ! -x "$VENV/bin/pytest" ] || ! "$VENV/bin/python" -c 'import psycopg2, psycopg, prometheus_client' 2>/dev/null; then
    echo "deps: creating $VENV (pytest, psycopg2, psycopg, prometheus-client)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check pytest psycopg2-binary 'psycopg[binary]' prometheus-client
fi
echo "deps: ok"
