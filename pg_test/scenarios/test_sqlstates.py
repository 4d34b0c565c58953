"""Every documented refusal comes with its documented SQLSTATE, seen through a real driver."""
import pytest

from conftest import APP, connect, run, sign, sqlstate_of

CASES = [
    # (name, statements run in one transaction by the app role, expected SQLSTATE)
    ("no context on a protected table", ["SELECT * FROM app.orders"], "28000"),
    ("no context, plan never reads a row", ["SELECT * FROM app.orders WHERE false"], "28000"),
    ("no context on insert", ["INSERT INTO app.orders (item) VALUES ('x')"], "28000"),
    ("current_tenant without context", ["SELECT tenancy.current_tenant()"], "28000"),
    ("tenant not granted", ["SELECT tenancy.set_tenant('nosuch')"], "42501"),
    ("malformed tenant id", ["SELECT tenancy.set_tenant('a b')"], "22023"),
    ("null tenant", ["SELECT tenancy.set_tenant(NULL)"], "22023"),
    ("raw SET of an ungranted tenant", ["SET LOCAL pg_tenancy.tenant = 'nosuch'"], "42501"),
    ("set_config of an ungranted tenant", ["SELECT set_config('pg_tenancy.tenant', 'nosuch', true)"], "42501"),
    ("cross-tenant insert", ["SELECT tenancy.set_tenant('t000')",
                             "INSERT INTO app.orders (tenant_id, item) VALUES ('t001', 'x')"], "42501"),
    ("cross-tenant update", ["SELECT tenancy.set_tenant('t000')",
                             "INSERT INTO app.orders (item) VALUES ('x')",
                             "UPDATE app.orders SET tenant_id = 't001'"], "42501"),
    ("truncate", ["TRUNCATE app.orders"], "42501"),
    ("malformed token", ["SELECT tenancy.set_tenant_token('abc')"], "28P01"),
    ("reserved prefix typo", ["SET pg_tenancy.tennant = 'x'"], "42602"),
    ("app cannot relax the mode", ["SET pg_tenancy.context_mode = 'open'"], "42501"),
    ("app cannot read the catalog", ["SELECT * FROM tenancy.tenants"], "42501"),
    ("app cannot grant itself", ["SELECT tenancy.grant_tenant('scn_app', '*', 'admin')"], "42501"),
    ("app cannot unprotect", ["SELECT tenancy.unprotect('app.orders')"], "42501"),
    ("app cannot mint tokens", ["SELECT tenancy._sign_token('{}')"], "42501"),
    ("app cannot protect a table it does not own", ["SELECT tenancy.protect('app.orders')"], "42501"),
]


@pytest.mark.parametrize("name,statements,state", CASES, ids=[c[0] for c in CASES])
def test_sqlstate(database, name, statements, state):
    conn = connect(user=APP, autocommit=False)
    try:
        got = None
        with conn.cursor() as cur:
            for sql in statements:
                try:
                    cur.execute(sql)
                except Exception as e:  # noqa: BLE001 - we want the SQLSTATE
                    got = e.pgcode
                    break
        assert got == state, f"{name}: expected {state}, got {got}"
    finally:
        conn.rollback()
        conn.close()


def test_status_sqlstates(su, app):
    run(su, "SELECT tenancy.create_tenant('st_ro', 'ro'), tenancy.create_tenant('st_susp', 's')")
    run(su, "SELECT tenancy.grant_tenant('scn_app', 'st_ro'), tenancy.grant_tenant('scn_app', 'st_susp')")
    run(su, "SELECT tenancy.set_status('st_ro', 'read_only'), tenancy.set_status('st_susp', 'suspended')")
    app.autocommit = False
    with app.cursor() as cur:
        cur.execute("SELECT tenancy.set_tenant('st_ro')")
        cur.execute("SELECT count(*) FROM app.orders")
        assert cur.fetchone() == (0,)
    assert sqlstate_of(app, "SELECT tenancy.set_tenant('st_ro'); INSERT INTO app.orders (item) VALUES ('x')") == "25006"
    assert sqlstate_of(app, "SELECT tenancy.set_tenant('st_susp')") == "55000"
    run(su, "SELECT tenancy.grant_tenant('scn_app', 't009', 'read')")
    try:
        assert sqlstate_of(app, "SELECT tenancy.set_tenant('t009'); DELETE FROM app.orders") == "42501"
    finally:
        run(su, "SELECT tenancy.grant_tenant('scn_app', 't009', 'read_write')")


def test_token_sqlstates(su, app):
    expired = sign(su, '{"tenant_id": "t000", "exp": 1000}')
    nosecret_ok = sign(su, '{"tenant_id": "t000", "exp": 4102444800}')
    app.autocommit = False
    assert sqlstate_of(app, "SELECT tenancy.set_tenant_token(%s)", expired) == "28P01"
    assert sqlstate_of(app, "SELECT tenancy.set_tenant_token(%s)", nosecret_ok) is None


def test_context_from_connection_options(database):
    """A context given at connection start (PGOPTIONS) is verified when it is first used."""
    conn = connect(user=APP, options="-c pg_tenancy.tenant=t007")
    assert run(conn, "SELECT tenancy.current_tenant()") == [("t007",)]
    conn.close()
    conn = connect(user="scn_other", options="-c pg_tenancy.tenant=t007")
    assert sqlstate_of(conn, "SELECT count(*) FROM app.orders") == "42501"
    assert sqlstate_of(conn, "SELECT tenancy.current_tenant()") == "42501"
    conn.close()
