"""What a table owner (not a superuser) can and cannot do to a protected table.

Refused, because it has no legitimate use on a protected table: re-keying it onto another column,
putting it under a parent that is not protected (by INHERIT or ATTACH PARTITION), attaching a
table that already holds rows as its partition or child, rules, and restrictive policies that
would run non-leakproof code before the tenant filter. Allowed but surfaced, because it has
legitimate uses: code that runs over every tenant's rows (expression indexes, CHECK
constraints, triggers, statistics, ALTER COLUMN ... TYPE ... USING) is recorded in the denial log
as `protected_ddl`, and each function it calls is listed by tenancy.check() until a superuser
approves that function's definition.
"""
import time

import pytest

from conftest import APP, OWNER, TENANTS, connect, run, sqlstate_of

A, B = TENANTS[5], TENANTS[6]


@pytest.fixture
def owned(su):
    """A protected table of the owner's, with a row per tenant, and a plain table of theirs."""
    own = connect(user=OWNER)
    for t in ("od_parent", "od_loaded", "od_loot", "od_empty", "od_items", "od_plain_parent", "od_list"):
        run(own, f"DROP TABLE IF EXISTS app.{t} CASCADE")
    run(own, "CREATE TABLE app.od_items (tenant_id text NOT NULL, id int, amount int, email text, other text)")
    run(own, "SELECT count(*) FROM tenancy.protect('app.od_items')")
    run(own, f"GRANT SELECT, INSERT ON app.od_items TO {APP}")
    app = connect(user=APP)
    for t, amount in ((A, 10), (B, 4242)):
        run(app, "BEGIN; SELECT tenancy.set_tenant(%s); "
                 "INSERT INTO app.od_items (id, amount, email) VALUES (1, %s, %s); COMMIT", t, amount, f"{t}@x")
    app.close()
    yield own
    own.close()


def audit_events(su, since, event):
    deadline = time.time() + 10
    while time.time() < deadline:
        rows = run(su, "SELECT relation, detail FROM tenancy.audit_log WHERE id > %s AND event = %s ORDER BY id",
                   since, event)
        if rows:
            return rows
        time.sleep(0.05)
    return []


def last_audit_id(su):
    return run(su, "SELECT coalesce(max(id), 0) FROM tenancy.audit_log")[0][0]


def test_rekeying_is_refused(su, owned):
    # the owner fills another column with one tenant's id everywhere, then re-keys onto it
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_items', 'other')") == "42501"
    assert run(su, "SELECT tenant_column FROM tenancy.protected_tables WHERE rel = 'app.od_items'::regclass") \
        == [("tenant_id",)]
    # protect() on the same column is a repair, and still works
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_items')") is None


def test_an_unprotected_parent_is_refused(su, owned):
    run(owned, "CREATE TABLE app.od_plain_parent (tenant_id text, id int, amount int, email text, other text)")
    assert sqlstate_of(owned, "ALTER TABLE app.od_items INHERIT app.od_plain_parent") == "42501"
    assert run(su, "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'app.od_items'::regclass") == [(0,)]
    # the same by ATTACH PARTITION to a partitioned table that is not protected
    run(owned, "CREATE TABLE app.od_list (tenant_id text NOT NULL, id int, amount int, email text, other text) "
               "PARTITION BY LIST (tenant_id)")
    run(owned, "CREATE TABLE app.od_loot (LIKE app.od_list)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_loot')")
    assert sqlstate_of(owned, "ALTER TABLE app.od_list ATTACH PARTITION app.od_loot DEFAULT") == "42501"
    # protect() refuses a table under an unprotected parent too
    run(owned, "CREATE TABLE app.od_empty PARTITION OF app.od_list DEFAULT")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_empty')") == "42501"


