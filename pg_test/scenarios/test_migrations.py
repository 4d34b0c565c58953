"""Migrations by tenant cohort (issue 12, runbook section 3): expand once, then each tenant in
its own transaction with a ledger, run as a role row security confines, in the tenant's context;
a failure leaves its tenant as it was; a rerun continues where a run stopped, after a kill -9
too; parallel runs share the tenants without waiting on each other; a cohort moves back by its
pointer while the others stay; bad input is refused with its SQLSTATE."""
import os
import signal
import threading
import time

import psycopg2
import pytest

from conftest import APP, DB, OWNER, connect, run, sqlstate_of, wait_for_server

MG = [f"mg-{c}" for c in "abcdef"]
COHORT = '{"tenants": [' + ", ".join(f'"{t}"' for t in MG) + ']}'


@pytest.fixture
def mg(database):
    su = connect()
    run(su, "DELETE FROM tenancy.migrations")
    run(su, "UPDATE tenancy.tenants SET schema_version = 0")
    for t in MG:
        if not run(su, "SELECT 1 FROM tenancy.tenants WHERE id = %s", t):
            run(su, "SELECT tenancy.create_tenant(%s)", t)
            run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", APP, t)
    own = connect(user=OWNER)
    run(own, "DROP TABLE IF EXISTS app.mg_orders")
    run(own, "CREATE TABLE app.mg_orders (tenant_id text NOT NULL, id int, amount int, PRIMARY KEY (tenant_id, id))")
    run(own, "SELECT count(*) FROM tenancy.protect('app.mg_orders')")
    run(own, f"GRANT SELECT, INSERT, UPDATE, DELETE ON app.mg_orders TO {APP}")
    own.close()
    run(su, """INSERT INTO app.mg_orders SELECT t, i, i * 10 FROM unnest(%s::text[]) t, generate_series(1, 5) i""", MG)
    yield su
    su = connect()      # (a test may have killed the server's backends)
    run(su, "DELETE FROM tenancy.migrations")
    run(su, "UPDATE tenancy.tenants SET schema_version = 0")
    su.close()


def add_cents(su, per_tenant="UPDATE app.mg_orders SET cents = amount * 100", **kw):
    run(su, "SELECT tenancy.add_migration('mg-cents', 1, 'ALTER TABLE app.mg_orders ADD COLUMN cents int', "
            "per_tenant => %s, down => %s, cleanup => 'ALTER TABLE app.mg_orders DROP COLUMN cents', run_as => %s, ddl_as => %s)",
        per_tenant, kw.get("down", "UPDATE app.mg_orders SET cents = NULL"), APP, OWNER)


def migrate(su, name, cohort=None):
    return run(su, "CALL tenancy.migrate(%s, %s)", name, cohort)[0][0]


def versions(su):
    return dict(run(su, "SELECT id, schema_version FROM tenancy.tenants WHERE id = ANY (%s)", MG))


def cents(su):
    return dict(run(su, "SELECT tenant_id, count(cents) FROM app.mg_orders GROUP BY 1"))


def test_a_cohort_moves_tenant_by_tenant_and_a_rerun_continues(mg):
    su = mg
    add_cents(su)
    app = connect(user=APP)
    run(app, "SELECT tenancy.set_tenant(%s, true)", MG[0])
    assert run(app, "SELECT tenancy.schema_version()") == [(0,)]
    r = migrate(su, "mg-cents", '{"tenants": ["mg-a", "mg-b"]}')
    assert (r["applied"], r["failed"], r["version"]) == (2, 0, 1), r
    assert versions(su) == {"mg-a": 1, "mg-b": 1, "mg-c": 0, "mg-d": 0, "mg-e": 0, "mg-f": 0}
    assert cents(su) == {"mg-a": 5, "mg-b": 5, "mg-c": 0, "mg-d": 0, "mg-e": 0, "mg-f": 0}
    # an open session of a migrated tenant sees its version at its next statement
    assert run(app, "SELECT tenancy.schema_version()") == [(1,)]
    # the rest: the two done are not done again
    r = migrate(su, "mg-cents", COHORT)
    assert (r["applied"], r["already"]) == (4, 2), r
    assert run(su, "SELECT count(*), max(attempts), bool_and(state = 'applied') FROM tenancy.migration_ledger "
                   "WHERE migration = 'mg-cents' AND tenant = ANY (%s)", MG) == [(6, 1, True)]
    # the per-tenant step ran in each tenant's context as the application role: row security
    # kept each run to its tenant (5 rows each, no tenant's row updated twice)
    assert cents(su) == {t: 5 for t in MG}
    app.close()


