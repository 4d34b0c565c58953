-- The statements tenancy.unprotect() runs for one table, in order (core/src/policy.rs renders
-- them, as for sql/protect_table.sql).
-- step drop_isolation if tenancy_isolation exists
DROP POLICY tenancy_isolation ON {table}
-- step drop_write_guard if tenancy_write_guard exists
DROP POLICY tenancy_write_guard ON {table}
-- step drop_truncate_guard
DROP TRIGGER IF EXISTS tenancy_truncate_guard ON {table}
-- step drop_default
ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT
-- step no_force
ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY
-- step disable
ALTER TABLE {table} DISABLE ROW LEVEL SECURITY
