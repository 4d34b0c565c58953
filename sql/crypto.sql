-- Per-tenant encryption: what is plain SQL (src/crypto/ has the rest).

-- Tenants whose active data key is older than pg_tenancy.key_rotation_interval.
CREATE VIEW tenancy.keys_due AS
SELECT k.tenant, k.version, k.created_at, now() - k.created_at AS age
  FROM tenancy.keys k
 WHERE k.kind = 'data' AND k.state = 'active'
   AND k.created_at < now() - current_setting('pg_tenancy.key_rotation_interval')::interval;


------------------------------------------------------------------------------------------------
-- Online re-encryption: one batch of the current tenant's rows whose ciphertext is older than the
-- active key. Returns how many it moved; call it until it returns 0. Skips rows that writers hold
-- locked (a later batch picks them up), so it never blocks the application. Runs as the caller;
-- context_expr is an SQL expression over the row, e.g. $$'orders.card:' || id$$.
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.reencrypt(rel regclass, col name, context_expr text DEFAULT $$''$$,
                                  batch_size integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    active integer := tenancy.active_key_version();
    n bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = '22023',
            HINT = 'For example 1000.';
    END IF;
    EXECUTE format(
        'WITH todo AS (SELECT tableoid, ctid FROM %1$s '
        '               WHERE %2$I IS NOT NULL AND tenancy.key_version(%2$I) OPERATOR(pg_catalog.<) $1 '
        '               LIMIT $2 FOR UPDATE SKIP LOCKED) '
        'UPDATE %1$s AS t SET %2$I = tenancy.rewrap(t.%2$I, %3$s) FROM todo '
        ' WHERE t.tableoid OPERATOR(pg_catalog.=) todo.tableoid AND t.ctid OPERATOR(pg_catalog.=) todo.ctid',
        rel, col, coalesce(context_expr, $$''$$))
    USING active, batch_size;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

