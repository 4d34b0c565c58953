-- Privileges: nothing by default, then exactly what applications and owners need.

REVOKE ALL ON ALL TABLES IN SCHEMA tenancy FROM PUBLIC;
GRANT USAGE ON SCHEMA tenancy TO PUBLIC;
-- Functions applications call keep PostgreSQL's default privilege (EXECUTE for PUBLIC) as a
-- NULL ACL: revoking it and granting it back would store the same rights as an explicit ACL,
-- which every statement calling the function then reads and copies out of pg_proc when it
-- starts (bench/README.md, set_tenant). Every other function and procedure is revoked from PUBLIC.
DO $$
DECLARE
    f regprocedure;
    public_ones regprocedure[] := ARRAY[
        'tenancy.set_tenant(text, boolean)',
        'tenancy.set_tenant_token(text, boolean)',
        'tenancy.reset_tenant()',
        'tenancy.current_tenant()',
        'tenancy.current_tenant(anyelement)',
        'tenancy.writable_tenant()',
        'tenancy.has_tenant()',
        'tenancy.tenant_scope()',
        'tenancy.schema_version()',
        'tenancy.flag(text)',
        'tenancy.config(text)',
        'tenancy.valid_tenant_id(text)',
        'tenancy.grant_tenant(regrole, text, text)',
        'tenancy.revoke_tenant(regrole, text)',
        'tenancy._grant_tenant(oid, text, text)',
        'tenancy._revoke_tenant(oid, text)',
        'tenancy.protect(regclass, name, boolean)',
        'tenancy._protect(oid, text, boolean)',
        'tenancy.protect_schema(name, name, boolean)',
        'tenancy._protect_schema(text, text, boolean)',
        'tenancy.policy_sql(regclass, name)',
        'tenancy._policy_sql(oid, text)',
        'tenancy.truncate_guard()',
        'tenancy._capture()',
        'tenancy._guard_exempt(oid)',
        'tenancy._guard_ddl()',
        'tenancy._guard_drop()',
        'tenancy.encrypt(bytea, text)',
        'tenancy.encrypt(text, text)',
        'tenancy.decrypt(bytea, text)',
        'tenancy.decrypt_text(bytea, text)',
        'tenancy.rewrap(bytea, text)',
        'tenancy.key_version(bytea)',
        'tenancy.blind_index(text, text)',
        'tenancy.active_key_version()',
        'tenancy.cipher_implementation()',
        'tenancy.reencrypt(regclass, name, text, integer)',
        'tenancy._write_denied(text)',
        'tenancy.meter(text, bigint)'
    ]::pg_catalog.regprocedure[];
BEGIN
    FOR f IN
        SELECT p.oid::pg_catalog.regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace OPERATOR(pg_catalog.=) 'tenancy'::pg_catalog.regnamespace
           AND p.prokind OPERATOR(pg_catalog.=) ANY (ARRAY['f', 'p', 'w', 'a']::"char"[])
           AND p.oid OPERATOR(pg_catalog.<>) ALL (public_ones::pg_catalog.oid[])
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON ROUTINE %s FROM PUBLIC', f);
    END LOOP;
END
$$;
-- Usage statistics span every tenant: monitoring reads them (pg_monitor), not applications.
GRANT EXECUTE ON FUNCTION tenancy._stats(), tenancy.metrics(), tenancy.stats_status(),
    tenancy._quantile_ms(bigint[], double precision),
    tenancy._allowance(tenancy.plans, tenancy.limits, text) TO pg_monitor;

-- Per-relation statistics count rows a session's own scans read, the other tenants' included
-- (an index scan on another column reads them before the tenant filter drops them): in this
-- database they are not for PUBLIC. Monitoring keeps them through pg_read_all_stats.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
         WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
           AND p.proname OPERATOR(pg_catalog.~) '^pg_stat_get_' AND p.pronargs OPERATOR(pg_catalog.=) 1
           AND p.proargtypes[0] OPERATOR(pg_catalog.=) 'pg_catalog.oid'::pg_catalog.regtype
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO pg_read_all_stats', f);
    END LOOP;
END
$$;
-- The statistics of an expression index sample every tenant's values of a protected table, and
-- pg_stats shows them to the index's owner (row security is the table's, not the index's): in
-- this database pg_stats is not for PUBLIC either.
REVOKE SELECT ON pg_catalog.pg_stats FROM PUBLIC;
GRANT SELECT ON pg_catalog.pg_stats TO pg_read_all_stats;
-- The auditor reads the log and the reports; pruning stays with superusers.
GRANT SELECT ON tenancy.audit_log TO tenancy_auditor;
GRANT EXECUTE ON FUNCTION tenancy.unexpected_denials(interval), tenancy.audit_status() TO tenancy_auditor;

