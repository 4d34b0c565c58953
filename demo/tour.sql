-- The pg_tenancy tour (run by `make demo`). Expected refusals are shown as ERRORs.
\set ON_ERROR_STOP 0
\set VERBOSITY default
\set SHOW_CONTEXT never
\pset footer off

\echo '== 1. Install, two tenants, an application role that is neither owner nor BYPASSRLS'
CREATE EXTENSION pg_tenancy;
INSERT INTO tenancy.plans (name, client_type, monthly_price) VALUES ('enterprise', 'institutional', 2000);
SELECT id, name, plan, region, status FROM tenancy.create_tenant('acme', 'Acme Corp', 'enterprise', 'eu-west',
       '{"flags": {"new_checkout": true}, "sla": "99.95"}');
SELECT id, name, plan, region, status FROM tenancy.create_tenant('globex', 'Globex', 'standard', 'us-east');
CREATE ROLE demo_owner;
CREATE ROLE demo_app LOGIN;
CREATE SCHEMA shop AUTHORIZATION demo_owner;
GRANT USAGE ON SCHEMA shop TO demo_app;
SELECT tenancy.grant_tenant('demo_app', 'acme', 'read_write'), tenancy.grant_tenant('demo_app', 'globex', 'read_write');

\echo '== 2. The table owner protects a shared table (the statements it ran are returned)'
SET ROLE demo_owner;
CREATE TABLE shop.orders (tenant_id text NOT NULL, id bigserial, item text, amount numeric,
                          PRIMARY KEY (tenant_id, id));
GRANT SELECT, INSERT, UPDATE, DELETE ON shop.orders TO demo_app;
GRANT USAGE ON SEQUENCE shop.orders_id_seq TO demo_app;
SELECT * FROM tenancy.protect('shop.orders');
RESET ROLE;

\echo '== 3. Each tenant writes without naming itself, and reads only its own rows'
SET ROLE demo_app;
BEGIN;
SELECT tenancy.set_tenant('acme');
INSERT INTO shop.orders (item, amount) VALUES ('anvil', 120), ('rocket skates', 80);
SELECT tenant_id, item, amount FROM shop.orders ORDER BY id;
SELECT tenancy.flag('new_checkout') AS new_checkout, tenancy.config('sla') AS sla;
COMMIT;
BEGIN;
SELECT tenancy.set_tenant('globex');
INSERT INTO shop.orders (item, amount) VALUES ('hammock', 45);
SELECT tenant_id, item, amount FROM shop.orders ORDER BY id;
\echo '-- a guessed WHERE finds nothing:'
SELECT count(*) AS acme_rows_visible_to_globex FROM shop.orders WHERE tenant_id = 'acme';
COMMIT;

\echo '== 4. Refused: no context, a cross-tenant write, a tenant not granted'
SELECT * FROM shop.orders;
BEGIN;
SELECT tenancy.set_tenant('globex');
INSERT INTO shop.orders (tenant_id, item) VALUES ('acme', 'planted by globex');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('initech');
ROLLBACK;
RESET ROLE;

