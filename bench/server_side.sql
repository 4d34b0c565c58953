-- Server-side cost per transaction, without the network and client in the way: PL/pgSQL loops
-- that COMMIT every iteration, run as the application role, pg_tenancy vs hand-written WHERE,
-- interleaved rounds, median ratio (baseline time / pg_tenancy time = throughput ratio).
\set ON_ERROR_STOP 1
SET client_min_messages = notice;
CREATE OR REPLACE PROCEDURE pg_temp.bench(kind text, n int, INOUT ms double precision)
LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    t text;
    r int;
    x text;
    c bigint;
BEGIN
    FOR i IN 1..n LOOP
        t := 't' || lpad((floor(random() * 1000))::int::text, 4, '0');
        r := 1 + floor(random() * 1000)::int;
        CASE kind
        WHEN 'point_prot' THEN
            PERFORM tenancy.set_tenant(t);
            SELECT payload INTO x FROM b.prot WHERE id = r;
        WHEN 'point_plain' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT payload INTO x FROM b.plain WHERE tenant_id = t AND id = r;
        WHEN 'range_prot' THEN
            PERFORM tenancy.set_tenant(t);
            SELECT count(*) INTO c FROM b.prot WHERE id BETWEEN 1 AND 1000;
        WHEN 'range_plain' THEN
            PERFORM set_config('app.tenant', t, true);
            SELECT count(*) INTO c FROM b.plain WHERE tenant_id = t AND id BETWEEN 1 AND 1000;
        WHEN 'set_tenant' THEN
            PERFORM tenancy.set_tenant(t);
        WHEN 'set_config' THEN
            PERFORM set_config('app.tenant', t, true);
        END CASE;
        COMMIT;
    END LOOP;
    ms := extract(epoch FROM clock_timestamp() - t0) * 1000;
END $$;

CREATE TEMP TABLE results (name text, round int, prot_ms float8, base_ms float8);
DO $$
DECLARE
    pairs text[][] := ARRAY[['point lookup, context in txn', 'point_prot', 'point_plain', '20000'],
                            ['1,000-row range, context in txn', 'range_prot', 'range_plain', '2000'],
                            ['set_tenant() vs set_config()', 'set_tenant', 'set_config', '20000']];
    p text[];
    a float8;
    b float8;
BEGIN
    -- warm the caches (pg_tenancy's verification cache included) once
    CALL pg_temp.bench('point_prot', 5000, a);
    CALL pg_temp.bench('point_plain', 5000, b);
    FOREACH p SLICE 1 IN ARRAY pairs LOOP
        FOR round IN 1..5 LOOP
            a := 0; b := 0;
            CALL pg_temp.bench(p[2], p[4]::int, a);
            CALL pg_temp.bench(p[3], p[4]::int, b);
            INSERT INTO results VALUES (p[1], round, a, b);
            COMMIT;
        END LOOP;
    END LOOP;
END $$;
SELECT name AS "server-side benchmark",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY prot_us)::numeric, 2) AS "us/txn",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY base_us)::numeric, 2) AS "base us/txn",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ratio)::numeric, 3) AS "median ratio",
       round(min(ratio)::numeric, 3) || ' .. ' || round(max(ratio)::numeric, 3) AS "range"
  FROM (SELECT r.name, 1000 * r.prot_ms / n.n AS prot_us, 1000 * r.base_ms / n.n AS base_us,
               r.base_ms / r.prot_ms AS ratio
          FROM results r
          JOIN (VALUES ('point lookup, context in txn', 20000), ('1,000-row range, context in txn', 2000),
                       ('set_tenant() vs set_config()', 20000)) n(name, n) USING (name)) s
 GROUP BY name ORDER BY name DESC;
