-- The tenant context: scope, grants, statuses, flags, and every way to set or clear it.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
SELECT id FROM tenancy.create_tenant('initech', 'Initech');
SELECT id FROM tenancy.create_tenant('hooli', 'Hooli', config => '{"flags": {"beta": false}}');
SELECT tenancy.grant_tenant('regress_app', 'acme');
SELECT tenancy.grant_tenant('regress_app', 'globex', 'read_write');
SELECT tenancy.grant_tenant('regress_app', 'initech', 'read');
SELECT tenancy.grant_tenant('regress_app', 'hooli');
SELECT tenancy.grant_tenant('regress_reader', 'acme', 'read');
SELECT tenancy.grant_tenant('regress_group', 'globex', 'read_write');
SELECT tenancy.grant_tenant('regress_admin', 'acme', 'admin');
-- bad grants
SELECT tenancy.grant_tenant('regress_app', 'acme', 'owner');
SELECT tenancy.grant_tenant('regress_app', 'no such', 'read');
SELECT tenancy.grant_tenant('regress_app', 'nosuch', 'read');
SELECT tenancy.grant_tenant('regress_nosuchrole', 'acme', 'read');
SELECT role, tenant, scope FROM tenancy.grants ORDER BY role::text, tenant;

SET ROLE regress_app;
-- no context: fail closed, with a clear error
SELECT tenancy.current_tenant();
SELECT tenancy.has_tenant();
SELECT tenancy.flag('beta');
SELECT tenancy.writable_tenant();

-- transaction scope: gone after COMMIT and after ROLLBACK
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.current_tenant(), tenancy.tenant_scope(), tenancy.has_tenant();
SELECT tenancy.flag('beta'), tenancy.flag('old_ui'), tenancy.flag('missing');
SELECT tenancy.config('sla'), tenancy.config('flags') -> 'beta', tenancy.config('missing');
COMMIT;
SELECT tenancy.current_tenant();
BEGIN;
SELECT tenancy.set_tenant('globex');
ROLLBACK;
SELECT tenancy.has_tenant();
-- outside a transaction block the context lasts one statement, and says so
SELECT tenancy.set_tenant('acme');
SELECT tenancy.has_tenant();

-- session scope, then reset_tenant and DISCARD ALL clear it
SELECT tenancy.set_tenant('acme', session => true);
SELECT tenancy.current_tenant();
SELECT tenancy.reset_tenant();
SELECT tenancy.has_tenant();
SELECT tenancy.set_tenant('globex', true);
DISCARD ALL;
SELECT current_user, tenancy.has_tenant();
-- (DISCARD ALL also reset the role)
SET ROLE regress_app;
SET pg_tenancy.tenant = 'acme';
SELECT tenancy.current_tenant();
RESET pg_tenancy.tenant;
SELECT tenancy.has_tenant();

-- tenants not granted, unknown tenants and malformed ids: refused, and indistinguishable
BEGIN;
SELECT tenancy.set_tenant('7c9e6679-7425-40de-944b-e07fc1f90ae7');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('does-not-exist');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme''; SET ROLE postgres; --');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant(NULL);
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('');
ROLLBACK;
-- every other way to set the setting goes through the same check
BEGIN;
SET LOCAL pg_tenancy.tenant = 'does-not-exist';
ROLLBACK;
BEGIN;
SELECT set_config('pg_tenancy.tenant', '7c9e6679-7425-40de-944b-e07fc1f90ae7', true);
ROLLBACK;
SET pg_tenancy.tenant TO 'a b';
ALTER ROLE regress_app SET pg_tenancy.tenant = 'initech-nope';
SET pg_tenancy.tennant = 'acme';

-- the context is re-checked for the role that uses it: SET ROLE cannot carry it elsewhere
RESET ROLE;
BEGIN;
SET LOCAL ROLE regress_app;
SELECT tenancy.set_tenant('hooli');
SET LOCAL ROLE regress_reader;
SELECT tenancy.current_tenant();
ROLLBACK;

-- statuses: read_only reads but does not write; suspended and offboarded are refused
SELECT status FROM tenancy.set_status('hooli', 'read_only');
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('hooli');
SELECT tenancy.current_tenant();
SELECT tenancy.writable_tenant();
ROLLBACK;
RESET ROLE;
SELECT status FROM tenancy.set_status('hooli', 'suspended');
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('hooli');
ROLLBACK;
-- a suspension reaches a session that already holds the tenant, at its next statement
RESET ROLE;
SELECT status FROM tenancy.set_status('hooli', 'active');
SET ROLE regress_app;
SELECT tenancy.set_tenant('hooli', true);
RESET ROLE;
SELECT status FROM tenancy.set_status('hooli', 'suspended');
SET ROLE regress_app;
SELECT tenancy.current_tenant();
SELECT tenancy.reset_tenant();
RESET ROLE;
SELECT status FROM tenancy.set_status('hooli', 'active');

-- scope read: reads, no writes
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('initech');
SELECT tenancy.tenant_scope();
SELECT tenancy.writable_tenant();
ROLLBACK;
-- membership carries grants
SET ROLE regress_member;
BEGIN;
SELECT tenancy.set_tenant('globex'), tenancy.tenant_scope();
ROLLBACK;
-- revoking takes effect at once
RESET ROLE;
SELECT tenancy.revoke_tenant('regress_group', 'globex');
SELECT tenancy.revoke_tenant('regress_group', 'globex');
SET ROLE regress_member;
BEGIN;
SELECT tenancy.set_tenant('globex');
ROLLBACK;

-- grants: applications cannot grant themselves anything
SET ROLE regress_app;
SELECT tenancy.grant_tenant('regress_app', 'initech', 'admin');
SELECT tenancy.grant_tenant('regress_app', '*', 'read');
-- an admin of acme grants within acme, only from inside acme, never elsewhere
SET ROLE regress_admin;
SELECT tenancy.grant_tenant('regress_reader', 'acme', 'read_write');
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.grant_tenant('regress_reader', 'acme', 'read_write');
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.grant_tenant('regress_reader', 'globex', 'read_write');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.revoke_tenant('regress_app', 'globex');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.grant_tenant('regress_reader', '*', 'read');
ROLLBACK;
RESET ROLE;
SELECT role, tenant, scope, granted_by FROM tenancy.grants WHERE role = 'regress_reader'::regrole;

-- the all-tenants grant is explicit
SELECT tenancy.grant_tenant('regress_reader', '*', 'read');
SET ROLE regress_reader;
BEGIN;
SELECT tenancy.set_tenant('initech'), tenancy.tenant_scope();
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('nosuch');
ROLLBACK;
RESET ROLE;
SELECT tenancy.revoke_tenant('regress_reader', '*');
-- superusers may enter any existing tenant
BEGIN;
SELECT tenancy.set_tenant('initech'), tenancy.tenant_scope();
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('nosuch');
ROLLBACK;

\i pg_test/fixtures/teardown.sql
