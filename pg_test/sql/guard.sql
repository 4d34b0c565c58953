-- The guard: protection cannot be weakened except through tenancy.unprotect().
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
\i pg_test/fixtures/app.sql
-- as the table owner
SET ROLE regress_owner;
ALTER TABLE app.orders DISABLE ROW LEVEL SECURITY;
ALTER TABLE app.orders NO FORCE ROW LEVEL SECURITY;
DROP POLICY tenancy_isolation ON app.orders;
DROP POLICY tenancy_write_guard ON app.orders;
ALTER POLICY tenancy_isolation ON app.orders USING (true);
ALTER POLICY tenancy_isolation ON app.orders TO regress_owner;
ALTER POLICY tenancy_isolation ON app.orders RENAME TO whatever;
CREATE POLICY open_door ON app.orders FOR SELECT USING (true);
ALTER TABLE app.orders DROP COLUMN tenant_id CASCADE;
ALTER TABLE app.orders RENAME COLUMN tenant_id TO tid;
ALTER TABLE app.orders ALTER COLUMN tenant_id TYPE varchar(100);
ALTER TABLE app.orders DISABLE TRIGGER ALL;
ALTER TABLE app.orders DISABLE TRIGGER tenancy_truncate_guard;
ALTER TABLE app.orders ENABLE REPLICA TRIGGER tenancy_truncate_guard;
DROP TRIGGER tenancy_truncate_guard ON app.orders;
TRUNCATE app.orders;
TRUNCATE app.events;
-- partitions are guarded too
ALTER TABLE app.events_2027 DISABLE ROW LEVEL SECURITY;
DROP POLICY tenancy_isolation ON app.events_2026;
-- harmless changes still work
CREATE POLICY no_drafts ON app.orders AS RESTRICTIVE FOR SELECT USING (item <> 'draft');
DROP POLICY no_drafts ON app.orders;
ALTER TABLE app.orders ADD COLUMN note text;
ALTER TABLE app.orders DROP COLUMN note;
-- ... but it keeps its name and schema (another relation could take its place)
ALTER TABLE app.orders RENAME TO orders_renamed;
ALTER TABLE app.orders SET SCHEMA public;
CREATE INDEX ON app.orders (item);
-- switching the guard off is a superuser's act (for restoring dumps)
SET pg_tenancy.guard = off;
RESET ROLE;
-- superusers are refused as well: the guard protects against accidents
ALTER TABLE app.orders DISABLE ROW LEVEL SECURITY;
DROP POLICY tenancy_isolation ON app.orders;
TRUNCATE app.orders;
-- a superuser session with the guard off is reported by check()
SET pg_tenancy.guard = off;
SELECT severity, object, problem FROM tenancy.check() WHERE object = 'setting pg_tenancy.guard';
RESET pg_tenancy.guard;
SELECT count(*) FROM tenancy.check() WHERE object = 'setting pg_tenancy.guard';
-- nothing was weakened
SELECT rel, tenancy._protection_problem(rel) FROM tenancy.protected_tables ORDER BY rel::text;
-- dropping a protected table is allowed and forgets it
CREATE TABLE app.scratch (tenant_id text);
SELECT count(*) FROM tenancy.protect('app.scratch');
DROP TABLE app.scratch;
SELECT count(*) FROM tenancy.protected_tables WHERE rel::text = 'app.scratch';

\i pg_test/fixtures/teardown.sql
