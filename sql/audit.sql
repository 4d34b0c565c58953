-- The denial log (src/audit/). Rows come only from pg_tenancy's audit writer; they leave only
-- through tenancy.prune_audit(). tenancy_auditor reads it; application roles do not.

CREATE TABLE tenancy.audit_log (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                timestamptz NOT NULL,
    event             text        NOT NULL CONSTRAINT audit_log_event_check CHECK (event IN (
                          'no_context', 'cross_tenant_write', 'cross_tenant_probe',
                          'forbidden_tenant', 'bypass_read', 'policy_tamper',
                          'read_only_write', 'wrong_tenant_key', 'protected_ddl', 'tenant_restored',
                          'limit_exceeded', 'tenant_lockdown', 'tenant_unlock', 'tenant_purged')),
    database          name        NOT NULL,
    role              name        NOT NULL,
    session_tenant    text,
    attempted_tenant  text,
    relation          text,
    command           text,
    sqlstate          text        NOT NULL,
    query_id          bigint,
    backend_pid       integer     NOT NULL,
    detail            text,
    written_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE INDEX audit_log_at_idx ON tenancy.audit_log (at);
CREATE INDEX audit_log_event_at_idx ON tenancy.audit_log (event, at);
COMMENT ON TABLE tenancy.audit_log IS
    'Every cross-tenant attempt pg_tenancy saw, written outside the attempt''s transaction. Append-only.';
CREATE TRIGGER audit_log_append_only
    BEFORE INSERT OR UPDATE OR DELETE ON tenancy.audit_log
    FOR EACH ROW EXECUTE FUNCTION tenancy._audit_log_guard();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON tenancy.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._audit_log_guard();
-- ALWAYS: session_replication_role = replica does not silence them.
ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;
ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_log', '');
-- (and its id sequence, or a restored log would hand out ids it already holds)
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_log_id_seq', '');

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tenancy_auditor') THEN
        CREATE ROLE tenancy_auditor NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE tenancy_auditor IS 'Reads pg_tenancy''s audit log (tenancy.audit_log) and its reports.';

-- Denials an operator did not plan for, per event, role, tenant and relation, over the last
-- `since`: the runbook's "unexpected RLS denials" alert. Left out: bypass_read (not a denial;
-- listed in the log) and read_only_write (the consequence of a status an operator set).
CREATE FUNCTION tenancy.unexpected_denials(since interval DEFAULT '5 minutes')
RETURNS TABLE (event text, role name, session_tenant text, relation text,
               attempts bigint, first_at timestamptz, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.event, a.role, a.session_tenant, a.relation,
           count(*), min(a.at), max(a.at)
      FROM tenancy.audit_log a
     WHERE a.at >= now() - $1
       AND a.event IN ('no_context', 'cross_tenant_write', 'cross_tenant_probe',
                       'forbidden_tenant', 'policy_tamper', 'wrong_tenant_key')
     GROUP BY 1, 2, 3, 4
     ORDER BY count(*) DESC, 1, 2
$$;

