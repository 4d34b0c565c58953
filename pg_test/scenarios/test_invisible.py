"""The preloaded library is invisible to every statement it does not refuse.

The same statements run against a cluster without pg_tenancy and against the test cluster, which
preloads it, in a database without the extension and in one with it installed (no table
protected): every result, notice and error must be the same, field for field as a driver sees
them (psycopg2's `e.diag`: message, detail, hint, CONTEXT, position, internal query and
position, schema, table, column, data type and constraint names). Errors raised inside utility
statements, PL/pgSQL, SQL functions, COPY and CALL are where a hook that catches and re-raises
loses fields. (PostgreSQL's own regression suite is run the same way by
scripts/pg_regress_diff.sh.)
"""
import io
import os
import subprocess

import psycopg2
import pytest

from conftest import PORT, ROOT, SOCK, connect, run

PLAIN_ROOT = ROOT + "-plain"
PLAIN_PORT = PORT - 3
HERE = os.path.dirname(os.path.abspath(__file__))
CLUSTER = os.path.join(HERE, "..", "..", "scripts", "cluster.sh")

SETUP = [
    "CREATE TABLE inv_t (id int PRIMARY KEY, email text CONSTRAINT inv_email UNIQUE, "
    "n int CONSTRAINT inv_n_positive CHECK (n > 0), ref int CONSTRAINT inv_ref REFERENCES inv_t (id))",
    "INSERT INTO inv_t VALUES (1, 'dup', 1, NULL), (2, 'other', 2, 1)",
    "CREATE PROCEDURE inv_p(x int) LANGUAGE plpgsql AS $$ BEGIN INSERT INTO inv_t (id, email, n) VALUES (x, 'dup', 1); END $$",
    "CREATE FUNCTION inv_f(x int) RETURNS int LANGUAGE sql AS $$ SELECT 1 / x $$",
    "CREATE FUNCTION inv_g(x int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'inv_g %', x; "
    "RETURN inv_f(x); END $$",
    "CREATE SCHEMA inv_s",
    "CREATE TABLE inv_s.child (id int, CONSTRAINT inv_child_fk FOREIGN KEY (id) REFERENCES inv_t (id))",
]

STATEMENTS = [
    "INSERT INTO inv_t VALUES (1, 'x', 1, NULL)",
    "CALL inv_p(3)",
    "DO $$ BEGIN CALL inv_p(4); END $$",
    "SELECT inv_f(0)",
    "SELECT inv_g(0)",
    "SELECT inv_g(1)",
    "DO $$ BEGIN PERFORM 1 / 0; END $$",
    "DO $$ BEGIN RAISE EXCEPTION USING MESSAGE = 'boom', DETAIL = 'd', HINT = 'h', ERRCODE = 'P0001', "
    "SCHEMA = 's', TABLE = 't', COLUMN = 'c', CONSTRAINT = 'k', DATATYPE = 'y'; END $$",
    "SELECT * FROM no_such_table",
    "SELEC 1",
    "SELECT 'abc'::int",
    "CREATE TABLE inv_t (a int)",
    "ALTER TABLE inv_t ADD CONSTRAINT inv_big CHECK (n > 5)",
    "ALTER TABLE inv_t ALTER COLUMN email TYPE int USING email::int",
    "ALTER TABLE inv_t ADD COLUMN id int",
    "UPDATE inv_t SET n = -1 WHERE id = 2",
    "INSERT INTO inv_t VALUES (5, 'e', 1, 999)",
    "DELETE FROM inv_t WHERE id = 1",
    "INSERT INTO inv_s.child VALUES (42)",
    "CREATE INDEX ON inv_t (no_such_column)",
    "CREATE UNIQUE INDEX ON inv_t (n)",
    "DROP TABLE no_such_table",
    "CREATE EXTENSION no_such_extension",
    "VACUUM no_such_table",
    "EXPLAIN ANALYZE SELECT 1 / 0",
    "EXPLAIN ANALYZE SELECT inv_f(0)",
    "SET statement_timeout = 'x'",
    "FETCH ALL FROM no_such_cursor",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1 / (id - 2) FROM inv_t",
    "PREPARE q(int) AS SELECT 1 / $1",
    "EXECUTE q(0)",
    "SELECT count(*), min(email), max(n) FROM inv_t",
    "CREATE TABLE inv_p2 (tenant_id text, v int) PARTITION BY LIST (tenant_id)",
    "CREATE TABLE inv_p2_a PARTITION OF inv_p2 FOR VALUES IN ('a')",
    "INSERT INTO inv_p2 VALUES ('b', 1)",
    "ALTER TABLE inv_p2 ATTACH PARTITION inv_t FOR VALUES IN ('c')",
    "CREATE RULE inv_r AS ON INSERT TO inv_s.child DO ALSO NOTHING",
    "DROP RULE inv_r ON inv_s.child",
    "SELECT pg_catalog.set_config('search_path', 'nowhere', true)",
    "CREATE VIEW inv_v AS SELECT no_such_column FROM inv_t",
]
COPY_IN = "3\tdup\t1\t\\N\n"
FIELDS = ["severity", "sqlstate", "message_primary", "message_detail", "message_hint", "context",
          "statement_position", "internal_position", "internal_query", "schema_name", "table_name",
          "column_name", "datatype_name", "constraint_name", "source_function"]


