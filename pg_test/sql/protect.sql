-- tenancy.protect(): generated policies, and what they let an application role do.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
SELECT id FROM tenancy.create_tenant('7c9e6679-7425-40de-944b-e07fc1f90ae7', 'UUID tenant');
SELECT tenancy.grant_tenant('regress_app', 'acme'), tenancy.grant_tenant('regress_app', 'globex', 'read_write');
CREATE SCHEMA app AUTHORIZATION regress_owner;
GRANT USAGE ON SCHEMA app TO regress_app, regress_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE regress_owner IN SCHEMA app
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO regress_app, regress_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE regress_owner IN SCHEMA app
    GRANT USAGE ON SEQUENCES TO regress_app;

SET ROLE regress_owner;
CREATE TABLE app.orders (
    tenant_id text NOT NULL,
    id bigserial,
    item text NOT NULL,
    amount numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, id)
);
-- the table owner protects its own table; the statements run are returned
SELECT * FROM tenancy.protect('app.orders');
-- idempotent
SELECT count(*) FROM tenancy.protect('app.orders');
SELECT tenancy.policy_sql('app.orders');
RESET ROLE;
SELECT rel, tenant_column, column_type FROM tenancy.protected_tables;
SELECT polname, polcmd, polpermissive, pg_get_expr(polqual, polrelid) AS using_expr,
       pg_get_expr(polwithcheck, polrelid) AS check_expr
  FROM pg_policy WHERE polrelid = 'app.orders'::regclass ORDER BY polname;
SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = 'app.orders'::regclass;