def test_a_failing_tenant_is_left_as_it_was_and_the_others_move(mg):
    su = mg
    # mg-c has one row the step cannot take (division by zero): its whole step is undone
    run(su, "UPDATE app.mg_orders SET amount = 31 WHERE tenant_id = 'mg-c' AND id = 2")
    add_cents(su, per_tenant="UPDATE app.mg_orders SET cents = 100 / (amount - 31)")
    r = migrate(su, "mg-cents", '{"tenants": ["mg-b", "mg-c", "mg-d"]}')
    assert (r["applied"], r["failed"]) == (2, 1), r
    assert run(su, "SELECT state, sqlstate, attempts FROM tenancy.migration_ledger WHERE tenant = 'mg-c'") == [("failed", "22012", 1)]
    assert versions(su)["mg-c"] == 0
    assert cents(su)["mg-c"] == 0          # none of its rows, not only the failing one
    assert cents(su)["mg-b"] == 5 and cents(su)["mg-d"] == 5
    # the ledger holds no row value and no message, only the SQLSTATE
    assert run(su, "SELECT count(*) FROM tenancy.migration_ledger l WHERE l::text LIKE '%%division%%'") == [(0,)]
    # fixed, the rerun takes it
    run(su, "UPDATE app.mg_orders SET amount = 20 WHERE tenant_id = 'mg-c' AND id = 2")
    r = migrate(su, "mg-cents", '{"tenants": ["mg-b", "mg-c", "mg-d"]}')
    assert (r["applied"], r["already"], r["failed"]) == (1, 2, 0), r
    assert run(su, "SELECT state, sqlstate, attempts FROM tenancy.migration_ledger WHERE tenant = 'mg-c'") == [("applied", None, 2)]


def test_versions_apply_in_order(mg):
    su = mg
    add_cents(su)
    run(su, "SELECT tenancy.add_migration('mg-note', 2, 'ALTER TABLE app.mg_orders ADD COLUMN note text', "
            "per_tenant => 'UPDATE app.mg_orders SET note = ''v2''', run_as => %s, ddl_as => %s)", APP, OWNER)
    # version 2 before version 1 is expanded: refused
    assert sqlstate_of(su, "CALL tenancy.migrate('mg-note')") == "55000"
    migrate(su, "mg-cents", '{"tenants": ["mg-a"]}')
    r = migrate(su, "mg-note", '{"tenants": ["mg-a", "mg-b"]}')
    # mg-b has not had version 1: blocked (recorded as failed, 55000), mg-a moves to 2
    assert (r["applied"], r["blocked"]) == (1, 1), r
    assert versions(su)["mg-a"] == 2 and versions(su)["mg-b"] == 0
    assert run(su, "SELECT sqlstate FROM tenancy.migration_ledger WHERE migration = 'mg-note' AND tenant = 'mg-b'") == [("55000",)]


def test_kill_9_in_the_middle_resumes_where_it_stopped(mg):
    su = mg
    add_cents(su, per_tenant="SELECT pg_sleep(CASE WHEN tenancy.current_tenant() = 'mg-c' THEN 60 ELSE 0 END); "
                             "UPDATE app.mg_orders SET cents = amount * 100")
    runner = connect()
    pid = run(runner, "SELECT pg_backend_pid()")[0][0]
    th = threading.Thread(target=lambda: sqlstate_of(runner, "CALL tenancy.migrate('mg-cents', %s)", COHORT))
    th.start()
    watch = connect()
    for _ in range(500):
        if run(watch, "SELECT count(*) FROM tenancy.migration_ledger WHERE tenant = 'mg-b' AND state = 'applied'")[0][0]:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the migration did not reach mg-c")
    watch.close()
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    th.join(timeout=30)
    try:
        runner.close()
    except psycopg2.Error:
        pass
    wait_for_server()
    su = connect()
    v = versions(su)
    assert (v["mg-a"], v["mg-b"], v["mg-c"], v["mg-d"]) == (1, 1, 0, 0), v
    assert cents(su)["mg-c"] == 0
    assert run(su, "SELECT count(*) FROM tenancy.migration_ledger WHERE tenant = 'mg-c'") == [(0,)]
    run(su, "UPDATE tenancy.migrations SET per_tenant = 'UPDATE app.mg_orders SET cents = amount * 100'")
    r = migrate(su, "mg-cents", COHORT)
    assert (r["applied"], r["already"], r["failed"]) == (len(MG) - 2, 2, 0), r
    assert versions(su) == {t: 1 for t in MG}
    assert run(su, "SELECT max(attempts) FROM tenancy.migration_ledger WHERE tenant = ANY (%s)", MG) == [(1,)]
    assert cents(su) == {t: 5 for t in MG}
    su.close()