def test_attaching_a_table_that_holds_rows_is_refused(su, owned):
    run(owned, "CREATE TABLE app.od_parent (tenant_id text NOT NULL, id int, v text) PARTITION BY LIST (tenant_id)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_parent')")
    # rows written for any tenant, outside the policies
    run(owned, "CREATE TABLE app.od_loaded (tenant_id text NOT NULL, id int, v text)")
    run(owned, "INSERT INTO app.od_loaded VALUES (%s, 1, 'forged')", B)
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_loaded FOR VALUES IN ('{B}')") == "42501"
    # ... even protected first (its rows were still written before)
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_loaded')")
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_loaded FOR VALUES IN ('{B}')") == "42501"
    # an empty table attaches, and is protected with its parent
    run(owned, "CREATE TABLE app.od_empty (tenant_id text NOT NULL, id int, v text)")
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_empty FOR VALUES IN ('{A}')") is None
    assert run(su, "SELECT count(*) FROM tenancy.protected_tables WHERE rel = 'app.od_empty'::regclass") == [(1,)]
    # a superuser may attach a loaded table (a bulk load it is responsible for)
    run(su, "DELETE FROM app.od_loaded")
    run(su, "INSERT INTO app.od_loaded VALUES (%s, 1, 'loaded')", B)
    assert sqlstate_of(su, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_loaded FOR VALUES IN ('{B}')") is None


def test_rules_are_refused(su, owned):
    run(owned, "CREATE TABLE app.od_loot (tenant_id text, id int, amount int, email text, other text)")
    since = last_audit_id(su)
    assert sqlstate_of(owned, "CREATE RULE copy AS ON INSERT TO app.od_items DO ALSO "
                              "INSERT INTO app.od_loot VALUES (NEW.*)") == "42501"
    assert sqlstate_of(su, "CREATE RULE copy AS ON INSERT TO app.od_items DO ALSO "
                           "INSERT INTO app.od_loot VALUES (NEW.*)") == "42501"
    assert run(su, "SELECT count(*) FROM pg_rules WHERE tablename = 'od_items'") == [(0,)]
    assert len(audit_events(su, since, "policy_tamper")) >= 1


def test_code_over_every_tenants_rows_is_recorded_and_listed_until_approved(su, owned):
    run(owned, "CREATE TABLE app.od_loot (v text)")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_peek(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RAISE NOTICE 'saw %', $1; RETURN $1; END $$""")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_copy() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
                  BEGIN INSERT INTO app.od_loot VALUES (NEW.email); RETURN NEW; END $$""")
    since = last_audit_id(su)
    owned.notices.clear()
    run(owned, "CREATE INDEX od_peek_idx ON app.od_items (app.od_peek(email))")   # runs over every row
    run(owned, "CREATE TRIGGER od_copy AFTER INSERT ON app.od_items FOR EACH ROW EXECUTE FUNCTION app.od_copy()")
    run(owned, "ALTER TABLE app.od_items ALTER COLUMN amount TYPE bigint USING amount::bigint")
    events = audit_events(su, since, "protected_ddl")
    deadline = time.time() + 5
    while len(events) < 3 and time.time() < deadline:
        time.sleep(0.1)
        events = audit_events(su, since, "protected_ddl")
    details = " | ".join(d for _, d in events)
    assert "app.od_peek(text)" in details and "app.od_copy()" in details, details
    assert "USING" in details, details
    assert {r for r, _ in events} == {"app.od_items"}
    listed = {r[0] for r in run(su, "SELECT object FROM tenancy.check() WHERE problem LIKE 'runs over every tenant%%'")}
    assert {"function app.od_peek(text)", "function app.od_copy()"} <= listed
    # approval by a superuser takes it off the list; a role that is not one cannot approve
    assert sqlstate_of(owned, "SELECT tenancy.approve_function('app.od_peek(text)', 'mine')") == "42501"
    run(su, "SELECT tenancy.approve_function('app.od_peek(text)', 'reviewed: logs only')")
    listed = {r[0] for r in run(su, "SELECT object FROM tenancy.check() WHERE problem LIKE 'runs over every tenant%%'")}
    assert "function app.od_peek(text)" not in listed and "function app.od_copy()" in listed
    # redefining the approved function lapses the approval
    run(owned, """CREATE OR REPLACE FUNCTION app.od_peek(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN INSERT INTO app.od_loot VALUES ($1); RETURN $1; END $$""")
    listed = {r[0] for r in run(su, "SELECT object FROM tenancy.check() WHERE problem LIKE 'runs over every tenant%%'")}
    assert "function app.od_peek(text)" in listed
    run(owned, "DROP TRIGGER od_copy ON app.od_items")
    run(owned, "DROP INDEX app.od_peek_idx")


def test_restrictive_policies_must_not_leak_before_the_tenant_filter(su, owned):
    run(owned, """CREATE OR REPLACE FUNCTION app.od_leak(int) RETURNS boolean LANGUAGE plpgsql COST 0.0001 AS $$
                  BEGIN RAISE NOTICE 'amount %', $1; RETURN true; END $$""")
    assert sqlstate_of(owned, "CREATE POLICY od_leaky ON app.od_items AS RESTRICTIVE FOR SELECT "
                              "USING (app.od_leak(amount))") == "42501"
    assert sqlstate_of(owned, "CREATE POLICY od_cast ON app.od_items AS RESTRICTIVE FOR SELECT "
                              "USING (email::int > 0)") == "42501"   # a cast error is an oracle too
    # leakproof comparisons are fine
    assert sqlstate_of(owned, "CREATE POLICY od_fine ON app.od_items AS RESTRICTIVE FOR SELECT "
                              "USING (email <> 'draft')") is None
    run(owned, "DROP POLICY od_fine ON app.od_items")
    app = connect(user=APP)
    try:
        run(app, "SELECT tenancy.set_tenant(%s, true)", A)
        app.notices.clear()
        assert run(app, "SELECT amount FROM app.od_items") == [(10,)]
        assert not any("4242" in n for n in app.notices)
    finally:
        app.close()


def test_temporary_tables_cannot_be_protected(owned):
    run(owned, "CREATE TEMP TABLE od_tmp (tenant_id text)")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('od_tmp')") == "42809"
    # nor become children of a protected table
    assert sqlstate_of(owned, "CREATE TEMP TABLE od_tmp_child () INHERITS (app.od_items)") == "42809"
