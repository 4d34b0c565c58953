"""Server log lines, per tenant and masked (issue 14), read from the test cluster's real log:
a token never reaches the log, whatever the statement (log_statement, log_min_duration_statement,
the STATEMENT of a failing SET LOCAL, bound parameters); under a tenant context the statement
text loses its literals, parameters their values and violations' details their row values, and
lines carry the tenant; the client's messages are unchanged; a session without a context on
tables that are not protected is logged exactly as without pg_tenancy."""
import time
import uuid

import psycopg
import psycopg2
import pytest

from conftest import APP, DB, OWNER, PORT, ROOT, SOCK, TENANTS, connect, run, sign, sqlstate_of

T = TENANTS[6]
LOG = f"{ROOT}/server.log"


@pytest.fixture(scope="module")
def logged(database):
    su = connect()
    run(su, f"ALTER ROLE {APP} SET log_statement = 'all'")
    run(su, f"ALTER ROLE {APP} SET log_min_duration_statement = 0")
    run(su, f"ALTER ROLE {APP} SET log_min_error_statement = 'error'")
    own = connect(user=OWNER)
    run(own, "DROP TABLE IF EXISTS app.lg_plain")
    run(own, "CREATE TABLE app.lg_plain (v text UNIQUE)")
    run(own, f"GRANT SELECT, INSERT ON app.lg_plain TO {APP}")
    own.close()
    yield su
    run(su, f"ALTER ROLE {APP} RESET ALL")
    su.close()


def log_since(marker):
    # the log is written by the server; wait until the marker line is there
    for _ in range(50):
        with open(LOG, encoding="utf-8", errors="replace") as f:
            text = f.read()
        at = text.rfind(marker)
        if at >= 0:
            return text[at:]
        time.sleep(0.1)
    raise AssertionError(f"marker {marker} not in the server log")


def mark(conn):
    m = f"lgmark-{uuid.uuid4().hex}"
    run(conn, f"DO $$ BEGIN RAISE LOG '{m}'; END $$")
    return m


def test_tokens_never_reach_the_log(logged):
    su = logged
    token = sign(su, f'{{"tenant_id": "{T}", "exp": {int(time.time()) + 600}}}')
    expired = sign(su, f'{{"tenant_id": "{T}", "exp": {int(time.time()) - 600}}}')
    conn = connect(user=APP, autocommit=False)
    m = mark(connect(user=APP))
    run(conn, f"SET LOCAL pg_tenancy.tenant = '{token}'")
    run(conn, "SELECT count(*) FROM app.orders")
    conn.commit()
    # a failing SET LOCAL: the STATEMENT line of its error
    assert sqlstate_of(conn, f"SET LOCAL pg_tenancy.tenant = '{expired}'") == "28P01"
    assert sqlstate_of(conn, f"SELECT tenancy.set_tenant_token('{expired}')") == "28P01"
    conn.commit()
    # bound parameters (extended protocol)
    with psycopg.connect(host=SOCK, port=PORT, user=APP, dbname=DB, autocommit=True) as c3:
        c3.execute("SELECT tenancy.set_tenant_token(%s, true)", (token,))
        c3.execute("SELECT count(*) FROM app.orders WHERE client = %s", ("bound-secret-91",))
    end = mark(connect(user=APP))
    text = log_since(m)
    assert end in text
    head = token.split(".")[0] + "." + token.split(".")[1]
    assert head not in text and expired.split(".")[1] not in text, text
    assert "<token>" in text or "pg_tenancy.tenant = $1" in text
    assert "bound-secret-91" not in text
    conn.close()


def test_literals_parameters_and_row_values_are_masked_under_a_context(logged):
    app = connect(user=APP)
    m = mark(app)
    run(app, "SELECT tenancy.set_tenant(%s, true)", T)
    run(app, "INSERT INTO app.orders (id, client, item) VALUES (424242, 'Ana Pérez', 'secret-item-77')")
    run(app, "SELECT item FROM app.orders WHERE client = 'Ana Pérez' AND id = 424242")
    # (on a protected table PostgreSQL itself leaves the key out of the detail: row security)
    assert sqlstate_of(app, "INSERT INTO app.orders (id, client, item) VALUES (424242, 'Ana Pérez', 'dup-item-55')") == "23505"
    # a table that is not protected, under the context: the client still gets the values
    run(app, "INSERT INTO app.lg_plain VALUES ('dup-plain-66')")
    with app.cursor() as cur:
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("INSERT INTO app.lg_plain VALUES ('dup-plain-66')")
    assert e.value.pgcode == "23505" and "dup-plain-66" in e.value.diag.message_detail
    run(app, "SELECT tenancy.reset_tenant()")
    end = mark(app)
    text = log_since(m)
    assert end in text
    for secret in ("Ana Pérez", "secret-item-77", "dup-item-55", "424242", "dup-plain-66"):
        assert secret not in text, (secret, text)
    # the lines say which tenant, and keep the statements' shape
    assert f"[tenant={T}] statement: INSERT INTO app.orders (id, client, item) VALUES ($1, $2, $3)" in text, text
    assert "Key (v)=(...) already exists." in text
    assert f"tenant={T}" in text.split("lg_plain_v_key")[1][:400]
    app.close()


