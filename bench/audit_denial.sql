-- Cost of one recorded denial, server side: an INSERT refused because its row carries another
-- tenant's id (row security refuses it; pg_tenancy records cross_tenant_write: queue + log
-- line), against the same INSERT refused by a CHECK constraint (nothing recorded). Both run
-- as an application role inside an exception block; 5 interleaved rounds of 2,000 each,
-- waiting for the audit writer to empty the queue between rounds. The difference is what
-- recording costs the backend that made the attempt.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
\o /dev/null
DROP TABLE IF EXISTS public.denials;
DROP ROLE IF EXISTS bench_denier;
CREATE ROLE bench_denier;
SELECT count(*) FROM (SELECT tenancy.create_tenant(t, t) FROM unnest(ARRAY['den-a', 'den-b']) t
                       WHERE NOT EXISTS (SELECT 1 FROM tenancy.tenants WHERE id = t)) x;
SELECT tenancy.grant_tenant('bench_denier', 'den-a', 'read_write');
CREATE TABLE public.denials (tenant_id text NOT NULL, v int CHECK (v >= 0));
SELECT count(*) FROM tenancy.protect('public.denials', create_index => true);
GRANT INSERT, SELECT ON public.denials TO bench_denier;
CREATE FUNCTION pg_temp.wait_drained() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    WHILE (SELECT queued_here FROM tenancy.audit_status()) > 0 LOOP
        PERFORM pg_sleep(0.02);
    END LOOP;
END $$;
CREATE FUNCTION pg_temp.refusals(kind text, n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
BEGIN
    PERFORM tenancy.set_tenant('den-a');
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        BEGIN
            IF kind = 'cross_tenant' THEN
                INSERT INTO public.denials VALUES ('den-b', 1);
            ELSE
                INSERT INTO public.denials VALUES ('den-a', -1);
            END IF;
        EXCEPTION WHEN insufficient_privilege OR check_violation THEN NULL;
        END;
    END LOOP;
    RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
END $$;
GRANT EXECUTE ON FUNCTION pg_temp.refusals(text, int) TO bench_denier;
CREATE TEMP TABLE results (round int, kind text, us double precision);
GRANT INSERT ON results TO bench_denier;
SELECT written AS written_before FROM tenancy.audit_status() \gset
SET ROLE bench_denier;
SELECT tenancy.set_tenant('den-a', true);
INSERT INTO results SELECT 0, 'warm-up', pg_temp.refusals('cross_tenant', 200) + pg_temp.refusals('check', 200);
RESET ROLE;
SELECT pg_temp.wait_drained();
-- five rounds, which kind goes first alternating, the queue emptied between rounds
SELECT stmt
  FROM generate_series(1, 5) AS r,
       LATERAL (SELECT CASE WHEN r % 2 = 1 THEN 'check' ELSE 'cross_tenant' END AS first,
                       CASE WHEN r % 2 = 1 THEN 'cross_tenant' ELSE 'check' END AS second) k,
       LATERAL unnest(ARRAY[
           'SET ROLE bench_denier',
           format('INSERT INTO results SELECT %s, %L, pg_temp.refusals(%L, 2000)', r, k.first, k.first),
           format('INSERT INTO results SELECT %s, %L, pg_temp.refusals(%L, 2000)', r, k.second, k.second),
           'RESET ROLE',
           'SELECT pg_temp.wait_drained()']) WITH ORDINALITY AS x(stmt, n)
 ORDER BY r, n \gexec
\o
\pset footer off
SELECT kind AS "refused INSERT",
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY us)::numeric, 1) AS "median us",
       round(min(us)::numeric, 1) AS "min us", round(max(us)::numeric, 1) AS "max us"
  FROM results WHERE round > 0 GROUP BY kind ORDER BY kind DESC;
SELECT round((percentile_cont(0.5) WITHIN GROUP (ORDER BY c.us - k.us))::numeric, 1)
           AS "recording one denial costs (us, median of per-round differences)"
  FROM results c JOIN results k ON k.round = c.round AND k.kind = 'check'
 WHERE c.kind = 'cross_tenant';
SELECT written - :written_before AS "rows written", (SELECT overflowed FROM tenancy.audit_status()) AS "overflowed (since start)"
  FROM tenancy.audit_status();
DROP TABLE public.denials;
DROP FUNCTION pg_temp.refusals(text, int);
DROP OWNED BY bench_denier;
DROP ROLE bench_denier;
