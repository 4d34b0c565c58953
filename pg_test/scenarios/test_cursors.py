"""WITH HOLD cursors over protected tables follow the tenant context that declared them. On a
pooled connection handed to another client without a reset, the next tenant cannot read the
rows waiting in such a cursor: not by FETCH or MOVE, not by PL/pgSQL in a DO block, not with no
context at all; the declaring context reads them again, and the attempt is in the denial log."""
import socket
import struct
import time

import psycopg2

from conftest import APP, DB, PORT, SOCK, TENANTS, connect, run, sqlstate_of

A, B = TENANTS[0], TENANTS[1]


def setup_table(su):
    run(su, "CREATE TABLE IF NOT EXISTS app.held (tenant_id text NOT NULL DEFAULT tenancy.current_tenant(), "
            "id int, secret text, PRIMARY KEY (tenant_id, id))")
    run(su, f"GRANT SELECT, INSERT ON app.held TO {APP}")
    run(su, "SELECT count(*) FROM tenancy.protect('app.held')")
    app = connect(user=APP)
    for t in (A, B):
        run(app, "BEGIN; SELECT tenancy.set_tenant(%s); "
                 "INSERT INTO app.held (id, secret) SELECT i, %s || '-secret-' || i FROM generate_series(1, 50) i "
                 "ON CONFLICT DO NOTHING; COMMIT", t, t)
    app.close()


class Wire:
    """A bare protocol-v3 client: what a driver does under the hood, including an Execute of a
    named portal, which no SQL statement (and no hook) sees."""

    def __init__(self, user):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(f"{SOCK}/.s.PGSQL.{PORT}")
        body = struct.pack("!i", 196608) + f"user\0{user}\0database\0{DB}\0\0".encode()
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        self.until_ready()

    def recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.s.recv(n - len(data))
            assert chunk, "server closed the connection"
            data += chunk
        return data

    def until_ready(self):
        """(SQLSTATE of the first error or None, data rows) up to ReadyForQuery."""
        error, rows = None, []
        while True:
            kind = self.recv(1)
            (n,) = struct.unpack("!i", self.recv(4))
            body = self.recv(n - 4)
            if kind == b"E" and error is None:
                fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                error = fields[b"C"].decode()
            elif kind == b"D":
                rows.append(body)
            elif kind == b"Z":
                return error, rows

    def send(self, kind, body):
        self.s.sendall(kind + struct.pack("!i", len(body) + 4) + body)

    def query(self, sql):
        self.send(b"Q", sql.encode() + b"\0")
        return self.until_ready()

    def execute_portal(self, name):
        self.send(b"E", name.encode() + b"\0" + struct.pack("!i", 0))
        self.send(b"S", b"")
        return self.until_ready()

    def close(self):
        self.send(b"X", b"")
        self.s.close()


def test_held_cursor_refuses_a_protocol_level_execute(su):
    setup_table(su)
    w = Wire(APP)
    try:
        assert w.query(f"BEGIN; SELECT tenancy.set_tenant('{A}'); "
                       "DECLARE wire CURSOR WITH HOLD FOR SELECT secret FROM app.held; COMMIT")[0] is None
        # the next client on the connection, as a driver would: Execute the portal by name
        error, rows = w.execute_portal("wire")
        assert rows == [] and error == "55000", (error, len(rows))
        assert w.query(f"SELECT tenancy.set_tenant('{B}', true)")[0] is None
        error, rows = w.execute_portal("wire")
        assert rows == [] and error == "55000", (error, len(rows))
        # back in the declaring context, the same Execute reads the rows
        assert w.query(f"SELECT tenancy.set_tenant('{A}', true)")[0] is None
        error, rows = w.execute_portal("wire")
        assert error is None and len(rows) == 50
    finally:
        w.close()