def test_parallel_runs_share_the_tenants(mg):
    su = mg
    add_cents(su, per_tenant="SELECT pg_sleep(0.1); UPDATE app.mg_orders SET cents = amount * 100")
    migrate(su, "mg-cents", '{"tenants": []}')      # expand alone
    reports, errors = [], []

    def one():
        c = connect()
        try:
            reports.append(migrate(c, "mg-cents", COHORT))
        except psycopg2.Error as e:
            errors.append(e.pgcode)
        finally:
            c.close()

    ths = [threading.Thread(target=one) for _ in range(3)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(timeout=60)
    assert errors == []
    assert sum(r["applied"] for r in reports) == len(MG), reports
    assert all(r["failed"] == 0 for r in reports), reports
    assert run(su, "SELECT count(*), max(attempts) FROM tenancy.migration_ledger WHERE tenant = ANY (%s)", MG) == [(len(MG), 1)]
    assert cents(su) == {t: 5 for t in MG}


def test_a_cohort_moves_back_while_the_others_stay(mg):
    su = mg
    add_cents(su, down=None)
    migrate(su, "mg-cents", COHORT)
    app = connect(user=APP)
    run(app, "SELECT tenancy.set_tenant('mg-e', true)")
    assert run(app, "SELECT tenancy.schema_version()") == [(1,)]
    # without a down step, the cohort's pointer moves back in one statement
    r = run(su, "CALL tenancy.rollback_migration('mg-cents', '{\"tenants\": [\"mg-a\", \"mg-b\"]}')")[0][0]
    assert (r["rolled_back"], r["cleaned_up"]) == (2, False), r
    assert versions(su) == {"mg-a": 0, "mg-b": 0, "mg-c": 1, "mg-d": 1, "mg-e": 1, "mg-f": 1}
    # the other cohort keeps working on the new version, and its rows are untouched
    assert run(app, "SELECT tenancy.schema_version(), count(cents) FROM app.mg_orders") == [(1, 5)]
    run(app, "UPDATE app.mg_orders SET cents = cents + 1 WHERE id = 1")
    assert run(su, "SELECT state FROM tenancy.migration_ledger WHERE tenant = 'mg-a'") == [("rolled_back",)]
    # contract waits for every tenant
    assert sqlstate_of(su, "SELECT tenancy.contract_migration('mg-cents')") == "55000"
    # the rest back: no tenant is left on the version, cleanup undoes up
    r = run(su, "CALL tenancy.rollback_migration('mg-cents')")[0][0]
    assert r["cleaned_up"] is True, r
    assert run(su, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'mg_orders' AND column_name = 'cents'") == [(0,)]
    assert run(su, "SELECT expanded_at FROM tenancy.migrations WHERE name = 'mg-cents'") == [(None,)]
    app.close()


def test_a_down_step_runs_per_tenant_and_contract_after_everyone(mg):
    su = mg
    add_cents(su)
    run(su, "UPDATE tenancy.migrations SET contract = 'ALTER TABLE app.mg_orders DROP COLUMN amount'")
    # (the database's other tenants, some of them suspended by other scenarios, count as moved)
    migrate(su, "mg-cents", COHORT)
    run(su, "UPDATE tenancy.tenants SET schema_version = 1 WHERE id <> ALL (%s)", MG)
    r = run(su, "CALL tenancy.rollback_migration('mg-cents', '{\"tenants\": [\"mg-f\"]}')")[0][0]
    assert r["rolled_back"] == 1, r
    assert cents(su)["mg-f"] == 0 and cents(su)["mg-e"] == 5
    migrate(su, "mg-cents", '{"tenants": ["mg-f"]}')
    run(su, "SELECT tenancy.contract_migration('mg-cents')")
    assert run(su, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'mg_orders' AND column_name = 'amount'") == [(0,)]
    assert run(su, "SELECT contracted_at IS NOT NULL FROM tenancy.migrations WHERE name = 'mg-cents'") == [(True,)]


def test_cohorts_by_plan_flag_and_percent(mg):
    su = mg
    run(su, "SELECT tenancy.alter_tenant('mg-a', config => '{\"flags\": {\"beta\": true}}'::jsonb)")
    assert run(su, "SELECT array_agg(c) FROM tenancy.cohort('{\"flag\": \"beta\"}') c") == [(["mg-a"],)]
    ten = {c for (c,) in run(su, "SELECT tenancy.cohort('{\"percent\": 10}')")}
    fifty = {c for (c,) in run(su, "SELECT tenancy.cohort('{\"percent\": 50}')")}
    every = {c for (c,) in run(su, "SELECT tenancy.cohort('{\"percent\": 100}')")}
    assert ten <= fifty <= every and set(MG) <= every
    assert run(su, "SELECT count(*) FROM tenancy.cohort('{\"percent\": 0}')") == [(0,)]
    assert {c for (c,) in run(su, "SELECT tenancy.cohort('{\"plan\": \"standard\", \"tenants\": [\"mg-a\", \"mg-b\"]}')")} == {"mg-a", "mg-b"}
    run(su, "SELECT tenancy.alter_tenant('mg-a', config => '{}'::jsonb)")


def test_bad_input_and_who_may(mg):
    su = mg
    app = connect(user=APP)
    add_cents(su)
    assert sqlstate_of(su, "CALL tenancy.migrate('nosuch')") == "42704"
    for cohort in ('[]', '{"tenant": ["mg-a"]}', '{"tenants": "mg-a"}', '{"percent": 120}', '{"plan": 3}'):
        assert sqlstate_of(su, "CALL tenancy.migrate('mg-cents', %s)", cohort) == "22023", cohort
    assert sqlstate_of(su, "CALL tenancy.migrate('mg-cents', '{\"tenants\": [\"mg-a\", \"nosuch\"]}')") == "42704"
    o = f"ddl_as => '{OWNER}'"
    assert sqlstate_of(su, f"SELECT tenancy.add_migration('mg-again', 1, 'SELECT 1', {o})") == "22023"     # version
    assert sqlstate_of(su, f"SELECT tenancy.add_migration('Bad Name', 5, 'SELECT 1', {o})") == "22023"
    assert sqlstate_of(su, f"SELECT tenancy.add_migration('mg-x', 5, 'SELECT 1', per_tenant => 'SELECT 1', {o})") == "22023"
    assert sqlstate_of(su, f"SELECT tenancy.add_migration('mg-x', 5, 'SELECT 1', per_tenant => 'SELECT 1', run_as => 'postgres', {o})") == "22023"
    # the DDL steps never run as a superuser: ddl_as is required, and not a superuser
    assert sqlstate_of(su, "SELECT tenancy.add_migration('mg-x', 5, 'SELECT 1')") == "22023"
    assert sqlstate_of(su, "SELECT tenancy.add_migration('mg-x', 5, 'SELECT 1', ddl_as => 'postgres')") == "22023"
    # a procedure that commits between tenants: not inside a transaction block
    su.autocommit = False
    assert sqlstate_of(su, "CALL tenancy.migrate('mg-cents')") == "2D000"
    su.autocommit = True
    # the application role runs none of it and reads none of it
    for sql in ("CALL tenancy.migrate('mg-cents')", "CALL tenancy.rollback_migration('mg-cents')",
                "SELECT tenancy.add_migration('mg-y', 9, 'SELECT 1', ddl_as => 'scn_app')", "SELECT tenancy.contract_migration('mg-cents')",
                "SELECT tenancy._run_step(0, NULL, NULL, 'SELECT 1', false)",
                "SELECT * FROM tenancy.cohort()", "SELECT * FROM tenancy.migrations",
                "SELECT * FROM tenancy.migration_ledger"):
        assert sqlstate_of(app, sql) == "42501", sql
    # and without a context its version is not a value
    assert sqlstate_of(app, "SELECT tenancy.schema_version()") == "28000"
    app.close()


def test_per_tenant_steps_run_in_signed_mode(mg):
    su = mg
    add_cents(su)
    run(su, f"ALTER DATABASE {DB} SET pg_tenancy.context_mode = 'signed'")
    try:
        signed = connect()
        assert run(signed, "SHOW pg_tenancy.context_mode") == [("signed",)]
        r = migrate(signed, "mg-cents", '{"tenants": ["mg-a", "mg-b"]}')
        assert (r["applied"], r["failed"]) == (2, 0), r
        assert cents(signed)["mg-a"] == 5 and cents(signed)["mg-c"] == 0
        signed.close()
    finally:
        run(su, f"ALTER DATABASE {DB} RESET pg_tenancy.context_mode")


def test_every_tenant_column_but_the_pointer_invalidates_verifications(mg):
    # the update trigger lists its columns: a column added to tenancy.tenants must be listed
    # too, or changing it would not reach open sessions (schema_version and updated_at alone
    # are left out on purpose: a migration moves one tenant per transaction)
    su = mg
    listed = {c for (c,) in run(su, """
        SELECT a.attname FROM pg_trigger t, unnest(t.tgattr) n, pg_attribute a
         WHERE t.tgrelid = 'tenancy.tenants'::regclass AND t.tgname = 'tenancy_invalidate_update'
           AND a.attrelid = t.tgrelid AND a.attnum = n""")}
    columns = {c for (c,) in run(su, """
        SELECT attname FROM pg_attribute WHERE attrelid = 'tenancy.tenants'::regclass AND attnum > 0 AND NOT attisdropped""")}
    assert listed == columns - {"schema_version", "updated_at"}, (listed, columns)
    # and a change of one of them reaches an open session at its next statement
    app = connect(user=APP)
    run(app, "SELECT tenancy.set_tenant('mg-d', true)")
    assert run(app, "SELECT count(*) FROM app.mg_orders") == [(5,)]
    run(su, "SELECT tenancy.set_status('mg-d', 'suspended')")
    try:
        assert sqlstate_of(app, "SELECT count(*) FROM app.mg_orders") is not None
    finally:
        run(su, "SELECT tenancy.set_status('mg-d', 'active')")
    app.close()


def test_run_as_is_checked_again_at_each_step(mg):
    su = mg
    run(su, "DROP ROLE IF EXISTS mg_runner")
    run(su, "CREATE ROLE mg_runner")
    run(su, "GRANT USAGE ON SCHEMA app TO mg_runner")
    run(su, "GRANT SELECT, UPDATE ON app.mg_orders TO mg_runner")
    for t in MG:
        run(su, "SELECT tenancy.grant_tenant('mg_runner', %s, 'read_write')", t)
    run(su, "SELECT tenancy.add_migration('mg-cents', 1, 'ALTER TABLE app.mg_orders ADD COLUMN cents int', "
            "per_tenant => 'UPDATE app.mg_orders SET cents = amount * 100', run_as => 'mg_runner', ddl_as => %s)", OWNER)
    # made a role row security does not apply to after the migration was registered: no step runs
    run(su, "ALTER ROLE mg_runner BYPASSRLS")
    try:
        r = migrate(su, "mg-cents", COHORT)
        assert (r["applied"], r["failed"]) == (0, len(MG)), r
        assert run(su, "SELECT DISTINCT sqlstate FROM tenancy.migration_ledger WHERE tenant = ANY (%s)", MG) == [("22023",)]
        assert cents(su) == {t: 0 for t in MG}
    finally:
        run(su, "ALTER ROLE mg_runner NOBYPASSRLS")
    r = migrate(su, "mg-cents", COHORT)
    assert r["applied"] == len(MG), r
    run(su, "DELETE FROM tenancy.migrations")
    for t in MG:
        run(su, "SELECT tenancy.revoke_tenant('mg_runner', %s)", t)
    run(su, "DROP OWNED BY mg_runner")
    run(su, "DROP ROLE mg_runner")


def test_a_step_cannot_leave_its_role_its_tenant_or_the_migration(mg):
    # the steps run in a security-restricted operation as their role: no way back to the
    # superuser who called migrate(), no other tenant's rows, nothing left in the session
    su = mg
    own = connect(user=OWNER)
    run(own, "CREATE TABLE app.mg_who (step text, who text)")
    run(own, f"GRANT INSERT ON app.mg_who TO {APP}")
    # a trigger the owner put on a table the up step changes runs as the owner, not as the superuser
    run(own, """CREATE FUNCTION app.mg_note() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO app.mg_who VALUES ('trigger', current_user); RETURN NULL; END $$""")
    run(own, "CREATE TABLE app.mg_settings (v text)")
    run(own, "CREATE TRIGGER mg_note AFTER INSERT ON app.mg_settings FOR EACH STATEMENT EXECUTE FUNCTION app.mg_note()")
    own.close()
    run(su, "SELECT tenancy.add_migration('mg-cents', 1, 'INSERT INTO app.mg_settings VALUES (''v1''); "
            "INSERT INTO app.mg_who VALUES (''up'', current_user)', "
            "per_tenant => 'INSERT INTO app.mg_who VALUES (''step'', current_user)', run_as => %s, ddl_as => %s)", APP, OWNER)
    before = run(su, "SELECT current_user, current_setting('search_path')")
    r = migrate(su, "mg-cents", '{"tenants": ["mg-a"]}')
    assert r["applied"] == 1, r
    assert sorted(run(su, "SELECT step, who FROM app.mg_who")) == sorted([("trigger", OWNER), ("up", OWNER), ("step", APP)])
    assert run(su, "SELECT current_user, current_setting('search_path')") == before
    # what a step may not do: each one fails its tenant (nothing of it kept), the SQLSTATE recorded
    attempts = {
        "mg-b": "RESET ROLE; DELETE FROM app.mg_orders",
        "mg-c": "SELECT set_config('role', 'none', false); DELETE FROM app.mg_orders",
        "mg-d": "SELECT set_config('pg_tenancy.tenant', 'mg-a', true); DELETE FROM app.mg_orders",
        "mg-e": "CREATE TEMP TABLE mg_shadow (v text)",
        "mg-f": "RESET pg_tenancy.tenant; DELETE FROM app.mg_orders",
    }
    run(su, "DELETE FROM tenancy.migrations")
    run(su, "UPDATE tenancy.tenants SET schema_version = 0 WHERE id = ANY (%s)", MG)
    for v, (t, sql) in enumerate(sorted(attempts.items()), start=1):
        run(su, "SELECT tenancy.add_migration(%s, %s, 'SELECT 1', per_tenant => %s, run_as => %s, ddl_as => %s)",
            f"mg-bad-{v}", v, sql, APP, OWNER)
        run(su, "UPDATE tenancy.tenants SET schema_version = %s WHERE id = %s", v - 1, t)
        r = migrate(su, f"mg-bad-{v}", f'{{"tenants": ["{t}"]}}')
        assert r["failed"] == 1, (t, sql, r)
        code = run(su, "SELECT sqlstate FROM tenancy.migration_ledger WHERE tenant = %s", t)[0][0]
        assert code in ("42501", "28000"), (t, sql, code)
    # no tenant lost a row, and the caller's session is as it was
    assert dict(run(su, "SELECT tenant_id, count(*) FROM app.mg_orders GROUP BY 1")) == {t: 5 for t in MG}
    assert run(su, "SELECT current_user, current_setting('search_path')") == before
    assert run(su, "SELECT count(*) FROM pg_class WHERE relname = 'mg_shadow'") == [(0,)]
    # a session-level SET in a step does not outlive it
    run(su, "SELECT tenancy.add_migration('mg-set', 10, 'SELECT 1', per_tenant => 'SET search_path = app', run_as => %s, ddl_as => %s)", APP, OWNER)
    run(su, "UPDATE tenancy.tenants SET schema_version = 5 WHERE id = 'mg-a'")
    assert migrate(su, "mg-set", '{"tenants": ["mg-a"]}')["applied"] == 1
    assert run(su, "SELECT current_setting('search_path')") == [(before[0][1],)]
    own = connect(user=OWNER)
    run(own, "DROP TABLE app.mg_who, app.mg_settings")
    run(own, "DROP FUNCTION app.mg_note()")
    own.close()


def test_check_reports_failed_tenants_and_unusable_roles(mg):
    su = mg
    run(su, "UPDATE app.mg_orders SET amount = 31 WHERE tenant_id = 'mg-c' AND id = 2")
    add_cents(su, per_tenant="UPDATE app.mg_orders SET cents = 100 / (amount - 31)")
    migrate(su, "mg-cents", '{"tenants": ["mg-b", "mg-c"]}')
    rows = run(su, "SELECT severity, problem FROM tenancy.check() WHERE object = 'migration mg-cents'")
    assert rows == [("WARNING", "1 tenant(s) failed its per-tenant step (SQLSTATE 22012); they stay on the version before")], rows
    run(su, "DROP ROLE IF EXISTS mg_gone")
    run(su, "CREATE ROLE mg_gone")
    run(su, "SELECT tenancy.add_migration('mg-gone', 2, 'SELECT 1', ddl_as => 'mg_gone')")
    run(su, "DROP ROLE mg_gone")
    assert run(su, "SELECT severity FROM tenancy.check() WHERE object = 'migration mg-gone'") == [("ERROR",)]
    # and its steps are refused, with a message that says why
    assert sqlstate_of(su, "CALL tenancy.migrate('mg-gone')") == "22023"


def test_the_guard_judges_the_steps_role_not_the_superuser_who_calls(mg):
    # owner code a step reaches (here a SECURITY DEFINER function of the owner's) plants a
    # restrictive policy that would copy every tenant's rows out: the guard refuses it as it
    # refuses the owner, though the session started as the superuser who called migrate()
    su = mg
    own = connect(user=OWNER)
    run(own, "CREATE TABLE app.mg_loot (x text)")
    run(own, "GRANT INSERT, SELECT ON app.mg_loot TO PUBLIC")
    run(own, """CREATE FUNCTION app.mg_spy(r app.mg_orders) RETURNS bool LANGUAGE plpgsql COST 0.0001
                AS $$ BEGIN INSERT INTO app.mg_loot VALUES (r::text); RETURN true; END $$""")
    run(own, """CREATE FUNCTION app.mg_plant() RETURNS void LANGUAGE plpgsql SECURITY DEFINER
                SET search_path = app, pg_catalog AS $$ BEGIN
                EXECUTE 'CREATE POLICY mg_leak ON app.mg_orders AS RESTRICTIVE FOR SELECT USING (app.mg_spy(mg_orders))';
                END $$""")
    run(own, f"GRANT EXECUTE ON FUNCTION app.mg_plant() TO {APP}")
    assert sqlstate_of(own, "SELECT app.mg_plant()") == "42501"      # the owner itself: refused
    mark = run(su, "SELECT coalesce(max(id), 0) FROM tenancy.audit_log")[0][0]
    try:
        run(su, "SELECT tenancy.add_migration('mg-plant', 1, 'SELECT 1', per_tenant => 'SELECT app.mg_plant()', "
                "run_as => %s, ddl_as => %s)", APP, OWNER)
        r = migrate(su, "mg-plant", '{"tenants": ["mg-a"]}')
        assert r["failed"] == 1, r
        assert run(su, "SELECT sqlstate FROM tenancy.migration_ledger WHERE tenant = 'mg-a'") == [("42501",)]
        # and through the up step, run as ddl_as
        run(su, "SELECT tenancy.add_migration('mg-plant-up', 2, 'SELECT app.mg_plant()', ddl_as => %s)", OWNER)
        run(su, "UPDATE tenancy.tenants SET schema_version = 1 WHERE id = 'mg-b'")
        assert sqlstate_of(su, "CALL tenancy.migrate('mg-plant-up', '{\"tenants\": [\"mg-b\"]}')") == "42501"
        assert run(su, "SELECT count(*) FROM pg_policy WHERE polname = 'mg_leak'") == [(0,)]
        assert run(su, "SELECT count(*) FROM app.mg_loot") == [(0,)]
        # the refusals are recorded against the step's role, never the superuser's
        for _ in range(100):
            roles = {r for (r,) in run(su, "SELECT role FROM tenancy.audit_log WHERE id > %s AND event = 'policy_tamper'", mark)}
            if len(roles) >= 2:
                break
            time.sleep(0.05)
        assert roles == {OWNER, APP}, roles
    finally:
        run(own, "DROP FUNCTION app.mg_plant()")
        run(own, "DROP FUNCTION app.mg_spy(app.mg_orders)")
        run(own, "DROP TABLE app.mg_loot")
        own.close()
