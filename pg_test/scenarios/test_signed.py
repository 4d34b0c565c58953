"""Signed mode: every way an application (or SQL injected through it) might forge the context."""
import base64
import json

import psycopg2
import pytest

from conftest import APP, DB, connect, run, sign


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.fixture
def signed(su):
    run(su, f"ALTER DATABASE {DB} SET pg_tenancy.context_mode = 'signed'")
    yield
    run(su, f"ALTER DATABASE {DB} RESET pg_tenancy.context_mode")


def refused(conn, sql, *args):
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args or None)
            if cur.description:
                cur.fetchall()
            cur.execute("SELECT tenancy.current_tenant()")
            got = cur.fetchone()
        return None, got
    except psycopg2.Error as e:
        return e.pgcode, None
    finally:
        conn.rollback()


def test_forgeries_refused(su, signed):
    good = sign(su, '{"tenant_id": "t000", "exp": 4102444800}')
    other = sign(su, '{"tenant_id": "t001", "exp": 4102444800}')
    h, p, s = good.split(".")
    attempts = {
        "expired": sign(su, '{"tenant_id": "t000", "exp": 1000}'),
        "alg none": b64({"alg": "none", "typ": "JWT"}) + "." + p + ".",
        "alg none keeping signature": b64({"alg": "none"}) + "." + p + "." + s,
        "alg HS512": b64({"alg": "HS512"}) + "." + p + "." + s,
        "alg RS256": b64({"alg": "RS256"}) + "." + p + "." + s,
        "tampered payload": h + "." + other.split(".")[1] + "." + s,
        "wrong secret": None,  # filled below
        "no signature": h + "." + p + ".",
        "truncated": good[:-5],
        "padding added": good + "==",
    }
    run(su, "SET pg_tenancy.jwt_secret = 'a-completely-different-secret-of-enough-length'")
    attempts["wrong secret"] = sign(su, '{"tenant_id": "t000", "exp": 4102444800}')
    run(su, "RESET pg_tenancy.jwt_secret")

    app = connect(user=APP)
    assert run(app, "SHOW pg_tenancy.context_mode") == [("signed",)]
    for name, token in attempts.items():
        code, got = refused(app, "SELECT tenancy.set_tenant_token(%s)", token)
        assert code == "28P01", f"{name}: {code} {got}"
        code, got = refused(app, "SET LOCAL pg_tenancy.tenant = %s", token)
        assert code == "28P01", f"SET LOCAL {name}: {code} {got}"
    # every other way in
    for sql in ["SELECT tenancy.set_tenant('t000')",
                "SET LOCAL pg_tenancy.tenant = 't000'",
                "SET pg_tenancy.tenant = 't000'",
                "SELECT set_config('pg_tenancy.tenant', 't000', false)",
                "SELECT set_config('pg_tenancy.tenant', 't000', true)"]:
        code, got = refused(app, sql)
        assert code == "42501", f"{sql}: {code} {got}"
    for sql in ["SET pg_tenancy.context_mode = 'open'",
                "RESET pg_tenancy.context_mode",
                "SET pg_tenancy.jwt_secret = 'attacker-attacker-attacker-attacker-1'",
                "SET pg_tenancy.jwt_leeway = 300",
                "SET pg_tenancy.tenant_claim = 'sub'",
                "ALTER ROLE scn_app SET pg_tenancy.context_mode = 'open'"]:
        code, _ = refused(app, sql)
        assert code == "42501", f"{sql}: {code}"
    # RESET of the context only clears it
    code, _ = refused(app, "RESET pg_tenancy.tenant")
    assert code == "28000"
    # the genuine token works, through the function and as a plain SET LOCAL
    assert refused(app, "SELECT tenancy.set_tenant_token(%s)", good) == (None, ("t000",))
    assert refused(app, "SET LOCAL pg_tenancy.tenant = %s", good) == (None, ("t000",))
    app.close()


def test_sql_injection_cannot_switch_tenant(su, signed):
    """An application that splices user input into SQL still cannot change tenant."""
    good = sign(su, '{"tenant_id": "t004", "exp": 4102444800}')
    run(su, "SELECT tenancy.set_tenant('t005'); INSERT INTO app.orders (tenant_id, item) VALUES ('t005', 'secret')")
    app = connect(user=APP)
    app.autocommit = False
    with app.cursor() as cur:
        cur.execute("SELECT tenancy.set_tenant_token(%s)", (good,))
    payloads = [
        "x'; SELECT set_config('pg_tenancy.tenant', 't005', true); SELECT item FROM app.orders WHERE item = 'secret",
        "x'; SET LOCAL pg_tenancy.tenant = 't005'; SELECT item FROM app.orders WHERE item = 'secret",
        "x'; SELECT tenancy.set_tenant('t005'); SELECT item FROM app.orders WHERE item = 'secret",
        "x' UNION SELECT item FROM app.orders WHERE tenant_id = 't005' AND item = 'secret",
    ]
    for payload in payloads:
        leaked = []
        try:
            with app.cursor() as cur:
                cur.execute("SAVEPOINT attempt")
                cur.execute("SELECT item FROM app.orders WHERE item = '" + payload + "'")
                leaked = cur.fetchall()
                cur.execute("RELEASE SAVEPOINT attempt")
        except psycopg2.Error:
            with app.cursor() as cur:
                cur.execute("ROLLBACK TO SAVEPOINT attempt")
        assert ("secret",) not in leaked, payload
        with app.cursor() as cur:
            cur.execute("SELECT tenancy.current_tenant()")
            assert cur.fetchone() == ("t004",), payload
    app.rollback()
    app.close()
