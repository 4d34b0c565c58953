-- tenancy.check(): the pre-go-live checklist.
\set VERBOSITY default
\set SHOW_CONTEXT never
\i pg_test/fixtures/setup.sql
\i pg_test/fixtures/app.sql
-- a table left unprotected, one without an index on the tenant column, one with a NULLable one
CREATE SCHEMA app2 AUTHORIZATION regress_owner;
SET ROLE regress_owner;
CREATE TABLE app2.a (tenant_id text, x int);
CREATE TABLE app2.b (tenant_id text, y int);
SELECT count(*) FROM tenancy.protect('app2.a', create_index => true);
CREATE TABLE app.invoices (tenant_id text NOT NULL, n int);
SELECT count(*) FROM tenancy.protect('app.invoices');
RESET ROLE;
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_bypass;
RESET client_min_messages;
CREATE ROLE regress_bypass LOGIN BYPASSRLS;
SET ROLE regress_owner;
CREATE TABLE app.unprotected (tenant_id text, x int);
CREATE TABLE app.customers (tenant_id text NOT NULL, id int NOT NULL, email text,
                            PRIMARY KEY (tenant_id, id));
SELECT count(*) FROM tenancy.protect('app.customers');
ALTER TABLE app.customers ADD CONSTRAINT customers_email_key UNIQUE (email);
CREATE TABLE app.carts (tenant_id text NOT NULL, id int, customer_id int);
SELECT count(*) FROM tenancy.protect('app.carts');
ALTER TABLE app.carts ADD CONSTRAINT carts_id_key UNIQUE (tenant_id, id);
CREATE UNIQUE INDEX customers_id_only ON app.customers (id);
-- (validating a new foreign key reads every tenant's rows: FORCE RLS makes that the superuser's job)
RESET ROLE;
ALTER TABLE app.carts ADD CONSTRAINT carts_customer_fk FOREIGN KEY (customer_id) REFERENCES app.customers (id);
SET ROLE regress_owner;
CREATE TABLE app.payments (tenant_id text NOT NULL, cart int,
    FOREIGN KEY (tenant_id, cart) REFERENCES app.carts (tenant_id, id));
SELECT count(*) FROM tenancy.protect('app.payments', create_index => true);
CREATE VIEW app.all_orders AS SELECT * FROM app.orders;
CREATE VIEW app.my_orders WITH (security_invoker = true) AS SELECT * FROM app.orders;
CREATE FUNCTION app.count_orders() RETURNS bigint LANGUAGE sql SECURITY DEFINER
    AS $$ SELECT count(*) FROM app.orders $$;
RESET ROLE;
CREATE MATERIALIZED VIEW app.order_totals AS SELECT tenant_id, count(*) FROM app.events GROUP BY 1;
GRANT SELECT ON tenancy.tenants TO PUBLIC;
SELECT tenancy.grant_tenant('regress_reader', '*', 'read');
SELECT * FROM tenancy.check() WHERE object NOT LIKE 'role postgres' AND problem NOT LIKE '%overflowed the audit queue%';
-- fixing them clears the findings
REVOKE SELECT ON tenancy.tenants FROM PUBLIC;
SELECT tenancy.revoke_tenant('regress_reader', '*');
DROP MATERIALIZED VIEW app.order_totals;
DROP VIEW app.all_orders;
DROP FUNCTION app.count_orders();
ALTER TABLE app.carts DROP CONSTRAINT carts_customer_fk;
DROP INDEX app.customers_id_only;
ALTER TABLE app.customers DROP CONSTRAINT customers_email_key;
DROP TABLE app.unprotected;
DROP ROLE regress_bypass;
SELECT severity, object, problem FROM tenancy.check() WHERE object NOT LIKE 'role postgres' AND problem NOT LIKE '%overflowed the audit queue%';

\i pg_test/fixtures/teardown.sql
