"""Tenant backups and selective restore: round trips, streamed archives, every named verification
failure, restores while other tenants write, and a kill -9 in the middle of a restore.

Backups are a superuser's job; the application role may call none of it. Each scenario checks
the other tenants' rows (a checksum per table and tenant) before and after.
"""
import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg2
import pytest

from conftest import APP, DB, OWNER, PORT, ROOT, SOCK, connect, new_key_file, run, sqlstate_of, wait_for_server

BACKUP_DIR = f"{ROOT}/backups"
TABLES = ["app.bk_orders", "app.bk_lines", "app.bk_events"]


def checksums(conn):
    """{(table, tenant): (rows, md5 of the rows)} over the backup test tables."""
    out = {}
    for t in TABLES:
        for tenant, n, digest in run(
                conn, f"SELECT tenant_id, count(*), md5(string_agg(x::text, '|' ORDER BY x::text)) FROM {t} x GROUP BY 1"):
            out[(t, tenant)] = (n, digest)
    return out


def of(sums, tenant):
    return {k: v for k, v in sums.items() if k[1] == tenant}


def others(sums, tenant):
    return {k: v for k, v in sums.items() if k[1] != tenant}


@pytest.fixture(scope="module")
def bk(database):
    os.makedirs(BACKUP_DIR, exist_ok=True)
    shutil.chown(BACKUP_DIR, "postgres", "postgres")
    su = connect()
    for t in ("bk-a", "bk-b", "bk-c", "bk-shred"):
        run(su, "SELECT tenancy.create_tenant(%s, %s) WHERE NOT EXISTS (SELECT FROM tenancy.tenants WHERE id = %s)", t, t, t)
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", APP, t)
    own = connect(user=OWNER)
    run(own, """CREATE TABLE IF NOT EXISTS app.bk_orders (
                    tenant_id text NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY, item text,
                    weight numeric GENERATED ALWAYS AS (length(item) * 2) STORED, PRIMARY KEY (tenant_id, id))""")
    run(own, """CREATE TABLE IF NOT EXISTS app.bk_lines (
                    tenant_id text NOT NULL, order_id bigint, n int, note text,
                    FOREIGN KEY (tenant_id, order_id) REFERENCES app.bk_orders (tenant_id, id))""")
    run(own, """CREATE TABLE IF NOT EXISTS app.bk_events (tenant_id text NOT NULL, at date NOT NULL, what jsonb)
                PARTITION BY RANGE (at)""")
    run(own, "CREATE TABLE IF NOT EXISTS app.bk_events_1 PARTITION OF app.bk_events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    run(own, "CREATE TABLE IF NOT EXISTS app.bk_events_2 PARTITION OF app.bk_events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
    for t in TABLES:
        run(own, f"SELECT count(*) FROM tenancy.protect('{t}', create_index => true)")
        run(own, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {t} TO {APP}")
    for tenant, n in (("bk-a", 3000), ("bk-b", 2000), ("bk-c", 500), ("bk-shred", 10)):
        run(su, """INSERT INTO app.bk_orders (tenant_id, item)
                   SELECT %s, 'item ' || i || E' with\\nnewline, "quotes", \\\\ and ''ticks''' FROM generate_series(1, %s) i""",
            tenant, n)
        run(su, "INSERT INTO app.bk_lines SELECT tenant_id, id, 1, NULL FROM app.bk_orders WHERE tenant_id = %s", tenant)
        run(su, """INSERT INTO app.bk_events SELECT %s, date '2026-06-01' + (i %% 400), jsonb_build_object('i', i, 'f', i / 7.0)
                   FROM generate_series(1, %s) i""", tenant, n)
    own.close()
    su.close()
    yield


def backup_conn():
    conn = connect()
    run(conn, f"SET pg_tenancy.backup_dir = '{BACKUP_DIR}'")
    return conn


def test_round_trip_restores_exactly_and_touches_no_other_tenant(bk):
    su = backup_conn()
    before = checksums(su)
    b = run(su, "SELECT tenancy.backup('bk-a')")[0][0]
    row = run(su, "SELECT tenant, kind, tables, row_count, key_version IS NOT NULL, location FROM tenancy.backups WHERE id = %s", b)[0]
    assert row[:3] == ("bk-a", "full", run(su, "SELECT count(*) FROM tenancy.protected_tables p JOIN pg_class c ON c.oid = p.rel WHERE NOT c.relispartition")[0][0])
    assert row[4] is True and row[5].startswith(BACKUP_DIR + "/tenant-bk-a/")
    # the archive holds no plaintext of the rows
    with open(row[5]) as f:
        text = f.read()
    assert "newline" not in text and "quotes" not in text
    assert run(su, "SELECT (tenancy.verify_backup(%s))->>'rows'", b)[0][0] == str(row[3])
    # damage: updates, deletes, inserts of that tenant
    run(su, "DELETE FROM app.bk_lines WHERE tenant_id = 'bk-a' AND order_id % 3 = 0")
    run(su, "UPDATE app.bk_orders SET item = 'damaged' WHERE tenant_id = 'bk-a'")
    run(su, "INSERT INTO app.bk_orders (tenant_id, item) VALUES ('bk-a', 'after the backup')")
    run(su, "DELETE FROM app.bk_events WHERE tenant_id = 'bk-a' AND at > '2027-01-01'")
    assert of(checksums(su), "bk-a") != of(before, "bk-a")
    report = run(su, "CALL tenancy.restore('bk-a', %s)", b)[0][0]
    assert report["mode"] == "replace" and set(report["seconds"]) >= {"pause", "wait_for_writers", "stage_and_verify", "swap", "resume"}
    after = checksums(su)
    assert of(after, "bk-a") == of(before, "bk-a")
    assert others(after, "bk-a") == others(before, "bk-a")
    assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-a'") == [("active",)]
    assert run(su, "SELECT state FROM tenancy.restores WHERE backup = %s", b) == [("done",)]
    assert run(su, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenancy\\_restore\\_%%'") == [(0,)]
    # recorded in the audit log (the writer is asynchronous)
    for _ in range(100):
        if run(su, "SELECT count(*) FROM tenancy.audit_log WHERE event = 'tenant_restored' AND attempted_tenant = 'bk-a'")[0][0]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("no tenant_restored audit event")
    # the backup's own reads are not reported as superuser bypass reads (each statement of the
    # test's superuser session is)
    time.sleep(0.5)
    bypass = "SELECT count(*) FROM tenancy.audit_log WHERE event = 'bypass_read' AND relation LIKE 'app.bk_%%'"
    n = run(su, bypass)[0][0]
    run(su, "SELECT tenancy.backup('bk-a')")
    time.sleep(0.5)
    assert run(su, bypass)[0][0] == n
    su.close()


def test_export_to_a_file_and_import(bk, tmp_path):
    su = backup_conn()
    before = checksums(su)
    path = tmp_path / "bk-b.pgtb"
    os.chmod(tmp_path, 0o777)
    env = dict(os.environ, PGHOST=SOCK, PGPORT=str(PORT), PGUSER="postgres", PGDATABASE=DB)
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c",
                    f"\\copy (SELECT * FROM tenancy.export('bk-b')) TO '{path}'"], env=env, check=True)
    b = run(su, "SELECT id FROM tenancy.backups WHERE tenant = 'bk-b' AND location = 'exported' ORDER BY created_at DESC LIMIT 1")[0][0]
    # an exported archive is not kept here
    assert sqlstate_of(su, "SELECT tenancy.verify_backup(%s)", b) == "58030"
    run(su, "DELETE FROM tenancy.backups WHERE id = %s", b)
    out = subprocess.run(["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                          "-c", "CREATE TEMP TABLE a (n bigserial, line text)",
                          "-c", f"\\copy a (line) FROM '{path}'",
                          "-c", "SELECT tenancy.import(array_agg(line ORDER BY n)) FROM a"],
                         env=env, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str(b)
    assert run(su, "SELECT location FROM tenancy.backups WHERE id = %s", b) == [("imported",)]
    run(su, "DELETE FROM app.bk_lines WHERE tenant_id = 'bk-b'")
    run(su, "CALL tenancy.restore('bk-b', %s)", b)
    assert checksums(su) == before
    # importing it again is idempotent
    lines = [l for l in path.read_text().split("\n") if l]
    assert run(su, "SELECT tenancy.import(%s)", lines)[0][0] == b
    su.close()


def manifest_end(lines):
    return next(i for i, l in enumerate(lines) if l.startswith('"Manifest-Checksum"'))


def rechecksum(lines):
    """Recompute the manifest checksum (a checksum is no seal: anyone can)."""
    import hashlib
    end = manifest_end(lines)
    digest = hashlib.sha256("".join(l + "\n" for l in lines[:end]).encode()).hexdigest()
    return lines[:end] + [f'"Manifest-Checksum": "{digest}"}}'] + lines[end + 1:]


def test_every_verification_failure_is_named(bk):
    su = backup_conn()
    plain = [r[0] for r in run(su, "SELECT * FROM tenancy.export('bk-c', encrypted => false)")]
    sealed = [r[0] for r in run(su, "SELECT * FROM tenancy.export('bk-c')")]
    run(su, "DELETE FROM tenancy.backups WHERE tenant = 'bk-c' AND location = 'exported'")
    end = manifest_end(plain)
    # anyone can write an unencrypted archive: imported only on request
    assert sqlstate_of(su, "SELECT tenancy.import(%s)", plain) == "42501"
    assert sqlstate_of(su, "SELECT tenancy.import(%s, allow_unencrypted => true)", plain) is None
    assert sqlstate_of(su, "SELECT tenancy.import(%s)", sealed) is None
    run(su, "DELETE FROM tenancy.backups WHERE tenant = 'bk-c'")

    def fails(lines, code):
        assert sqlstate_of(su, "SELECT tenancy.import(%s, allow_unencrypted => true)", lines) == code
        assert run(su, "SELECT count(*) FROM tenancy.backups WHERE tenant = 'bk-c'") == [(0,)]

    def edit(lines, i, old, new):
        out = list(lines)
        assert old in out[i]
        out[i] = out[i].replace(old, new, 1)
        return out

    rows_line = next(i for i, l in enumerate(plain) if '"Rows"' in l)
    # manifest altered (its checksum no longer matches)
    fails(edit(plain, rows_line, '"Rows": ', '"Rows": 1'), "XX001")
    # manifest truncated or unparsable
    fails(plain[:end], "22032")
    fails(["not a manifest"] + plain, "22032")
    # archive from a newer format version
    fails(rechecksum(edit(plain, 1, '"PgTenancy-Backup-Version": 1', '"PgTenancy-Backup-Version": 2')), "0A000")
    # a table in the manifest but missing from the archive
    fails([l for l in plain if not l.startswith("D 0 ")], "58P01")
    # a table present but not in the manifest
    fails(plain + ["D 99 0 AAAA"], "58P02")
    # size mismatch (a chunk shortened)
    # (a chunk with rows in it: other suites' protected tables may hold none of bk-c's)
    d = next(i for i, l in enumerate(plain) if l.startswith("D ") and len(l) > 100)
    import base64
    prefix = " ".join(plain[d].split(" ", 3)[:3]) + " "
    payload = base64.b64decode(plain[d].split(" ", 3)[3])
    fails(plain[:d] + [prefix + base64.b64encode(payload[:-5]).decode()] + plain[d + 1:], "22026")
    # checksum mismatch (same size, other bytes), and a sealed chunk altered
    changed = bytes([payload[0] ^ 1]) + payload[1:]
    fails(plain[:d] + [prefix + base64.b64encode(changed).decode()] + plain[d + 1:], "22000")
    ds = next(i for i, l in enumerate(sealed) if l.startswith("D 0 0 "))
    sp = base64.b64decode(sealed[ds].split(" ", 3)[3])
    fails(sealed[:ds] + ["D 0 0 " + base64.b64encode(sp[:-1] + bytes([sp[-1] ^ 1])).decode()] + sealed[ds + 1:], "22000")
    # a chunk count no size allows (it would make the server allocate without end)
    chunks_line = next(i for i, l in enumerate(plain) if '"Chunks"' in l)
    fails(rechecksum(edit(plain, chunks_line, '"Chunks": 1', '"Chunks": 4294967295')), "22026")
    fails(rechecksum(edit(sealed, next(i for i, l in enumerate(sealed) if '"Chunks"' in l), '"Chunks": 1', '"Chunks": 4294967295')), "XX001")
    size_line = next(i for i, l in enumerate(plain) if '"Size"' in l)
    huge = edit(edit(plain, size_line, '"Size": ', '"Size": 46116860184'), chunks_line, '"Chunks": 1', '"Chunks": 4000000000')
    fails(rechecksum(huge), "22026")
    # count mismatch (the manifest re-checksummed by whoever changed it)
    fails(rechecksum(edit(plain, rows_line, '"Rows": ', '"Rows": 1')), "21000")
    # an encrypted archive's manifest is sealed with the tenant's key: re-checksumming is not enough
    srows = next(i for i, l in enumerate(sealed) if '"Rows"' in l)
    fails(rechecksum(edit(sealed, srows, '"Rows": ', '"Rows": 1')), "XX001")
    fails([l for l in sealed if not l.startswith("S ")], "XX001")
    # broken chain
    fails(rechecksum(edit(plain, next(i for i, l in enumerate(plain) if '"Parent"' in l), "null", '"00000000-0000-0000-0000-000000000000"')), "23000")
    # a type name in the manifest is never spliced into SQL, nor even looked up where the live
    # table has the column (its owner could have put another type under that name)
    type_line = next(i for i, l in enumerate(plain) if '"Type": "text"' in l)
    hostile = rechecksum(edit(plain, type_line, '"Type": "text"', '"Type": "text); DROP TABLE app.bk_lines; --"'))
    hb = run(su, "SELECT tenancy.import(%s, allow_unencrypted => true)", hostile)[0][0]
    run(su, "DROP SCHEMA IF EXISTS bk_hostile CASCADE")
    assert sqlstate_of(su, "CALL tenancy.restore('bk-c', %s, mode => 'sandbox', into_schema => 'bk_hostile')", hb) is None
    assert run(su, "SELECT to_regclass('app.bk_lines') IS NOT NULL") == [(True,)]
    run(su, "DROP SCHEMA bk_hostile CASCADE")
    run(su, "DELETE FROM tenancy.backups WHERE id = %s", hb)
    # another tenant's archive: restoring bk-c's backup as bk-a
    b = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
    assert sqlstate_of(su, "CALL tenancy.restore('bk-a', %s)", b) == "42501"
    # an unknown backup
    assert sqlstate_of(su, "SELECT tenancy.verify_backup('00000000-0000-0000-0000-000000000000')") == "42704"
    # the file on disk altered after the backup
    path = run(su, "SELECT location FROM tenancy.backups WHERE id = %s", b)[0][0]
    subprocess.run(["sed", "-i", "s/\"Rows\": /\"Rows\": 1/", path], check=True)
    assert sqlstate_of(su, "SELECT tenancy.verify_backup(%s)", b) == "XX001"
    assert sqlstate_of(su, "CALL tenancy.restore('bk-c', %s)", b) == "XX001"
    # a failed restore leaves the tenant's status as it was
    assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-c'") == [("active",)]
    os.remove(path)
    assert sqlstate_of(su, "SELECT tenancy.verify_backup(%s)", b) == "58030"
    su.close()


def test_shred_makes_every_backup_of_the_tenant_fail_with_key_destroyed(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-shred')")[0][0]
    assert run(su, "SELECT (tenancy.verify_backup(%s))->>'tenant'", b) == [("bk-shred",)]
    run(su, "SELECT tenancy.shred('bk-shred', 'bk-shred')")
    assert sqlstate_of(su, "SELECT tenancy.verify_backup(%s)", b) == "55000"
    assert sqlstate_of(su, "CALL tenancy.restore('bk-shred', %s)", b) == "55000"
    su.close()


def test_sandbox_restore_touches_nothing_live(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-b')")[0][0]
    before = checksums(su)
    run(su, "DROP SCHEMA IF EXISTS bk_sandbox CASCADE")
    report = run(su, "CALL tenancy.restore('bk-b', %s, mode => 'sandbox', into_schema => 'bk_sandbox')", b)[0][0]
    assert report["mode"] == "sandbox"
    assert run(su, "SELECT count(*) FROM bk_sandbox.bk_orders") == run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-b'")
    assert run(su, "SELECT count(*) FROM bk_sandbox.bk_events") == run(su, "SELECT count(*) FROM app.bk_events WHERE tenant_id = 'bk-b'")
    assert checksums(su) == before
    assert run(su, "SELECT count(*) FROM tenancy.restores WHERE backup = %s", b) == [(0,)]
    # a sandbox is not protected and not readable by applications
    assert run(su, "SELECT count(*) FROM tenancy.protected_tables WHERE rel::text LIKE 'bk_sandbox.%%'") == [(0,)]
    app = connect(user=APP)
    assert sqlstate_of(app, "SELECT count(*) FROM bk_sandbox.bk_orders") == "42501"
    app.close()
    run(su, "DROP SCHEMA bk_sandbox CASCADE")
    su.close()


def test_application_role_can_do_none_of_it(bk, app):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
    su.close()
    run(app, "BEGIN")
    run(app, "SELECT tenancy.set_tenant('bk-c')")
    run(app, "ROLLBACK")
    for sql, args in [
        ("SELECT tenancy.backup('bk-c')", ()),
        ("SELECT * FROM tenancy.export('bk-c')", ()),
        ("SELECT tenancy.verify_backup(%s)", (b,)),
        ("SELECT tenancy.import(ARRAY['x'])", ()),
        ("CALL tenancy.restore('bk-c', %s)", (b,)),
        ("SELECT tenancy.resume_tenant('bk-c')", ()),
        ("SELECT * FROM tenancy.backups", ()),
        ("SELECT * FROM tenancy.backup_archives", ()),
        ("SELECT tenancy._restore_swap('bk-c', %s, 'x')", (b,)),
    ]:
        assert sqlstate_of(app, sql, *args) == "42501", sql


def test_other_tenants_write_throughout_a_restore(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-a')")[0][0]
    run(su, "UPDATE app.bk_orders SET item = item || ' changed' WHERE tenant_id = 'bk-a'")
    before_b = of(checksums(su), "bk-b")
    stop = threading.Event()
    latencies, errors = [], []

    def writer():
        conn = connect(user=APP, autocommit=False)
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                run(conn, "SELECT tenancy.set_tenant('bk-c')")
                run(conn, "INSERT INTO app.bk_orders (item) VALUES ('concurrent')")
                run(conn, "UPDATE app.bk_orders SET item = item WHERE id = (SELECT min(id) FROM app.bk_orders)")
                conn.commit()
            except psycopg2.Error as e:
                errors.append(e.pgcode)
                conn.rollback()
            latencies.append(time.monotonic() - t0)
        conn.close()

    count_c = run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-c'")[0][0]
    th = threading.Thread(target=writer)
    th.start()
    time.sleep(0.3)
    run(su, "CALL tenancy.restore('bk-a', %s)", b)
    time.sleep(0.3)
    stop.set()
    th.join()
    assert errors == []
    # bound: another tenant's transaction never waits on the restore (no lock they need is held)
    assert max(latencies) < 0.5, max(latencies)
    assert run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-c'")[0][0] == count_c + len(latencies)
    assert of(checksums(su), "bk-b") == before_b
    assert run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-a' AND item LIKE '%% changed'") == [(0,)]
    su.close()


def test_the_paused_tenant_cannot_write_and_a_restore_waits_for_writes_under_way(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-b')")[0][0]
    # a transaction of bk-b that was writing before the restore: the restore waits for it
    w = connect(user=APP, autocommit=False)
    run(w, "SELECT tenancy.set_tenant('bk-b')")
    run(w, "INSERT INTO app.bk_orders (item) VALUES ('in flight')")
    done = []
    th = threading.Thread(target=lambda: done.append(run(backup_conn(), "CALL tenancy.restore('bk-b', %s)", b)))
    th.start()
    for _ in range(100):
        if run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-b'") == [("read_only",)]:
            break
        time.sleep(0.05)
    # new writes of the paused tenant are refused
    app = connect(user=APP, autocommit=False)
    run(app, "SELECT tenancy.set_tenant('bk-b')")
    with pytest.raises(psycopg2.Error) as e:
        run(app, "INSERT INTO app.bk_orders (item) VALUES ('during')")
    assert e.value.pgcode == "25006"
    app.rollback()
    time.sleep(0.3)
    assert not done  # still waiting for the writer
    w.commit()  # its row is then replaced by the backup's rows
    th.join(timeout=30)
    assert done
    assert run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-b' AND item IN ('in flight', 'during')") == [(0,)]
    assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-b'") == [("active",)]
    w.close(), app.close(), su.close()


def test_kill_9_in_the_middle_of_a_restore_leaves_live_data_as_it_was(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
    run(su, "UPDATE app.bk_orders SET item = 'current' WHERE tenant_id = 'bk-c'")
    before = checksums(su)
    su.close()
    for step in ("wait_for_writers", "swap"):
        blocker = connect(autocommit=False)
        if step == "wait_for_writers":
            # a transaction that was writing before the pause: the restore waits for it
            run(blocker, "INSERT INTO app.bk_orders (tenant_id, item) VALUES ('bk-b', 'blocker')")
        else:
            # a lock that conflicts with the swap's DELETE, held by a transaction that wrote
            # nothing (so the restore does not wait for it before the swap)
            run(blocker, "LOCK TABLE app.bk_orders IN SHARE MODE")
        restorer = backup_conn()
        pid = run(restorer, "SELECT pg_backend_pid()")[0][0]
        th = threading.Thread(target=lambda: sqlstate_of(restorer, "CALL tenancy.restore('bk-c', %s)", b))
        th.start()
        watch = connect()
        for _ in range(500):
            activity = run(watch, "SELECT wait_event_type, query FROM pg_stat_activity WHERE pid = %s", pid)
            running = run(watch, "SELECT count(*) FROM tenancy.restores WHERE tenant = 'bk-c' AND state = 'running'")[0][0]
            if running and (step == "wait_for_writers" or (activity and activity[0][0] == "Lock")):
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the restore did not reach {step}")
        watch.close()
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        th.join(timeout=30)
        for c in (blocker, restorer):
            try:
                c.close()
            except psycopg2.Error:
                pass
        wait_for_server()
        su = connect()
        assert checksums(su) == before, step
        assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-c'") == [("read_only",)], step
        assert run(su, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenancy\\_restore\\_%%'") == [(0,)]
        # check() says so, with the one documented call
        assert run(su, "SELECT severity, fix FROM tenancy.check() WHERE object = 'tenant bk-c' AND problem LIKE 'a restore started%%'") \
            == [("ERROR", "SELECT tenancy.resume_tenant('bk-c');")]
        # the one documented call
        assert run(su, "SELECT tenancy.resume_tenant('bk-c')") == [("active",)]
        assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-c'") == [("active",)]
        assert run(su, "SELECT count(*) FROM tenancy.restores WHERE tenant = 'bk-c' AND state = 'running'") == [(0,)]
        su.close()
    # and a restore then works
    su = backup_conn()
    run(su, "CALL tenancy.restore('bk-c', %s)", b)
    assert run(su, "SELECT count(*) FROM app.bk_orders WHERE tenant_id = 'bk-c' AND item = 'current'") == [(0,)]
    su.close()


def test_incremental_backups_replay_to_any_time(bk):
    su = backup_conn()
    own = connect(user=OWNER)
    try:
        assert run(su, "SELECT tenancy.enable_change_capture()")[0][0] >= 3
        full = run(su, "SELECT tenancy.backup('bk-b')")[0][0]
        # an owner cannot remove the capture trigger (incrementals would miss changes)
        assert sqlstate_of(own, "DROP TRIGGER tenancy_capture ON app.bk_orders") == "42501"
        assert sqlstate_of(own, "ALTER TABLE app.bk_orders DISABLE TRIGGER tenancy_capture") == "42501"
        app = connect(user=APP, autocommit=False)

        def work(sqls):
            run(app, "SELECT tenancy.set_tenant('bk-b')")
            for q in sqls:
                run(app, q)
            app.commit()

        work(["UPDATE app.bk_orders SET item = 'first change' WHERE id % 10 = 0",
              "DELETE FROM app.bk_lines WHERE order_id % 7 = 0",
              "INSERT INTO app.bk_events VALUES (DEFAULT, '2027-03-01', '{\"new\": 1}')"])
        at_t1 = checksums(su)
        t1 = run(su, "SELECT clock_timestamp()")[0][0]
        time.sleep(0.05)
        work(["INSERT INTO app.bk_orders (item) VALUES ('second'), ('third')",
              "DELETE FROM app.bk_events WHERE at < '2026-07-01'"])
        i1 = run(su, "SELECT tenancy.backup('bk-b', 'incremental')")[0][0]
        work(["UPDATE app.bk_events SET what = '{\"moved\": true}', at = '2027-02-02' WHERE at < '2026-09-01'",
              "UPDATE app.bk_orders SET item = item || ' again' WHERE item = 'second'"])
        i2 = run(su, "SELECT tenancy.backup('bk-b', 'incremental')")[0][0]
        final = checksums(su)
        reg = run(su, "SELECT kind, parent, row_count > 0, first_change <= last_change FROM tenancy.backups WHERE id = %s", i2)[0]
        assert reg == ("incremental", i1, True, True)
        assert run(su, "SELECT (tenancy.verify_backup(%s))->'chain'", i2)[0][0] == [str(full), str(i1), str(i2)]
        # captured changes are gone once a backup holds them
        assert run(su, "SELECT count(*) FROM tenancy.changes WHERE tenant = 'bk-b'") == [(0,)]
        # damage, then the whole chain
        run(su, "UPDATE app.bk_orders SET item = 'damage' WHERE tenant_id = 'bk-b'")
        run(su, "DELETE FROM app.bk_lines WHERE tenant_id = 'bk-b'")
        report = run(su, "CALL tenancy.restore('bk-b', %s)", i2)[0][0]
        assert report["chain"] == 3
        assert checksums(su) == final
        # point in time: the chain replayed up to t1
        run(su, "CALL tenancy.restore('bk-b', %s, \"at\" => %s)", i2, t1)
        assert of(checksums(su), "bk-b") == of(at_t1, "bk-b")
        assert others(checksums(su), "bk-b") == others(final, "bk-b")
        # before the full backup: nothing covers it
        assert sqlstate_of(su, "CALL tenancy.restore('bk-b', %s, \"at\" => now() - interval '1 day')", i2) == "22023"
        # an incremental needs capture on since its parent
        run(su, "SELECT tenancy.disable_change_capture()")
        assert sqlstate_of(su, "SELECT tenancy.backup('bk-b', 'incremental')") == "23000"
        run(su, "SELECT tenancy.enable_change_capture()")
        assert sqlstate_of(su, "SELECT tenancy.backup('bk-b', 'incremental')") == "23000"
        app.close()
    finally:
        run(su, "SELECT tenancy.disable_change_capture()")
        own.close()
        su.close()


def test_owner_code_never_runs_as_a_superuser_during_a_restore(bk):
    su = backup_conn()
    own = connect(user=OWNER)
    try:
        run(own, "CREATE TABLE app.bk_spy (who name, what text)")
        run(own, "GRANT INSERT ON app.bk_spy TO PUBLIC")
        run(own, "CREATE DOMAIN app.bk_d AS text")
        run(own, "CREATE TABLE app.bk_dom (tenant_id text NOT NULL, id int, v app.bk_d, PRIMARY KEY (tenant_id, id))")
        run(own, "SELECT count(*) FROM tenancy.protect('app.bk_dom')")
        run(su, "INSERT INTO app.bk_dom VALUES ('bk-a', 1, 'one'), ('bk-a', 2, 'two'), ('bk-b', 1, 'other')")
        b = run(su, "SELECT tenancy.backup('bk-a')")[0][0]
        # after the backup: the domain's name now names one whose check runs the owner's code
        run(own, "ALTER DOMAIN app.bk_d RENAME TO bk_d_old")
        run(own, """CREATE FUNCTION app.bk_evil(text) RETURNS boolean LANGUAGE plpgsql AS
                    $$ BEGIN INSERT INTO app.bk_spy VALUES (current_user, 'domain'); RETURN true; END $$""")
        run(own, "CREATE DOMAIN app.bk_d AS text CHECK (app.bk_evil(VALUE))")
        run(su, "CALL tenancy.restore('bk-a', %s)", b)
        run(su, "DROP SCHEMA IF EXISTS bk_sb CASCADE")
        run(su, "CALL tenancy.restore('bk-a', %s, mode => 'sandbox', into_schema => 'bk_sb')", b)
        run(su, "DROP SCHEMA bk_sb CASCADE")
        assert run(su, "SELECT count(*) FROM app.bk_spy") == [(0,)]
        # a trigger function approved, then redefined: the approval lapsed, the restore refuses
        run(own, "CREATE FUNCTION app.bk_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")
        run(su, "SELECT tenancy.approve_function('app.bk_touch()', 'reviewed: returns the row as is')")
        run(own, "CREATE TRIGGER bk_touch BEFORE INSERT ON app.bk_dom FOR EACH ROW EXECUTE FUNCTION app.bk_touch()")
        run(own, """CREATE OR REPLACE FUNCTION app.bk_touch() RETURNS trigger LANGUAGE plpgsql AS
                    $$ BEGIN INSERT INTO app.bk_spy VALUES (current_user, 'trigger'); NEW.tenant_id := 'bk-b'; RETURN NEW; END $$""")
        before = run(su, "SELECT tenant_id, id, v FROM app.bk_dom ORDER BY 1, 2")
        assert sqlstate_of(su, "CALL tenancy.restore('bk-a', %s)", b) == "55P03"
        assert run(su, "SELECT count(*) FROM app.bk_spy") == [(0,)]
        assert run(su, "SELECT tenant_id, id, v FROM app.bk_dom ORDER BY 1, 2") == before
        assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-a'") == [("active",)]
    finally:
        run(su, "DROP TABLE IF EXISTS app.bk_dom, app.bk_spy")
        run(own, "DROP FUNCTION IF EXISTS app.bk_touch(), app.bk_evil(text) CASCADE")
        run(own, "DROP DOMAIN IF EXISTS app.bk_d, app.bk_d_old")
        own.close()
        su.close()


def test_a_restore_never_quotes_row_values_nor_loses_data_silently(bk):
    su = backup_conn()
    own = connect(user=OWNER)
    try:
        run(su, "INSERT INTO app.bk_orders (tenant_id, item) VALUES ('bk-b', 'secret-item-42')")
        b = run(su, "SELECT tenancy.backup('bk-b')")[0][0]
        run(su, "DELETE FROM app.bk_orders WHERE item = 'secret-item-42'")
        # a constraint the backup's rows break: refused with its SQLSTATE, never the row
        run(own, "ALTER TABLE app.bk_orders ADD CONSTRAINT bk_no_secrets CHECK (item NOT LIKE 'secret%') NOT VALID")
        try:
            run(su, "CALL tenancy.restore('bk-b', %s)", b)
            pytest.fail("restored rows that break a constraint")
        except psycopg2.Error as e:
            assert e.pgcode == "23514"
            text = " ".join(str(x) for x in (e.pgerror, e.diag.message_detail, e.diag.message_hint))
            assert "secret" not in text
        run(own, "ALTER TABLE app.bk_orders DROP CONSTRAINT bk_no_secrets")
        # a column renamed since the backup: refused, not restored as NULLs
        run(own, "ALTER TABLE app.bk_lines RENAME COLUMN note TO remark")
        assert sqlstate_of(su, "CALL tenancy.restore('bk-b', %s)", b) == "55P03"
        run(own, "ALTER TABLE app.bk_lines RENAME COLUMN remark TO note")
        # a table added since, whose foreign key a swap would cascade through
        run(own, """CREATE TABLE app.bk_child (tenant_id text NOT NULL, order_id bigint,
                    FOREIGN KEY (tenant_id, order_id) REFERENCES app.bk_orders (tenant_id, id) ON DELETE CASCADE)""")
        run(own, "SELECT count(*) FROM tenancy.protect('app.bk_child', create_index => true)")
        run(su, "INSERT INTO app.bk_child SELECT tenant_id, id FROM app.bk_orders WHERE tenant_id = 'bk-b' LIMIT 5")
        assert sqlstate_of(su, "CALL tenancy.restore('bk-b', %s)", b) == "55P03"
        assert run(su, "SELECT count(*) FROM app.bk_child") == [(5,)]
        run(own, "DROP TABLE app.bk_child")
        # the offboarded are not restored into
        run(su, "SELECT tenancy.create_tenant('bk-off', 'Off') WHERE NOT EXISTS (SELECT FROM tenancy.tenants WHERE id = 'bk-off')")
        off = run(su, "SELECT tenancy.backup('bk-off')")[0][0]
        run(su, "SELECT tenancy.set_status('bk-off', 'offboarded')")
        assert sqlstate_of(su, "CALL tenancy.restore('bk-off', %s)", off) == "55000"
        assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-b'") == [("active",)]
    finally:
        run(su, "DROP TABLE IF EXISTS app.bk_child")
        own.close()
        su.close()


def test_resume_tenant_refuses_a_restore_still_running(bk):
    su = backup_conn()
    b = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
    blocker = connect(autocommit=False)
    run(blocker, "LOCK TABLE app.bk_orders IN SHARE MODE")
    restorer = backup_conn()
    pid = run(restorer, "SELECT pg_backend_pid()")[0][0]
    th = threading.Thread(target=lambda: run(restorer, "CALL tenancy.restore('bk-c', %s)", b))
    th.start()
    for _ in range(500):
        if run(su, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", pid) == [("Lock",)]:
            break
        time.sleep(0.02)
    assert sqlstate_of(su, "SELECT tenancy.resume_tenant('bk-c')") == "55006"
    assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-c'") == [("read_only",)]
    blocker.rollback()
    th.join(timeout=30)
    assert run(su, "SELECT state FROM tenancy.restores WHERE tenant = 'bk-c' ORDER BY id DESC LIMIT 1") == [("done",)]
    assert run(su, "SELECT status FROM tenancy.tenants WHERE id = 'bk-c'") == [("active",)]
    blocker.close(), restorer.close(), su.close()


def test_drills_and_retention(bk):
    su = backup_conn()
    full = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
    report = run(su, "SELECT tenancy.drill('bk-c')")[0][0]
    assert report["ok"] is True and report["backup"] == str(full) and report["rows"] > 0
    assert run(su, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'tenancy\\_drill\\_%%'") == [(0,)]
    # check() lists tenants without a recent backup or drill once the database uses them
    findings = run(su, "SELECT object, problem FROM tenancy.check() WHERE severity = 'WARNING' AND object LIKE 'tenant %%'")
    assert ("tenant bk-c", "no backup of the tenant kept here in the last 8 days") not in findings
    assert any(p == "no successful restore drill of the tenant in the last 8 days" for _, p in findings)
    # "restore tested" is a query
    assert run(su, """SELECT count(*) FROM tenancy.drills d WHERE d.tenant = 'bk-c' AND d.ok
                      AND d.at > now() - interval '8 days'""")[0][0] >= 1
    # a drill that fails is recorded, not hidden
    path = run(su, "SELECT location FROM tenancy.backups WHERE id = %s", full)[0][0]
    os.rename(path, path + ".moved")
    report = run(su, "SELECT tenancy.drill('bk-c')")[0][0]
    assert report["ok"] is False and report["sqlstate"] == "58030"
    os.rename(path + ".moved", path)
    assert sqlstate_of(su, "SELECT tenancy.drill('bk-b')") in (None,)
    # retention: never under 30 days, and never a backup a kept incremental needs
    assert run(su, "SELECT bool_and(expires_at >= created_at + interval '30 days') FROM tenancy.backups") == [(True,)]
    try:
        run(su, "SELECT tenancy.enable_change_capture()")
        f = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
        run(su, "UPDATE app.bk_orders SET item = item WHERE tenant_id = 'bk-c' AND id IN (SELECT id FROM app.bk_orders WHERE tenant_id = 'bk-c' LIMIT 3)")
        i = run(su, "SELECT tenancy.backup('bk-c', 'incremental')")[0][0]
    finally:
        run(su, "SELECT tenancy.disable_change_capture()")
    fpath = run(su, "SELECT location FROM tenancy.backups WHERE id = %s", f)[0][0]
    run(su, "UPDATE tenancy.backups SET expires_at = now() - interval '1 day' WHERE tenant = 'bk-c' AND id <> %s", i)
    gone = {r[0] for r in run(su, "SELECT backup FROM tenancy.prune_backups()")}
    assert full in gone and f not in gone and i not in gone      # f: the kept incremental's parent
    assert not os.path.exists(path) and os.path.exists(fpath)
    assert run(su, "SELECT count(*) FROM tenancy.drills WHERE backup IS NULL AND tenant = 'bk-c'")[0][0] >= 2
    run(su, "UPDATE tenancy.backups SET expires_at = now() - interval '1 day' WHERE id = %s", i)
    gone = {r[0] for r in run(su, "SELECT backup FROM tenancy.prune_backups()")}
    assert {f, i} <= gone and not os.path.exists(fpath)
    su.close()


def test_capture_cannot_be_stopped_bent_or_crashed_by_an_owner(bk):
    su = backup_conn()
    own = connect(user=OWNER)
    try:
        run(su, "SELECT tenancy.enable_change_capture()")
        for ddl in [
            "CREATE TRIGGER bk_st AFTER INSERT ON app.bk_orders FOR EACH STATEMENT EXECUTE FUNCTION tenancy._capture()",
            "CREATE OR REPLACE TRIGGER tenancy_capture AFTER INSERT ON app.bk_orders FOR EACH ROW EXECUTE FUNCTION tenancy._capture()",
            "CREATE OR REPLACE TRIGGER tenancy_capture AFTER INSERT OR UPDATE OR DELETE ON app.bk_orders FOR EACH ROW WHEN (false) EXECUTE FUNCTION tenancy._capture()",
            "ALTER TABLE app.bk_events_1 DISABLE TRIGGER tenancy_capture",
            "CREATE TRIGGER bk_before BEFORE INSERT ON app.bk_events_2 FOR EACH ROW EXECUTE FUNCTION tenancy._capture()",
        ]:
            assert sqlstate_of(own, ddl) == "42501", ddl
        # a detached partition loses the cloned trigger: check() says so (and a chain that would
        # need it refuses to restore: it is a table the full backup does not have)
        run(own, "ALTER TABLE app.bk_events DETACH PARTITION app.bk_events_2")
        problems = run(su, "SELECT problem FROM tenancy.check() WHERE object = 'app.bk_events_2'")
        assert any("capture" in p[0] for p in problems), problems
        run(su, "ALTER TABLE app.bk_events ATTACH PARTITION app.bk_events_2 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')")
        # outside a protected table, or as anything but its own trigger, it refuses (never a crash)
        run(own, "CREATE TABLE app.bk_free (tenant_id text, v int)")
        run(own, "CREATE TRIGGER bk_st AFTER INSERT ON app.bk_free FOR EACH STATEMENT EXECUTE FUNCTION tenancy._capture()")
        assert sqlstate_of(own, "INSERT INTO app.bk_free VALUES ('bk-a', 1)") == "42501"
        assert run(su, "SELECT 1") == [(1,)]
        # a table retyped by another session while this one's cached output functions are in
        # use: the invalidation is not lost (it once made capture run text output on an int)
        run(own, "CREATE TABLE app.bk_retype (tenant_id text NOT NULL, v text)")
        run(own, "SELECT count(*) FROM tenancy.protect('app.bk_retype', create_index => true)")
        s1 = connect()
        run(s1, "INSERT INTO app.bk_retype VALUES ('bk-a', '7')")
        th = threading.Thread(target=lambda: run(s1, "UPDATE app.bk_orders SET item = item WHERE tenant_id = 'bk-a' AND id = (SELECT min(id) FROM app.bk_orders WHERE tenant_id = 'bk-a') AND pg_sleep(2) IS NOT NULL"))
        th.start()
        time.sleep(0.5)
        run(own, "ALTER TABLE app.bk_retype ALTER COLUMN v TYPE int USING v::int")
        th.join()
        run(s1, "INSERT INTO app.bk_retype VALUES ('bk-a', 42)")
        assert run(su, "SELECT new_row FROM tenancy.changes WHERE rel = 'app.bk_retype'::regclass ORDER BY xid DESC, seq DESC LIMIT 1") == [("(bk-a,42)",)]
        s1.close()
        run(su, "DROP TABLE app.bk_retype")
        # a writer's session settings do not change what is restored
        full = run(su, "SELECT tenancy.backup('bk-a')")[0][0]
        app = connect(user=APP, autocommit=False)
        run(app, "SET DateStyle = 'SQL, DMY'")
        run(app, "SET extra_float_digits = -3")
        run(app, "SELECT tenancy.set_tenant('bk-a')")
        run(app, """INSERT INTO app.bk_events VALUES (DEFAULT, '2026-02-01', '{"f": 0.1234567890123}')""")
        app.commit()
        app.close()
        i = run(su, "SELECT tenancy.backup('bk-a', 'incremental')")[0][0]
        before = checksums(su)
        run(su, "DELETE FROM app.bk_events WHERE tenant_id = 'bk-a'")
        run(su, "CALL tenancy.restore('bk-a', %s)", i)
        assert checksums(su) == before
        # a column dropped and added again within the chain, a table protected after the full
        # backup: the chain no longer describes the rows, the restore refuses
        run(own, "CREATE TABLE app.bk_late (tenant_id text NOT NULL, v int)")
        run(su, "INSERT INTO app.bk_late VALUES ('bk-a', 1)")
        run(own, "SELECT count(*) FROM tenancy.protect('app.bk_late', create_index => true)")
        i2 = run(su, "SELECT tenancy.backup('bk-a', 'incremental')")[0][0]
        assert sqlstate_of(su, "CALL tenancy.restore('bk-a', %s)", i2) == "23000"
        assert run(su, "SELECT count(*) FROM app.bk_late") == [(1,)]
        run(su, "DROP TABLE app.bk_late")
        full = run(su, "SELECT tenancy.backup('bk-a')")[0][0]
        run(own, "ALTER TABLE app.bk_lines DROP COLUMN n")
        run(own, "ALTER TABLE app.bk_lines ADD COLUMN n int")
        run(su, "UPDATE app.bk_lines SET note = 'x', n = 2 WHERE tenant_id = 'bk-a' AND order_id IN (SELECT order_id FROM app.bk_lines WHERE tenant_id = 'bk-a' LIMIT 2)")
        i3 = run(su, "SELECT tenancy.backup('bk-a', 'incremental')")[0][0]
        assert sqlstate_of(su, "CALL tenancy.restore('bk-a', %s)", i3) == "23000"
        # an export is not kept here: the next incremental continues from the last file backup
        exported = [r[0] for r in run(su, "SELECT * FROM tenancy.export('bk-c')")]
        full_c = run(su, "SELECT tenancy.backup('bk-c')")[0][0]
        exported = [r[0] for r in run(su, "SELECT * FROM tenancy.export('bk-c')")]
        run(su, "UPDATE app.bk_orders SET item = 'after export' WHERE tenant_id = 'bk-c' AND id = (SELECT min(id) FROM app.bk_orders WHERE tenant_id = 'bk-c')")
        ic = run(su, "SELECT tenancy.backup('bk-c', 'incremental')")[0][0]
        assert run(su, "SELECT parent FROM tenancy.backups WHERE id = %s", ic) == [(full_c,)]
        assert run(su, "SELECT row_count FROM tenancy.backups WHERE id = %s", ic) == [(1,)]
    finally:
        run(su, "DROP TABLE IF EXISTS app.bk_free, app.bk_late")
        run(su, "SELECT tenancy.disable_change_capture()")
        own.close()
        su.close()


def test_a_shred_reaches_copies_when_tenants_have_their_own_keys(bk):
    """With pg_tenancy.tenant_key_command, a tenant's keys are wrapped by the master key bound to
    the tenant's own key in an outside store (here: files). A shred deletes that key there
    (tenant_key_shred_command): a copy of the database made before the shred (as a physical
    backup, a replica or old WAL would be) can no longer read the tenant's backups or
    ciphertexts, though it holds the wrapped keys and the master key still works."""
    db, copy = "pg_tenancy_tk", "pg_tenancy_tk_copy"
    store = f"{ROOT}/tenant-keys"
    os.makedirs(store, exist_ok=True)
    shutil.chown(store, "postgres", "postgres")
    master = new_key_file(f"{ROOT}/tk-master")
    for t in ("tk-a", "tk-b"):
        new_key_file(f"{store}/{t}.key")
    admin = connect(dbname="postgres")
    for d in (copy, db):
        run(admin, f"DROP DATABASE IF EXISTS {d} WITH (FORCE)")
    run(admin, f"CREATE DATABASE {db}")
    settings = [f"SET pg_tenancy.master_key_file = '{master}'", f"SET pg_tenancy.backup_dir = '{BACKUP_DIR}'"]
    bound = [f"SET pg_tenancy.tenant_key_command = 'cat {store}/%t.key'",
             f"SET pg_tenancy.tenant_key_shred_command = 'rm {store}/%t.key'"]

    def session(name, own_keys=True):
        c = connect(dbname=name)
        for s in settings + (bound if own_keys else []):
            run(c, s)
        return c
    try:
        c = session(db, own_keys=False)
        run(c, "CREATE EXTENSION pg_tenancy")
        run(c, "SELECT tenancy.create_tenant('tk-a', 'A'), tenancy.create_tenant('tk-b', 'B')")
        run(c, "CREATE TABLE t (tenant_id text NOT NULL, v text)")
        run(c, "SELECT count(*) FROM tenancy.protect('t', create_index => true)")
        run(c, "INSERT INTO t VALUES ('tk-a', 'a1'), ('tk-b', 'b1')")
        # tk-b's key made before tenants had keys of their own: rotate_master_key() binds it
        run(c, "SELECT tenancy.backup('tk-b')")
        assert "+tenant:" not in run(c, "SELECT kek_id FROM tenancy.keys WHERE tenant = 'tk-b'")[0][0]
        c.close()
        c = session(db)
        assert run(c, "SELECT tenancy.rotate_master_key()")[0][0] >= 1
        assert "+tenant:" in run(c, "SELECT kek_id FROM tenancy.keys WHERE tenant = 'tk-b'")[0][0]
        b = run(c, "SELECT tenancy.backup('tk-a')")[0][0]
        run(c, "BEGIN")
        run(c, "SELECT tenancy.set_tenant('tk-a')")
        ct = run(c, "SELECT tenancy.encrypt('secret of a')")[0][0]
        run(c, "COMMIT")
        assert run(c, "SELECT bool_and(kek_id LIKE '%%+tenant:%%') FROM tenancy.keys") == [(True,)]
        c.close()
        # the copy, made before the shred
        run(admin, f"CREATE DATABASE {copy} TEMPLATE {db}")
        cc = session(copy)
        assert run(cc, "SELECT (tenancy.verify_backup(%s))->>'tenant'", b) == [("tk-a",)]
        cc.close()
        # without the tenant's own key, even the original cannot unwrap
        c = session(db, own_keys=False)
        assert sqlstate_of(c, "SELECT tenancy.verify_backup(%s)", b) == "55000"
        c.close()
        # the shred deletes the tenant's key in the store
        c = session(db)
        run(c, "SELECT tenancy.shred('tk-a', 'tk-a')")
        assert not os.path.exists(f"{store}/tk-a.key") and os.path.exists(f"{store}/tk-b.key")
        c.close()
        cc = session(copy)
        assert sqlstate_of(cc, "SELECT tenancy.verify_backup(%s)", b) == "55000"
        run(cc, "BEGIN")
        run(cc, "SELECT tenancy.set_tenant('tk-a')")
        try:
            run(cc, "SELECT tenancy.decrypt_text(%s)", ct)
            pytest.fail("the copy decrypted a shredded tenant's ciphertext")
        except psycopg2.Error as e:
            assert e.pgcode == "55000"
        cc.rollback() if not cc.autocommit else run(cc, "ROLLBACK")
        # the other tenant is untouched, in the copy too
        assert run(cc, "SELECT (tenancy.verify_backup(id))->>'tenant' FROM tenancy.backups WHERE tenant = 'tk-b'") == [("tk-b",)]
        cc.close()
        # a shred rolled back (or in a savepoint rolled back) never touches the store
        c = session(db)
        run(c, "BEGIN")
        run(c, "SELECT tenancy.shred('tk-b', 'tk-b')")
        run(c, "ROLLBACK")
        run(c, "BEGIN")
        run(c, "SAVEPOINT s")
        run(c, "SELECT tenancy.shred('tk-b', 'tk-b')")
        run(c, "ROLLBACK TO SAVEPOINT s")
        run(c, "COMMIT")
        assert os.path.exists(f"{store}/tk-b.key")
        assert run(c, "SELECT (tenancy.verify_backup(id))->>'tenant' FROM tenancy.backups WHERE tenant = 'tk-b'") == [("tk-b",)]
        c.close()
        # a shred whose store command fails (at commit) destroys nothing
        c = session(db)
        run(c, f"SET pg_tenancy.tenant_key_shred_command = 'exit 1'")
        assert sqlstate_of(c, "SELECT tenancy.shred('tk-b', 'tk-b')") == "55000"
        assert run(c, "SELECT count(*) FROM tenancy.keys WHERE tenant = 'tk-b' AND wrapped IS NOT NULL")[0][0] >= 1
        c.close()
    finally:
        for d in (copy, db):
            run(admin, f"DROP DATABASE IF EXISTS {d} WITH (FORCE)")
        admin.close()
