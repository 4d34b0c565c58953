"""Authorization is current at every statement, whatever the isolation level, and a context is
honoured only if the role that set it holds the grant.

Each change an administrator makes (revoke a grant, revoke the membership that carried it,
suspend, offboard, lower a scope from read_write to read, strip SUPERUSER, drop the role) reaches
a session that is already inside a READ COMMITTED, REPEATABLE READ or SERIALIZABLE transaction
with the tenant entered: at its next statement under the context it holds, and at its next
set_tenant.
"""
import psycopg2
import pytest

from conftest import DB, connect, run, sqlstate_of

LEVELS = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]
T, U = "az-t", "az-u"


@pytest.fixture(scope="module")
def table(database):
    su = connect()
    for t in (T, U):
        run(su, "SELECT tenancy.create_tenant(%s, %s)", t, t)
    run(su, "CREATE TABLE IF NOT EXISTS app.az (tenant_id text NOT NULL, id int, v text, PRIMARY KEY (tenant_id, id))")
    run(su, "SELECT count(*) FROM tenancy.protect('app.az')")
    run(su, "GRANT SELECT, INSERT, UPDATE, DELETE ON app.az TO PUBLIC")
    run(su, "INSERT INTO app.az VALUES (%s, 1, 'mine'), (%s, 1, 'theirs')", T, U)
    yield su
    su.close()


def drop_role(su, name):
    run(su, f"""DO $$ BEGIN
                  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                      EXECUTE 'DROP OWNED BY {name}'; EXECUTE 'DROP ROLE {name}';
                  END IF; END $$""")


def fresh_role(su, name, group=False):
    drop_role(su, name)
    drop_role(su, f"{name}_grp")
    run(su, f"CREATE ROLE {name} LOGIN")
    run(su, f"GRANT USAGE ON SCHEMA app TO {name}")
    if group:
        run(su, f"CREATE ROLE {name}_grp NOLOGIN")
        run(su, f"GRANT {name}_grp TO {name}")
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", f"{name}_grp", T)
    else:
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", name, T)


