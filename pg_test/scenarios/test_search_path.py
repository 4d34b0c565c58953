"""Nothing pg_tenancy runs resolves through a search_path its caller controls.

An application role that may create objects in a schema of its own puts that schema first on
its search_path (ahead of pg_catalog) and plants functions and operators shadowing everything
the extension's SQL could use, for every type it uses; it also plants tables and types in
pg_temp. Each plant records current_user when it runs. Then the role calls every function of
the extension it may call, with and without a context, including a tenant's first key and the
encryption that updates the key's counter (and rotates it). Not one plant may ever run: not as
the extension's owner (that was a SUPERUSER escalation), and not as the caller either.

A database owner who sets the database's search_path is tried the same way against the audit
writer, a background worker that runs as the bootstrap superuser.
"""
import time

import pytest

from conftest import DB, connect, run, sqlstate_of

ROLE = "sp_app"
TENANT, FRESH, OTHER = "sp-t1", "sp-fresh", "sp-t2"

TYPES = ["int2", "int4", "int8", "text", "bytea", "uuid", "timestamptz", "jsonb", "bool", "oid",
         "name", "float8", "interval", "regclass", "regrole", "regtype", "varchar", "numeric"]
BINARY_OPS = ["+", "-", "=", "<>", "<", ">", "<=", ">=", "||", "~", "~*"]
# function names the extension's SQL might call, planted for the argument lists it would use
FUNCTIONS = {
    "lower": ["text"], "upper": ["text"], "btrim": ["text"], "length": ["text"], "now": [],
    "max": None, "min": None, "count": None, "sum": None, "to_timestamp": ["float8"],
    "unnest": ["anyarray"], "pg_has_role": ["oid", "oid", "text"], "to_regclass": ["text"],
    "encode": ["bytea", "text"], "sha256": ["bytea"], "convert_to": ["text", "name"],
    "format": ["text"], "quote_ident": ["text"], "current_database": [], "current_setting": ["text"],
    "jsonb_typeof": ["jsonb"], "array_position": ["anyarray", "anyelement"], "clock_timestamp": [],
    "get_byte": ["bytea", "int4"], "concat_ws": ["text", "text"],
    "pg_get_expr": ["pg_node_tree", "oid"], "set_config": ["text", "text", "bool"],
}


def plant_sql(schema):
    """DDL planting shadows in `schema`; every plant logs (current_user, what) into sp_ran.log."""
    out = []
    for t in TYPES:
        for i, op in enumerate(BINARY_OPS):
            fn = f"{schema}.op_{t}_{i}"
            ret = "bool" if op in ("=", "<>", "<", ">", "<=", ">=", "~", "~*") else t
            out.append(f"""CREATE FUNCTION {fn}({t}, {t}) RETURNS {ret} LANGUAGE plpgsql AS $$
                BEGIN INSERT INTO sp_ran.log VALUES (current_user, '{schema} {t} {op}'); RETURN NULL; END $$""")
            out.append(f"CREATE OPERATOR {schema}.{op} (LEFTARG = {t}, RIGHTARG = {t}, FUNCTION = {fn})")
    for name, args in FUNCTIONS.items():
        if args is None:  # aggregates: shadow with a same-named aggregate over each type
            for t in ("int4", "int8", "text"):
                sfunc = f"{schema}.agg_{name}_{t}"
                out.append(f"""CREATE FUNCTION {sfunc}({t}, {t}) RETURNS {t} LANGUAGE plpgsql AS $$
                    BEGIN INSERT INTO sp_ran.log VALUES (current_user, '{schema} agg {name}'); RETURN $2; END $$""")
                out.append(f"CREATE AGGREGATE {schema}.{name}({t}) (SFUNC = {sfunc}, STYPE = {t})")
            continue
        sig = ", ".join(args)
        ret = "anyelement" if "anyelement" in args else ("setof anyelement" if args == ["anyarray"] else "text")
        if args == ["anyarray"]:
            ret = "setof text"
            sig = "anyarray"
        body = f"BEGIN INSERT INTO sp_ran.log VALUES (current_user, '{schema} fn {name}'); RETURN NULL; END"
        if ret == "setof text":
            body = f"BEGIN INSERT INTO sp_ran.log VALUES (current_user, '{schema} fn {name}'); RETURN; END"
        out.append(f"CREATE FUNCTION {schema}.{name}({sig}) RETURNS {ret} LANGUAGE plpgsql AS $$ {body} $$")
    return out


