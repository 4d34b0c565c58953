"""EXPLAIN ANALYZE is not an oracle on other tenants' rows.

With an index on a searched column and the other scans disabled, the tenant filter runs after
the index scan, and "Rows Removed by Filter" counts the other tenants' rows in the searched
range: a binary search over it recovers their values. For roles subject to the policies, EXPLAIN
ANALYZE of a statement on a protected table is refused (42501, recorded as cross_tenant_probe)
by default, or, with pg_tenancy.explain_analyze = 'hide', runs with every counter that could
describe other tenants' rows zeroed.
"""
import time

import pytest

from conftest import APP, TENANTS, connect, run, sqlstate_of

A, B = TENANTS[7], TENANTS[8]


@pytest.fixture(scope="module")
def amounts(database):
    su = connect()
    run(su, "CREATE TABLE app.ex_pay (tenant_id text NOT NULL, id int, amount int, email text)")
    run(su, "SELECT count(*) FROM tenancy.protect('app.ex_pay')")
    run(su, "CREATE INDEX ON app.ex_pay (amount)")
    run(su, f"GRANT SELECT ON app.ex_pay TO {APP}")
    run(su, "INSERT INTO app.ex_pay SELECT %s, g, g, 'a' || g || '@x' FROM generate_series(1, 50) g", A)
    run(su, "INSERT INTO app.ex_pay SELECT %s, g, 1000 + g, 'b' || g || '@x' FROM generate_series(1, 200) g", B)
    run(su, "ANALYZE app.ex_pay")
    run(su, """CREATE FUNCTION app.ex_threshold() RETURNS int LANGUAGE plpgsql STABLE AS $$
               BEGIN RETURN (SELECT count(*) FROM pg_catalog.pg_am)::int - 100; END $$""")
    run(su, f"GRANT EXECUTE ON FUNCTION app.ex_threshold() TO {APP}")
    yield su
    su.close()


def app_in(tenant):
    conn = connect(user=APP)
    run(conn, "SELECT tenancy.set_tenant(%s, true)", tenant)
    run(conn, "SET enable_seqscan = off")
    run(conn, "SET enable_bitmapscan = off")
    return conn


ORACLE = "SELECT * FROM app.ex_pay WHERE amount > 1100"


def test_explain_analyze_is_refused_and_recorded(amounts):
    su = amounts
    since = run(su, "SELECT coalesce(max(id), 0) FROM tenancy.audit_log")[0][0]
    conn = app_in(A)
    try:
        for sql in [f"EXPLAIN ANALYZE {ORACLE}", f"EXPLAIN (ANALYZE, TIMING off) {ORACLE}",
                    f"EXPLAIN (ANALYZE true, BUFFERS) {ORACLE}", f"EXPLAIN (ANALYZE on, FORMAT json) {ORACLE}",
                    # a stable function folded while planning runs its own query first
                    "EXPLAIN ANALYZE SELECT * FROM app.ex_pay WHERE amount > app.ex_threshold()"]:
            assert sqlstate_of(conn, sql) == "42501", sql
        run(conn, f"PREPARE p AS {ORACLE}")
        assert sqlstate_of(conn, "EXPLAIN ANALYZE EXECUTE p") == "42501"
        assert sqlstate_of(conn, f"DO $$ BEGIN EXECUTE 'EXPLAIN ANALYZE {ORACLE}'; END $$") == "42501"
        # EXPLAIN without ANALYZE runs nothing and still works, and so does the statement itself
        plan = "\n".join(r[0] for r in run(conn, f"EXPLAIN {ORACLE}"))
        assert "Index Scan" in plan
        assert "\n".join(r[0] for r in run(conn, f"EXPLAIN (ANALYZE false) {ORACLE}"))
        assert run(conn, ORACLE) == []
        # a refused EXPLAIN leaves nothing pending: the next statements are plain
        assert run(conn, "SELECT count(*) FROM app.ex_pay") == [(50,)]
    finally:
        conn.close()
    deadline = time.time() + 10
    n = 0
    while time.time() < deadline:
        n = run(su, "SELECT count(*) FROM tenancy.audit_log WHERE id > %s AND event = 'cross_tenant_probe' "
                    "AND relation = 'app.ex_pay' AND detail LIKE 'EXPLAIN ANALYZE%%'", since)[0][0]
        if n >= 7:
            break
        time.sleep(0.05)
    assert n == 7


def test_hide_mode_shows_no_counts_of_other_tenants(amounts):
    su = connect()
    try:
        run(su, "SET pg_tenancy.explain_analyze = 'hide'")
        run(su, f"SET ROLE {APP}")
        run(su, "SELECT tenancy.set_tenant(%s, true)", A)
        run(su, "SET enable_seqscan = off")
        run(su, "SET enable_bitmapscan = off")
        # (what planning read is the catalogs', and is left as it is)
        out = "\n".join(r[0] for r in run(su, f"EXPLAIN (ANALYZE, BUFFERS) {ORACLE}")).split("Planning")[0]
        assert "Index Scan" in out and "actual" in out, out
        assert "Rows Removed" not in out and "Buffers:" not in out and "Heap Fetches" not in out, out
        out = "\n".join(r[0] for r in run(su, "EXPLAIN (ANALYZE, BUFFERS) SELECT count(*) FROM app.ex_pay "
                                               "WHERE amount > 10")).split("Planning")[0]
        assert "Rows Removed" not in out and "shared hit" not in out, out
    finally:
        su.close()


def test_roles_that_bypass_row_security_keep_explain_analyze(amounts):
    out = "\n".join(r[0] for r in run(amounts, f"EXPLAIN ANALYZE {ORACLE}"))
    assert "actual" in out
