"""pg_dump / pg_restore of a database with protected tables: the catalogs come along, the guard
refuses a restore that has not said it is one, and the restored copy is isolated again."""
import os
import subprocess

from conftest import APP, DB, PORT, ROOT, SOCK, connect, run, sqlstate_of

BIN = "/usr/lib/postgresql/15/bin"
TARGET = "pg_tenancy_restored"


def tool(*args, env=None):
    return subprocess.run([f"{BIN}/{args[0]}", "-h", SOCK, "-p", str(PORT), "-U", "postgres", *args[1:]],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def fresh_target():
    admin = connect(dbname="postgres")
    run(admin, f"DROP DATABASE IF EXISTS {TARGET}")
    run(admin, f"CREATE DATABASE {TARGET}")
    admin.close()


def test_dump_and_restore(su):
    run(su, "SELECT tenancy.set_tenant('t000'); INSERT INTO app.orders (item) VALUES ('dumped')")
    expected = {t: n for t, n in run(su, "SELECT tenant_id, count(*) FROM app.orders GROUP BY 1")}
    registry = run(su, "SELECT rel::text, tenant_column FROM tenancy.protected_tables ORDER BY 1")
    dump = f"{ROOT}/scenarios.dump"
    res = tool("pg_dump", "-Fc", "-f", dump, DB)
    assert res.returncode == 0, res.stderr

    # a plain restore trips the guard, and says what to do
    fresh_target()
    res = tool("pg_restore", "--exit-on-error", "-d", TARGET, dump)
    assert res.returncode != 0
    # (the protected tables' pieces, or the append-only audit log, whichever comes first)
    assert ("cannot be weakened" in res.stderr or "append-only" in res.stderr) and "pg_tenancy.guard=off" in res.stderr

    # the documented restore
    fresh_target()
    res = tool("pg_restore", "--exit-on-error", "-d", TARGET, dump, env={"PGOPTIONS": "-c pg_tenancy.guard=off"})
    assert res.returncode == 0, res.stderr

    target = connect(dbname=TARGET)
    assert run(target, "SELECT rel::text, tenant_column FROM tenancy.protected_tables ORDER BY 1") == registry
    assert run(target, "SELECT count(*) FROM tenancy.tenants")[0][0] >= 10
    errors = run(target, "SELECT object, problem FROM tenancy.check() WHERE severity = 'ERROR'")
    assert errors == []
    # the restored guard is armed again
    assert sqlstate_of(target, "ALTER TABLE app.orders DISABLE ROW LEVEL SECURITY") == "42501"
    target.close()

    app = connect(user=APP, dbname=TARGET, autocommit=False)
    with app.cursor() as cur:
        for tenant, n in expected.items():
            cur.execute("SELECT tenancy.set_tenant(%s)", (tenant,))
            cur.execute("SELECT tenant_id, count(*) FROM app.orders GROUP BY 1")
            assert cur.fetchall() == [(tenant, n)]
            app.rollback()
    app.close()
