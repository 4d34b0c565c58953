"""Tenants working at the same time, each on its own connection, never see each other."""
import random
import threading

from conftest import APP, TENANTS, connect, run, sqlstate_of, unique

ROUNDS = 200


def worker(tenant, client, errors, counts):
    conn = connect(user=APP, autocommit=False)
    try:
        with conn.cursor() as cur:
            for i in range(ROUNDS):
                cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
                cur.execute("INSERT INTO app.orders (client, item) VALUES (%s, %s)", (client, f"item{i}"))
                cur.execute("SELECT DISTINCT tenant_id FROM app.orders")
                seen = {r[0] for r in cur.fetchall()}
                if seen != {tenant}:
                    errors.append(f"{client} in {tenant} saw tenants {seen}")
                if random.random() < 0.2:
                    conn.rollback()
                else:
                    conn.commit()
                    counts[client] = counts.get(client, 0) + 1
    except Exception as e:  # noqa: BLE001
        errors.append(f"{client}: {e!r}")
    finally:
        conn.close()


def test_two_tenants_concurrently(database):
    errors, counts = [], {}
    clients = [(TENANTS[0], unique("a")), (TENANTS[1], unique("b")),
               (TENANTS[0], unique("a")), (TENANTS[1], unique("b"))]
    threads = [threading.Thread(target=worker, args=(t, c, errors, counts)) for t, c in clients]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    # every committed row is there, under its own tenant, and nowhere else
    su = connect()
    for tenant, client in clients:
        rows = run(su, "SELECT tenant_id, count(*) FROM app.orders WHERE client = %s GROUP BY 1", client)
        assert rows == [(tenant, counts.get(client, 0))]
    su.close()


def test_context_does_not_survive_the_transaction(database):
    conn = connect(user=APP, autocommit=False)
    with conn.cursor() as cur:
        cur.execute("SELECT tenancy.set_tenant('t002')")
        cur.execute("INSERT INTO app.orders (item) VALUES ('kept')")
        conn.commit()
        cur.execute("SELECT tenancy.has_tenant()")
        assert cur.fetchone() == (False,)
    # a protected table does not answer without a tenant context
    assert sqlstate_of(conn, "SELECT count(*) FROM app.orders") == "28000"
    conn.close()


def test_parallel_query_sees_only_the_tenant(database):
    """Parallel workers get the context from the leader and filter exactly like it."""
    su = connect()
    expected = dict(run(su, "SELECT tenant_id, count(*) FROM app.orders GROUP BY 1"))
    su.close()
    conn = connect(user=APP, autocommit=False)
    with conn.cursor() as cur:
        for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0",
                        "min_parallel_table_scan_size = 0", "enable_indexscan = off",
                        "enable_indexonlyscan = off", "enable_bitmapscan = off",
                        "max_parallel_workers_per_gather = 2"):
            cur.execute("SET " + setting)
        for tenant in TENANTS[:3]:
            cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
            cur.execute("EXPLAIN (COSTS OFF) SELECT tenant_id, count(*) FROM app.orders GROUP BY 1")
            plan = "\n".join(r[0] for r in cur.fetchall())
            assert "Parallel Seq Scan" in plan, plan
            cur.execute("SELECT tenant_id, count(*) FROM app.orders GROUP BY 1")
            assert cur.fetchall() == ([(tenant, expected[tenant])] if tenant in expected else [])
            conn.commit()
    # nor does a parallel scan without a context
    assert sqlstate_of(conn, "SELECT count(*) FROM app.orders") == "28000"
    conn.close()
