"""The denial log under load, across a restart, when its queue overflows, and without preload."""
import os
import subprocess
import threading
import time

import psycopg2
import pytest

from conftest import APP, PORT, ROOT, TENANTS, connect, run, sqlstate_of, unique

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(REPO, "scripts", "cluster.sh")


def status(conn):
    cols = ("queued", "capacity", "recorded", "written", "overflowed", "discarded")
    row = run(conn, f"SELECT {', '.join(cols)} FROM tenancy.audit_status()")[0]
    return dict(zip(cols, row))


def wait_drained(conn, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run(conn, "SELECT queued_here FROM tenancy.audit_status()")[0][0] == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the audit queue did not drain")


def max_id(conn):
    return run(conn, "SELECT coalesce(max(id), 0) FROM tenancy.audit_log")[0][0]


def test_ten_thousand_refused_writes_from_eight_sessions(su):
    """Exactly one row per refused write, each visible within a second of its abort."""
    wait_drained(su)
    start = max_id(su)
    log_offset = os.path.getsize(f"{ROOT}/server.log")
    marker = unique("burst")
    per_session, sessions = 1250, 8
    aborts, errors = [], []
    lock = threading.Lock()

    def attack(n):
        conn = connect(user=APP, autocommit=False)
        mine, other = TENANTS[n % len(TENANTS)], TENANTS[(n + 1) % len(TENANTS)]
        local = []
        try:
            with conn.cursor() as cur:
                for i in range(per_session):
                    cur.execute("SELECT tenancy.set_tenant(%s)", (mine,))
                    try:
                        cur.execute("INSERT INTO app.orders (tenant_id, client, item) VALUES (%s, %s, 'x')",
                                    (other, marker))
                        errors.append("a cross-tenant write was accepted")
                    except psycopg2.errors.InsufficientPrivilege:
                        pass
                    conn.rollback()
                    local.append(time.time())
        finally:
            conn.close()
        with lock:
            aborts.extend(local)

    # observe the log's row count while the attack runs
    seen = []
    done = threading.Event()

    def watch():
        conn = connect()
        while not done.is_set():
            n = run(conn, "SELECT count(*) FROM tenancy.audit_log WHERE id > %s AND event = 'cross_tenant_write' "
                          "AND role = %s", start, APP)[0][0]
            seen.append((time.time(), n))
            if n >= per_session * sessions:
                break
            time.sleep(0.02)
        conn.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=attack, args=(n,)) for n in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    watcher.join(timeout=60)
    done.set()
    assert not errors
    total = per_session * sessions
    assert len(aborts) == total
    wait_drained(su)
    time.sleep(0.3)
    rows = run(su, "SELECT count(*), count(DISTINCT backend_pid), max(written_at - at) < interval '1 second' "
                   "FROM tenancy.audit_log WHERE id > %s AND event = 'cross_tenant_write' AND role = %s",
               start, APP)[0]
    assert rows[0] == total, f"{rows[0]} rows for {total} refused writes"
    assert rows[1] == sessions
    assert rows[2], "an event took a second or more to be written"
    # the k-th abort (in time) must be visible once k rows are: the queue is written in order
    aborts.sort()
    worst, j = 0.0, 0
    for k, t_abort in enumerate(aborts, start=1):
        while j < len(seen) and seen[j][1] < k:
            j += 1
        assert j < len(seen), "the watcher stopped before every row was visible"
        worst = max(worst, seen[j][0] - t_abort)
    print(f"\n10,000 refused writes: worst abort-to-visible {worst * 1000:.0f} ms")
    assert worst < 1.0, f"an event became visible {worst:.3f} s after its abort"
    # one structured server-log line per event, without the rows' values
    with open(f"{ROOT}/server.log", errors="replace") as f:
        f.seek(log_offset)
        lines = [l for l in f if "pg_tenancy audit: " in l and '"event":"cross_tenant_write"' in l
                 and f'"role":"{APP}"' in l]
    assert len(lines) == total
    assert not any(marker in l for l in lines)
    # nothing of the rows leaked into the log table either
    leaked = run(su, "SELECT count(*) FROM tenancy.audit_log WHERE id > %s AND "
                     "concat_ws(' ', detail, attempted_tenant, relation, command) LIKE %s",
                 start, f"%{marker}%")[0][0]
    assert leaked == 0


def test_overflow_counts_and_logs_never_blocks(su, app):
    """With the writer stuck behind a lock, a full queue overflows to the server log, counted."""
    wait_drained(su)
    cap = status(su)["capacity"]
    n = cap + 500
    holder = connect(autocommit=False)
    run(holder, "LOCK TABLE tenancy.audit_log IN ACCESS EXCLUSIVE MODE")
    try:
        before = status(su)
        run(app, "SET statement_timeout = '120s'")
        t0 = time.time()
        run(app, f"""DO $$ BEGIN
                       FOR i IN 1 .. {n} LOOP
                         BEGIN
                           PERFORM tenancy.set_tenant('no-such-tenant-ovf');
                         EXCEPTION WHEN insufficient_privilege THEN NULL;
                         END;
                       END LOOP;
                     END $$""")
        elapsed = time.time() - t0
        during = status(su)
        assert during["queued"] <= cap
        overflowed = during["overflowed"] - before["overflowed"]
        assert overflowed >= n - cap
        assert elapsed < 60, "recording blocked the backend"
    finally:
        holder.rollback()
        holder.close()
    wait_drained(su)
    after = status(su)
    written = after["written"] - before["written"]
    assert written + (after["overflowed"] - before["overflowed"]) == n
    # every overflowed event is in the server log, marked
    with open(f"{ROOT}/server.log", errors="replace") as f:
        full = sum(1 for line in f if "queue full" in line and "no-such-tenant-ovf" in line)
    assert full >= overflowed