def test_held_cursor_is_readable_only_in_its_context(su):
    setup_table(su)
    since = run(su, "SELECT coalesce(max(id), 0) FROM tenancy.audit_log")[0][0]
    conn = connect(user=APP)  # one server connection, as a pooler would hand it on
    try:
        # client 1, tenant A, transaction-scoped context (what transaction pooling needs)
        run(conn, "BEGIN; SELECT tenancy.set_tenant(%s); "
                  "DECLARE leak CURSOR WITH HOLD FOR SELECT tenant_id, secret FROM app.held ORDER BY id; "
                  "COMMIT", A)
        # client 2 on the same connection, no reset in between
        assert sqlstate_of(conn, "FETCH ALL FROM leak") == "42501"  # no context
        assert sqlstate_of(conn, "MOVE 1 IN leak") == "42501"
        run(conn, "SELECT tenancy.set_tenant(%s, true)", B)  # session context of another tenant
        assert sqlstate_of(conn, "FETCH ALL FROM leak") == "42501"
        # PL/pgSQL fetches through SPI, past the FETCH statement: the portal itself refuses
        assert sqlstate_of(conn, "DO $$ DECLARE c refcursor := 'leak'; r record; "
                                 "BEGIN FETCH c INTO r; RAISE NOTICE '%', r; END $$") == "55000"
        with conn.cursor() as cur:  # a token-less reset and a fresh B transaction: still refused
            cur.execute("SELECT tenancy.reset_tenant()")
        assert sqlstate_of(conn, "DO $$ DECLARE c refcursor := 'leak'; r record; "
                                 "BEGIN FETCH c INTO r; END $$") == "55000"
        # client 1 comes back with its context: the cursor reads, its own rows only, none skipped
        rows = run(conn, "BEGIN; SELECT tenancy.set_tenant(%s); FETCH ALL FROM leak", A)
        run(conn, "COMMIT")
        assert len(rows) == 50 and {t for t, _ in rows} == {A}
        # and after that transaction ends it is locked again
        assert sqlstate_of(conn, "FETCH ALL FROM leak") == "42501"
        # the attempts are in the denial log, with the cursor's tenant as the attempted one
        deadline = time.time() + 10
        seen = 0
        while time.time() < deadline:
            seen = run(su, "SELECT count(*) FROM tenancy.audit_log WHERE id > %s AND event = 'cross_tenant_probe' "
                           "AND attempted_tenant = %s AND relation = 'app.held' AND detail LIKE 'fetch from a held cursor%%'",
                       since, A)[0][0]
            if seen >= 4:
                break
            time.sleep(0.05)
        assert seen == 4
        # DISCARD ALL (a pooler's reset) closes it for good
        run(conn, "DISCARD ALL")
        assert sqlstate_of(conn, "FETCH ALL FROM leak") == "34000"
    finally:
        conn.close()


def test_held_cursor_in_session_context_and_cursors_without_hold(su):
    setup_table(su)
    conn = connect(user=APP)
    try:
        # a session-level context (a connection of its own): the held cursor keeps working
        run(conn, "SELECT tenancy.set_tenant(%s, true)", A)
        run(conn, "BEGIN; DECLARE mine CURSOR WITH HOLD FOR SELECT secret FROM app.held ORDER BY id; COMMIT")
        assert len(run(conn, "FETCH 10 FROM mine")) == 10
        assert len(run(conn, "FETCH ALL FROM mine")) == 40
        # switching tenant locks it; switching back unlocks it
        run(conn, "SELECT tenancy.set_tenant(%s, true)", B)
        assert sqlstate_of(conn, "FETCH ABSOLUTE 1 FROM mine") == "42501"
        run(conn, "SELECT tenancy.set_tenant(%s, true)", A)
        run(conn, "CLOSE mine")
        # every held cursor is bound, even one that names no protected table (what it reads
        # cannot be known when it is declared); a cursor reusing the name is a new one
        run(conn, "BEGIN; DECLARE mine CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 3) g; COMMIT")
        run(conn, "SELECT tenancy.set_tenant(%s, true)", B)
        assert sqlstate_of(conn, "FETCH ALL FROM mine") == "42501"
        run(conn, "SELECT tenancy.set_tenant(%s, true)", A)
        assert [r[0] for r in run(conn, "FETCH ALL FROM mine")] == [1, 2, 3]
        run(conn, "CLOSE mine")
        run(conn, "SELECT tenancy.set_tenant(%s, true)", B)
        # a cursor without HOLD lives in its transaction, under the context of that transaction
        rows = run(conn, "BEGIN; DECLARE t CURSOR FOR SELECT tenant_id FROM app.held; FETCH ALL FROM t")
        run(conn, "COMMIT")
        assert {r[0] for r in rows} == {B}
    finally:
        conn.close()


