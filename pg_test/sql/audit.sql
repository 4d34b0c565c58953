-- The denial log: every event type, rows that survive the rollback of the attempt, who may
-- read it, and that nobody can change it.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_aud_app;
DROP ROLE IF EXISTS regress_aud_reader;
RESET client_min_messages;
CREATE ROLE regress_aud_app;
CREATE ROLE regress_aud_reader IN ROLE tenancy_auditor;
SELECT (tenancy.create_tenant('aud-a', 'Audit A')).id, (tenancy.create_tenant('aud-b', 'Audit B')).id,
       (tenancy.create_tenant('aud-c', 'Audit C')).id;
SELECT tenancy.grant_tenant('regress_aud_app', 'aud-a', 'read_write'),
       tenancy.grant_tenant('regress_aud_app', 'aud-b', 'read_write');
CREATE TABLE public.aud_notes (tenant_id text NOT NULL, id int, body text, PRIMARY KEY (tenant_id, id));
SELECT count(*) > 0 AS protected FROM tenancy.protect('public.aud_notes');
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON public.aud_notes TO regress_aud_app;
INSERT INTO public.aud_notes VALUES ('aud-a', 1, 'alpha'), ('aud-b', 1, 'bravo');
-- the writer is asynchronous: wait until the queue is empty
CREATE FUNCTION pg_temp.drained() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. 200 LOOP
        IF (SELECT queued_here FROM tenancy.audit_status()) = 0 THEN
            RETURN true;
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    RETURN false;
END $$;
SELECT pg_temp.drained();
SELECT coalesce(max(id), 0) AS start FROM tenancy.audit_log \gset

SET ROLE regress_aud_app;
-- no_context
SELECT * FROM public.aud_notes;
-- forbidden_tenant: a tenant not granted, a malformed context
SELECT tenancy.set_tenant('aud-c');
SET pg_tenancy.tenant = 'no such thing!';
BEGIN;
SELECT tenancy.set_tenant('aud-a');
-- cross_tenant_probe: no rows, but it names another tenant (constant, IN list, parameter)
SELECT count(*) FROM public.aud_notes WHERE tenant_id = 'aud-b';
SELECT count(*) FROM public.aud_notes WHERE tenant_id IN ('aud-a', 'aud-c');
PREPARE probe(text) AS SELECT count(*) FROM public.aud_notes WHERE tenant_id = $1;
EXECUTE probe('aud-a');
EXECUTE probe('aud-b');
-- filtering on one's own tenant is no probe
SELECT count(*) FROM public.aud_notes WHERE tenant_id = 'aud-a';
-- cross_tenant_write, then the transaction rolls back
INSERT INTO public.aud_notes VALUES ('aud-b', 2, 'sneaky');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('aud-a');
UPDATE public.aud_notes SET tenant_id = 'aud-b' WHERE id = 1;
ROLLBACK;
-- TRUNCATE would destroy every tenant's rows
BEGIN;
SELECT tenancy.set_tenant('aud-a');
TRUNCATE public.aud_notes;
ROLLBACK;
-- wrong_tenant_key: another tenant's ciphertext
RESET ROLE;
\! head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /tmp/pg_tenancy_regress_audit_mk && chmod 644 /tmp/pg_tenancy_regress_audit_mk
SET pg_tenancy.master_key_file = '/tmp/pg_tenancy_regress_audit_mk';
SET ROLE regress_aud_app;
BEGIN;
SELECT tenancy.set_tenant('aud-b');
SELECT tenancy.encrypt('for b only', 'notes') AS c \gset
SELECT tenancy.set_tenant('aud-a');
SELECT tenancy.decrypt_text(:'c', 'notes');
ROLLBACK;
RESET ROLE;
RESET pg_tenancy.master_key_file;
-- read_only_write
SELECT (tenancy.set_status('aud-a', 'read_only')).status;
SET ROLE regress_aud_app;
BEGIN;
SELECT tenancy.set_tenant('aud-a');
SELECT count(*) FROM public.aud_notes;
INSERT INTO public.aud_notes VALUES ('aud-a', 3, 'late');
ROLLBACK;
RESET ROLE;
SELECT (tenancy.set_status('aud-a', 'active')).status;
-- policy_tamper by a role that does not own the table (refused by PostgreSQL, recorded by us)
SET ROLE regress_aud_app;
ALTER TABLE public.aud_notes DISABLE ROW LEVEL SECURITY;
DROP POLICY tenancy_isolation ON public.aud_notes;
CREATE POLICY open_door ON public.aud_notes USING (true);
ALTER TABLE public.aud_notes DROP COLUMN tenant_id;
ALTER TABLE public.aud_notes ADD COLUMN harmless int;
RESET ROLE;
-- policy_tamper (by the superuser, refused by the guard)
ALTER TABLE public.aud_notes DISABLE ROW LEVEL SECURITY;
-- bypass_read: a superuser reads without row security
SELECT count(*) FROM public.aud_notes;