@pytest.fixture(scope="module")
def plain_cluster():
    env = dict(os.environ, PGT_ROOT=PLAIN_ROOT, PGT_PORT=str(PLAIN_PORT), PGT_PRELOAD="0")
    subprocess.run([CLUSTER, "start"], env=env, check=True, capture_output=True)
    yield f"{PLAIN_ROOT}/sock", PLAIN_PORT
    subprocess.run([CLUSTER, "destroy"], env=env, check=False, capture_output=True)


def fresh_db(host, port, name, extension):
    admin = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname=name)
    conn.autocommit = True
    with conn.cursor() as cur:
        if extension:
            cur.execute("CREATE EXTENSION pg_tenancy")
        for sql in SETUP:
            cur.execute(sql)
    return conn


def outcome(conn, sql, copy=None):
    """Everything a client sees of one statement."""
    del conn.notices[:]
    try:
        with conn.cursor() as cur:
            if copy is not None:
                cur.copy_expert(sql, io.StringIO(copy))
                rows = cur.rowcount
            else:
                cur.execute(sql)
                rows = cur.fetchall() if cur.description else cur.statusmessage
        return ("ok", rows, list(conn.notices))
    except psycopg2.Error as e:
        fields = {f: getattr(e.diag, f) for f in FIELDS}
        return ("error", e.pgerror, fields, list(conn.notices))


def run_all(conn):
    out = [outcome(conn, s) for s in STATEMENTS]
    out.append(outcome(conn, "COPY inv_t FROM STDIN", COPY_IN))
    out.append(outcome(conn, "COPY inv_t (id, email, n) FROM STDIN", "7\tfresh\t0\n"))
    return out


@pytest.mark.parametrize("extension", [False, True], ids=["preloaded", "preloaded-and-installed"])
def test_every_statement_behaves_as_without_pg_tenancy(plain_cluster, extension):
    plain = fresh_db(*plain_cluster, "inv_db", extension=False)
    ours = fresh_db(SOCK, PORT, "inv_db", extension=extension)
    try:
        expected, got = run_all(plain), run_all(ours)
        errors = sum(1 for o in expected if o[0] == "error")
        assert errors >= 30, expected   # the statements do fail as intended
        for sql, e, g in zip(STATEMENTS + ["COPY", "COPY (check)"], expected, got):
            assert g == e, f"{sql}\n plain:     {e}\n preloaded: {g}"
    finally:
        plain.close()
        ours.close()


def test_drop_extension_leaves_no_trace_in_any_session(database):
    """DROP EXTENSION (which leaves the `tenancy` schema behind) must not leave the library
    holding OIDs of dropped tables: in the dropping session and in another session that had
    used the extension, later statements behave as where it was never installed, and CREATE
    EXTENSION again protects again in those same sessions."""
    db = "pg_tenancy_dropext"
    admin = connect(dbname="postgres")
    run(admin, f"DROP DATABASE IF EXISTS {db}")
    run(admin, f"CREATE DATABASE {db}")
    run(admin, "DROP ROLE IF EXISTS inv_app")
    run(admin, "DROP ROLE IF EXISTS inv_dropped")
    run(admin, "CREATE ROLE inv_app LOGIN")
    try:
        a = connect(dbname=db)

        def protected_table():
            run(a, "CREATE TABLE t (tenant_id text NOT NULL, x int)")
            run(a, "SELECT count(*) FROM tenancy.protect('t')")
            run(a, "GRANT SELECT ON t TO inv_app")

        def refused(conn):  # no tenant context: refused, not an empty result
            with pytest.raises(psycopg2.Error) as e:
                run(conn, "SELECT * FROM t")
            return e.value.pgcode

        run(a, "CREATE EXTENSION pg_tenancy")
        run(a, "SELECT tenancy.create_tenant('acme', 'Acme')")
        protected_table()
        run(a, "CREATE ROLE inv_dropped")
        b = connect(user="inv_app", dbname=db)
        # both sessions cache the catalog's OIDs and the protected set
        assert refused(b) == "28000"
        run(a, "SET ROLE inv_app")
        assert refused(a) == "28000"
        run(a, "RESET ROLE")
        run(a, "DROP EXTENSION pg_tenancy CASCADE")
        # (the table keeps FORCE ROW LEVEL SECURITY without policies: PostgreSQL's empty answer)
        assert run(b, "SELECT count(*) FROM t") == [(0,)]
        assert run(a, "SELECT count(*) FROM t") == [(0,)]
        run(a, "CREATE TABLE u (y int)")
        run(a, "GRANT SELECT ON u TO inv_app")
        assert run(b, "SELECT count(*) FROM u") == [(0,)]
        run(a, "DROP ROLE inv_dropped")  # the DROP ROLE hook looks for grants only where installed
        run(a, "DROP TABLE t")
        run(a, "CREATE EXTENSION pg_tenancy")
        protected_table()
        assert refused(b) == "28000"
        run(a, "SET ROLE inv_app")
        assert refused(a) == "28000"
        a.close(), b.close()
    finally:
        run(admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        run(admin, "DROP ROLE IF EXISTS inv_dropped")
        run(admin, "DROP ROLE IF EXISTS inv_app")
        admin.close()
