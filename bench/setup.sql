-- 1M rows over 1,000 tenants, twice: `prot` protected by pg_tenancy, `plain` unprotected.
\set ON_ERROR_STOP 1
CREATE EXTENSION pg_tenancy;
CREATE ROLE bench_owner;
CREATE ROLE bench_app LOGIN;
CREATE SCHEMA b AUTHORIZATION bench_owner;
GRANT USAGE ON SCHEMA b TO bench_app;
SELECT count(*) FROM (
    SELECT tenancy.create_tenant('t' || lpad(i::text, 4, '0'), 'Tenant ' || i),
           tenancy.grant_tenant('bench_app', 't' || lpad(i::text, 4, '0'), 'read_write')
      FROM generate_series(0, 999) i) s;
CREATE TABLE b.plain (tenant_id text NOT NULL, id int NOT NULL, payload text NOT NULL,
                      PRIMARY KEY (tenant_id, id));
INSERT INTO b.plain
SELECT 't' || lpad(t::text, 4, '0'), i, md5((t * 1000 + i)::text)
  FROM generate_series(0, 999) t, generate_series(1, 1000) i;
CREATE TABLE b.prot (LIKE b.plain INCLUDING ALL);
INSERT INTO b.prot SELECT * FROM b.plain;
ALTER TABLE b.plain OWNER TO bench_owner;
ALTER TABLE b.prot OWNER TO bench_owner;
GRANT SELECT ON b.plain, b.prot TO bench_app;
SET ROLE bench_owner;
SELECT count(*) AS statements FROM tenancy.protect('b.prot');
RESET ROLE;
VACUUM ANALYZE b.plain;
VACUUM ANALYZE b.prot;
-- The best hand-written policy a user writes (the form Supabase recommends): the third side.
CREATE TABLE b.pol (LIKE b.plain INCLUDING ALL);
INSERT INTO b.pol SELECT * FROM b.plain;
ALTER TABLE b.pol OWNER TO bench_owner;
ALTER TABLE b.pol ENABLE ROW LEVEL SECURITY;
ALTER TABLE b.pol FORCE ROW LEVEL SECURITY;
CREATE POLICY by_setting ON b.pol USING (tenant_id = (SELECT current_setting('app.tenant')));
GRANT SELECT ON b.pol TO bench_app;
VACUUM ANALYZE b.pol;