-- bad targets
SET ROLE regress_owner;
CREATE VIEW app.v AS SELECT 1 AS tenant_id;
SELECT tenancy.protect('app.v');
CREATE TABLE app.no_tenant (id int);
SELECT tenancy.protect('app.no_tenant');
CREATE TABLE app.money (tenant_id numeric);
SELECT tenancy.protect('app.money');
SELECT tenancy.protect('app.nosuch');
DROP VIEW app.v;
DROP TABLE app.no_tenant, app.money;
RESET ROLE;
-- only the owner can protect a table (PostgreSQL's own ownership check)
SET ROLE regress_app;
SELECT tenancy.protect('app.orders');
SELECT tenancy.unprotect('app.orders');
RESET ROLE;

-- isolation as the application role: neither owner nor BYPASSRLS
SET ROLE regress_app;
SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user;
SELECT * FROM app.orders;
INSERT INTO app.orders (item) VALUES ('anvil');
BEGIN;
SELECT tenancy.set_tenant('acme');
INSERT INTO app.orders (item, amount) VALUES ('anvil', 10), ('rocket', 99);
SELECT tenant_id, item FROM app.orders ORDER BY id;
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex');
INSERT INTO app.orders (item, amount) VALUES ('widget', 5);
SELECT tenant_id, item FROM app.orders ORDER BY id;
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex');
-- a forgotten WHERE does not matter; a guessed WHERE finds nothing
SELECT count(*) FROM app.orders WHERE tenant_id = 'acme';
UPDATE app.orders SET amount = 0 WHERE tenant_id = 'acme';
DELETE FROM app.orders WHERE tenant_id = 'acme';
-- writing another tenant's id is refused
INSERT INTO app.orders (tenant_id, item) VALUES ('acme', 'planted');
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex');
UPDATE app.orders SET tenant_id = 'acme' WHERE item = 'widget';
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('globex');
INSERT INTO app.orders (tenant_id, id, item) SELECT 'globex', id, 'x' FROM app.orders WHERE item = 'widget'
    ON CONFLICT (tenant_id, id) DO UPDATE SET tenant_id = 'acme';
ROLLBACK;
-- COPY TO is filtered; COPY FROM is refused by PostgreSQL on RLS tables
BEGIN;
SELECT tenancy.set_tenant('acme');
COPY app.orders (tenant_id, item) TO STDOUT;
COPY app.orders (item) FROM STDIN;
smuggled
\.
ROLLBACK;
-- no context: statements that touch rows are refused, not silently empty
SELECT * FROM app.orders;
UPDATE app.orders SET amount = 1;
DELETE FROM app.orders;
-- ... even when the table is empty, or the plan would never look at a row
SET ROLE regress_owner;
CREATE TABLE app.empty (tenant_id text NOT NULL, v int);
SELECT count(*) FROM tenancy.protect('app.empty', create_index => true);
GRANT SELECT, INSERT, UPDATE, DELETE ON app.empty TO regress_app;
SET ROLE regress_app;
SELECT * FROM app.empty;
SELECT * FROM app.orders WHERE false;
DELETE FROM app.empty;
CREATE TEMP VIEW v_empty AS SELECT * FROM app.empty;
SELECT * FROM v_empty;
-- row_security = off does not help an application role
SET row_security = off;
SELECT * FROM app.orders;
RESET row_security;
-- a leaky function in WHERE never sees other tenants' rows (policies run first)
CREATE FUNCTION pg_temp.peek(text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS
    $$ BEGIN RAISE NOTICE 'peeked at %', $1; RETURN true; END $$;
BEGIN;
SELECT tenancy.set_tenant('globex');
SELECT item FROM app.orders WHERE pg_temp.peek(item);
ROLLBACK;
-- savepoints restore the context with the rest of the transaction state
BEGIN;
SELECT tenancy.set_tenant('acme');
SAVEPOINT s;
SELECT tenancy.set_tenant('globex');
ROLLBACK TO SAVEPOINT s;
SELECT tenancy.current_tenant(), count(*) FROM app.orders;
COMMIT;
-- prepared statements and generic plans do not freeze the tenant
SET plan_cache_mode = force_generic_plan;
PREPARE q AS SELECT tenant_id, count(*) FROM app.orders GROUP BY 1;
BEGIN; SELECT tenancy.set_tenant('acme'); EXECUTE q; COMMIT;
BEGIN; SELECT tenancy.set_tenant('globex'); EXECUTE q; COMMIT;
DEALLOCATE q;
RESET plan_cache_mode;
-- the policy is an index condition evaluated once per statement (initPlan)
BEGIN;
SELECT tenancy.set_tenant('acme');
SET LOCAL enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT * FROM app.orders WHERE id = 1;
ROLLBACK;
RESET ROLE;

-- read_only tenant: reads work, every write is refused
SELECT status FROM tenancy.set_status('acme', 'read_only');
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT count(*) FROM app.orders;
INSERT INTO app.orders (item) VALUES ('nope');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme');
UPDATE app.orders SET amount = 1;
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme');
DELETE FROM app.orders;
ROLLBACK;
RESET ROLE;
SELECT status FROM tenancy.set_status('acme', 'active');
-- read scope: same, for the role
SELECT tenancy.grant_tenant('regress_reader', 'acme', 'read');
SET ROLE regress_reader;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT count(*) FROM app.orders;
DELETE FROM app.orders;
ROLLBACK;
RESET ROLE;

-- every supported tenant column type, and hostile identifiers
SELECT id FROM tenancy.create_tenant('42', 'Forty-two');
SELECT tenancy.grant_tenant('regress_app', '42');
SET ROLE regress_owner;
CREATE TABLE app.by_uuid (tenant_id uuid NOT NULL, v int);
CREATE TABLE app.by_int (tenant_id int4 NOT NULL, v int);
CREATE TABLE app.by_bigint (tenant_id int8 NOT NULL, v int);
CREATE TABLE app."Robert'); DROP TABLE app.orders;--" ("tenant"";--" varchar(63) NOT NULL, v int);
SELECT count(*) FROM tenancy.protect('app.by_uuid', create_index => true);
SELECT count(*) FROM tenancy.protect('app.by_int', create_index => true);
SELECT count(*) FROM tenancy.protect('app.by_bigint', create_index => true);
SELECT * FROM tenancy.protect('app."Robert''); DROP TABLE app.orders;--"', 'tenant";--', true);
RESET ROLE;
SELECT tenancy.grant_tenant('regress_app', '7c9e6679-7425-40de-944b-e07fc1f90ae7');
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('42');
INSERT INTO app.by_int (v) VALUES (1);
INSERT INTO app.by_bigint (v) VALUES (1);
INSERT INTO app."Robert'); DROP TABLE app.orders;--" (v) VALUES (1);
SELECT * FROM app.by_int;
SELECT * FROM app.by_bigint;
SELECT * FROM app."Robert'); DROP TABLE app.orders;--";
INSERT INTO app.by_uuid (v) VALUES (1);
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('7c9e6679-7425-40de-944b-e07fc1f90ae7');
INSERT INTO app.by_uuid (v) VALUES (1);
SELECT * FROM app.by_uuid;
INSERT INTO app.by_uuid VALUES ('00000000-0000-0000-0000-000000000000', 2);
ROLLBACK;
RESET ROLE;
SELECT to_regclass('app.orders') IS NOT NULL AS orders_still_there;

-- partitions: protected with their parent, including ones created later
SET ROLE regress_owner;
CREATE TABLE app.events (tenant_id text NOT NULL, at date NOT NULL, what text)
    PARTITION BY RANGE (at);
CREATE TABLE app.events_2026 PARTITION OF app.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
SELECT count(*) FROM tenancy.protect('app.events', create_index => true);
CREATE TABLE app.events_2027 PARTITION OF app.events FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
CREATE TABLE app.events_2028 (LIKE app.events);
ALTER TABLE app.events ATTACH PARTITION app.events_2028 FOR VALUES FROM ('2028-01-01') TO ('2029-01-01');
RESET ROLE;
SELECT rel, tenant_column FROM tenancy.protected_tables WHERE rel::text LIKE 'app.events%' ORDER BY 1;
GRANT SELECT, INSERT ON app.events_2027 TO regress_app;
SET ROLE regress_app;
BEGIN;
SELECT tenancy.set_tenant('acme');
INSERT INTO app.events VALUES (DEFAULT, '2027-05-01', 'acme event');
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex');
SELECT count(*) FROM app.events;
-- querying the partition directly does not go around the parent's protection
SELECT count(*) FROM app.events_2027;
ROLLBACK;
RESET ROLE;

-- auto_protect (off by default) protects new tables that have the tenant column
SET pg_tenancy.auto_protect = on;
SET ROLE regress_owner;
-- (the setting is the superuser's: the owner cannot turn it on or off)
SET pg_tenancy.auto_protect = off;
CREATE TABLE app.invoices (tenant_id text NOT NULL, n int);
CREATE TABLE app.lookup (code text);
RESET ROLE;
SELECT rel FROM tenancy.protected_tables WHERE rel IN ('app.invoices'::regclass, 'app.lookup'::regclass);
RESET pg_tenancy.auto_protect;

-- protect_schema
CREATE SCHEMA app2 AUTHORIZATION regress_owner;
SET ROLE regress_owner;
CREATE TABLE app2.a (tenant_id text, x int);
CREATE TABLE app2.b (tenant_id text, y int);
CREATE TABLE app2.c (z int);
SELECT count(*) FROM tenancy.protect_schema('app2', create_index => true);
SELECT tenancy.protect_schema('app2', 'nope');
RESET ROLE;
SELECT rel FROM tenancy.protected_tables WHERE rel::text LIKE 'app2.%' ORDER BY 1;

-- unprotect: superuser only (unless granted), and it really removes the protection
SET ROLE regress_owner;
SELECT tenancy.unprotect('app2.b');
RESET ROLE;
SELECT * FROM tenancy.unprotect('app2.b');
SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = 'app2.b'::regclass;
SELECT count(*) FROM pg_policy WHERE polrelid = 'app2.b'::regclass;
SELECT count(*) FROM tenancy.unprotect('app2.b');

\i pg_test/fixtures/teardown.sql