\echo '== 5. Signed mode: only a token from the gateway sets the context; forgeries are refused'
-- (the secret shared with the gateway lives in a file only the server reads)
ALTER DATABASE :DBNAME SET pg_tenancy.jwt_secret_file = :'SECRET_FILE';
ALTER DATABASE :DBNAME SET pg_tenancy.context_mode = 'signed';
\connect - postgres
-- (the gateway's side: mint tokens with the shared secret; applications cannot)
SELECT tenancy._sign_token('{"tenant_id": "acme", "exp": 4102444800}') AS token \gset
SELECT tenancy._sign_token('{"tenant_id": "globex", "exp": 4102444800}') AS globex_token \gset
SELECT split_part(:'token', '.', 1) || '.' || split_part(:'globex_token', '.', 2) || '.' || split_part(:'token', '.', 3) AS forged \gset
\connect - demo_app
SHOW pg_tenancy.context_mode;
SELECT tenancy._sign_token('{"tenant_id": "globex", "exp": 4102444800}');
BEGIN;
SET LOCAL pg_tenancy.tenant = 'globex';
ROLLBACK;
BEGIN;
SELECT set_config('pg_tenancy.tenant', 'globex', true);
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant_token(:'forged');
ROLLBACK;
SET pg_tenancy.context_mode = 'open';
BEGIN;
SELECT tenancy.set_tenant_token(:'token');
SELECT tenant_id, item FROM shop.orders ORDER BY id;
COMMIT;
\connect - postgres

\echo '== 6. Per-tenant encryption: keys wrapped by a master key kept outside the database'
ALTER DATABASE :DBNAME SET pg_tenancy.master_key_file = :'MASTER_KEY_FILE';
ALTER DATABASE :DBNAME RESET pg_tenancy.context_mode;
\connect - demo_app
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.encrypt('4111 1111 1111 1111', 'orders.card:1') AS card \gset
SELECT length(:'card'::bytea) AS ciphertext_bytes, tenancy.key_version(:'card') AS key_version,
       tenancy.decrypt_text(:'card', 'orders.card:1') AS decrypted_by_acme,
       tenancy.cipher_implementation() AS aes_gcm_code;
COMMIT;
\echo '-- the same ciphertext is refused to another tenant, and to another row:'
BEGIN;
SELECT tenancy.set_tenant('globex');
SELECT tenancy.decrypt_text(:'card', 'orders.card:1');
ROLLBACK;
BEGIN;
SELECT tenancy.set_tenant('acme');
SELECT tenancy.decrypt_text(:'card', 'orders.card:2');
ROLLBACK;
\connect - postgres

\echo '== 7. The guard: protection cannot be switched off by accident, not even by a superuser'
ALTER TABLE shop.orders DISABLE ROW LEVEL SECURITY;
TRUNCATE shop.orders;

\echo '== 8. tenancy.check(): the pre-go-live checklist the database can verify itself'
SELECT severity, object, problem FROM tenancy.check();

\echo '== 9. Backups of one tenant, and a restore of that tenant alone'
SET pg_tenancy.backup_dir = :'BACKUP_DIR';
SELECT tenancy.backup('acme') AS acme_backup \gset
SELECT tenant, kind, tables, row_count, key_version, pg_size_pretty(archive_bytes) AS archive
  FROM tenancy.backups WHERE id = :'acme_backup';
SELECT tenancy.verify_backup(:'acme_backup') ->> 'rows' AS verified_rows;
\echo '-- an accident hits acme (and only acme):'
UPDATE shop.orders SET amount = 0 WHERE tenant_id = 'acme';
SELECT tenant_id, item, amount FROM shop.orders ORDER BY id;
CALL tenancy.restore('acme', :'acme_backup');
SELECT tenant_id, item, amount FROM shop.orders ORDER BY id;
\echo '-- restoring acme\'s backup into globex is refused (and recorded):'
CALL tenancy.restore('globex', :'acme_backup');

\echo '== 10. The denial log: every attempt above, written outside the transactions that failed'
-- (the audit writer is asynchronous: wait until this database's queue is empty)
DO $$ BEGIN
    FOR i IN 1 .. 100 LOOP
        EXIT WHEN (SELECT queued_here FROM tenancy.audit_status()) = 0;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
SELECT event, role, session_tenant AS tenant, attempted_tenant AS attempted, relation, sqlstate
  FROM tenancy.audit_log WHERE database = current_database() AND event <> 'bypass_read' ORDER BY id;
\echo '-- the alert query of the runbook, and the queue behind the log:'
SELECT event, role, attempts FROM tenancy.unexpected_denials('1 hour');
SELECT queued, written, overflowed FROM tenancy.audit_status();

\echo '== 11. Plans and limits in the database, metering, usage per tenant, incident response'
INSERT INTO tenancy.plans (name, client_type, statements_per_second, burst, webhook_events_per_day, sla_p99_ms, monthly_price)
VALUES ('cooperative', 'cooperative', 5, 5, 3, 2000, 390);
SELECT id, plan FROM tenancy.alter_tenant('acme', plan => 'cooperative');
\connect - demo_app
SELECT tenancy.set_tenant_token(:'token', true) AS entered;
\echo '-- the plan allows 3 webhook events a day: the second call would cross it, so it counts nothing'
SELECT tenancy.meter('webhook_events', 2) AS counted;
SELECT tenancy.meter('webhook_events', 2) AS counted;
\echo '-- 5 statements a second: the next ones are refused (53400), globex is not affected'
SELECT count(*) FROM shop.orders;
SELECT count(*) FROM shop.orders;
SELECT count(*) FROM shop.orders;
SELECT count(*) FROM shop.orders;
SELECT count(*) FROM shop.orders;
SELECT tenancy.reset_tenant();
\connect - postgres
SELECT tenant, plan, statements, rows, errors, refused_rate, refused_meter, round(p99_ms::numeric, 3) AS p99_ms
  FROM tenancy.stats WHERE tenant IN ('acme', 'globex') ORDER BY tenant;
SELECT tenant, rule, value, threshold FROM tenancy.alerts ORDER BY tenant, rule;
\echo '-- a leak is suspected: acme read-only at once, its key rotated, an incident opened'
SELECT id, tenant, previous_status, key_rotated, notify_by - detected_at AS notify_within
  FROM tenancy.lockdown('acme', 'demo: suspected leak');
SELECT tenant, rule FROM tenancy.alerts WHERE rule = 'incident';
SELECT status FROM tenancy.unlock('acme');
\echo '-- the same figures as Prometheus scrapes them (tenancy.metrics(), or the HTTP endpoint):'
SELECT line FROM regexp_split_to_table(tenancy.metrics(), E'\n') AS line
 WHERE line ~ '^pg_tenancy_(statements_total|limit_refusals_total|meter_used|alert_active)\{tenant="acme"';

\echo '== 12. A migration by tenant cohort: expand once, then tenant by tenant (each in its own transaction, in its context, as the application role), with a ledger and a pointer'
\connect - postgres
SELECT tenancy.add_migration('orders-cents', 1, up => 'ALTER TABLE shop.orders ADD COLUMN cents bigint',
    per_tenant => 'UPDATE shop.orders SET cents = amount * 100', down => 'UPDATE shop.orders SET cents = NULL',
    cleanup => 'ALTER TABLE shop.orders DROP COLUMN cents', run_as => 'demo_app', ddl_as => 'demo_owner');
\echo '-- the first cohort: acme alone (the step has no WHERE: row security keeps it in its tenant)'
CALL tenancy.migrate('orders-cents', '{"tenants": ["acme"]}');
SELECT tenant_id, count(*) AS rows, count(cents) AS migrated FROM shop.orders GROUP BY 1 ORDER BY 1;
\echo '-- then everyone: acme is not migrated twice'
CALL tenancy.migrate('orders-cents');
SELECT migration, tenant, state, attempts FROM tenancy.migration_ledger ORDER BY tenant;
\echo '-- acme back to the version before (its down step), globex stays on the new one'
CALL tenancy.rollback_migration('orders-cents', '{"tenants": ["acme"]}');
SELECT id, schema_version FROM tenancy.tenants ORDER BY id;