def test_failed_fetch_leaves_the_cursor_locked_not_broken(su):
    """A refused fetch inside a transaction aborts it; the cursor survives, locked, and reads
    again in its context."""
    setup_table(su)
    conn = connect(user=APP, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tenancy.set_tenant(%s)", (A,))
            cur.execute("DECLARE c2 CURSOR WITH HOLD FOR SELECT id FROM app.held ORDER BY id")
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("SELECT tenancy.set_tenant(%s)", (B,))
            try:
                cur.execute("FETCH 5 FROM c2")
                raise AssertionError("fetch under another tenant worked")
            except psycopg2.Error as e:
                assert e.pgcode == "42501"
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT tenancy.set_tenant(%s)", (A,))
            cur.execute("FETCH 5 FROM c2")
            assert [r[0] for r in cur.fetchall()] == [1, 2, 3, 4, 5]
        conn.commit()
    finally:
        conn.close()


def test_held_cursor_over_functions_is_bound_too(su):
    """A held cursor over a PL/pgSQL function, or a SQL function that is not inlined, reads a
    protected table out of sight of DECLARE: bound all the same, through every route, also for
    the next client of a pooled connection."""
    setup_table(su)
    run(su, """CREATE OR REPLACE FUNCTION app.held_plpgsql() RETURNS SETOF text LANGUAGE plpgsql STABLE AS $$
               BEGIN RETURN QUERY SELECT secret FROM app.held ORDER BY id; END $$""")
    run(su, """CREATE OR REPLACE FUNCTION app.held_sql() RETURNS SETOF text LANGUAGE sql STABLE
               SET work_mem = '4MB' AS $$ SELECT secret FROM app.held ORDER BY id $$""")  # SET: never inlined
    run(su, f"GRANT EXECUTE ON FUNCTION app.held_plpgsql(), app.held_sql() TO {APP}")
    conn = connect(user=APP)
    try:
        for fn in ("held_plpgsql", "held_sql"):
            run(conn, f"BEGIN; SELECT tenancy.set_tenant(%s); "
                      f"DECLARE f CURSOR WITH HOLD FOR SELECT * FROM app.{fn}(); COMMIT", A)
            # the next client, with no context or with another tenant's
            assert sqlstate_of(conn, "FETCH ALL FROM f") == "42501"
            run(conn, "SELECT tenancy.set_tenant(%s, true)", B)
            assert sqlstate_of(conn, "FETCH 1 FROM f") == "42501"
            assert sqlstate_of(conn, "DO $$ DECLARE c refcursor := 'f'; r record; "
                                     "BEGIN FETCH c INTO r; END $$") == "55000"
            run(conn, "SELECT tenancy.set_tenant(%s, true)", A)
            rows = run(conn, "FETCH ALL FROM f")
            assert len(rows) == 50 and all(r[0].startswith(A + "-secret-") for r in rows)
            run(conn, "CLOSE f")
            run(conn, "SELECT tenancy.reset_tenant()")
    finally:
        conn.close()
    # the same through a protocol-level Execute of the portal by the next client
    w = Wire(APP)
    try:
        assert w.query(f"BEGIN; SELECT tenancy.set_tenant('{A}'); "
                       "DECLARE wf CURSOR WITH HOLD FOR SELECT * FROM app.held_plpgsql(); COMMIT")[0] is None
        assert w.query(f"SELECT tenancy.set_tenant('{B}', true)")[0] is None
        error, rows = w.execute_portal("wf")
        assert rows == [] and error == "55000", (error, len(rows))
    finally:
        w.close()