@pytest.fixture(scope="module")
def planted(database):
    su = connect()
    run(su, f"DROP ROLE IF EXISTS {ROLE}")
    run(su, f"CREATE ROLE {ROLE} LOGIN")
    run(su, f"GRANT CREATE ON DATABASE {DB} TO {ROLE}")
    for t in (TENANT, FRESH, OTHER):
        run(su, "SELECT tenancy.create_tenant(%s, %s)", t, t)
    run(su, "SELECT tenancy.grant_tenant(%s, %s, 'admin')", ROLE, TENANT)
    run(su, "SELECT tenancy.grant_tenant(%s, %s, 'read_write')", ROLE, FRESH)
    # every 2nd encryption is counted, every 8th rotates the key: the counter and rotation paths run
    run(su, f"ALTER ROLE {ROLE} SET pg_tenancy.max_encryptions_per_key = 8")
    run(su, "DROP SCHEMA IF EXISTS sp_ran CASCADE")
    run(su, "CREATE SCHEMA sp_ran")
    run(su, "CREATE TABLE sp_ran.log (who name, what text)")
    run(su, "GRANT USAGE ON SCHEMA sp_ran TO PUBLIC")
    run(su, "GRANT INSERT ON sp_ran.log TO PUBLIC")
    app = connect(user=ROLE)
    run(app, "CREATE SCHEMA appws")
    for ddl in plant_sql("appws"):
        run(app, ddl)
    # the role's own table, which it protects
    run(app, "CREATE TABLE appws.notes (tenant_id text NOT NULL, id int, alt text, body bytea, PRIMARY KEY (tenant_id, id))")
    app.close()
    yield su
    run(su, "DROP SCHEMA IF EXISTS appws CASCADE")
    run(su, "DROP SCHEMA IF EXISTS sp_ran CASCADE")
    run(su, f"REVOKE CREATE ON DATABASE {DB} FROM {ROLE}")
    su.close()


def plant_temp(conn):
    """Tables, types and a function in pg_temp named like the extension's own objects."""
    for t in ("tenants", "grants", "keys", "protected_tables", "audit_log", "approved_functions"):
        run(conn, f"CREATE TEMP TABLE {t} (id text, tenant text, role oid, scope text, status text)")
    run(conn, "CREATE TYPE pg_temp.scope AS (x int)")
    run(conn, """CREATE FUNCTION pg_temp.pg_has_role(oid, oid, text) RETURNS bool LANGUAGE plpgsql AS $$
                 BEGIN INSERT INTO sp_ran.log VALUES (current_user, 'pg_temp fn pg_has_role'); RETURN true; END $$""")


def test_no_planted_object_ever_runs(planted):
    su = planted
    app = connect(user=ROLE)
    try:
        plant_temp(app)
        run(app, "SET search_path = appws, pg_catalog, pg_temp")
        # the planted operators are live for the role's own statements: the trap is armed
        run(app, "SELECT 1::int8 + 1::int8")
        assert run(su, "SELECT count(*) FROM sp_ran.log")[0][0] == 1
        run(su, "TRUNCATE sp_ran.log")

        # without a context
        for sql in ["SELECT tenancy.has_tenant()", "SELECT tenancy.valid_tenant_id('x')",
                    "SELECT tenancy.cipher_implementation()", "SELECT tenancy.reset_tenant()"]:
            run(app, sql)
        for sql in ["SELECT tenancy.current_tenant()", "SELECT tenancy.tenant_scope()",
                    "SELECT tenancy.encrypt('x'::text)", f"SELECT tenancy.set_tenant('{OTHER}')",
                    "SELECT tenancy.set_tenant('nosuch')", "SELECT tenancy.set_tenant('007')",
                    "SELECT tenancy.set_tenant_token('a.b.c')", "SELECT tenancy.unprotect('appws.notes')", "SELECT tenancy.prune_audit('1 day')",
                    "SELECT tenancy.rotate_key('sp-t1')", "SELECT tenancy.check()"]:
            assert sqlstate_of(app, sql) is not None, sql
        # the role protects its own table (it owns it)
        run(app, "SELECT count(*) FROM tenancy.protect('appws.notes')")
        run(app, "SELECT tenancy.policy_sql('appws.notes')")
        run(app, "SELECT count(*) FROM tenancy.protect_schema('appws')")
        assert sqlstate_of(app, "SELECT * FROM tenancy.protect('appws.notes', 'alt')") == "42501"
        assert sqlstate_of(app, "SELECT * FROM appws.notes") == "28000"

        # with a context: the tenant's first data and blind-index keys, the counter, rotations
        run(app, f"SELECT tenancy.set_tenant('{FRESH}', true)")
        for sql in ["SELECT tenancy.current_tenant()", "SELECT tenancy.writable_tenant()",
                    "SELECT tenancy.tenant_scope()", "SELECT tenancy.flag('x')", "SELECT tenancy.config('x')",
                    "SELECT tenancy.active_key_version()", "SELECT tenancy.blind_index('a@b.c')",
                    "SELECT tenancy.has_tenant()", "SELECT tenancy.schema_version()"]:
            run(app, sql)
        for i in range(20):
            c = run(app, "SELECT tenancy.encrypt(%s::text, 'ctx')", f"v{i}")[0][0]
        assert run(app, "SELECT tenancy.key_version(%s)", c)[0][0] >= 2  # rotated on the way
        assert run(app, "SELECT tenancy.decrypt_text(%s, 'ctx')", c)[0][0] == "v19"
        run(app, "SELECT tenancy.decrypt(%s, 'ctx')", c)
        run(app, "SELECT tenancy.rewrap(%s, 'ctx')", c)
        assert sqlstate_of(app, "SELECT tenancy.decrypt(%s, 'other')", c) == "22000"
        run(app, "INSERT INTO appws.notes (id, body) SELECT g, tenancy.encrypt(pg_catalog.concat('n', g)) FROM generate_series(1, 5) g")
        run(app, "SELECT tenancy.reencrypt('appws.notes', 'body')")
        run(app, f"SELECT count(*) FROM appws.notes WHERE tenant_id OPERATOR(pg_catalog.=) '{OTHER}'")  # a probe
        assert sqlstate_of(app, f"INSERT INTO appws.notes (tenant_id, id) VALUES ('{OTHER}', 99)") == "42501"
        assert sqlstate_of(app, "EXPLAIN ANALYZE SELECT * FROM appws.notes") == "42501"
        assert sqlstate_of(app, "TRUNCATE appws.notes") == "42501"
        run(app, f"SELECT tenancy.set_tenant('{TENANT}', true)")
        run(app, "SELECT tenancy.grant_tenant('sp_app', %s, 'admin')", TENANT)
        run(app, "SELECT tenancy.revoke_tenant('pg_monitor', %s)", TENANT)
        run(app, "DECLARE held CURSOR WITH HOLD FOR SELECT 1")
        assert sqlstate_of(app, f"SELECT tenancy.set_tenant('{OTHER}', true)") == "42501"
        run(app, f"SELECT tenancy.set_tenant('{FRESH}', true)")
        assert sqlstate_of(app, "FETCH held") == "42501"
        run(app, "DISCARD ALL")
        # a token (minted by a superuser)
        token = run(su, "SELECT tenancy._sign_token(jsonb_build_object('tenant_id', %s::text, "
                        "'exp', extract(epoch from now())::int + 60))", FRESH)[0][0]
        run(app, "SET search_path = appws, pg_catalog, pg_temp")
        run(app, "SELECT tenancy.set_tenant_token(%s, true)", token)
        run(app, "SELECT tenancy.encrypt('x'::text)")
        run(app, "SELECT count(*) FROM appws.notes")
    finally:
        app.close()
    ran = run(su, "SELECT who, what, count(*) FROM sp_ran.log GROUP BY 1, 2 ORDER BY 1, 2")
    assert ran == [], f"planted objects ran: {ran}"
    assert run(su, f"SELECT rolsuper FROM pg_roles WHERE rolname = '{ROLE}'")[0][0] is False