def test_queued_events_survive_a_clean_restart(su, app):
    """A clean shutdown writes what is still queued before the writer exits."""
    wait_drained(su)
    tag = unique("rst")
    holder = connect(autocommit=False)
    run(holder, "LOCK TABLE tenancy.audit_log IN ACCESS EXCLUSIVE MODE")
    for _ in range(5):
        assert sqlstate_of(app, "SELECT tenancy.set_tenant(%s)", tag) == "42501"
    assert status(su)["queued"] >= 5
    su.close()
    app.close()
    subprocess.run([CLUSTER, "restart"], check=True, capture_output=True)
    try:
        holder.close()
    except psycopg2.Error:
        pass
    conn = connect()
    n = run(conn, "SELECT count(*) FROM tenancy.audit_log WHERE attempted_tenant = %s", tag)[0][0]
    conn.close()
    assert n == 5


def test_without_preload_nothing_is_served_and_errors_say_why(tmp_path):
    """Loaded late (at its first function call), pg_tenancy would have missed statements and
    settings it must see: it refuses to act on a tenant context, and says why."""
    root, port = "/tmp/pg_tenancy_nopreload", PORT - 1
    env = dict(os.environ, PGT_ROOT=root, PGT_PORT=str(port), PGT_PRELOAD="0")
    subprocess.run([CLUSTER, "destroy"], env=env, check=True, capture_output=True)
    subprocess.run([CLUSTER, "start"], env=env, check=True, capture_output=True)
    try:
        conn = connect(dbname="postgres", host=f"{root}/sock", port=port)
        run(conn, "CREATE EXTENSION pg_tenancy")
        for fn in ("SELECT * FROM tenancy.audit_status()", "SELECT tenancy.prune_audit('1 day')"):
            try:
                run(conn, fn)
                raise AssertionError(f"{fn} worked without preload")
            except psycopg2.Error as e:
                assert e.pgcode == "55000"
                assert "shared_preload_libraries" in e.pgerror
        findings = run(conn, "SELECT severity, object FROM tenancy.check() WHERE severity = 'ERROR'")
        assert ("ERROR", "setting shared_preload_libraries") in findings
        run(conn, "CREATE ROLE np_app")
        run(conn, "SELECT tenancy.create_tenant('np-a', 'A'), tenancy.create_tenant('np-b', 'B')")
        run(conn, "SELECT tenancy.grant_tenant('np_app', 'np-a', 'read_write')")
        run(conn, "CREATE TABLE np (tenant_id text NOT NULL, v int)")
        run(conn, "SELECT count(*) FROM tenancy.protect('np')")
        run(conn, "INSERT INTO np VALUES ('np-a', 1), ('np-b', 2)")
        run(conn, "GRANT SELECT, INSERT ON np TO np_app")
        run(conn, "SET ROLE np_app")
        assert sqlstate_of(conn, "SELECT * FROM np") == "28000"
        for sql in ("SELECT tenancy.set_tenant('np-a')", "SET pg_tenancy.tenant = 'np-a'"):
            with conn.cursor() as cur:
                with pytest.raises(psycopg2.Error) as e:
                    cur.execute(sql)
            assert e.value.pgcode == "55000" and "shared_preload_libraries" in e.value.pgerror, sql
        # still nothing readable, by any route
        assert sqlstate_of(conn, "SELECT * FROM np") == "28000"
        assert sqlstate_of(conn, "SELECT count(*) FROM np") == "28000"
        conn.close()
    finally:
        subprocess.run([CLUSTER, "destroy"], env=env, check=True, capture_output=True)


def test_probe_recorded_once_under_parallel_query(su):
    """Parallel workers re-check the leader's plan; the probe is still one event."""
    wait_drained(su)
    start = max_id(su)
    conn = connect(user=APP, autocommit=False)
    try:
        with conn.cursor() as cur:
            for setting in ("parallel_setup_cost = 0", "parallel_tuple_cost = 0",
                            "min_parallel_table_scan_size = 0", "enable_indexscan = off",
                            "enable_indexonlyscan = off", "enable_bitmapscan = off",
                            "max_parallel_workers_per_gather = 2"):
                cur.execute(f"SET {setting}")
            cur.execute("SELECT tenancy.set_tenant(%s)", (TENANTS[0],))
            query = "SELECT tenant_id, count(*) FROM app.orders WHERE tenant_id IN (%s, %s) GROUP BY 1"
            cur.execute("EXPLAIN (COSTS OFF) " + query, (TENANTS[0], TENANTS[1]))
            plan = "\n".join(r[0] for r in cur.fetchall())
            assert "Parallel Seq Scan" in plan, plan
            cur.execute(query, (TENANTS[0], TENANTS[1]))
            assert all(row[0] == TENANTS[0] for row in cur.fetchall())
    finally:
        conn.rollback()
        conn.close()
    wait_drained(su)
    rows = run(su, "SELECT event, attempted_tenant, relation FROM tenancy.audit_log WHERE id > %s AND role = %s",
               start, APP)
    assert rows == [("cross_tenant_probe", TENANTS[1], "app.orders")]