def test_a_pooled_connection_back_on_a_tenant_is_logged_as_that_tenant(logged):
    # set_tenant() of a tenant the connection already verified answers from the cache without
    # touching the verified entry; the log lines of the statements after it still name the tenant
    other = TENANTS[7]
    app = connect(user=APP)
    for t in (T, other, T):
        run(app, "BEGIN")
        run(app, "SELECT tenancy.set_tenant(%s)", t)
        run(app, "COMMIT")
    m = mark(app)
    run(app, "SELECT tenancy.set_tenant(%s, true)", other)
    run(app, "SELECT tenancy.set_tenant(%s, true)", T)
    assert sqlstate_of(app, "SELECT 1/0 FROM app.lg_plain WHERE v = 'pool-secret-38'") == "22012"
    run(app, "SELECT tenancy.reset_tenant()")
    end = mark(app)
    text = log_since(m)
    assert end in text
    assert "pool-secret-38" not in text, text
    line = next(l for l in text.splitlines() if "statement: SELECT" in l and "FROM app.lg_plain" in l)
    assert f"[tenant={T}]" in line, (line, text)
    lines = text.splitlines()
    error = next(i for i, l in enumerate(lines) if "ERROR:  division by zero" in l)
    assert lines[error + 1].endswith(f"DETAIL:  tenant={T}"), (lines[error:error + 2], text)
    app.close()


def test_a_session_without_context_on_plain_tables_is_logged_as_is(logged):
    app = connect(user=APP)
    m = mark(app)
    run(app, "INSERT INTO app.lg_plain VALUES ('plain-visible-31')")
    assert sqlstate_of(app, "SELECT 1/0 FROM app.lg_plain WHERE v = 'plain-visible-32'") == "22012"
    end = mark(app)
    text = log_since(m)
    assert end in text
    assert "statement: INSERT INTO app.lg_plain VALUES ('plain-visible-31')" in text
    assert "STATEMENT:  SELECT 1/0 FROM app.lg_plain WHERE v = 'plain-visible-32'" in text
    assert "[tenant=" not in text
    app.close()


def test_contexts_escaped_strings_and_comments_are_masked_too(logged):
    su = logged
    run(su, """CREATE OR REPLACE FUNCTION app.lg_fail() RETURNS int LANGUAGE plpgsql AS $$
               DECLARE x int; BEGIN x := length('ctx-secret-44') / 0; RETURN x; END $$""")
    run(su, f"GRANT EXECUTE ON FUNCTION app.lg_fail() TO {APP}")
    app = connect(user=APP)
    m = mark(app)
    run(app, "SELECT tenancy.set_tenant(%s, true)", T)
    assert sqlstate_of(app, "SELECT app.lg_fail()") == "22012"
    assert sqlstate_of(app, "SELECT '{\"a\": \"json-secret-47\", bad}'::json") == "22P02"
    run(app, "SET standard_conforming_strings = off")
    assert sqlstate_of(app, "INSERT INTO app.orders (client, item) VALUES ('x\\' scs-secret-45 ', 'y') /* cm-secret-46 */") is None
    run(app, "RESET standard_conforming_strings")
    run(app, "SELECT tenancy.reset_tenant()")
    end = mark(app)
    text = log_since(m)
    assert end in text
    for secret in ("ctx-secret-44", "scs-secret-45", "cm-secret-46", "json-secret-47"):
        assert secret not in text, (secret, text)
    app.close()


def test_a_database_not_in_utf8_is_masked_too(database):
    admin = connect(dbname="postgres")
    run(admin, "DROP DATABASE IF EXISTS lg_latin1")
    run(admin, "CREATE DATABASE lg_latin1 TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'")
    admin.close()
    su = connect(dbname="lg_latin1")
    run(su, "CREATE EXTENSION pg_tenancy")
    run(su, "SET log_statement = 'all'")
    m = f"lgmark-{uuid.uuid4().hex}"
    run(su, f"DO $$ BEGIN RAISE LOG '{m}'; END $$")
    token = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnRfaWQiOiJsYXRpbiJ9.c2lnbmF0dXJlLWxhdGluMQ"
    sqlstate_of(su, f"SELECT tenancy.set_tenant_token('{token}') /* é */")
    end = f"lgmark-{uuid.uuid4().hex}"
    run(su, f"DO $$ BEGIN RAISE LOG '{end}'; END $$")
    su.close()
    text = log_since(m)
    assert end in text and "eyJ0ZW5hbnRfaWQiOiJsYXRpbiJ9" not in text
    admin = connect(dbname="postgres")
    run(admin, "DROP DATABASE lg_latin1")
    admin.close()
