"""Multi-session scenarios against the real test cluster (scripts/cluster.sh).

Every scenario connects as an application role that is neither the table owner, nor a
superuser, nor BYPASSRLS: a test run as the owner would pass for the wrong reason.
"""
import os
import shutil
import time
import uuid

import psycopg2
import psycopg2.errors
import pytest

ROOT = os.environ.get("PGT_ROOT", "/tmp/pg_tenancy")
PORT = int(os.environ.get("PGT_PORT", "5499"))
SOCK = f"{ROOT}/sock"
DB = "pg_tenancy_scenarios"
APP = "scn_app"
OWNER = "scn_owner"
SECRET = "scenario-secret-scenario-secret-scenario-secret"
TENANTS = [f"t{i:03d}" for i in range(10)]


def connect(user="postgres", dbname=DB, host=SOCK, port=PORT, autocommit=True, **kw):
    conn = psycopg2.connect(host=host, port=port, user=user, dbname=dbname, **kw)
    conn.autocommit = autocommit
    return conn


def run(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args or None)
        if cur.description is not None:
            return cur.fetchall()
        return None


@pytest.fixture(scope="session")
def database():
    """A fresh database with the extension, ten tenants, an owner, an app role and a table."""
    admin = connect(dbname="postgres")
    # (the dump/restore scenario's copy holds grants to these roles too)
    for db in (DB, "pg_tenancy_restored"):
        run(admin, f"DROP DATABASE IF EXISTS {db}")
    for role in (APP, OWNER, "scn_other"):
        run(admin, f"DROP ROLE IF EXISTS {role}")
    run(admin, f"CREATE DATABASE {DB}")
    run(admin, f"CREATE ROLE {APP} LOGIN")
    run(admin, f"CREATE ROLE scn_other LOGIN")
    run(admin, f"CREATE ROLE {OWNER} LOGIN")
    admin.close()

    su = connect()
    run(su, "CREATE EXTENSION pg_tenancy")
    for t in TENANTS:
        run(su, "SELECT tenancy.create_tenant(%s, %s)", t, f"Tenant {t}")
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", APP, t)
    run(su, f"CREATE SCHEMA app AUTHORIZATION {OWNER}")
    run(su, f"GRANT USAGE ON SCHEMA app TO {APP}, scn_other")
    # the secret lives in a file only the server reads; the database setting holds its path
    secret_file = f"{ROOT}/scenario-secret"
    with open(secret_file, "w") as f:
        f.write(SECRET + "\n")
    os.chmod(secret_file, 0o600)
    shutil.chown(secret_file, "postgres", "postgres")
    run(su, f"ALTER DATABASE {DB} SET pg_tenancy.jwt_secret_file = '{secret_file}'")
    master_key = new_key_file(f"{ROOT}/scenario-master-key")
    run(su, f"ALTER DATABASE {DB} SET pg_tenancy.master_key_file = '{master_key}'")
    own = connect(user=OWNER)
    run(own, """CREATE TABLE app.orders (
                    tenant_id text NOT NULL, id bigserial, client text, item text,
                    PRIMARY KEY (tenant_id, id))""")
    run(own, "SELECT count(*) FROM tenancy.protect('app.orders')")
    run(own, f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON app.orders TO {APP}, scn_other")
    run(own, f"GRANT USAGE ON SEQUENCE app.orders_id_seq TO {APP}, scn_other")
    own.close()
    su.close()
    yield DB


@pytest.fixture
def su(database):
    conn = connect()
    yield conn
    conn.close()


@pytest.fixture
def app(database):
    conn = connect(user=APP)
    # the premise of every scenario: this role gets no free pass from row level security
    row = run(conn, "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
    assert row == [(False, False)]
    yield conn
    conn.close()


def new_key_file(path):
    """A fresh random 32-byte key (64 hex digits) that only the server's OS user reads."""
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    os.chmod(path, 0o600)
    shutil.chown(path, "postgres", "postgres")
    return path


def sign(su_conn, payload):
    return run(su_conn, "SELECT tenancy._sign_token(%s::jsonb)", payload)[0][0]


def sqlstate_of(conn, sql, *args):
    """Run sql in its own transaction; return the SQLSTATE it failed with (None if it worked)."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
        return None
    except psycopg2.Error as e:
        return e.pgcode
    finally:
        if not conn.autocommit:
            conn.rollback()


def unique(prefix="c"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for_server():
    """After a kill -9 of a backend: wait until the server has restarted and takes connections."""
    for _ in range(300):
        try:
            connect().close()
            return
        except psycopg2.OperationalError:
            time.sleep(0.1)
    pytest.fail("the server did not come back")
