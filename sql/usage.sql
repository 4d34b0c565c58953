-- Usage: plans' limits per tenant, metering, and per-tenant statistics (src/stats, src/usage).
-- The tables (tenancy.plans, tenancy.limits, tenancy.meter_usage) are in schema.sql.

-- What applies to each tenant: its own limit where it has one, else its plan's.
CREATE VIEW tenancy.effective_limits AS
SELECT t.id AS tenant, t.plan, p.client_type,
       coalesce(l.statements_per_second, p.statements_per_second) AS statements_per_second,
       coalesce(l.burst, p.burst) AS burst,
       coalesce(l.max_concurrent, p.max_concurrent) AS max_concurrent,
       coalesce(l.storage_bytes, p.storage_bytes) AS storage_bytes,
       coalesce(l.meters ->> 'webhook_events', p.webhook_events_per_day::text)::bigint AS webhook_events_per_day,
       coalesce(l.meters ->> 'egress_bytes', p.egress_bytes_per_day::text)::bigint AS egress_bytes_per_day,
       p.meters || coalesce(l.meters, '{}') AS meters,
       p.backup_retention_days, p.sla_p99_ms, p.monthly_price,
       l.tenant IS NOT NULL AS overridden, l.reason AS override_reason
  FROM tenancy.tenants t
  JOIN tenancy.plans p ON p.name = t.plan
  LEFT JOIN tenancy.limits l ON l.tenant = t.id;

-- A tenant's own limits, at once for every session (the next statement of each sees them).
-- Arguments left NULL keep what the tenant has; tenancy.clear_limit() goes back to the plan.
CREATE FUNCTION tenancy.set_limit(
    tenant text, statements_per_second double precision DEFAULT NULL, burst double precision DEFAULT NULL,
    max_concurrent integer DEFAULT NULL, storage_bytes bigint DEFAULT NULL, meters jsonb DEFAULT NULL,
    reason text DEFAULT NULL)
RETURNS tenancy.limits
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    r tenancy.limits;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tenancy.tenants t WHERE t.id = tenant) THEN
        RAISE EXCEPTION 'tenant does not exist' USING ERRCODE = '42704',
            HINT = 'Create it with tenancy.create_tenant(...).';
    END IF;
    IF meters IS NOT NULL AND NOT tenancy._valid_meters(meters) THEN
        RAISE EXCEPTION 'invalid meter allowances' USING ERRCODE = '22023',
            HINT = 'A JSON object of meter name to allowance per day, for example {"webhook_events": 10000}.';
    END IF;
    INSERT INTO tenancy.limits AS l (tenant, statements_per_second, burst, max_concurrent, storage_bytes,
                                     meters, reason, set_by, set_at)
    VALUES (tenant, statements_per_second, burst, max_concurrent, storage_bytes, coalesce(meters, '{}'),
            reason, current_user::regrole, now())
    ON CONFLICT ON CONSTRAINT limits_pkey DO UPDATE
       SET statements_per_second = coalesce(EXCLUDED.statements_per_second, l.statements_per_second),
           burst = coalesce(EXCLUDED.burst, l.burst),
           max_concurrent = coalesce(EXCLUDED.max_concurrent, l.max_concurrent),
           storage_bytes = coalesce(EXCLUDED.storage_bytes, l.storage_bytes),
           meters = l.meters || EXCLUDED.meters,
           reason = coalesce(EXCLUDED.reason, l.reason),
           set_by = EXCLUDED.set_by, set_at = EXCLUDED.set_at
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- Back to the plan's limits; whether the tenant had its own.
CREATE FUNCTION tenancy.clear_limit(tenant text) RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$ WITH d AS (DELETE FROM tenancy.limits l WHERE l.tenant = $1 RETURNING 1) SELECT count(*) > 0 FROM d $$;

-- Per tenant of this database (and "(other)", tenants past pg_tenancy.stats_max_tenants), since
-- the last tenancy.reset_stats(): top-level statements run under the tenant's context, their
-- rows, errors by SQLSTATE class, executor time (total, mean, max, p95 and p99 from a fixed
-- log-scale histogram whose bucket bounds are in tenancy.stats_buckets), denials, refusals by the
-- limits, statements running now, last statement.
CREATE VIEW tenancy.stats AS
SELECT s.tenant, t.plan, s.statements, s.rows, s.errors, s.errors_by_class,
       s.total_time_ms, s.mean_time_ms, s.max_time_ms, s.p95_ms, s.p99_ms,
       s.denials, s.refused_rate, s.refused_concurrency, s.refused_meter, s.running, s.last_active,
       s.histogram
  FROM tenancy._stats() s
  LEFT JOIN tenancy.tenants t ON t.id = s.tenant;

-- The upper bounds of the histogram's buckets, in milliseconds (the last is +Infinity).
CREATE VIEW tenancy.stats_buckets AS
SELECT n AS bucket, CASE WHEN n <= 18 THEN (ARRAY[0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000,
                                                   5000, 10000, 20000, 60000])[n]::double precision
                         ELSE 'Infinity'::double precision END AS le_ms
  FROM generate_series(1, 19) AS n;

-- (the tenancy.stats view reads every tenant; its function refuses nobody, the grants do)
REVOKE ALL ON tenancy.stats, tenancy.stats_buckets, tenancy.effective_limits FROM PUBLIC;
GRANT SELECT ON tenancy.stats, tenancy.stats_buckets, tenancy.effective_limits TO pg_monitor;
