"""pgbouncer in transaction pooling mode: many clients switching tenants over a few server
connections; no client ever sees another tenant's row."""
import os
import random
import shutil
import subprocess
import threading
import time

import psycopg2
import pytest

from conftest import APP, DB, PORT, ROOT, SOCK, TENANTS, connect, run, unique

BOUNCER_PORT = PORT + 1000
CLIENTS = 48
TXNS_PER_CLIENT = 100


@pytest.fixture(scope="module")
def bouncer(database):
    d = f"{ROOT}/pgbouncer"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/pgbouncer.ini", "w") as f:
        f.write(f"""[databases]
{DB} = host={SOCK} port={PORT} dbname={DB}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {BOUNCER_PORT}
unix_socket_dir =
auth_type = trust
auth_file = {d}/userlist.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 200
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
    with open(f"{d}/userlist.txt", "w") as f:
        f.write(f'"{APP}" ""\n')
    shutil.chown(d, "postgres", "postgres")
    for name in ("pgbouncer.ini", "userlist.txt"):
        shutil.chown(f"{d}/{name}", "postgres", "postgres")
    proc = subprocess.Popen(["sudo", "-u", "postgres", "/usr/sbin/pgbouncer", f"{d}/pgbouncer.ini"])
    for _ in range(100):
        try:
            psycopg2.connect(host="127.0.0.1", port=BOUNCER_PORT, user=APP, dbname=DB).close()
            break
        except psycopg2.OperationalError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("pgbouncer did not start")
    yield BOUNCER_PORT
    proc.terminate()  # sudo relays the signal to pgbouncer
    proc.wait(timeout=10)


def client(port, errors, stats):
    name = unique("pgb")
    conn = psycopg2.connect(host="127.0.0.1", port=port, user=APP, dbname=DB)
    conn.autocommit = False
    backends = set()
    try:
        with conn.cursor() as cur:
            for i in range(TXNS_PER_CLIENT):
                tenant = random.choice(TENANTS)
                cur.execute("SELECT tenancy.set_tenant(%s), pg_backend_pid()", (tenant,))
                backends.add(cur.fetchone()[1])
                cur.execute("INSERT INTO app.orders (client, item) VALUES (%s, %s)", (name, str(i)))
                cur.execute("SELECT tenant_id, client FROM app.orders WHERE client LIKE 'pgb-%%'")
                for tenant_id, _ in cur.fetchall():
                    if tenant_id != tenant:
                        errors.append(f"{name} in {tenant} saw a row of {tenant_id}")
                conn.commit()
                # now, with no context, on whatever server connection comes next: refused
                try:
                    cur.execute("SELECT count(*) FROM app.orders")
                    errors.append(f"{name} read a protected table with no context: {cur.fetchone()}")
                except psycopg2.Error as e:
                    if e.pgcode != "28000":
                        errors.append(f"{name}: unexpected {e.pgcode}")
                conn.rollback()
        stats.append(len(backends))
    except Exception as e:  # noqa: BLE001
        errors.append(f"{name}: {e!r}")
    finally:
        conn.close()


def test_transaction_pooling_never_leaks(bouncer):
    errors, stats = [], []
    threads = [threading.Thread(target=client, args=(bouncer, errors, stats)) for _ in range(CLIENTS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(stats) == CLIENTS
    # the pool really was shared: clients hopped between server connections
    assert max(stats) > 1
    su = connect()
    total = run(su, "SELECT count(*) FROM app.orders WHERE client LIKE 'pgb-%%'")[0][0]
    su.close()
    assert total == CLIENTS * TXNS_PER_CLIENT


def test_session_scope_is_cleared_by_reset_query(database):
    """Session-scoped contexts are unsafe behind transaction pooling; DISCARD ALL (pgbouncer's
    server_reset_query in session mode) clears them."""
    conn = connect(user=APP)
    run(conn, "SELECT tenancy.set_tenant('t003', session => true)")
    assert run(conn, "SELECT tenancy.current_tenant()") == [("t003",)]
    run(conn, "DISCARD ALL")
    assert run(conn, "SELECT tenancy.has_tenant()") == [(False,)]
    conn.close()


def test_held_cursor_left_on_a_pooled_connection(bouncer, database):
    """A client leaves a WITH HOLD cursor of tenant A on a transaction-pooled server connection
    (no reset between clients); the next clients, through pgbouncer, never read its rows."""
    su = connect()
    run(su, "CREATE TABLE IF NOT EXISTS app.pooled (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(), "
            "id int, secret text, PRIMARY KEY (tenant_id, id))")
    run(su, f"GRANT SELECT, INSERT ON app.pooled TO {APP}")
    run(su, "SELECT count(*) FROM tenancy.protect('app.pooled')")
    su.close()
    a = psycopg2.connect(host="127.0.0.1", port=bouncer, user=APP, dbname=DB)
    a.autocommit = True
    run(a, "BEGIN; SELECT tenancy.set_tenant(%s); "
           "INSERT INTO app.pooled (id, secret) SELECT i, 'a-secret' FROM generate_series(1, 20) i ON CONFLICT DO NOTHING; "
           "DECLARE left_behind CURSOR WITH HOLD FOR SELECT secret FROM app.pooled; COMMIT", TENANTS[0])
    a.close()
    refused = {}
    for i in range(20):
        b = psycopg2.connect(host="127.0.0.1", port=bouncer, user=APP, dbname=DB)
        b.autocommit = True
        try:
            # another tenant's transaction, and a client with no context at all
            sql = ("BEGIN; SELECT tenancy.set_tenant(%s); FETCH ALL FROM left_behind; COMMIT" if i % 2
                   else "FETCH ALL FROM left_behind")
            with b.cursor() as cur:
                cur.execute(sql, (TENANTS[1],) if i % 2 else None)
                raise AssertionError(f"another client fetched the held cursor: {cur.fetchall()!r}")
        except psycopg2.Error as e:
            refused[e.pgcode] = refused.get(e.pgcode, 0) + 1
        finally:
            b.close()
    # 42501 on the connection that holds the cursor, 34000 (no such cursor) on the others
    assert set(refused) <= {"42501", "34000"}, refused
    assert refused.get("42501", 0) > 0, refused
