"""Smaller holes: creating a tenant's keys is a write; registry rows of tables that are gone are
reported; lookups that decide access fail closed."""
import pytest

from conftest import connect, run, sqlstate_of

T = "sm-t"


@pytest.fixture(scope="module")
def reader(database):
    su = connect()
    run(su, "SELECT tenancy.create_tenant(%s, %s)", T, T)
    run(su, """DO $$ BEGIN
                 IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sm_reader') THEN
                     EXECUTE 'DROP OWNED BY sm_reader'; EXECUTE 'DROP ROLE sm_reader';
                 END IF; END $$""")
    run(su, "CREATE ROLE sm_reader LOGIN")
    run(su, "SELECT tenancy.grant_tenant('sm_reader', %s, 'read')", T)
    yield su
    su.close()


def test_a_read_grant_cannot_create_keys(reader):
    conn = connect(user="sm_reader")
    try:
        run(conn, "SELECT tenancy.set_tenant(%s, true)", T)
        for sql in ["SELECT tenancy.encrypt('x'::text)", "SELECT tenancy.blind_index('x')",
                    "SELECT tenancy.active_key_version()"]:
            assert sqlstate_of(conn, sql) == "42501", sql
    finally:
        conn.close()
    assert run(reader, "SELECT count(*) FROM tenancy.keys WHERE tenant = %s", T) == [(0,)]
    # once a writer created them, a reader may use the blind index (a lookup) and decrypt
    run(reader, "SELECT tenancy.grant_tenant('sm_reader', %s, 'read_write')", T)
    conn = connect(user="sm_reader")
    try:
        run(conn, "SELECT tenancy.set_tenant(%s, true)", T)
        c = run(conn, "SELECT tenancy.encrypt('secret'::text)")[0][0]
        idx = run(conn, "SELECT tenancy.blind_index('x')")[0][0]
        run(reader, "SELECT tenancy.grant_tenant('sm_reader', %s, 'read')", T)
        assert run(conn, "SELECT tenancy.decrypt_text(%s)", c) == [("secret",)]
        assert run(conn, "SELECT tenancy.blind_index('x')") == [(idx,)]
    finally:
        conn.close()


def test_dangling_registry_rows_are_reported(reader):
    su = reader
    run(su, "SET pg_tenancy.guard = off")
    run(su, "INSERT INTO tenancy.protected_tables (rel, tenant_column, column_type) VALUES (4000000000::oid::regclass, 'x', 'text')")
    run(su, "RESET pg_tenancy.guard")
    try:
        rows = run(su, "SELECT severity, problem FROM tenancy.check() WHERE object = 'protected table 4000000000'")
        assert rows == [("INFO", "tenancy.protected_tables lists a table that no longer exists")]
    finally:
        run(su, "DELETE FROM tenancy.protected_tables WHERE rel = 4000000000::oid::regclass")
