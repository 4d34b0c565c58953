-- Usage: plans' limits per tenant, metering, and per-tenant statistics (src/stats, src/usage).
-- The tables (tenancy.plans, tenancy.limits, tenancy.meter_usage) are in schema.sql.

-- The allowance per day of `meter` for a tenant on plan `p` with its own limits `l` (NULL when
-- it has none): its own, else the plan's column (webhook_events, egress_bytes), else the plan's
-- `meters` entry; NULL = no limit. The one definition tenancy.meter(), the metrics, the alerts
-- and effective_limits use.
CREATE FUNCTION tenancy._allowance(p tenancy.plans, l tenancy.limits, meter text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT COALESCE((l.meters OPERATOR(pg_catalog.->>) meter)::pg_catalog.int8,
                    CASE meter WHEN 'webhook_events' THEN p.webhook_events_per_day
                               WHEN 'egress_bytes' THEN p.egress_bytes_per_day END,
                    (p.meters OPERATOR(pg_catalog.->>) meter)::pg_catalog.int8);
END;

-- What applies to each tenant: its own limit where it has one, else its plan's.
CREATE VIEW tenancy.effective_limits AS
SELECT t.id AS tenant, t.plan, p.client_type,
       coalesce(l.statements_per_second, p.statements_per_second) AS statements_per_second,
       coalesce(l.burst, p.burst) AS burst,
       coalesce(l.max_concurrent, p.max_concurrent) AS max_concurrent,
       coalesce(l.storage_bytes, p.storage_bytes) AS storage_bytes,
       tenancy._allowance(p, l, 'webhook_events') AS webhook_events_per_day,
       tenancy._allowance(p, l, 'egress_bytes') AS egress_bytes_per_day,
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

------------------------------------------------------------------------------------------------
-- Incident actions (runbook section 4)
------------------------------------------------------------------------------------------------
-- `days` business days (Monday to Friday) after `t`.
CREATE FUNCTION tenancy._business_days_after(t timestamptz, days integer) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT t + make_interval(days => (
        SELECT n FROM generate_series(1, days * 2 + 7) AS n
         WHERE (SELECT count(*) FROM generate_series(1, n) AS k
                 WHERE extract(isodow FROM (t AT TIME ZONE 'UTC') + make_interval(days => k)) < 6) = days
         ORDER BY n LIMIT 1))
$$;

-- A tenant under attack or leaking: read-only at once for every session (their next
-- statement), its data key rotated (new encryptions under a new version; rewrap to move old
-- ciphertexts), the event recorded, and an incident opened that tenancy.alerts shows until it is
-- closed. Returns the incident. A key that cannot be rotated (no master key configured) does not
-- stop the lockdown: the incident says why (key_rotation_error) and a WARNING is raised.
CREATE FUNCTION tenancy.lockdown(tenant text, reason text) RETURNS tenancy.incidents
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    t tenancy.tenants;
    r tenancy.incidents;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a lockdown needs a reason' USING ERRCODE = '22023',
            HINT = 'Say what was detected: it opens the incident record.';
    END IF;
    SELECT * INTO t FROM tenancy.tenants x WHERE x.id = tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant does not exist' USING ERRCODE = '42704',
            HINT = 'Create it with tenancy.create_tenant(...).';
    END IF;
    IF t.status IN ('suspended', 'offboarded') THEN
        RAISE EXCEPTION 'tenant is %', t.status USING ERRCODE = '55000',
            HINT = 'A suspended or offboarded tenant already writes nothing.';
    END IF;
    PERFORM tenancy.set_status(tenant, 'read_only');
    INSERT INTO tenancy.incidents (tenant, reason, detected_at, notify_by, postmortem_by, previous_status, opened_by)
    VALUES (tenant, reason, now(), now() + interval '72 hours', tenancy._business_days_after(now(), 5),
            CASE WHEN t.status = 'read_only' AND EXISTS (
                     SELECT 1 FROM tenancy.incidents i WHERE i.tenant = tenant AND i.unlocked_at IS NULL)
                 THEN (SELECT i.previous_status FROM tenancy.incidents i
                        WHERE i.tenant = tenant AND i.unlocked_at IS NULL ORDER BY i.id LIMIT 1)
                 ELSE t.status END,
            current_user::regrole)
    RETURNING * INTO r;
    IF EXISTS (SELECT 1 FROM tenancy.keys k WHERE k.tenant = tenant AND k.kind = 'data' AND k.state = 'active') THEN
        BEGIN
            PERFORM tenancy.rotate_key(tenant);
            UPDATE tenancy.incidents i SET key_rotated = true WHERE i.id = r.id RETURNING * INTO r;
        EXCEPTION WHEN OTHERS THEN
            UPDATE tenancy.incidents i SET key_rotation_error = SQLSTATE || ': ' || SQLERRM
             WHERE i.id = r.id RETURNING * INTO r;
            RAISE WARNING 'the tenant''s data key was not rotated' USING
                DETAIL = r.key_rotation_error,
                HINT = 'Configure the master key and run tenancy.rotate_key(tenant).';
        END;
    END IF;
    PERFORM tenancy._record_incident('lockdown', tenant, r.id);
    RETURN r;
END
$$;

-- Writes back (the status the tenant had before its first open lockdown). The incident stays
-- open until tenancy.close_incident().
CREATE FUNCTION tenancy.unlock(tenant text) RETURNS tenancy.tenants
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    prev text;
    id bigint;
    r tenancy.tenants;
BEGIN
    SELECT i.previous_status, i.id INTO prev, id FROM tenancy.incidents i
     WHERE i.tenant = tenant AND i.unlocked_at IS NULL ORDER BY i.id LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant is not locked down' USING ERRCODE = '55000',
            HINT = 'tenancy.set_status() changes a status that no lockdown set.';
    END IF;
    r := tenancy.set_status(tenant, prev);
    UPDATE tenancy.incidents i SET unlocked_at = now() WHERE i.tenant = tenant AND i.unlocked_at IS NULL;
    PERFORM tenancy._record_incident('unlock', tenant, id);
    RETURN r;
END
$$;

-- Close an incident once the customer is told and the post-mortem written.
CREATE FUNCTION tenancy.close_incident(id bigint, postmortem text) RETURNS tenancy.incidents
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    r tenancy.incidents;
BEGIN
    IF postmortem IS NULL OR btrim(postmortem) = '' THEN
        RAISE EXCEPTION 'closing an incident needs its post-mortem' USING ERRCODE = '22023',
            HINT = 'A link to it or its summary.';
    END IF;
    UPDATE tenancy.incidents i SET closed_at = now(), closed_by = current_user::regrole, postmortem = postmortem
     WHERE i.id = id AND i.closed_at IS NULL RETURNING * INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no open incident with that id' USING ERRCODE = '42704',
            HINT = 'SELECT * FROM tenancy.incidents WHERE closed_at IS NULL;';
    END IF;
    RETURN r;
END
$$;

------------------------------------------------------------------------------------------------
-- Storage per tenant (measured; see tenancy.tenant_storage)
------------------------------------------------------------------------------------------------
-- One protected table's rows per tenant: how many and how many bytes (pg_column_size of the
-- whole row, TOASTed values as stored). Called by tenancy.measure_storage() as a superuser.
CREATE FUNCTION tenancy._measure_table(rel regclass, col name)
RETURNS TABLE (tenant text, rows bigint, row_bytes bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY EXECUTE format(
        'SELECT t.%I::pg_catalog.text, pg_catalog.count(*), pg_catalog.sum(pg_catalog.pg_column_size(t.*))::pg_catalog.int8 '
        'FROM ONLY %s t GROUP BY 1', col, rel);
END
$$;

-- Measure every tenant's storage now; what tenancy.measure_storage() runs. A tenant is charged
-- the bytes of its own live rows as stored (each row's bytes, TOASTed values included, plus its
-- 24-byte tuple header and 4-byte line pointer): never a share of indexes, free space or dead
-- rows, which another tenant's updates and deletes could otherwise move onto it.
CREATE FUNCTION tenancy._measure_storage() RETURNS TABLE (tenant text, bytes bigint, rows bigint)
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH agg AS (
        SELECT m.tenant, sum(m.rows)::bigint AS rows, sum(m.row_bytes)::bigint AS row_bytes
          FROM tenancy.protected_tables p
          JOIN pg_class c ON c.oid = p.rel::oid AND c.relkind = 'r'
         CROSS JOIN LATERAL tenancy._measure_table(p.rel, p.tenant_column) m
         WHERE m.tenant IS NOT NULL
         GROUP BY m.tenant),
    measured AS (
        SELECT t.id AS tenant, coalesce(a.row_bytes + a.rows * 28, 0) AS bytes,
               coalesce(a.row_bytes, 0) AS row_bytes, coalesce(a.rows, 0) AS rows
          FROM tenancy.tenants t LEFT JOIN agg a ON a.tenant = t.id),
    -- (the day's last measurement: the storage history of tenancy.usage_report)
    history AS (
        INSERT INTO tenancy.usage_daily AS d (day, tenant, storage_bytes)
        SELECT (now() AT TIME ZONE 'UTC')::date, m.tenant, m.bytes
          FROM measured m JOIN tenancy.tenants t ON t.id = m.tenant
         -- (an offboarded tenant: while it keeps rows, and the day they are gone)
         WHERE t.status <> 'offboarded' OR m.bytes > 0
            OR (SELECT u.storage_bytes FROM tenancy.usage_daily u
                 WHERE u.tenant = m.tenant AND u.storage_bytes IS NOT NULL
                 ORDER BY u.day DESC LIMIT 1) > 0
        ON CONFLICT (tenant, day) DO UPDATE SET storage_bytes = EXCLUDED.storage_bytes)
    INSERT INTO tenancy.tenant_storage AS s (tenant, bytes, row_bytes, rows, measured_at)
    SELECT m.tenant, m.bytes, m.row_bytes, m.rows, now() FROM measured m
    ON CONFLICT (tenant) DO UPDATE
       SET bytes = EXCLUDED.bytes, row_bytes = EXCLUDED.row_bytes, rows = EXCLUDED.rows,
           measured_at = EXCLUDED.measured_at
    RETURNING s.tenant, s.bytes, s.rows
$$;

-- (a measurement changes what the limits compare with: cached verifications are dropped)
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.tenant_storage
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._limits_changed();

-- Storage per tenant against its quota.
CREATE VIEW tenancy.storage AS
SELECT t.id AS tenant, t.plan, s.bytes, s.rows, s.measured_at,
       coalesce(l.storage_bytes, p.storage_bytes) AS quota_bytes,
       CASE WHEN coalesce(l.storage_bytes, p.storage_bytes) > 0
            THEN s.bytes::double precision / coalesce(l.storage_bytes, p.storage_bytes) END AS quota_use
  FROM tenancy.tenants t
  JOIN tenancy.plans p ON p.name = t.plan
  LEFT JOIN tenancy.limits l ON l.tenant = t.id
  LEFT JOIN tenancy.tenant_storage s ON s.tenant = t.id;

REVOKE ALL ON tenancy.storage, tenancy.tenant_storage FROM PUBLIC;
GRANT SELECT ON tenancy.storage TO pg_monitor;

------------------------------------------------------------------------------------------------
-- Alerts (runbook section 5)
------------------------------------------------------------------------------------------------
-- Take a snapshot of every tenant's usage counters for the alerts' windows (the usage worker
-- runs it every pg_tenancy.snapshot_interval; or schedule it every minute), add their growth to
-- tenancy.usage_daily, and drop snapshots older than two hours. Returns the tenants written.
CREATE FUNCTION tenancy.snapshot_usage() RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    -- (one at a time: two overlapping runs would add the same growth twice)
    LOCK TABLE tenancy.usage_history IN SHARE ROW EXCLUSIVE MODE;
    WITH cur AS (
        SELECT s.tenant, s.statements, s.errors, s.denials, s.total_time_ms, s.histogram
          FROM tenancy._stats() s
         WHERE (s.statements > 0 OR s.denials > 0) AND s.tenant <> '(other)'),
    prev AS (
        SELECT DISTINCT ON (h.tenant) h.tenant, h.statements, h.errors, h.total_ms
          FROM tenancy.usage_history h ORDER BY h.tenant, h.at DESC),
    -- growth since the previous snapshot (counters lower than then were reset: all of them)
    delta AS (
        SELECT c.tenant,
               CASE WHEN p.tenant IS NULL OR c.statements < p.statements THEN c.statements ELSE c.statements - p.statements END AS statements,
               CASE WHEN p.tenant IS NULL OR c.statements < p.statements THEN c.errors ELSE greatest(c.errors - p.errors, 0) END AS errors,
               CASE WHEN p.tenant IS NULL OR c.statements < p.statements THEN c.total_time_ms ELSE greatest(c.total_time_ms - p.total_ms, 0) END AS ms
          FROM cur c LEFT JOIN prev p ON p.tenant = c.tenant),
    daily AS (
        INSERT INTO tenancy.usage_daily AS d (day, tenant, statements, errors, compute_ms)
        SELECT (now() AT TIME ZONE 'UTC')::date, x.tenant, x.statements, x.errors, x.ms
          FROM delta x JOIN tenancy.tenants t ON t.id = x.tenant
         WHERE x.statements > 0 OR x.errors > 0
        ON CONFLICT (tenant, day) DO UPDATE
           SET statements = d.statements + EXCLUDED.statements, errors = d.errors + EXCLUDED.errors,
               compute_ms = d.compute_ms + EXCLUDED.compute_ms),
    -- (each tenant's newest snapshot is kept however old: it is where the next growth starts)
    gone AS (
        DELETE FROM tenancy.usage_history h
         WHERE h.at < now() - interval '2 hours'
           AND h.at < (SELECT max(h2.at) FROM tenancy.usage_history h2 WHERE h2.tenant = h.tenant)),
    old_days AS (DELETE FROM tenancy.usage_daily d WHERE d.day < (now() AT TIME ZONE 'UTC')::date - 400),
    ins AS (
        INSERT INTO tenancy.usage_history (at, tenant, statements, errors, denials, total_ms, histogram)
        SELECT now(), c.tenant, c.statements, c.errors, c.denials, c.total_time_ms, c.histogram FROM cur c
        ON CONFLICT (tenant, at) DO NOTHING
        RETURNING 1)
    SELECT count(*) FROM ins
$$;

-- Cost and margin per tenant over [from, to): statement time (tenancy.usage_daily, filled by
-- snapshot_usage), storage (the average of the days measured in the period, each day's last
-- measurement; with none, the last one before the period's end) and backups kept, for the
-- period's share of a month, metered use, support; priced by tenancy.cost_model, against the
-- plan's monthly price for the same share of a month. margin = (revenue - cost) / revenue; the
-- seed's target is 0.8 to 0.9.
CREATE FUNCTION tenancy.usage_report("from" timestamptz, "to" timestamptz)
RETURNS TABLE (tenant text, plan text, days double precision, statements bigint, errors bigint,
               compute_hours double precision, storage_gb double precision, backup_gb double precision,
               meters jsonb, cost_compute numeric, cost_storage numeric, cost_backups numeric,
               cost_meters numeric, cost_support numeric, cost numeric, revenue numeric, margin numeric,
               currency text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF "from" IS NULL OR "to" IS NULL OR "to" <= "from" THEN
        RAISE EXCEPTION 'invalid report period' USING ERRCODE = '22023',
            HINT = 'usage_report(from, to) with from < to, for example usage_report(date_trunc(''month'', now()) - interval ''1 month'', date_trunc(''month'', now())).';
    END IF;
    RETURN QUERY
    WITH period AS (
        SELECT (extract(epoch FROM "to" - "from") / 86400.0)::double precision AS days,
               ("from" AT TIME ZONE 'UTC')::date AS d0, ("to" AT TIME ZONE 'UTC')::date AS d1),
    -- (no row: the table's column defaults)
    cm AS (SELECT coalesce(c.currency, 'USD') AS currency, coalesce(c.storage_gb_month, 0.115) AS storage_gb_month,
                  coalesce(c.compute_hour, 0.05) AS compute_hour, coalesce(c.backup_gb_month, 0.023) AS backup_gb_month,
                  coalesce(c.meter_unit, '{"webhook_events": 0.00001, "egress_bytes": 0.00000000009}') AS meter_unit,
                  coalesce(c.support_tenant_month, 0) AS support_tenant_month
             FROM (SELECT 1) one LEFT JOIN tenancy.cost_model c ON true),
    use AS (
        SELECT u.tenant, sum(u.statements)::bigint AS statements, sum(u.errors)::bigint AS errors,
               (sum(u.compute_ms) / 3600000.0)::double precision AS compute_hours
          FROM tenancy.usage_daily u, period
         WHERE u.day >= period.d0 AND u.day < greatest(period.d1, period.d0 + 1)
         GROUP BY u.tenant),
    met AS (
        SELECT m.tenant, jsonb_object_agg(m.meter, m.used) AS meters,
               sum(m.used * coalesce((SELECT (cm.meter_unit ->> m.meter)::numeric FROM cm), 0)) AS cost
          FROM (SELECT u.tenant, u.meter, sum(u.used) AS used
                  FROM tenancy.meter_usage u, period
                 WHERE u.day >= period.d0 AND u.day < greatest(period.d1, period.d0 + 1)
                 GROUP BY u.tenant, u.meter) m
         GROUP BY m.tenant),
    sto AS (
        SELECT t.id AS tenant,
               coalesce((SELECT avg(u.storage_bytes) FROM tenancy.usage_daily u
                          WHERE u.tenant = t.id AND u.storage_bytes IS NOT NULL
                            AND u.day >= period.d0 AND u.day < greatest(period.d1, period.d0 + 1)),
                        (SELECT u.storage_bytes FROM tenancy.usage_daily u
                          WHERE u.tenant = t.id AND u.storage_bytes IS NOT NULL AND u.day < greatest(period.d1, period.d0 + 1)
                          ORDER BY u.day DESC LIMIT 1)) AS bytes
          FROM tenancy.tenants t, period),
    bk AS (
        SELECT b.tenant, sum(b.archive_bytes) / 1e9 AS gb
          FROM tenancy.backups b, period
         WHERE b.created_at < "to" AND b.expires_at > "from"
         GROUP BY b.tenant),
    r AS (
        SELECT t.id AS tenant, t.plan, period.days,
               coalesce(use.statements, 0) AS statements, coalesce(use.errors, 0) AS errors,
               coalesce(use.compute_hours, 0) AS compute_hours,
               (coalesce(st.bytes, 0) / 1e9)::double precision AS storage_gb, coalesce(bk.gb, 0)::double precision AS backup_gb,
               coalesce(met.meters, '{}') AS meters,
               round((coalesce(use.compute_hours, 0) * cm.compute_hour)::numeric, 4) AS cost_compute,
               round((coalesce(st.bytes, 0) / 1e9 * cm.storage_gb_month * period.days / 30)::numeric, 4) AS cost_storage,
               round((coalesce(bk.gb, 0) * cm.backup_gb_month * period.days / 30)::numeric, 4) AS cost_backups,
               round(coalesce(met.cost, 0)::numeric, 4) AS cost_meters,
               round((cm.support_tenant_month * period.days / 30)::numeric, 4) AS cost_support,
               round((p.monthly_price * period.days / 30)::numeric, 2) AS revenue,
               cm.currency
          FROM tenancy.tenants t
          JOIN tenancy.plans p ON p.name = t.plan
          CROSS JOIN period CROSS JOIN cm
          LEFT JOIN use ON use.tenant = t.id
          LEFT JOIN met ON met.tenant = t.id
          LEFT JOIN bk ON bk.tenant = t.id
          LEFT JOIN sto st ON st.tenant = t.id
         -- (an offboarded tenant: only for a period it still used: statements, or rows kept)
         WHERE t.status <> 'offboarded' OR coalesce(use.statements, 0) > 0 OR coalesce(st.bytes, 0) > 0)
    SELECT r.tenant, r.plan, r.days, r.statements, r.errors, r.compute_hours, r.storage_gb, r.backup_gb,
           r.meters, r.cost_compute, r.cost_storage, r.cost_backups, r.cost_meters, r.cost_support,
           r.cost_compute + r.cost_storage + r.cost_backups + r.cost_meters + r.cost_support,
           r.revenue,
           CASE WHEN r.revenue > 0
                THEN round((r.revenue - (r.cost_compute + r.cost_storage + r.cost_backups + r.cost_meters + r.cost_support)) / r.revenue, 4)
           END,
           r.currency
      FROM r ORDER BY r.tenant;
END
$$;

-- What fires now, per tenant: p99_latency (over pg_tenancy.alert_p99_window, against the plan's
-- sla_p99_ms or pg_tenancy.alert_p99), error_ratio and unexpected_denials (over
-- pg_tenancy.alert_error_window), quota_use (a meter today above pg_tenancy.alert_quota_ratio of
-- the allowance), incident (an open incident). Windows compare the counters now with the last
-- snapshot at least a window old (or the oldest one), so tenancy.snapshot_usage() must run.
CREATE VIEW tenancy.alerts AS
WITH now_s AS (SELECT * FROM tenancy._stats() WHERE tenant <> '(other)'),
settings AS (
    SELECT extract(epoch FROM current_setting('pg_tenancy.alert_p99')::interval)::double precision * 1000 AS p99_limit,
           current_setting('pg_tenancy.alert_p99_window')::interval AS p99_window,
           current_setting('pg_tenancy.alert_error_ratio')::double precision AS error_ratio,
           current_setting('pg_tenancy.alert_error_window')::interval AS error_window,
           current_setting('pg_tenancy.alert_quota_ratio')::double precision AS quota_ratio,
           current_setting('pg_tenancy.alert_min_statements')::bigint AS min_statements),
base AS (
    -- the counters at the start of each window: the newest snapshot at least that old, else the
    -- oldest (counters lower now than then were reset: the window starts from zero)
    SELECT n.*, st.*,
           (SELECT h FROM tenancy.usage_history h WHERE h.tenant = n.tenant
             ORDER BY (h.at <= now() - st.p99_window) DESC, CASE WHEN h.at <= now() - st.p99_window THEN h.at END DESC, h.at
             LIMIT 1) AS p99_base,
           (SELECT h FROM tenancy.usage_history h WHERE h.tenant = n.tenant
             ORDER BY (h.at <= now() - st.error_window) DESC, CASE WHEN h.at <= now() - st.error_window THEN h.at END DESC, h.at
             LIMIT 1) AS err_base
      FROM now_s n, settings st),
windows AS (
    SELECT b.tenant, b.p99_limit, b.error_ratio, b.min_statements,
           (b.p99_base).at AS p99_since, (b.err_base).at AS err_since,
           CASE WHEN b.p99_base IS NULL OR b.statements < (b.p99_base).statements THEN b.histogram
                ELSE ARRAY(SELECT x - y FROM unnest(b.histogram, (b.p99_base).histogram) AS u(x, y)) END AS p99_hist,
           b.statements - CASE WHEN b.err_base IS NULL OR b.statements < (b.err_base).statements THEN 0
                               ELSE (b.err_base).statements END AS err_statements,
           b.errors - CASE WHEN b.err_base IS NULL OR b.errors < (b.err_base).errors THEN 0
                           ELSE (b.err_base).errors END AS err_errors,
           b.denials - CASE WHEN b.err_base IS NULL OR b.denials < (b.err_base).denials THEN 0
                            ELSE (b.err_base).denials END AS err_denials
      FROM base b
     WHERE b.p99_base IS NOT NULL OR b.err_base IS NOT NULL)
SELECT w.tenant, 'p99_latency'::text AS rule, tenancy._quantile_ms(w.p99_hist, 0.99) AS value,
       coalesce(p.sla_p99_ms, w.p99_limit) AS threshold, w.p99_since AS since
  FROM windows w
  LEFT JOIN tenancy.tenants t ON t.id = w.tenant
  LEFT JOIN tenancy.plans p ON p.name = t.plan
 WHERE w.p99_since IS NOT NULL
   AND (SELECT sum(x) FROM unnest(w.p99_hist) x) >= w.min_statements
   AND tenancy._quantile_ms(w.p99_hist, 0.99) > coalesce(p.sla_p99_ms, w.p99_limit)
UNION ALL
SELECT w.tenant, 'error_ratio', w.err_errors::double precision / w.err_statements, w.error_ratio, w.err_since
  FROM windows w
 WHERE w.err_since IS NOT NULL AND w.err_statements >= w.min_statements
   AND w.err_errors::double precision / w.err_statements > w.error_ratio
UNION ALL
SELECT w.tenant, 'unexpected_denials', w.err_denials, 0, w.err_since
  FROM windows w
 WHERE w.err_since IS NOT NULL AND w.err_denials > 0
UNION ALL
SELECT m.tenant, 'quota_use:' || m.meter, m.used::double precision / m.allowance,
       (SELECT quota_ratio FROM settings), m.day::timestamptz
  FROM (SELECT u.tenant, u.meter, u.day, u.used, e.allowance
          FROM tenancy.meter_usage u
          JOIN tenancy.tenants t ON t.id = u.tenant
          JOIN tenancy.plans p ON p.name = t.plan
          LEFT JOIN tenancy.limits l ON l.tenant = t.id
         CROSS JOIN LATERAL (SELECT tenancy._allowance(p, l, u.meter) AS allowance) e
         WHERE u.day = (now() AT TIME ZONE 'UTC')::date) m
 WHERE m.allowance > 0 AND m.used::double precision / m.allowance > (SELECT quota_ratio FROM settings)
UNION ALL
SELECT st.tenant, 'quota_use:storage', st.quota_use, (SELECT quota_ratio FROM settings), st.measured_at
  FROM tenancy.storage st
 WHERE st.quota_use > (SELECT quota_ratio FROM settings)
UNION ALL
SELECT i.tenant, 'incident', i.id, NULL, i.detected_at
  FROM tenancy.incidents i
 WHERE i.closed_at IS NULL;

REVOKE ALL ON tenancy.alerts, tenancy.incidents, tenancy.usage_history, tenancy.usage_daily, tenancy.cost_model FROM PUBLIC;
GRANT SELECT ON tenancy.alerts TO pg_monitor;

