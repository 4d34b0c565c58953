"""Known ways around row level security, tried by the application role (no superuser, no
BYPASSRLS, not the owner) against a protected table holding two tenants' rows. None may show,
change or remove the other tenant's rows."""
import psycopg2
import pytest

from conftest import APP, TENANTS, connect, run, sqlstate_of

A, B = TENANTS[2], TENANTS[3]


@pytest.fixture
def rows(su):
    """Each tenant's own rows in app.orders, removed afterwards."""
    app = connect(user=APP)
    for t, items in ((A, ["1", "2"]), (B, ["abc", "victim-secret"])):
        run(app, "BEGIN; SELECT tenancy.set_tenant(%s); "
                 "INSERT INTO app.orders (client, item) SELECT 'attack', unnest(%s::text[]); COMMIT", t, items)
    ids = {t: [r[0] for r in run(su, "SELECT id FROM app.orders WHERE tenant_id = %s AND client = 'attack' ORDER BY id", t)]
           for t in (A, B)}
    yield ids
    run(su, "DELETE FROM app.orders WHERE client IN ('attack', 'merge-attacker')")
    app.close()


def in_tenant(tenant):
    conn = connect(user=APP, autocommit=False)
    with conn.cursor() as cur:
        cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
    return conn


def b_rows_intact(su, ids):
    got = run(su, "SELECT id, item FROM app.orders WHERE tenant_id = %s AND client = 'attack' ORDER BY id", B)
    return got == list(zip(ids[B], ["abc", "victim-secret"]))


def test_merge_cannot_reach_another_tenant(su, rows):
    conn = in_tenant(A)
    try:
        victim = rows[B][0]
        with conn.cursor() as cur:
            # MATCHED on the other tenant's key: invisible, so NOT MATCHED inserts a row for B: refused
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("MERGE INTO app.orders t USING (SELECT %s::text AS tenant_id, %s::bigint AS id) s "
                            "ON t.tenant_id = s.tenant_id AND t.id = s.id "
                            "WHEN MATCHED THEN UPDATE SET item = 'pwned' "
                            "WHEN NOT MATCHED THEN INSERT (tenant_id, client, item) VALUES (s.tenant_id, 'merge-attacker', 'pwned')",
                            (B, victim))
            assert e.value.pgcode == "42501"
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT tenancy.set_tenant(%s)", (A,))
            cur.execute("MERGE INTO app.orders t USING (SELECT unnest(%s::bigint[]) AS id) s ON t.id = s.id "
                        "WHEN MATCHED THEN DELETE", (rows[B],))
            assert cur.rowcount == 0
            # moving one's own row to the other tenant
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("MERGE INTO app.orders t USING (SELECT %s::bigint AS id) s ON t.id = s.id "
                            "WHEN MATCHED THEN UPDATE SET tenant_id = %s", (rows[A][0], B))
            assert e.value.pgcode == "42501"
        conn.rollback()
    finally:
        conn.close()
    assert b_rows_intact(su, rows)


def test_leaky_function_sees_only_own_rows(su, rows):
    """A cheap, non-leakproof function in WHERE runs after the policy, never on other rows."""
    conn = in_tenant(A)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE FUNCTION pg_temp.leak(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 "
                        "AS $$ BEGIN RAISE NOTICE 'saw %', $1; RETURN true; END $$")
            conn.notices.clear()
            cur.execute("SELECT count(*) FROM app.orders WHERE pg_temp.leak(item) AND client = 'attack'")
            assert cur.fetchone()[0] == 2
        seen = "".join(conn.notices)
        assert "saw 1" in seen and "saw 2" in seen
        assert "victim-secret" not in seen and "abc" not in seen
        conn.rollback()
    finally:
        conn.close()


def test_error_oracle_on_casts(su, rows):
    """A cast that would fail on the other tenant's values never meets them."""
    conn = in_tenant(A)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM app.orders WHERE client = 'attack' AND item::int > 0")
            assert cur.fetchone()[0] == 2
            cur.execute("SELECT count(*) FROM app.orders WHERE client = 'attack' AND 1 / (length(item) - 3) = 0")
            assert cur.fetchone()[0] == 2   # 'abc' (length 3) would divide by zero
        conn.rollback()
    finally:
        conn.close()


def test_row_security_off_copy_and_statistics(su, rows):
    run(su, "ANALYZE app.orders")
    conn = in_tenant(A)
    try:
        with conn.cursor() as cur:
            # turning row security off is refused rather than silently filtered
            cur.execute("SET LOCAL row_security = off")
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT count(*) FROM app.orders")
            assert e.value.pgcode == "42501"
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT tenancy.set_tenant(%s)", (A,))
            out = []

            class Sink:
                def write(self, data):
                    out.append(data.decode() if isinstance(data, bytes) else data)

            cur.copy_expert("COPY (SELECT tenant_id, item FROM app.orders WHERE client = 'attack') TO STDOUT", Sink())
            text = "".join(out)
            assert B not in text and "victim-secret" not in text and text.count("\n") == 2
            cur.copy_expert("COPY app.orders TO STDOUT", Sink())
            assert "victim-secret" not in "".join(out)
        conn.rollback()
        # column statistics (most common values, histograms) are not PUBLIC's in a database with
        # pg_tenancy (an expression index's statistics sample every tenant's values)
        assert sqlstate_of(conn, "SELECT count(*) FROM pg_stats WHERE schemaname = 'app' AND tablename = 'orders'") == "42501"
    finally:
        conn.close()
    assert run(su, "SELECT count(*) FROM pg_stats WHERE schemaname = 'app' AND tablename = 'orders'")[0][0] > 0
