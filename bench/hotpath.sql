-- The hot path, three ways, on the server (no network, no client): pg_tenancy's protection
-- (b.prot), the best hand-written policy `tenant_id = (SELECT current_setting('app.tenant'))`
-- (b.pol), and a hand-written WHERE on an unprotected copy (b.plain). A PL/pgSQL procedure run
-- as the application role; every iteration runs the three sides one after the other, in a
-- rotating order, each timed on its own (clock_timestamp() before and after, its COMMIT
-- included), so that whatever else the machine does falls on the three alike. A round is n
-- iterations; the figures are medians over the rounds. Times are per transaction; "session"
-- sets the context once per session and times statement + COMMIT.
\set ON_ERROR_STOP 1
\if :{?rounds}
\else
\set rounds 15
\endif
SET client_min_messages = warning;
CREATE OR REPLACE PROCEDURE pg_temp.bench(kind text, n int, INOUT us float8[])
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    acc float8[] := ARRAY[0, 0, 0];
    t text;
    r int;
    x text;
    c bigint;
    side int;
BEGIN
    IF kind = 'session' THEN
        PERFORM tenancy.set_tenant('t0042', true);
        PERFORM set_config('app.tenant', 't0042', false);
    END IF;
    IF kind = 'scan' THEN
        SET LOCAL enable_indexscan = off;
        SET LOCAL enable_bitmapscan = off;
        SET LOCAL enable_indexonlyscan = off;
        SET LOCAL max_parallel_workers_per_gather = 0;
    END IF;
    FOR i IN 1..n LOOP
        t := 't' || lpad((floor(random() * 1000))::int::text, 4, '0');
        r := 1 + floor(random() * 1000)::int;
        FOR j IN 0..2 LOOP
            side := 1 + (i + j) % 3;          -- 1 protected, 2 policy, 3 WHERE; rotating order
            -- (the clock starts inside each branch: CASE tests its branches in order, and the
            -- tests before a branch are not part of what it measures)
            CASE kind || side
            WHEN 'point1' THEN
                t0 := clock_timestamp();
                PERFORM tenancy.set_tenant(t);
                SELECT payload INTO x FROM b.prot WHERE id = r;
            WHEN 'point2' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT payload INTO x FROM b.pol WHERE id = r;
            WHEN 'point3' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT payload INTO x FROM b.plain WHERE tenant_id = t AND id = r;
            WHEN 'session1' THEN
                t0 := clock_timestamp();
                SELECT payload INTO x FROM b.prot WHERE id = r;
            WHEN 'session2' THEN
                t0 := clock_timestamp();
                SELECT payload INTO x FROM b.pol WHERE id = r;
            WHEN 'session3' THEN
                t0 := clock_timestamp();
                SELECT payload INTO x FROM b.plain WHERE tenant_id = 't0042' AND id = r;
            WHEN 'range1' THEN
                t0 := clock_timestamp();
                PERFORM tenancy.set_tenant(t);
                SELECT count(*) INTO c FROM b.prot WHERE id BETWEEN 1 AND 1000;
            WHEN 'range2' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT count(*) INTO c FROM b.pol WHERE id BETWEEN 1 AND 1000;
            WHEN 'range3' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT count(*) INTO c FROM b.plain WHERE tenant_id = t AND id BETWEEN 1 AND 1000;
            WHEN 'scan1' THEN
                t0 := clock_timestamp();
                PERFORM tenancy.set_tenant(t);
                SELECT count(*) INTO c FROM b.prot;
            WHEN 'scan2' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT count(*) INTO c FROM b.pol;
            WHEN 'scan3' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
                SELECT count(*) INTO c FROM b.plain WHERE tenant_id = t;
            WHEN 'set1' THEN
                t0 := clock_timestamp();
                PERFORM tenancy.set_tenant(t);
            WHEN 'set2', 'set3' THEN
                t0 := clock_timestamp();
                PERFORM set_config('app.tenant', t, true);
            END CASE;
            IF kind <> 'scan' THEN
                COMMIT;
            END IF;
            acc[side] := acc[side] + extract(epoch FROM clock_timestamp() - t0);
        END LOOP;
    END LOOP;
    us := ARRAY[acc[1] * 1e6 / n, acc[2] * 1e6 / n, acc[3] * 1e6 / n];
END $$;

CREATE TEMP TABLE results (bench text, round int, prot float8, pol float8, plain float8);
SELECT set_config('bench.rounds', :'rounds', false) IS NOT NULL AS rounds_set \gset
DO $$
DECLARE
    benches text[][] := ARRAY[['point', '1500'], ['session', '1500'], ['range', '150'], ['scan', '2'], ['set', '1500']];
    b text[];
    us float8[];
BEGIN
    -- warm every cache once (pg_tenancy's verifications of the 1,000 tenants included)
    FOREACH b SLICE 1 IN ARRAY benches LOOP
        CALL pg_temp.bench(b[1], least(b[2]::int, 1000), us);
    END LOOP;
    FOR round IN 1..current_setting('bench.rounds')::int LOOP
        FOREACH b SLICE 1 IN ARRAY benches LOOP
            CALL pg_temp.bench(b[1], b[2]::int, us);
            INSERT INTO results VALUES (b[1], round, us[1], us[2], us[3]);
            COMMIT;
        END LOOP;
    END LOOP;
END $$;
SELECT bench AS "server side (us per txn)",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY prot)::numeric, 2) AS protected,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY CASE WHEN bench = 'set' THEN NULL ELSE pol END)::numeric, 2) AS "policy",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY plain)::numeric, 2) AS "WHERE",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY prot - plain)::numeric, 2) AS "prot-WHERE us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY CASE WHEN bench = 'set' THEN NULL ELSE pol - plain END)::numeric, 2) AS "pol-WHERE us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY CASE WHEN bench = 'set' THEN NULL ELSE prot - pol END)::numeric, 2) AS "prot-pol us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY plain / prot)::numeric, 3) AS "WHERE/prot",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY CASE WHEN bench = 'set' THEN NULL ELSE pol / prot END)::numeric, 3) AS "policy/prot"
  FROM results
 GROUP BY bench
 ORDER BY array_position(ARRAY['point', 'session', 'range', 'scan', 'set'], bench);
