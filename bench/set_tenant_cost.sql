-- set_tenant() against set_config() (issue 13, target 3), on the server: a PL/pgSQL procedure
-- run as the application role; each iteration picks a random tenant among the 1,000 and runs
-- three sides one after the other, in a rotating order, each timed on its own with its COMMIT:
-- tenancy.set_tenant(t), set_config('pg_tenancy.tenant', t, true) (the same setting, verified
-- by its check hook) and set_config('app.tenant', t, true) (a setting nobody verifies, what a
-- hand-written policy reads). The two verified sides take different tenants, so that neither
-- finds the other's verification freshly in the caches. A round is n iterations; medians over
-- the rounds.
-- Run by hotpath.sh and run.sh, which set :rounds.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
CREATE OR REPLACE PROCEDURE pg_temp.bench_set(n int, INOUT us float8[])
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    acc float8[] := ARRAY[0, 0, 0];
    t text;
    u text;
    side int;
BEGIN
    FOR i IN 1..n LOOP
        t := 't' || lpad((floor(random() * 1000))::int::text, 4, '0');
        u := 't' || lpad((floor(random() * 1000))::int::text, 4, '0');
        FOR j IN 0..2 LOOP
            side := 1 + (i + j) % 3;
            -- (the clock starts inside each branch, see hotpath.sql)
            CASE side
            WHEN 1 THEN
                t0 := clock_timestamp();
                PERFORM tenancy.set_tenant(t);
            WHEN 2 THEN
                t0 := clock_timestamp();
                PERFORM set_config('pg_tenancy.tenant', u, true);
            WHEN 3 THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
            END CASE;
            COMMIT;
            acc[side] := acc[side] + extract(epoch FROM clock_timestamp() - t0);
        END LOOP;
    END LOOP;
    us := ARRAY[acc[1] * 1e6 / n, acc[2] * 1e6 / n, acc[3] * 1e6 / n];
END $$;
CREATE TEMP TABLE results (round int, st float8, sc float8, app float8);
SELECT set_config('bench.rounds', :'rounds', false) IS NOT NULL AS rounds_set \gset
DO $$
DECLARE us float8[];
BEGIN
    CALL pg_temp.bench_set(1000, us);      -- warm the verifications of the 1,000 tenants
    FOR round IN 1..current_setting('bench.rounds')::int LOOP
        CALL pg_temp.bench_set(3000, us);
        INSERT INTO results VALUES (round, us[1], us[2], us[3]);
        COMMIT;
    END LOOP;
END $$;
SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY st)::numeric, 3) AS "set_tenant us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY sc)::numeric, 3) AS "set_config(pg_tenancy.tenant) us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY app)::numeric, 3) AS "set_config(app.tenant) us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY st - app)::numeric, 3) AS "set_tenant - app us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY st - sc)::numeric, 3) AS "set_tenant - pg_tenancy us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY app / st)::numeric, 3) AS "app/set_tenant"
  FROM results;
