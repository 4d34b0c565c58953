"""Per-tenant encryption across sessions: rotation under concurrent writers, shredding seen by
sessions that already hold the keys, no key survives a rolled-back creation."""
import threading
import time

import psycopg2

from conftest import APP, TENANTS, connect, run, sqlstate_of


def app_in(tenant):
    conn = connect(user=APP, autocommit=False)
    with conn.cursor() as cur:
        cur.execute("SELECT tenancy.set_tenant(%s, true)", (tenant,))
    conn.commit()
    return conn


def test_first_key_created_in_a_rolled_back_transaction_is_forgotten(su):
    a = app_in("t006")
    with a.cursor() as cur:
        cur.execute("SELECT tenancy.encrypt('lost')")
        a.rollback()
        cur.execute("SELECT tenancy.encrypt('kept', 'ctx')")
        kept = cur.fetchone()[0]
        a.commit()
    b = app_in("t006")
    with b.cursor() as cur:
        cur.execute("SELECT tenancy.decrypt_text(%s, 'ctx')", (kept,))
        assert cur.fetchone() == ("kept",)
    a.close()
    b.close()


def test_rotation_while_writers_write(su):
    run(su, "CREATE TABLE IF NOT EXISTS app.secrets (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(), "
            "id serial, body bytea, PRIMARY KEY (tenant_id, id))")
    run(su, f"GRANT SELECT, INSERT, UPDATE ON app.secrets TO {APP}; GRANT USAGE ON SEQUENCE app.secrets_id_seq TO {APP}")
    run(su, "SELECT count(*) FROM tenancy.protect('app.secrets')")
    stop = threading.Event()
    errors = []

    def writer(tenant):
        conn = app_in(tenant)
        try:
            with conn.cursor() as cur:
                i = 0
                while not stop.is_set():
                    cur.execute("INSERT INTO app.secrets (body) SELECT tenancy.encrypt(%s, 'secrets.body')", (f"{tenant}-{i}",))
                    conn.commit()
                    i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in TENANTS[:2] for _ in range(2)]
    for th in threads:
        th.start()
    for _ in range(5):
        time.sleep(0.2)
        for t in TENANTS[:2]:
            run(su, "SELECT tenancy.rotate_key(%s)", t)
    stop.set()
    for th in threads:
        th.join()
    assert errors == []
    for t in TENANTS[:2]:
        conn = app_in(t)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT tenancy.key_version(body)), "
                        "bool_and(tenancy.decrypt_text(body, 'secrets.body') LIKE %s) FROM app.secrets", (f"{t}-%",))
            n, versions, ok = cur.fetchone()
        conn.close()
        assert n > 0 and ok, (t, n, ok)
        assert versions > 1, "the writers should have spanned several key versions"
    # online re-encryption, batch by batch, until nothing is left on an old version
    for t in TENANTS[:2]:
        conn = app_in(t)
        with conn.cursor() as cur:
            batches = 0
            while True:
                cur.execute("SELECT tenancy.reencrypt('app.secrets', 'body', $$'secrets.body'$$, 50)")
                moved = cur.fetchone()[0]
                conn.commit()
                batches += 1
                if moved == 0:
                    break
            cur.execute("SELECT count(DISTINCT tenancy.key_version(body)), "
                        "bool_and(tenancy.decrypt_text(body, 'secrets.body') LIKE %s) FROM app.secrets", (f"{t}-%",))
            assert cur.fetchone() == (1, True)
            assert batches > 1
        conn.close()


def test_shred_reaches_an_open_session(su):
    run(su, "SELECT tenancy.create_tenant('doomed', 'Doomed'), tenancy.grant_tenant('scn_app', 'doomed')")
    holder = app_in("doomed")
    with holder.cursor() as cur:
        cur.execute("SELECT tenancy.encrypt('last words', 'x')")
        ct = cur.fetchone()[0]
        holder.commit()
        cur.execute("SELECT tenancy.decrypt_text(%s, 'x')", (ct,))  # the key is now cached here
        assert cur.fetchone() == ("last words",)
        holder.commit()
    run(su, "SELECT tenancy.shred('doomed', 'doomed')")
    start = time.monotonic()
    assert sqlstate_of(holder, "SELECT tenancy.decrypt_text(%s, 'x')", ct) == "55000"
    # seen at the very next statement of the other session
    assert time.monotonic() - start < 1.0
    assert sqlstate_of(holder, "SELECT tenancy.encrypt('more')") == "55000"
    holder.close()


def test_crypto_sqlstates(su):
    a = app_in("t007")
    with a.cursor() as cur:
        cur.execute("SELECT tenancy.encrypt('v', 'c')")
        ct = cur.fetchone()[0]
        a.commit()
    assert sqlstate_of(a, "SELECT tenancy.decrypt(%s, 'other')", ct) == "22000"
    assert sqlstate_of(a, "SELECT tenancy.decrypt('\\x0102'::bytea)") == "22P03"
    # a value within 42 bytes of bytea's 1 GB limit cannot have a ciphertext: a clear error, no crash
    assert sqlstate_of(a, "SELECT tenancy.encrypt(repeat('x', 1073741800))") == "54000"
    b = app_in("t008")
    assert sqlstate_of(b, "SELECT tenancy.decrypt(%s, 'c')", ct) == "22000"
    assert sqlstate_of(b, "SELECT tenancy.shred('t008', 't008')") == "42501"
    a.close()
    b.close()
    run(su, "SET pg_tenancy.master_key_file = '/nonexistent'")
    assert sqlstate_of(su, "SELECT tenancy.master_key_id()") == "F0000"
