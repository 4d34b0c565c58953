"""The tenant reaches a protected statement as a parameter filled when the statement starts.

The generated policy compares the tenant column with tenancy.current_tenant(NULL::<type>); in
the plan of a statement on a protected table each such call becomes a parameter that pg_tenancy
fills once, from the verified context, when the statement starts. These scenarios check that
plans made under one tenant and run under another (prepared statements, generic plans,
PL/pgSQL's cached plans, cursors) read the tenant of whoever runs them, that parallel workers and
functions run inside them get the same value, that partitions by tenant are pruned, and that the
places the conversion does not reach still work by calling the function.
"""
import io

import pytest

from conftest import APP, OWNER, TENANTS, connect, run, sqlstate_of

A, B, C = TENANTS[7], TENANTS[8], TENANTS[9]


@pytest.fixture(scope="module")
def tables(database):
    own = connect(user=OWNER)
    for t in ("tp_items", "tp_ints", "tp_uuids", "tp_parts"):
        run(own, f"DROP TABLE IF EXISTS app.{t} CASCADE")
    run(own, "CREATE TABLE app.tp_items (tenant_id text NOT NULL, id int NOT NULL, v text, PRIMARY KEY (tenant_id, id))")
    run(own, "SELECT count(*) FROM tenancy.protect('app.tp_items')")
    run(own, "CREATE TABLE app.tp_parts (tenant_id text NOT NULL, id int NOT NULL, v text) PARTITION BY LIST (tenant_id)")
    run(own, "SELECT count(*) FROM tenancy.protect('app.tp_parts')")
    for i, t in enumerate((A, B, C)):
        run(own, f"CREATE TABLE app.tp_parts_{i} PARTITION OF app.tp_parts FOR VALUES IN ('{t}')")
    run(own, f"GRANT SELECT, INSERT, UPDATE, DELETE ON app.tp_items, app.tp_parts TO {APP}")
    own.close()
    su = connect()
    # rows written as a superuser (no policies), 2,000 per tenant
    for t in (A, B, C):
        run(su, "INSERT INTO app.tp_items SELECT %s, g, %s || ':' || g FROM generate_series(1, 2000) g", t, t)
        run(su, "INSERT INTO app.tp_parts SELECT %s, g, %s || ':' || g FROM generate_series(1, 2000) g", t, t)
    run(su, "ANALYZE app.tp_items, app.tp_parts")
    yield su
    su.close()


def test_a_plan_reads_the_tenant_of_whoever_runs_it(tables):
    app = connect(user=APP)
    try:
        run(app, "PREPARE q(int) AS SELECT tenant_id, v FROM app.tp_items WHERE id = $1")
        run(app, "SET plan_cache_mode = force_generic_plan")
        for t in (A, B, C, A):
            run(app, "SELECT tenancy.set_tenant(%s, true)", t)
            assert run(app, "EXECUTE q(5)") == [(t, f"{t}:5")]
            assert run(app, "SELECT count(*) FROM app.tp_items") == [(2000,)]
        # the plan has no initPlan: the tenant is a parameter of the statement
        plan = "\n".join(r[0] for r in run(app, "EXPLAIN (COSTS OFF) EXECUTE q(5)"))
        assert "InitPlan" not in plan and "tenant_id = $" in plan, plan
        # PL/pgSQL keeps its plans across calls and transactions
        run(app, """CREATE FUNCTION pg_temp.pick(int) RETURNS text LANGUAGE plpgsql AS $$
                    DECLARE x text; BEGIN SELECT v INTO x FROM app.tp_items WHERE id = $1; RETURN x; END $$""")
        for t in (B, C, A, B):
            run(app, "SELECT tenancy.set_tenant(%s, true)", t)
            assert run(app, "SELECT pg_temp.pick(7)") == [(f"{t}:7",)]
    finally:
        app.close()


def test_without_a_context_the_statement_is_refused_not_empty(tables):
    app = connect(user=APP)
    try:
        run(app, "PREPARE q2 AS SELECT count(*) FROM app.tp_items")
        run(app, "SELECT tenancy.set_tenant(%s, true)", A)
        assert run(app, "EXECUTE q2") == [(2000,)]
        run(app, "SELECT tenancy.reset_tenant()")
        assert sqlstate_of(app, "EXECUTE q2") == "28000"
        # a superuser with no context who calls the function gets the same refusal
        assert sqlstate_of(tables, "SELECT count(*) FROM app.tp_items WHERE tenant_id = tenancy.current_tenant(NULL::text)") == "28000"
    finally:
        app.close()


