-- The statements tenancy.protect() runs for one table, in order: rendered by
-- core/src/policy.rs, where {table} is the schema-qualified, quoted table name, {column} the
-- quoted tenant column and {cast} the column's type. A step marked "if <policy> exists" runs only
-- when that policy exists (protect() is re-runnable, as a repair).
--
-- The permissive policy compares the column with tenancy.current_tenant(NULL::{cast}), which
-- pg_tenancy turns into a parameter of the statement, filled once when it starts from the
-- verified context (src/protect/param.rs): an index condition, read once, never per row. A row of another tenant fails the first test of
-- WITH CHECK and reaches _write_denied, which records the attempt and returns false; rows of the
-- current tenant never call it. The restrictive DELETE policy keeps read_only tenants and
-- read-scoped roles from deleting. TRUNCATE ignores row security: a trigger refuses it.
-- step enable
ALTER TABLE {table} ENABLE ROW LEVEL SECURITY
-- step force
ALTER TABLE {table} FORCE ROW LEVEL SECURITY
-- step drop_isolation if tenancy_isolation exists
DROP POLICY IF EXISTS tenancy_isolation ON {table}
-- step isolation
CREATE POLICY tenancy_isolation ON {table} AS PERMISSIVE FOR ALL TO PUBLIC USING ({column} OPERATOR(pg_catalog.=) tenancy.current_tenant(NULL::{cast})) WITH CHECK ({column} OPERATOR(pg_catalog.=) (SELECT tenancy.writable_tenant()::{cast}) OR tenancy._write_denied({column}::pg_catalog.text))
-- step drop_write_guard if tenancy_write_guard exists
DROP POLICY IF EXISTS tenancy_write_guard ON {table}
-- step write_guard
CREATE POLICY tenancy_write_guard ON {table} AS RESTRICTIVE FOR DELETE TO PUBLIC USING ((SELECT tenancy.writable_tenant()) IS NOT NULL)
-- step default
ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT tenancy.current_tenant(NULL::{cast})
-- step truncate_guard
CREATE OR REPLACE TRIGGER tenancy_truncate_guard BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION tenancy.truncate_guard()