def test_audit_writer_ignores_a_database_search_path(su):
    """The writer runs as the bootstrap superuser in each database: a database owner who plants
    objects on the database's search_path must not get them run."""
    admin = connect(dbname="postgres")
    run(admin, "DROP DATABASE IF EXISTS sp_owned")
    run(admin, "DROP ROLE IF EXISTS sp_dbowner")
    run(admin, "CREATE ROLE sp_dbowner LOGIN")
    run(admin, "CREATE DATABASE sp_owned OWNER sp_dbowner")
    try:
        s = connect(dbname="sp_owned")
        run(s, "CREATE EXTENSION pg_tenancy")
        run(s, "SELECT tenancy.create_tenant('sp-x', 'x')")
        run(s, "CREATE TABLE public.log (who name, what text)")
        run(s, "GRANT INSERT ON public.log TO PUBLIC")
        s.close()
        o = connect(user="sp_dbowner", dbname="sp_owned")
        run(o, "CREATE SCHEMA evil")
        for ddl in plant_sql("evil"):
            run(o, ddl.replace("sp_ran.log", "public.log"))
        run(o, "ALTER DATABASE sp_owned SET search_path = evil, pg_catalog")
        o.close()
        # an event for the writer to write: a context refused
        c = connect(user="sp_dbowner", dbname="sp_owned")
        assert sqlstate_of(c, "SELECT tenancy.set_tenant('sp-x')") == "42501"
        c.close()
        s = connect(dbname="sp_owned")
        run(s, "SET search_path = pg_catalog")  # (this session's own statements, not the worker's)
        deadline = time.time() + 15
        while time.time() < deadline and run(s, "SELECT count(*) FROM tenancy.audit_log")[0][0] == 0:
            time.sleep(0.1)
        assert run(s, "SELECT count(*) FROM tenancy.audit_log WHERE event = 'forbidden_tenant'")[0][0] == 1
        assert run(s, "SELECT who, what FROM public.log") == []
        s.close()
    finally:
        time.sleep(2.5)  # the writer leaves after 2 idle seconds; DROP DATABASE needs it gone
        run(admin, "DROP DATABASE IF EXISTS sp_owned WITH (FORCE)")
        run(admin, "DROP ROLE IF EXISTS sp_dbowner")
        admin.close()
