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

import psycopg2
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


def test_code_over_every_tenants_rows_needs_a_superusers_approval(su, owned):
    run(owned, "CREATE TABLE app.od_loot (v text)")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_peek(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RAISE NOTICE 'saw %', $1; RETURN $1; END $$""")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_copy() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
                  BEGIN INSERT INTO app.od_loot VALUES (NEW.email); RETURN NEW; END $$""")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_next() RETURNS int LANGUAGE plpgsql AS $$
                  BEGIN PERFORM pg_notify('spy', (SELECT string_agg(email, ',') FROM app.od_items)); RETURN 1; END $$""")
    run(owned, "CREATE DOMAIN app.od_inner AS text CHECK (VALUE IS NULL OR app.od_peek(VALUE) IS NOT NULL)")
    run(owned, "CREATE DOMAIN app.od_outer AS app.od_inner")
    since = last_audit_id(su)
    refused = [
        # the owner's own functions: an index expression, a trigger, a default, a domain two levels down
        "CREATE INDEX od_peek_idx ON app.od_items (app.od_peek(email))",
        "CREATE TRIGGER od_copy AFTER INSERT ON app.od_items FOR EACH ROW EXECUTE FUNCTION app.od_copy()",
        "ALTER TABLE app.od_items ALTER COLUMN id SET DEFAULT app.od_next()",
        "ALTER TABLE app.od_items ALTER COLUMN other TYPE app.od_outer",
        # PostgreSQL's own functions that carry what they see elsewhere
        "ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (set_config('od.x', email, false) IS NOT NULL)",
        "CREATE TRIGGER od_tap AFTER INSERT ON app.od_items FOR EACH ROW "
        "WHEN (pg_notify('tap', NEW.email) IS NULL) EXECUTE FUNCTION suppress_redundant_updates_trigger()",
        "ALTER TABLE app.od_items ADD CONSTRAINT y CHECK (query_to_xml('SELECT 1', false, false, '') IS NOT NULL) NOT VALID",
    ]
    for sql in refused:
        assert sqlstate_of(owned, sql) == "42501", sql
    assert run(su, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.od_items'::regclass AND NOT tgisinternal") == [(1,)]
    tampers = " | ".join(d for _, d in audit_events(su, since, "policy_tamper"))
    assert "app.od_peek(text)" in tampers and "app.od_copy()" in tampers and "pg_notify" in tampers, tampers
    # harmless built-ins and immutable expressions need nothing
    run(owned, "ALTER TABLE app.od_items ADD COLUMN seen timestamptz DEFAULT now()")
    run(owned, "CREATE INDEX od_lower_idx ON app.od_items (lower(email))")
    run(owned, "ALTER TABLE app.od_items ALTER COLUMN amount TYPE bigint USING amount::bigint")
    assert "USING" in " | ".join(d for _, d in audit_events(su, since, "protected_ddl"))
    # a superuser reviews and approves; a role that is not one cannot approve
    assert sqlstate_of(owned, "SELECT tenancy.approve_function('app.od_peek(text)', 'mine')") == "42501"
    run(su, "SELECT tenancy.approve_function('app.od_peek(text)', 'reviewed: logs only')")
    run(owned, "CREATE INDEX od_peek_idx ON app.od_items (app.od_peek(email))")
    # redefining the approved function lapses the approval: listed, and the table's DDL refused
    run(owned, """CREATE OR REPLACE FUNCTION app.od_peek(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN INSERT INTO app.od_loot VALUES ($1); RETURN $1; END $$""")
    listed = {r[0] for r in run(su, "SELECT object FROM tenancy.check() WHERE problem LIKE 'runs over every tenant%%'")}
    assert "function app.od_peek(text)" in listed
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ADD COLUMN z int") == "42501"
    run(owned, "DROP INDEX app.od_peek_idx, app.od_lower_idx")
    run(owned, "ALTER TABLE app.od_items DROP COLUMN seen")
    run(owned, "DROP DOMAIN app.od_outer, app.od_inner")


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


# -------------------------------------------------------------------------------------------
# What a second attacker's read found (each was reproduced before it was fixed)
# -------------------------------------------------------------------------------------------

@pytest.fixture
def ran_log(su):
    run(su, "CREATE TABLE IF NOT EXISTS public.od_ran (who name, what text)")
    run(su, "GRANT INSERT, SELECT ON public.od_ran TO PUBLIC")
    run(su, "TRUNCATE public.od_ran")
    yield lambda: run(su, "SELECT who, what FROM public.od_ran")


def test_attaching_a_view_runs_nothing_of_its_owner(su, owned, ran_log):
    spy = """CREATE FUNCTION pg_temp.spy() RETURNS int LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO public.od_ran VALUES (current_user, 'spy'); RETURN 1; END $$"""
    # as the application role (not the table's owner)
    app = connect(user=APP)
    try:
        run(app, spy)
        # (a view that calls unapproved code is refused outright now)
        assert sqlstate_of(app, "CREATE TEMP VIEW v AS SELECT pg_temp.spy() AS tenant_id") == "42501"
        run(app, "CREATE TEMP VIEW v AS SELECT 1 AS tenant_id")
        assert sqlstate_of(app, "ALTER TABLE app.od_items ATTACH PARTITION pg_temp.v DEFAULT") is not None
        assert sqlstate_of(app, "ALTER TABLE pg_temp.v INHERIT app.od_items") is not None
    finally:
        app.close()
    # as the owner, with a view of its own
    run(owned, spy)
    assert sqlstate_of(owned, "CREATE TEMP VIEW v AS SELECT pg_temp.spy() AS tenant_id, 1 AS id, 1 AS amount, ''::text AS email, ''::text AS other") == "42501"
    run(owned, "CREATE TEMP VIEW v AS SELECT 'x'::text AS tenant_id, 1 AS id, 1 AS amount, ''::text AS email, ''::text AS other")
    assert sqlstate_of(owned, "ALTER TABLE pg_temp.v INHERIT app.od_items") is not None
    assert ran_log() == []
    assert run(su, f"SELECT rolsuper FROM pg_roles WHERE rolname IN ('{APP}', '{OWNER}')") == [(False,), (False,)]


def test_protect_refuses_a_table_it_could_not_isolate(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_docs, app.od_loot CASCADE")
    run(owned, "CREATE TABLE app.od_loot (tenant_id text, body text)")
    run(owned, "CREATE TABLE app.od_docs (tenant_id text NOT NULL, body text)")
    run(owned, "ALTER TABLE app.od_docs ENABLE ROW LEVEL SECURITY")
    run(owned, "CREATE POLICY open_door ON app.od_docs AS PERMISSIVE FOR ALL USING (true) WITH CHECK (true)")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") == "42501"
    run(owned, "DROP POLICY open_door ON app.od_docs")
    run(su, "CREATE RULE od_copy AS ON INSERT TO app.od_docs DO ALSO INSERT INTO app.od_loot VALUES (NEW.*)")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") == "42501"
    run(su, "DROP RULE od_copy ON app.od_docs")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") is None
    # an empty child that carries its own open policy cannot be attached either
    run(owned, "CREATE TABLE app.od_parent (tenant_id text NOT NULL, id int, v text) PARTITION BY LIST (tenant_id)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_parent')")
    run(owned, "CREATE TABLE app.od_empty (tenant_id text NOT NULL, id int, v text)")
    run(owned, "ALTER TABLE app.od_empty ENABLE ROW LEVEL SECURITY")
    run(owned, "CREATE POLICY open_door ON app.od_empty AS PERMISSIVE FOR ALL USING (true)")
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_empty FOR VALUES IN ('{B}')") == "42501"
    run(owned, "DROP TABLE app.od_docs, app.od_loot")


def test_cascading_foreign_keys_from_unprotected_tables_are_refused(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_tids, app.od_amounts CASCADE")
    run(owned, "CREATE TABLE app.od_tids (t text PRIMARY KEY)")
    run(su, "INSERT INTO app.od_tids VALUES (%s), (%s)", A, B)
    for action in ("ON UPDATE CASCADE", "ON DELETE CASCADE", "ON DELETE SET NULL"):
        # (validating a new key reads every tenant's rows: without a context the owner is refused anyway)
        assert sqlstate_of(owned, f"ALTER TABLE app.od_items ADD FOREIGN KEY (tenant_id) REFERENCES app.od_tids (t) {action}") in ("42501", "28000"), action
        assert sqlstate_of(owned, f"ALTER TABLE app.od_items ADD FOREIGN KEY (tenant_id) REFERENCES app.od_tids (t) {action} NOT VALID") == "42501"
    run(owned, "CREATE TABLE app.od_amounts (a int PRIMARY KEY)")
    run(su, "INSERT INTO app.od_amounts SELECT DISTINCT amount FROM app.od_items")
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ADD FOREIGN KEY (amount) REFERENCES app.od_amounts (a) ON DELETE CASCADE NOT VALID") == "42501"
    # NO ACTION / RESTRICT change nothing, but deleting a referenced row tells whether any tenant
    # references it: refused too (a superuser may add such a key)
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ADD CONSTRAINT od_amount_fk FOREIGN KEY (amount) REFERENCES app.od_amounts (a) NOT VALID") == "42501"
    run(su, "ALTER TABLE app.od_items ADD CONSTRAINT od_amount_fk FOREIGN KEY (amount) REFERENCES app.od_amounts (a) NOT VALID")
    assert {r[0] for r in run(su, "SELECT object FROM tenancy.check() WHERE severity = 'ERROR'")} >= {"constraint od_amount_fk on app.od_items"}
    run(su, "ALTER TABLE app.od_items DROP CONSTRAINT od_amount_fk")
    assert run(su, "SELECT count(*) FROM app.od_items WHERE tenant_id = %s", B) == [(1,)]


def test_ddl_errors_on_rows_do_not_show_their_values(su, owned):
    since = last_audit_id(su)
    for sql in ["ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (tenant_id = 'nobody' OR email::int IS NOT NULL)",
                "ALTER TABLE app.od_items ALTER COLUMN email TYPE int USING email::int",
                "CREATE INDEX ON app.od_items ((email::int))",
                "ALTER TABLE app.od_items ADD COLUMN g int GENERATED ALWAYS AS (email::int) STORED"]:
        with owned.cursor() as cur:
            with pytest.raises(Exception) as e:
                cur.execute(sql)
        text = str(e.value) + str(getattr(e.value, "pgerror", ""))
        assert "@x" not in text and e.value.pgcode == "22P02", (sql, text)
    run(su, "INSERT INTO app.od_items (tenant_id, id, amount, email) VALUES (%s, 2, 1, %s)", B, f"{A}@x")
    with owned.cursor() as cur:
        with pytest.raises(Exception) as e:
            cur.execute("CREATE UNIQUE INDEX od_email_u ON app.od_items (email)")
    assert e.value.pgcode == "23505" and "@x" not in str(e.value) and e.value.diag.message_detail is not None
    assert "@x" not in e.value.diag.message_detail
    # notices of a function run over every row are not sent
    run(owned, """CREATE OR REPLACE FUNCTION app.od_peek2(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RAISE NOTICE 'saw %', $1; RETURN $1; END $$""")
    run(su, "SELECT tenancy.approve_function('app.od_peek2(text)', 'test: the shield')")
    owned.notices.clear()
    run(owned, "CREATE INDEX od_peek2_idx ON app.od_items (app.od_peek2(email))")
    assert not any("@x" in n for n in owned.notices), owned.notices
    run(owned, "DROP INDEX app.od_peek2_idx")
    assert len(audit_events(su, since, "protected_ddl")) >= 5


def test_nondeterministic_collations_are_refused(su, owned):
    run(su, "DROP COLLATION IF EXISTS public.od_ci")
    run(su, "CREATE COLLATION public.od_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
    run(owned, "DROP TABLE IF EXISTS app.od_notes")
    run(owned, "CREATE TABLE app.od_notes (tenant_id text COLLATE public.od_ci NOT NULL, note text)")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_notes')") == "42501"
    # (PostgreSQL itself refuses to retype a column its policies use; the guard would refuse it too)
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ALTER COLUMN tenant_id TYPE text COLLATE public.od_ci") is not None
    assert run(su, "SELECT attcollation = 'default'::regcollation FROM pg_attribute "
                   "WHERE attrelid = 'app.od_items'::regclass AND attname = 'tenant_id'") == [(True,)]
    run(owned, "DROP TABLE app.od_notes")


def test_statistics_and_nested_explain_are_not_oracles(su, owned):
    app = connect(user=APP)
    try:
        run(app, "SELECT tenancy.set_tenant(%s, true)", A)
        assert sqlstate_of(app, "SELECT pg_stat_get_xact_tuples_fetched('app.od_items'::regclass)") == "42501"
        assert sqlstate_of(app, "SELECT * FROM pg_stat_user_tables") == "42501"
        run(app, """CREATE FUNCTION pg_temp.n(int) RETURNS bigint LANGUAGE plpgsql AS $$
                    BEGIN RETURN (SELECT count(*) FROM app.od_items WHERE amount > $1); END $$""")
        assert sqlstate_of(app, "EXPLAIN (ANALYZE, BUFFERS) SELECT pg_temp.n(100)") == "42501"
        assert run(app, "SELECT pg_temp.n(0)") == [(1,)]
    finally:
        app.close()
    # monitoring keeps them
    assert sqlstate_of(su, "SELECT count(*) FROM pg_stat_user_tables") is None


def test_foreign_tables_cannot_join_a_protected_table(su, owned):
    run(su, "CREATE EXTENSION IF NOT EXISTS file_fdw")
    run(su, "DROP SERVER IF EXISTS od_files CASCADE")
    run(su, "CREATE SERVER od_files FOREIGN DATA WRAPPER file_fdw")
    assert sqlstate_of(su, "CREATE FOREIGN TABLE app.od_ft () INHERITS (app.od_items) SERVER od_files "
                           "OPTIONS (filename '/dev/null')") == "42501"
    run(su, "DROP SERVER od_files CASCADE")


SHIELDED = "a statement on a protected table failed while it evaluated its rows"


def shielded_error(conn, sql):
    """The error `sql` raises: it must be the shield's, with no value of the rows in it."""
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as e:
            cur.execute(sql)
    d = e.value.diag
    text = " ".join(str(x) for x in (e.value.pgerror, d.message_detail, d.message_hint, d.context) if x)
    assert "@x" not in text, (sql, text)
    assert d.message_primary == SHIELDED, (sql, text)
    return e.value.pgcode


def test_the_shield_hides_every_error_a_row_can_raise(su, owned):
    db = run(su, "SELECT current_database()")[0][0]
    run(owned, """CREATE OR REPLACE FUNCTION app.od_shout(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RAISE SQLSTATE '42P99' USING MESSAGE = 'saw ' || $1; END $$""")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_internal(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RAISE SQLSTATE 'XX000' USING MESSAGE = 'saw ' || $1; END $$""")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_lookup(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN EXECUTE format('SELECT 1 FROM app.%I', $1); RETURN true; END $$""")
    # (approved: a role that is not a superuser may not even try unapproved code; the shield
    # covers approved code that fails, and PostgreSQL's own functions)
    for fn in ("app.od_shout(text)", "app.od_internal(text)", "app.od_lookup(text)"):
        run(su, "SELECT tenancy.approve_function(%s, 'test: the shield')", fn)
    cases = {
        # lookups quote what they did not find
        "ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (email::regclass IS NOT NULL)": "42P01",
        "ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (has_column_privilege('app.od_items', email, 'SELECT'))": "42703",
        # SQLSTATEs raised by a function (one PostgreSQL does not define comes back as XX000)
        "ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (app.od_shout(email))": "XX000",
        "ALTER TABLE app.od_items ADD CONSTRAINT x CHECK (app.od_internal(email))": "XX000",
        "CREATE INDEX ON app.od_items (app.od_lookup(email))": "42P01",
        # a name with its database is the same table
        f"CREATE INDEX ON {db}.app.od_items ((email::int))": "22P02",
    }
    for sql, code in cases.items():
        assert shielded_error(owned, sql) == code, sql
    # errors about the statement itself, not the rows, are shown as they are
    with owned.cursor() as cur:
        with pytest.raises(psycopg2.Error) as e:
            cur.execute("ALTER TABLE app.od_items ADD COLUMN email text")
    assert e.value.pgcode == "42701" and "email" in e.value.diag.message_primary


def test_the_shield_keeps_notices_a_function_turns_back_on(su, owned):
    run(owned, """CREATE OR REPLACE FUNCTION app.od_loud(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN PERFORM set_config('client_min_messages', 'notice', true);
                        RAISE WARNING 'saw %', $1; RETURN true; END $$""")
    run(su, "SELECT tenancy.approve_function('app.od_loud(text)', 'test: the shield')")
    owned.notices.clear()
    run(owned, "CREATE INDEX od_loud_idx ON app.od_items (app.od_loud(email))")
    run(owned, "CLUSTER app.od_items USING od_loud_idx")
    # a bare CLUSTER (every table clustered before) and REINDEX of a whole schema are shielded too
    run(owned, "CLUSTER")
    run(owned, "REINDEX SCHEMA app")  # (the owner owns the schema)
    assert not any("@x" in n for n in owned.notices), owned.notices
    run(owned, "DROP INDEX app.od_loud_idx")


def test_domain_constraints_are_shielded_and_listed(su, owned):
    run(owned, "DROP DOMAIN IF EXISTS app.od_mail CASCADE")
    run(owned, "CREATE DOMAIN app.od_mail AS text")
    run(owned, "ALTER TABLE app.od_items ADD COLUMN mail app.od_mail")
    run(su, "UPDATE app.od_items SET mail = email")
    assert shielded_error(owned, "ALTER DOMAIN app.od_mail ADD CONSTRAINT c CHECK (VALUE::regclass IS NOT NULL)") == "42P01"
    run(owned, """CREATE OR REPLACE FUNCTION app.od_fine(text) RETURNS boolean LANGUAGE sql IMMUTABLE
                  AS $$ SELECT $1 IS NOT NULL $$""")
    # a domain constraint is code over the rows of every column of that type
    assert sqlstate_of(owned, "ALTER DOMAIN app.od_mail ADD CONSTRAINT c CHECK (app.od_fine(VALUE))") == "42501"
    run(su, "SELECT tenancy.approve_function('app.od_fine(text)', 'test: a domain')")
    run(owned, "ALTER DOMAIN app.od_mail ADD CONSTRAINT c CHECK (app.od_fine(VALUE))")
    run(owned, "ALTER TABLE app.od_items DROP COLUMN mail")
    run(owned, "DROP DOMAIN app.od_mail")


def test_a_child_answers_to_its_parents_tenant_column(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_parent, app.od_empty CASCADE")
    run(owned, "CREATE TABLE app.od_parent (tenant_id text NOT NULL, id int, v text) PARTITION BY LIST (tenant_id)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_parent')")
    # a table protected on another column cannot become its partition ...
    run(owned, "CREATE TABLE app.od_empty (tenant_id text NOT NULL, id int, v text NOT NULL)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_empty', 'v')")
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_empty FOR VALUES IN ('{A}')") == "42501"
    assert run(su, "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'app.od_empty'::regclass") == [(0,)]
    # ... and a partition cannot be protected on another column than its parent's
    run(su, "SELECT tenancy.unprotect('app.od_empty')")
    run(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_empty FOR VALUES IN ('{A}')")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_empty', 'v')") == "42501"
    assert run(su, "SELECT tenant_column FROM tenancy.protected_tables WHERE rel = 'app.od_empty'::regclass") \
        == [("tenant_id",)]


def test_protect_and_attach_refuse_what_would_run_before_the_filter(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_tids, app.od_docs, app.od_parent, app.od_empty CASCADE")
    run(owned, "CREATE TABLE app.od_tids (t text PRIMARY KEY)")
    run(owned, "CREATE TABLE app.od_docs (tenant_id text NOT NULL REFERENCES app.od_tids ON UPDATE CASCADE, body text)")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") == "42501"
    run(owned, """CREATE OR REPLACE FUNCTION app.od_leaky(text) RETURNS boolean LANGUAGE plpgsql
                  AS $$ BEGIN RAISE NOTICE '%', $1; RETURN true; END $$""")
    run(owned, "CREATE TABLE app.od_parent (tenant_id text NOT NULL, id int, v text) PARTITION BY LIST (tenant_id)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_parent')")
    run(owned, "CREATE TABLE app.od_empty (tenant_id text NOT NULL, id int, v text)")
    run(owned, "ALTER TABLE app.od_empty ENABLE ROW LEVEL SECURITY")
    run(owned, "CREATE POLICY leak ON app.od_empty AS RESTRICTIVE FOR SELECT USING (app.od_leaky(v))")
    assert sqlstate_of(owned, f"ALTER TABLE app.od_parent ATTACH PARTITION app.od_empty FOR VALUES IN ('{A}')") == "42501"
    run(owned, "DROP TABLE app.od_docs, app.od_tids, app.od_parent, app.od_empty CASCADE")


def test_weakening_named_with_its_database_is_recorded(su, owned):
    db = run(su, "SELECT current_database()")[0][0]
    since = last_audit_id(su)
    app = connect(user=APP)
    try:
        assert sqlstate_of(app, f"ALTER TABLE {db}.app.od_items NO FORCE ROW LEVEL SECURITY") == "42501"
    finally:
        app.close()
    assert audit_events(su, since, "policy_tamper")


def test_long_function_names_in_protect_do_not_break_it(su, owned):
    name = "od_" + "é" * 60
    run(owned, "DROP TABLE IF EXISTS app.od_docs")
    run(owned, f"""CREATE OR REPLACE FUNCTION app."{name}"(text) RETURNS boolean LANGUAGE sql IMMUTABLE
                   AS $$ SELECT true $$""")
    run(owned, f"""CREATE TABLE app.od_docs (tenant_id text NOT NULL, body text CHECK (app."{name}"(body)))""")
    # refused (the function is not approved), with its long name in the record: no panic
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") == "42501"
    run(su, f"""SELECT tenancy.approve_function('app."{name}"(text)', 'test')""")
    assert sqlstate_of(owned, "SELECT * FROM tenancy.protect('app.od_docs')") is None
    run(owned, "DROP TABLE app.od_docs")
    run(owned, f'DROP FUNCTION app."{name}"(text)')


def test_a_role_granted_trigger_cannot_add_one(su, owned):
    # (GRANT ALL hands TRIGGER to the application role)
    run(owned, f"GRANT ALL ON app.od_items TO {APP}")
    app = connect(user=APP)
    try:
        since = last_audit_id(su)
        assert sqlstate_of(app, "CREATE TRIGGER zz_tap AFTER INSERT ON app.od_items FOR EACH ROW "
                                "WHEN (pg_notify('tap', NEW.email) IS NULL) EXECUTE FUNCTION suppress_redundant_updates_trigger()") == "42501"
        run(app, """CREATE FUNCTION pg_temp.grab() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN NEW.amount := -1; RETURN NEW; END $$""")
        assert sqlstate_of(app, "CREATE TRIGGER zz_grab BEFORE INSERT ON app.od_items FOR EACH ROW "
                                "EXECUTE FUNCTION pg_temp.grab()") == "42501"
        assert audit_events(su, since, "policy_tamper")
    finally:
        app.close()
        run(owned, f"REVOKE ALL ON app.od_items FROM {APP}")
        run(owned, f"GRANT SELECT, INSERT ON app.od_items TO {APP}")
    assert run(su, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'app.od_items'::regclass AND NOT tgisinternal") == [(1,)]
    # check() names such privileges
    run(owned, f"GRANT TRIGGER, REFERENCES ON app.od_items TO {APP}")
    listed = {r[0] for r in run(su, "SELECT object FROM tenancy.check()")}
    assert "privilege TRIGGER on app.od_items" in listed and "privilege REFERENCES on app.od_items" in listed
    run(owned, f"REVOKE TRIGGER, REFERENCES ON app.od_items FROM {APP}")


def test_expression_index_statistics_are_not_the_owners_to_read(su, owned):
    run(owned, "CREATE INDEX od_email_lower ON app.od_items (lower(email))")
    run(su, "ANALYZE app.od_items")
    assert sqlstate_of(owned, "SELECT most_common_vals FROM pg_stats WHERE schemaname = 'app'") == "42501"
    assert run(su, "SELECT count(*) > 0 FROM pg_stats WHERE schemaname = 'app' AND tablename = 'od_email_lower'") == [(True,)]
    run(owned, "DROP INDEX app.od_email_lower")


def test_a_view_cannot_take_a_protected_tables_place(su, owned):
    since = last_audit_id(su)
    assert sqlstate_of(owned, "ALTER TABLE app.od_items RENAME TO od_items_data") == "42501"
    assert sqlstate_of(owned, "ALTER TABLE app.od_items SET SCHEMA public") == "42501"
    assert sqlstate_of(owned, "ALTER SCHEMA app RENAME TO app_old") == "42501"
    assert audit_events(su, since, "policy_tamper")
    # a view over a protected table that runs code on each tenant's reads needs approval too
    run(owned, "DROP VIEW IF EXISTS app.od_tap")
    assert sqlstate_of(owned, "CREATE VIEW app.od_tap WITH (security_invoker = true) AS SELECT o.* FROM app.od_items o "
                              "WHERE pg_notify('tap', o.email) IS NOT NULL") == "42501"
    run(owned, "CREATE VIEW app.od_tap WITH (security_invoker = true) AS SELECT o.* FROM app.od_items o")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_ins() RETURNS trigger LANGUAGE plpgsql AS $$
                  BEGIN PERFORM pg_notify('tap', NEW.email); RETURN NEW; END $$""")
    assert sqlstate_of(owned, "CREATE TRIGGER od_ins INSTEAD OF INSERT ON app.od_tap FOR EACH ROW "
                              "EXECUTE FUNCTION app.od_ins()") == "42501"
    run(owned, "DROP VIEW app.od_tap")


def test_foreign_keys_into_a_protected_table_are_no_oracle(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_guess, app.od_refs")
    run(owned, "ALTER TABLE app.od_items ADD CONSTRAINT od_items_key UNIQUE (tenant_id, id)")
    run(owned, "ALTER TABLE app.od_items ADD CONSTRAINT od_items_id UNIQUE (email)")
    # from a table that is not protected, on a key without the tenant column: refused
    assert sqlstate_of(owned, "CREATE TABLE app.od_guess (e text REFERENCES app.od_items (email))") == "42501"
    # a table created with its tenant column in the key is protected on it, and its rows answer to it
    run(owned, "CREATE TABLE app.od_refs (tenant_id text NOT NULL, i int, FOREIGN KEY (tenant_id, i) REFERENCES app.od_items (tenant_id, id))")
    assert run(su, "SELECT tenant_column FROM tenancy.protected_tables WHERE rel = 'app.od_refs'::regclass") == [("tenant_id",)]
    # a key that pairs another column with the tenant column: refused
    run(owned, "CREATE TABLE app.od_guess (tenant_id text NOT NULL, t text, i int)")
    run(owned, "SELECT count(*) FROM tenancy.protect('app.od_guess')")
    assert sqlstate_of(owned, "ALTER TABLE app.od_guess ADD FOREIGN KEY (t, i) REFERENCES app.od_items (tenant_id, id) NOT VALID") == "42501"
    run(owned, "DROP TABLE app.od_guess, app.od_refs")
    run(owned, "ALTER TABLE app.od_items DROP CONSTRAINT od_items_key, DROP CONSTRAINT od_items_id")


def test_retyping_a_column_runs_nothing_of_the_owners(su, owned):
    run(owned, "DROP TABLE IF EXISTS app.od_loot2")
    run(owned, "CREATE TABLE app.od_loot2 (v text)")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_grab(text) RETURNS text LANGUAGE plpgsql AS $$
                  BEGIN INSERT INTO app.od_loot2 VALUES ($1); RETURN $1; END $$""")
    run(owned, "DROP TYPE IF EXISTS app.od_box CASCADE")
    run(owned, "CREATE TYPE app.od_box AS (v text)")
    for sql in [
        # the owner's function, or a rewrite that picks rows by tenant
        "ALTER TABLE app.od_items ALTER COLUMN email TYPE varchar USING app.od_grab(email)",
        "ALTER TABLE app.od_items ALTER COLUMN other TYPE text USING CASE WHEN tenant_id <> 'x' THEN 'overwritten' ELSE other END",
        # to a type of the owner's (its cast or I/O could be the owner's code)
        "ALTER TABLE app.od_items ALTER COLUMN other TYPE app.od_box USING ROW(other)::app.od_box",
        "ALTER TABLE app.od_items ALTER COLUMN other TYPE app.od_box",
    ]:
        assert sqlstate_of(owned, sql) == "42501", sql
    assert run(su, "SELECT count(*) FROM app.od_loot2") == [(0,)]
    assert run(su, "SELECT count(*) FROM app.od_items WHERE other = 'overwritten'") == [(0,)]
    # the column itself, constants and casts to built-in types remain a migration's tools
    run(owned, "ALTER TABLE app.od_items ALTER COLUMN amount TYPE numeric USING amount::numeric(12, 2)")
    run(owned, "ALTER TABLE app.od_items ALTER COLUMN amount TYPE int USING amount::int")


def test_code_reached_through_types_needs_approval(su, owned):
    run(owned, """CREATE OR REPLACE FUNCTION app.od_w(text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
                  BEGIN RETURN true; END $$""")
    run(owned, "DROP DOMAIN IF EXISTS app.od_leakdom CASCADE")
    run(owned, "DROP DOMAIN IF EXISTS app.od_dd CASCADE")
    run(owned, "DROP TYPE IF EXISTS app.od_comp CASCADE")
    run(owned, "CREATE DOMAIN app.od_leakdom AS text CHECK (app.od_w(VALUE))")
    run(owned, "CREATE TYPE app.od_comp AS (a app.od_leakdom)")
    run(owned, """CREATE OR REPLACE FUNCTION app.od_steal() RETURNS text LANGUAGE plpgsql AS $$
                  BEGIN RETURN 'x'; END $$""")
    run(owned, "CREATE DOMAIN app.od_dd AS text DEFAULT app.od_steal()")
    for sql in [
        "ALTER TABLE app.od_items ADD CONSTRAINT c1 CHECK ((email::app.od_leakdom) IS NOT NULL) NOT VALID",
        "CREATE INDEX od_leak_idx ON app.od_items ((email::app.od_leakdom))",
        "ALTER TABLE app.od_items ADD CONSTRAINT c2 CHECK ((('(' || email || ')')::app.od_comp) IS NOT NULL) NOT VALID",
        "ALTER TABLE app.od_items ADD COLUMN note app.od_dd",
    ]:
        assert sqlstate_of(owned, sql) == "42501", sql
    # sequences and random numbers are a channel wherever a row is seen (fine in a default)
    run(owned, "DROP SEQUENCE IF EXISTS app.od_hit")
    run(owned, "CREATE SEQUENCE app.od_hit")
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ADD CONSTRAINT probe CHECK "
                              "(CASE WHEN tenant_id = 'x' THEN nextval('app.od_hit') > 0 ELSE true END) NOT VALID") == "42501"
    run(owned, "ALTER TABLE app.od_items ADD COLUMN seq int DEFAULT nextval('app.od_hit')")
    run(owned, "ALTER TABLE app.od_items DROP COLUMN seq")


def test_an_approval_covers_the_definition_it_saw(su, owned):
    run(owned, "CREATE OR REPLACE FUNCTION app.od_norm(text) RETURNS boolean LANGUAGE sql IMMUTABLE "
               "BEGIN ATOMIC SELECT $1 IS NOT NULL; END")
    run(su, "SELECT tenancy.approve_function('app.od_norm(text)', 'reviewed')")
    run(owned, "CREATE OR REPLACE FUNCTION app.od_norm(text) RETURNS boolean LANGUAGE sql IMMUTABLE "
               "BEGIN ATOMIC SELECT $1 IS NULL OR $1 IS NOT NULL; END")
    assert sqlstate_of(owned, "ALTER TABLE app.od_items ADD CONSTRAINT n CHECK (app.od_norm(email)) NOT VALID") == "42501"


def test_a_view_calling_unapproved_code_is_refused_however_it_reads(su, owned):
    run(owned, """CREATE OR REPLACE FUNCTION app.od_rows() RETURNS TABLE (tenant_id text, email text) LANGUAGE sql STABLE
                  AS 'SELECT tenant_id, email FROM app.od_items'""")
    assert sqlstate_of(owned, "CREATE VIEW app.od_v WITH (security_invoker) AS SELECT * FROM app.od_rows()") == "42501"


def test_a_statement_set_up_by_another_context_gets_its_own_tenant(su, owned):
    """A function its partition pruning calls while the statement is set up may verify another
    context; the statement still reads its own tenant."""
    run(su, "DROP ROLE IF EXISTS od_platform")
    run(su, "DROP SCHEMA IF EXISTS od_plat CASCADE")
    run(su, "CREATE ROLE od_platform")
    run(su, "SELECT tenancy.grant_tenant('od_platform', %s, 'read')", B)
    run(su, "GRANT USAGE ON SCHEMA app TO od_platform")
    run(su, "CREATE SCHEMA od_plat AUTHORIZATION od_platform")
    run(su, "GRANT USAGE ON SCHEMA od_plat TO PUBLIC")
    run(owned, "GRANT SELECT ON app.od_items TO od_platform")
    run(su, "SET ROLE od_platform")
    run(su, """CREATE FUNCTION od_plat.order_count(t text) RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER
               SET search_path = pg_catalog SET pg_tenancy.tenant = '' AS
               $$ BEGIN PERFORM tenancy.set_tenant(t); RETURN (SELECT count(*) FROM app.od_items); END $$""")
    run(su, "GRANT EXECUTE ON FUNCTION od_plat.order_count(text) TO PUBLIC")
    run(su, "RESET ROLE")
    app = connect(user=APP)
    try:
        run(app, f"""CREATE FUNCTION pg_temp.wrap() RETURNS bigint LANGUAGE plpgsql STABLE
                     AS $$ BEGIN RETURN od_plat.order_count('{B}'); END $$""")
        run(app, "CREATE TEMP TABLE tp (k bigint) PARTITION BY LIST (k)")
        run(app, "CREATE TEMP TABLE tp1 PARTITION OF tp FOR VALUES IN (1)")
        run(app, "CREATE TEMP TABLE tp2 PARTITION OF tp DEFAULT")
        run(app, "INSERT INTO tp VALUES (1)")
        run(app, "BEGIN")
        run(app, "SELECT tenancy.set_tenant(%s)", A)
        rows = run(app, "SELECT o.tenant_id FROM app.od_items o, tp WHERE tp.k = pg_temp.wrap() * 0 + 1")
        assert rows and {r[0] for r in rows} == {A}, rows
        run(app, "ROLLBACK")
    finally:
        app.close()
        run(su, "DROP SCHEMA od_plat CASCADE")
        run(owned, "REVOKE SELECT ON app.od_items FROM od_platform")
        run(su, "SELECT tenancy.revoke_tenant('od_platform', %s)", B)
        run(su, "DROP OWNED BY od_platform")
        run(su, "DROP ROLE od_platform")
