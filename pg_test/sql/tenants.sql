-- Tenants catalog: creation, validation, status, config.
\set VERBOSITY default
\set SHOW_CONTEXT never
CREATE EXTENSION pg_tenancy;
INSERT INTO tenancy.plans (name, client_type, statements_per_second, monthly_price)
VALUES ('enterprise', 'institutional', 500, 2000), ('pro', 'cooperative', 100, 300);

SELECT id, name, plan, region, status, config
  FROM tenancy.create_tenant('acme', 'Acme Corp', 'enterprise', 'eu-west',
                             '{"flags": {"beta": true, "old_ui": false}, "sla": "99.95"}');
SELECT id, plan, region, status FROM tenancy.create_tenant('globex', 'Globex');
SELECT id FROM tenancy.create_tenant('7c9e6679-7425-40de-944b-e07fc1f90ae7', 'UUID tenant');
SELECT id FROM tenancy.create_tenant('a.b_c-1', 'Punctuated');
-- the display name defaults to the id; the plan must exist
SELECT id, name, plan FROM tenancy.create_tenant('initech');
SELECT tenancy.create_tenant('hooli', plan => 'platinum');
SELECT tenancy.create_tenant('hooli', '  ');

-- invalid ids, names, configs, duplicates
SELECT tenancy.create_tenant('', 'empty');
SELECT tenancy.create_tenant('has space', 'x');
SELECT tenancy.create_tenant('quote''s', 'x');
SELECT tenancy.create_tenant(repeat('x', 64), 'too long');
SELECT tenancy.create_tenant(NULL, 'null');
SELECT tenancy.create_tenant('ok', '');
SELECT tenancy.create_tenant('ok', 'x', config => '[1,2]');
SELECT tenancy.create_tenant('acme', 'again');
-- the CHECK constraint is the backstop for direct inserts
\set VERBOSITY terse
INSERT INTO tenancy.tenants (id, name) VALUES ('bad id', 'x');
\set VERBOSITY default
SELECT tenancy.valid_tenant_id('acme'), tenancy.valid_tenant_id('a/b'), tenancy.valid_tenant_id(repeat('a', 63));

-- status
SELECT id, status FROM tenancy.set_status('globex', 'read_only');
SELECT id, status FROM tenancy.set_status('globex', 'active');
SELECT tenancy.set_status('globex', 'deleted');
SELECT tenancy.set_status('nobody', 'active');
SELECT id, status FROM tenancy.create_tenant('gone', 'Gone Ltd');
SELECT id, status FROM tenancy.set_status('gone', 'offboarded');
SELECT tenancy.set_status('gone', 'active');

-- alter_tenant changes only what it is given
SELECT id, name, plan, region, config FROM tenancy.alter_tenant('globex', plan => 'pro');
SELECT tenancy.alter_tenant('globex', config => '"flat"');
SELECT tenancy.alter_tenant('nobody', plan => 'pro');
SELECT tenancy.alter_tenant('globex', plan => 'platinum');

-- the catalog is for pg_tenancy only: applications cannot read or change it
CREATE ROLE regress_nobody;
SET ROLE regress_nobody;
SELECT count(*) FROM tenancy.tenants;
SELECT count(*) FROM tenancy.grants;
SELECT count(*) FROM tenancy.protected_tables;
SELECT tenancy.create_tenant('mine', 'x');
SELECT tenancy.set_status('acme', 'suspended');
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800}');
SELECT tenancy._invalidate('tenancy.tenants'::regclass);
RESET ROLE;
DROP ROLE regress_nobody;

SELECT id, status FROM tenancy.tenants ORDER BY id;

\i pg_test/fixtures/teardown.sql