CHANGES = {
    # name: (uses a group grant, the change, what the next read gets, what the next write gets)
    "revoke_grant": (False, lambda su, r: run(su, "SELECT tenancy.revoke_tenant(%s, %s)", r, T), "42501", "42501"),
    "revoke_membership": (True, lambda su, r: run(su, f"REVOKE {r}_grp FROM {r}"), "42501", "42501"),
    "suspend": (False, lambda su, r: run(su, "SELECT tenancy.set_status(%s, 'suspended')", T), "55000", "55000"),
    "offboard": (False, None, "55000", "55000"),
    "read_scope": (False, lambda su, r: run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read')", r, T), None, "42501"),
    "read_only": (False, lambda su, r: run(su, "SELECT tenancy.set_status(%s, 'read_only')", T), None, "25006"),
}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changes_reach_an_open_transaction(table, level, change):
    su = table
    role = "az_" + change[:10]
    group, apply, read_state, write_state = CHANGES[change]
    fresh_role(su, role, group)
    tenant = T
    if change == "offboard":  # final: a tenant of its own for each run
        tenant = f"az-off-{level.split()[0].lower()}"
        run(su, "SELECT tenancy.create_tenant(%s, %s)", tenant, tenant)
        run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", role, tenant)
        run(su, "INSERT INTO app.az VALUES (%s, 1, 'mine')", tenant)
        def apply(su, r):
            run(su, "SELECT tenancy.set_status(%s, 'offboarded')", tenant)
    conn = connect(user=role, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
            cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
            cur.execute("SELECT v FROM app.az ORDER BY id")  # takes the transaction's snapshot
            assert cur.fetchall() == [("mine",)]
            apply(su, role)
            # the next statement under the context already set
            cur.execute("SAVEPOINT s")
            try:
                cur.execute("SELECT v FROM app.az")
                got = None
                assert cur.fetchall() == [("mine",)]
            except psycopg2.Error as e:
                got = e.pgcode
                cur.execute("ROLLBACK TO SAVEPOINT s")
            assert got == read_state, (change, level, got)
            cur.execute("SAVEPOINT s")
            try:
                cur.execute("INSERT INTO app.az (id, v) VALUES (2, 'new')")
                got = None
            except psycopg2.Error as e:
                got = e.pgcode
            cur.execute("ROLLBACK TO SAVEPOINT s")
            assert got == write_state, (change, level, got)
            # and the next set_tenant
            if read_state is not None:
                cur.execute("SAVEPOINT s")
                with pytest.raises(psycopg2.Error) as e:
                    cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
                assert e.value.pgcode == read_state
                cur.execute("ROLLBACK TO SAVEPOINT s")
        conn.rollback()
    finally:
        conn.close()
        run(su, "SELECT tenancy.set_status(%s, 'active')", T)


@pytest.mark.parametrize("level", LEVELS)
def test_role_changes_reach_an_open_transaction(table, level):
    """SUPERUSER taken away, and the role dropped, while its session is open."""
    su = table
    drop_role(su, "az_super")
    run(su, "CREATE ROLE az_super LOGIN SUPERUSER")
    conn = connect(user="az_super", autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
            cur.execute("SELECT tenancy.set_tenant(%s)", (U,))   # a superuser may enter any tenant
            cur.execute("SELECT count(*) FROM app.az")
            run(su, "ALTER ROLE az_super NOSUPERUSER")
            cur.execute("SAVEPOINT s")
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT v FROM app.az")   # no grant at all now
            assert e.value.pgcode == "42501"
            cur.execute("ROLLBACK TO SAVEPOINT s")
        conn.rollback()
    finally:
        conn.close()

    fresh_role(su, "az_dropped")
    conn = connect(user="az_dropped", autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
            cur.execute("SELECT tenancy.set_tenant(%s)", (T,))
            cur.execute("SELECT count(*) FROM app.az")
        conn.commit()
        run(su, "REVOKE ALL ON SCHEMA app FROM az_dropped")
        run(su, "REVOKE ALL ON app.az FROM az_dropped")
        run(su, "DROP ROLE az_dropped")
        # its grant went with it
        assert run(su, "SELECT count(*) FROM tenancy.grants WHERE role::oid NOT IN (SELECT oid FROM pg_roles)")[0][0] == 0
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT tenancy.set_tenant(%s)", (T,))
            assert e.value.pgcode == "42501"
        conn.rollback()
    finally:
        conn.close()
    drop_role(su, "az_super")


def test_a_dropped_role_leaves_no_grant_for_an_oid_reuse(table):
    su = table
    fresh_role(su, "az_gone")
    oid = run(su, "SELECT 'az_gone'::regrole::oid")[0][0]
    run(su, "REVOKE ALL ON SCHEMA app FROM az_gone")
    run(su, "DROP ROLE az_gone")
    assert run(su, "SELECT count(*) FROM tenancy.grants WHERE role::oid = %s", oid)[0][0] == 0


# -------------------------------------------------------------------------------------------
# The role that set a context must hold the grant too
# -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def definer(table):
    su = table
    run(su, "DROP FUNCTION IF EXISTS app.az_rows()")
    for r in ("az_plain", "az_wide"):
        drop_role(su, r)
    run(su, "CREATE ROLE az_plain LOGIN")
    run(su, "GRANT USAGE ON SCHEMA app TO az_plain")
    run(su, "SELECT tenancy.grant_tenant('az_plain', %s, 'read_write')", T)
    run(su, "CREATE ROLE az_wide NOLOGIN")
    run(su, "SELECT tenancy.grant_tenant('az_wide', '*', 'read')")
    run(su, "GRANT USAGE ON SCHEMA app TO az_wide")
    run(su, "GRANT SELECT ON app.az TO az_wide")
    run(su, "GRANT CREATE ON SCHEMA app TO az_wide")
    run(su, "SET ROLE az_wide")
    run(su, """CREATE OR REPLACE FUNCTION app.az_rows() RETURNS SETOF text LANGUAGE sql STABLE
               SECURITY DEFINER PARALLEL SAFE SET search_path = pg_catalog AS $$ SELECT v FROM app.az $$""")
    run(su, "RESET ROLE")
    run(su, "GRANT EXECUTE ON FUNCTION app.az_rows() TO az_plain")
    yield su
    run(su, "DROP FUNCTION app.az_rows()")
    run(su, "REVOKE CREATE ON SCHEMA app FROM az_wide")


def test_startup_option_for_an_ungranted_tenant_is_useless_even_in_a_definer_function(definer):
    # the context arrives in the connection's start-up packet, for a tenant az_plain may not enter
    conn = connect(user="az_plain", options=f"-c pg_tenancy.tenant={U}")
    try:
        assert run(conn, "SHOW pg_tenancy.tenant") == [(U,)]
        assert sqlstate_of(conn, "SELECT * FROM app.az") == "42501"
        # a SECURITY DEFINER function of a role that may enter every tenant does not launder it
        assert sqlstate_of(conn, "SELECT * FROM app.az_rows()") == "42501"
        assert sqlstate_of(conn, "SELECT tenancy.current_tenant()") == "42501"
        # nor does a parallel worker running that function
        run(conn, "SET force_parallel_mode = on")
        run(conn, "SET parallel_setup_cost = 0")
        assert sqlstate_of(conn, "SELECT * FROM app.az_rows()") == "42501"
        run(conn, "RESET force_parallel_mode")
        # the granted tenant, set by the role itself, works through the function as well
        run(conn, "SELECT tenancy.set_tenant(%s, true)", T)
        assert run(conn, "SELECT * FROM app.az_rows()") == [("mine",)]
    finally:
        conn.close()


@pytest.mark.parametrize("where", ["ROLE", "DATABASE"])
def test_role_and_database_defaults_are_verified_for_the_session_user(definer, where):
    su = definer
    target = "az_plain" if where == "ROLE" else DB
    # stored by a superuser, who could enter the tenant: the session's role still cannot
    run(su, f"ALTER {where} {target} SET pg_tenancy.tenant = '{U}'")
    try:
        conn = connect(user="az_plain")
        try:
            assert run(conn, "SHOW pg_tenancy.tenant") == [(U,)]
            assert sqlstate_of(conn, "SELECT * FROM app.az_rows()") == "42501"
            assert sqlstate_of(conn, "SELECT count(*) FROM app.az") == "42501"
        finally:
            conn.close()
    finally:
        run(su, f"ALTER {where} {target} RESET pg_tenancy.tenant")


def test_set_role_needs_both_roles_granted(definer):
    su = definer
    run(su, "GRANT az_plain TO az_wide")
    run(su, "ALTER ROLE az_wide LOGIN")
    try:
        conn = connect(user="az_wide")
        try:
            # az_wide (all tenants, read) sets U, then acts as az_plain (T only): refused
            run(conn, "SELECT tenancy.set_tenant(%s, true)", U)
            run(conn, "SET ROLE az_plain")
            assert sqlstate_of(conn, "SELECT count(*) FROM app.az") == "42501"
            # az_plain sets T itself: fine for az_plain
            run(conn, "SELECT tenancy.set_tenant(%s, true)", T)
            assert run(conn, "SELECT v FROM app.az") == [("mine",)]
        finally:
            conn.close()
    finally:
        run(su, "ALTER ROLE az_wide NOLOGIN")
        run(su, "REVOKE az_plain FROM az_wide")


def test_cursors_follow_revocations_and_suspensions(table):
    """A cursor (held or not) declared before a revoke or a suspension is not read after it."""
    su = table
    fresh_role(su, "az_cursor")
    conn = connect(user="az_cursor")
    try:
        run(conn, "SELECT tenancy.set_tenant(%s, true)", T)
        run(conn, "BEGIN; DECLARE hc CURSOR WITH HOLD FOR SELECT v FROM app.az; COMMIT")
        assert run(conn, "FETCH 1 FROM hc") == [("mine",)]
        run(conn, "MOVE ABSOLUTE 0 IN hc")
        run(su, "SELECT tenancy.set_status(%s, 'suspended')", T)
        assert sqlstate_of(conn, "FETCH 1 FROM hc") == "55000"
        assert sqlstate_of(conn, "DO $$ DECLARE c refcursor := 'hc'; r record; BEGIN FETCH c INTO r; END $$") == "55000"
        run(su, "SELECT tenancy.set_status(%s, 'active')", T)
        assert run(conn, "FETCH 1 FROM hc") == [("mine",)]
        # a rollback that restores the declaring context verifies nothing: the cursor stays locked
        run(conn, "MOVE ABSOLUTE 0 IN hc")
        run(su, "SELECT tenancy.set_status(%s, 'suspended')", T)
        run(conn, "BEGIN; SET LOCAL pg_tenancy.tenant = ''; ROLLBACK")
        assert sqlstate_of(conn, "DO $$ DECLARE c refcursor := 'hc'; r record; BEGIN FETCH c INTO r; END $$") == "55000"
        run(su, "SELECT tenancy.set_status(%s, 'active')", T)
        assert run(conn, "FETCH 1 FROM hc") == [("mine",)]
        # a cursor without HOLD, inside its transaction: by SQL FETCH and by PL/pgSQL's
        run(conn, "BEGIN")
        run(conn, "DECLARE c CURSOR FOR SELECT v FROM app.az")
        run(conn, "DECLARE c2 CURSOR FOR SELECT v FROM app.az")
        run(su, "SELECT tenancy.revoke_tenant('az_cursor', %s)", T)
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("DO $$ DECLARE k refcursor := 'c2'; r record; BEGIN FETCH k INTO r; END $$")
        assert e.value.pgcode == "42501"  # verified again before the cursor's statement runs again
        run(conn, "ROLLBACK")
        run(su, "SELECT tenancy.grant_tenant('az_cursor', %s, 'read')", T)
        run(conn, "BEGIN")
        run(conn, "DECLARE c CURSOR FOR SELECT v FROM app.az")
        run(su, "SELECT tenancy.revoke_tenant('az_cursor', %s)", T)
        assert sqlstate_of(conn, "FETCH 1 FROM c") == "42501"
    finally:
        conn.close()
        run(su, "SELECT tenancy.set_status(%s, 'active')", T)