def test_parallel_workers_get_the_leaders_tenant(tables):
    app = connect(user=APP)
    try:
        for s in ("SET max_parallel_workers_per_gather = 2", "SET parallel_setup_cost = 0",
                  "SET parallel_tuple_cost = 0", "SET min_parallel_table_scan_size = 0",
                  "SET enable_indexscan = off", "SET enable_bitmapscan = off"):
            run(app, s)
        run(app, "SELECT tenancy.set_tenant(%s, true)", B)
        plan = "\n".join(r[0] for r in run(app, "EXPLAIN (COSTS OFF) SELECT count(*), min(v) FROM app.tp_items"))
        assert "Parallel Seq Scan" in plan, plan
        assert run(app, "SELECT count(*), min(tenant_id), max(tenant_id) FROM app.tp_items") == [(2000, B, B)]
        # a function run inside a worker plans and fills its own statement
        run(app, "SET force_parallel_mode = on")
        run(app, """CREATE FUNCTION pg_temp.n() RETURNS bigint LANGUAGE sql STABLE PARALLEL SAFE
                    AS $$ SELECT count(*) FROM app.tp_items WHERE id <= 10 $$""")
        assert run(app, "SELECT pg_temp.n()") == [(10,)]
    finally:
        app.close()


def test_partitions_by_tenant_are_pruned_when_the_statement_starts(tables):
    app = connect(user=APP)
    try:
        run(app, "SELECT tenancy.set_tenant(%s, true)", C)
        assert run(app, "SELECT count(*), min(tenant_id) FROM app.tp_parts") == [(2000, C)]
    finally:
        app.close()
    # (EXPLAIN ANALYZE is refused to roles under the policies; a superuser with a context, who
    # writes the same comparison, sees the partitions the parameter prunes when the statement starts)
    su = tables
    run(su, "BEGIN")
    try:
        run(su, "SELECT tenancy.set_tenant(%s)", A)
        plan = "\n".join(r[0] for r in run(su, "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
                                               "SELECT count(*) FROM app.tp_parts WHERE tenant_id = tenancy.current_tenant(NULL::text)"))
        assert "Subplans Removed: 2" in plan and "InitPlan" not in plan, plan
    finally:
        run(su, "ROLLBACK")


def test_writes_and_defaults(tables):
    app = connect(user=APP)
    try:
        run(app, "BEGIN")
        run(app, "SELECT tenancy.set_tenant(%s)", A)
        # the column default is the same call: a multi-row insert takes the tenant once
        run(app, "INSERT INTO app.tp_items (id, v) VALUES (9001, 'x'), (9002, 'y')")
        assert run(app, "SELECT tenant_id FROM app.tp_items WHERE id > 9000 ORDER BY id") == [(A,), (A,)]
        assert run(app, "UPDATE app.tp_items SET v = 'z' WHERE id > 9000 RETURNING tenant_id") == [(A,), (A,)]
        assert run(app, "INSERT INTO app.tp_items VALUES (%s, 9003, 'w') ON CONFLICT (tenant_id, id) DO UPDATE SET v = 'w' "
                        "RETURNING tenant_id", A) == [(A,)]
        run(app, "ROLLBACK")
        # (COPY FROM is refused under row security; a superuser's COPY evaluates the default on
        # its own, without a plan: the function reads the context itself)
        run(tables, "BEGIN")
        run(tables, "SELECT tenancy.set_tenant(%s)", B)
        with tables.cursor() as cur:
            cur.copy_expert("COPY app.tp_items (id, v) FROM STDIN", io.StringIO("9101\tcopied\n"))
        assert run(tables, "SELECT tenant_id FROM app.tp_items WHERE id = 9101") == [(B,)]
        run(tables, "ROLLBACK")
    finally:
        app.close()


def test_cursors_keep_the_tenant_they_started_with(tables):
    app = connect(user=APP, autocommit=False)
    try:
        run(app, "SELECT tenancy.set_tenant(%s)", A)
        run(app, "DECLARE c CURSOR FOR SELECT tenant_id FROM app.tp_items ORDER BY id")
        assert run(app, "FETCH 2 FROM c") == [(A,), (A,)]
        app.rollback()
    finally:
        app.close()


def test_the_function_takes_only_tenant_column_types(tables):
    app = connect(user=APP)
    try:
        run(app, "SELECT tenancy.set_tenant(%s, true)", A)
        assert run(app, "SELECT tenancy.current_tenant(NULL::text), tenancy.current_tenant(NULL::varchar)") == [(A, A)]
        assert sqlstate_of(app, "SELECT tenancy.current_tenant(NULL::int)") == "22P02"
        assert sqlstate_of(app, "SELECT tenancy.current_tenant(NULL::date)") == "22023"
        # nobody but the extension types a value with the parameters' domains
        assert sqlstate_of(app, "SELECT 'x'::tenancy._param_text") == "23514"
        assert sqlstate_of(app, "SELECT (SELECT NULL::tenancy._param_int4)") == "23502"
    finally:
        app.close()
