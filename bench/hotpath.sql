-- The hot path, three ways, on the server (no network, no client): pg_tenancy's protection
-- (b.prot), the best hand-written policy `tenant_id = (SELECT current_setting('app.tenant'))`
-- (b.pol), and a hand-written WHERE on an unprotected copy (b.plain). PL/pgSQL loops that COMMIT
-- every iteration, run as the application role; each round runs the three sides in a rotating
-- order; medians over the rounds. Times are per transaction (or per statement, "session").
\set ON_ERROR_STOP 1
\if :{?rounds}
\else
\set rounds 31
\endif
SET client_min_messages = warning;
CREATE OR REPLACE PROCEDURE pg_temp.bench(kind text, n int, INOUT us double precision)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    t text;
    r int;
    x text;
    c bigint;
BEGIN
    IF kind LIKE 'session_%' THEN
        PERFORM tenancy.set_tenant('t0042', true);
        PERFORM set_config('app.tenant', 't0042', false);
    END IF;
    IF kind LIKE 'scan_%' THEN
        SET LOCAL enable_indexscan = off;
        SET LOCAL enable_bitmapscan = off;
        SET LOCAL enable_indexonlyscan = off;
        SET LOCAL max_parallel_workers_per_gather = 0;
    END IF;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        t := 't' || lpad((floor(random() * 1000))::int::text, 4, '0');
        r := 1 + floor(random() * 1000)::int;
        CASE kind
        WHEN 'point_prot' THEN
            PERFORM tenancy.set_tenant(t);
            SELECT payload INTO x FROM b.prot WHERE id = r;
        WHEN 'point_pol' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT payload INTO x FROM b.pol WHERE id = r;
        WHEN 'point_plain' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT payload INTO x FROM b.plain WHERE tenant_id = t AND id = r;
        WHEN 'session_prot' THEN
            SELECT payload INTO x FROM b.prot WHERE id = r;
        WHEN 'session_pol' THEN
            SELECT payload INTO x FROM b.pol WHERE id = r;
        WHEN 'session_plain' THEN
            SELECT payload INTO x FROM b.plain WHERE tenant_id = 't0042' AND id = r;
        WHEN 'range_prot' THEN
            PERFORM tenancy.set_tenant(t);
            SELECT count(*) INTO c FROM b.prot WHERE id BETWEEN 1 AND 1000;
        WHEN 'range_pol' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT count(*) INTO c FROM b.pol WHERE id BETWEEN 1 AND 1000;
        WHEN 'range_plain' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT count(*) INTO c FROM b.plain WHERE tenant_id = t AND id BETWEEN 1 AND 1000;
        WHEN 'scan_prot' THEN
            PERFORM tenancy.set_tenant(t);
            SELECT count(*) INTO c FROM b.prot;
        WHEN 'scan_pol' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT count(*) INTO c FROM b.pol;
        WHEN 'scan_plain' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT count(*) INTO c FROM b.plain WHERE tenant_id = t;
        WHEN 'set_prot' THEN
            PERFORM tenancy.set_tenant(t);
        WHEN 'set_plain', 'set_pol' THEN
            PERFORM set_config('app.tenant', t, true);
        END CASE;
        IF kind NOT LIKE 'scan_%' THEN
            COMMIT;
        END IF;
    END LOOP;
    us := extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
END $$;

CREATE TEMP TABLE results (bench text, round int, side text, us float8);
SELECT set_config('bench.rounds', :'rounds', false) IS NOT NULL AS rounds_set \gset
DO $$
DECLARE
    benches text[][] := ARRAY[['point', '1000'], ['session', '1000'], ['range', '100'], ['scan', '1'], ['set', '1000']];
    sides text[] := ARRAY['prot', 'pol', 'plain'];
    b text[];
    us float8;
    k int;
BEGIN
    -- warm every cache once (pg_tenancy's verifications of the 1,000 tenants included)
    FOREACH b SLICE 1 IN ARRAY benches LOOP
        FOREACH k IN ARRAY ARRAY[1, 2, 3] LOOP
            CALL pg_temp.bench(b[1] || '_' || sides[k], least(b[2]::int, 1000), us);
        END LOOP;
    END LOOP;
    FOR round IN 1..current_setting('bench.rounds')::int LOOP
        FOREACH b SLICE 1 IN ARRAY benches LOOP
            FOR j IN 0..2 LOOP
                k := 1 + (round + j) % 3;   -- rotate which side goes first
                IF b[1] = 'set' AND sides[k] = 'pol' THEN
                    CONTINUE;
                END IF;
                CALL pg_temp.bench(b[1] || '_' || sides[k], b[2]::int, us);
                INSERT INTO results VALUES (b[1], round, sides[k], us);
                COMMIT;
            END LOOP;
        END LOOP;
    END LOOP;
END $$;
WITH r AS (
    SELECT bench, round,
           max(us) FILTER (WHERE side = 'prot') AS prot,
           max(us) FILTER (WHERE side = 'pol') AS pol,
           max(us) FILTER (WHERE side = 'plain') AS plain
      FROM results GROUP BY bench, round
)
SELECT bench AS "server side (us per txn)",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY prot)::numeric, 2) AS protected,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY pol)::numeric, 2) AS "policy",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY plain)::numeric, 2) AS "WHERE",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY prot - plain)::numeric, 2) AS "prot-WHERE us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY pol - plain)::numeric, 2) AS "pol-WHERE us",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY plain / prot)::numeric, 3) AS "WHERE/prot",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY pol / prot)::numeric, 3) AS "policy/prot"
  FROM r
 GROUP BY bench
 ORDER BY array_position(ARRAY['point', 'session', 'range', 'scan', 'set'], bench);
