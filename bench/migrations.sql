-- Migrations by cohort (issue 12), in a database of their own (bench/migrations.sh): 1,000
-- tenants, 10 rows each in mb.orders (protected), the per-tenant step run as mb_app. Per round,
-- in rotating order: (a) tenancy.migrate() of a migration that changes nothing (up 'SELECT 1',
-- no per-tenant step): the ledger and the pointer, one transaction per tenant; (b) migrate() of
-- one whose per-tenant step updates the tenant's rows (in its context, as mb_app); (c) the
-- baseline, the same update written by hand: a procedure that updates each tenant's rows with
-- a WHERE in its own transaction, as the superuser. Then the pointer of the whole cohort moved
-- back in one statement (rollback of the last migration, no down step), and forward again.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE OR REPLACE PROCEDURE pg_temp.by_hand() LANGUAGE plpgsql AS $$
DECLARE t text;
BEGIN
    FOR t IN SELECT id FROM tenancy.tenants WHERE id LIKE 'm%' ORDER BY id LOOP
        UPDATE mb.orders SET v = v + 1 WHERE tenant_id = t;
        COMMIT;
    END LOOP;
END $$;
CREATE TEMP TABLE results (round int, what text, seconds float8);
DO $$
DECLARE
    v int := COALESCE((SELECT max(version) FROM tenancy.migrations), 0);
    t0 timestamptz;
    rep jsonb;
    last text;
BEGIN
    FOR round IN 1..current_setting('bench.rounds')::int LOOP
        FOR j IN 0..2 LOOP
            CASE (round + j) % 3
            WHEN 0 THEN
                v := v + 1;
                PERFORM tenancy.add_migration('mb-noop-' || v, v, 'SELECT 1', ddl_as => 'mb_owner');
                COMMIT;
                t0 := clock_timestamp();
                CALL tenancy.migrate('mb-noop-' || v, NULL, rep);
                INSERT INTO pg_temp.results VALUES (round, 'a migrate(): nothing to change', extract(epoch FROM clock_timestamp() - t0));
            WHEN 1 THEN
                v := v + 1;
                PERFORM tenancy.add_migration('mb-touch-' || v, v, 'SELECT 1',
                    per_tenant => 'UPDATE mb.orders SET v = v + 1', run_as => 'mb_app', ddl_as => 'mb_owner');
                COMMIT;
                t0 := clock_timestamp();
                CALL tenancy.migrate('mb-touch-' || v, NULL, rep);
                INSERT INTO pg_temp.results VALUES (round, 'b migrate(): per-tenant update', extract(epoch FROM clock_timestamp() - t0));
            ELSE
                t0 := clock_timestamp();
                CALL pg_temp.by_hand();
                INSERT INTO pg_temp.results VALUES (round, 'c by hand: update per tenant', extract(epoch FROM clock_timestamp() - t0));
            END CASE;
            COMMIT;
        END LOOP;
        t0 := clock_timestamp();
        last := (SELECT name FROM tenancy.migrations WHERE version = v);
        CALL tenancy.rollback_migration(last, NULL, rep);
        INSERT INTO pg_temp.results VALUES (round, 'd rollback: pointer of 1,000 tenants', extract(epoch FROM clock_timestamp() - t0));
        COMMIT;
        -- forward again, for the next round's migrations
        CALL tenancy.migrate(last, NULL, rep);
        COMMIT;
    END LOOP;
END $$;
SELECT what, count(*) AS rounds, round(percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds)::numeric, 3) AS "median s",
       round(min(seconds)::numeric, 3) AS "min s", round(max(seconds)::numeric, 3) AS "max s",
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) * 1e6 / 1000)::numeric, 1) AS "us per tenant"
  FROM pg_temp.results GROUP BY what ORDER BY what;
SELECT round((SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) FROM pg_temp.results WHERE what LIKE 'c%')::numeric
           / (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) FROM pg_temp.results WHERE what LIKE 'b%')::numeric, 3)
       AS "by hand / migrate() (speed of migrate relative to the hand-written loop)";