SELECT pg_temp.drained();
-- every attempt is there, although each statement failed and its transaction rolled back
SELECT event, role, session_tenant, attempted_tenant, relation, command, sqlstate, detail
  FROM tenancy.audit_log
 WHERE id > :start AND (role = 'regress_aud_app' OR relation = 'public.aud_notes')
 ORDER BY id;
-- the detail and every other column carry no row values
SELECT count(*) AS leaked FROM tenancy.audit_log
 WHERE id > :start AND concat_ws(' ', detail, attempted_tenant, relation) ~ '(alpha|bravo|sneaky|late|for b only)';
SELECT event, role, session_tenant, relation, attempts
  FROM tenancy.unexpected_denials('1 hour')
 WHERE role = 'regress_aud_app' OR relation = 'public.aud_notes'
 ORDER BY event, role;

-- who may read it: the auditor, not the application
SET ROLE regress_aud_app;
SELECT count(*) FROM tenancy.audit_log;
SELECT * FROM tenancy.audit_status();
SELECT tenancy.prune_audit('1 day');
RESET ROLE;
SET ROLE regress_aud_reader;
SELECT count(*) > 0 AS auditor_reads FROM tenancy.audit_log WHERE id > :start;
SELECT capacity, written > 0 AS writes_counted FROM tenancy.audit_status();
UPDATE tenancy.audit_log SET detail = 'x' WHERE id > :start;
RESET ROLE;
-- nobody changes it, superusers included; only prune_audit removes rows
UPDATE tenancy.audit_log SET detail = 'x' WHERE id > :start;
DELETE FROM tenancy.audit_log WHERE id > :start;
TRUNCATE tenancy.audit_log;
INSERT INTO tenancy.audit_log (at, event, database, role, sqlstate, backend_pid)
VALUES (now(), 'no_context', 'x', 'x', '00000', 1);
SET session_replication_role = replica;
DELETE FROM tenancy.audit_log WHERE id > :start;
RESET session_replication_role;
ALTER TABLE tenancy.audit_log DISABLE TRIGGER audit_log_append_only;
SELECT tenancy.prune_audit('100 years');
SELECT tenancy.prune_audit(NULL);
SELECT pg_temp.drained();
SELECT event, role, relation, sqlstate, detail FROM tenancy.audit_log
 WHERE id > :start AND event = 'policy_tamper' AND relation LIKE 'tenancy.%' ORDER BY id;
-- tenancy.check() watches the log's own protection
ALTER TABLE tenancy.audit_log ENABLE TRIGGER audit_log_no_truncate;
SET pg_tenancy.guard = off;
ALTER TABLE tenancy.audit_log ENABLE TRIGGER audit_log_no_truncate;
RESET pg_tenancy.guard;
SELECT severity, object, problem FROM tenancy.check() WHERE object = 'tenancy.audit_log' AND severity = 'ERROR';
SET pg_tenancy.guard = off;
ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
RESET pg_tenancy.guard;
SELECT count(*) AS audit_findings FROM tenancy.check() WHERE object = 'tenancy.audit_log' AND severity = 'ERROR';
-- the retention function is the one way out (here: everything written so far)
SELECT tenancy.prune_audit('-1 minute') > 0 AS pruned;
SELECT count(*) AS left_after_prune FROM tenancy.audit_log WHERE id <= :start + 1000000;

DROP TABLE public.aud_notes;
DROP OWNED BY regress_aud_app;
DROP ROLE regress_aud_app;
DROP ROLE regress_aud_reader;

\i pg_test/fixtures/teardown.sql
