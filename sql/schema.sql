-- pg_tenancy catalog tables. The schema "tenancy" itself is created by CREATE EXTENSION
-- (control file: schema = tenancy). Nothing here is readable by PUBLIC: listing tenants
-- would tell every tenant who the others are. Functions that need these tables read them as
-- the schema owner (src/catalog.rs).

-- Metered allowances: a JSON object of meter name (lowercase letters, digits, '_') to a count
-- per day (an integer of 0 or more).
CREATE FUNCTION tenancy._valid_meters(m jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_typeof(m) = 'object' AND NOT EXISTS (
        SELECT 1 FROM jsonb_each(m) e
         WHERE e.key !~ '^[a-z][a-z0-9_]{0,62}$' OR jsonb_typeof(e.value) <> 'number'
            OR e.value::text !~ '^[0-9]{1,18}$')
$$;

-- A region's one spelling (tenancy.tenants.region; pg_tenancy.region checks the same in
-- pg_tenancy_core::tenant_id::valid_region): 1 to 63 lowercase letters, digits, '-' and '_'.
CREATE FUNCTION tenancy._valid_region(r text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
BEGIN ATOMIC
    SELECT r OPERATOR(pg_catalog.~) '^[a-z0-9][a-z0-9_-]{0,62}$';
END;

-- Plans: what a tenant may use (seed section 3). NULL limits are no limit. A tenant's own
-- overrides are in tenancy.limits; tenancy.effective_limits shows what applies.
CREATE TABLE tenancy.plans (
    name                    text        PRIMARY KEY
                            CONSTRAINT plans_name_check CHECK (name ~ '^[A-Za-z0-9_.-]{1,63}$'),
    client_type             text        NOT NULL DEFAULT 'farmer'
                            CONSTRAINT plans_client_type_check
                            CHECK (client_type IN ('farmer', 'cooperative', 'institutional')),
    statements_per_second   double precision CONSTRAINT plans_rate_check CHECK (statements_per_second > 0),
    burst                   double precision CONSTRAINT plans_burst_check CHECK (burst >= 1),
    max_concurrent          integer     CONSTRAINT plans_max_concurrent_check CHECK (max_concurrent > 0),
    storage_bytes           bigint      CONSTRAINT plans_storage_check CHECK (storage_bytes >= 0),
    webhook_events_per_day  bigint      CONSTRAINT plans_webhook_check CHECK (webhook_events_per_day >= 0),
    egress_bytes_per_day    bigint      CONSTRAINT plans_egress_check CHECK (egress_bytes_per_day >= 0),
    meters                  jsonb       NOT NULL DEFAULT '{}'
                            CONSTRAINT plans_meters_check CHECK (tenancy._valid_meters(meters)),
    backup_retention_days   integer     NOT NULL DEFAULT 30
                            CONSTRAINT plans_retention_check CHECK (backup_retention_days >= 1),
    sla_p99_ms              integer     CONSTRAINT plans_sla_check CHECK (sla_p99_ms > 0),
    monthly_price           numeric(12,2) NOT NULL DEFAULT 0
                            CONSTRAINT plans_price_check CHECK (monthly_price >= 0),
    pinned_stats            boolean     NOT NULL DEFAULT false,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenancy.plans IS
    'Plans: statement rate and burst, concurrent statements, storage, metered allowances per day (webhook_events, egress_bytes, and any named meter in meters), backup retention, SLA p99, price. NULL = no limit.';
INSERT INTO tenancy.plans (name, client_type) VALUES ('standard', 'farmer');
-- (the plan CREATE EXTENSION makes is not dumped: it is made again)
SELECT pg_catalog.pg_extension_config_dump('tenancy.plans', 'WHERE name <> ''standard''');

CREATE TABLE tenancy.tenants (
    id          text        PRIMARY KEY,
    name        text        NOT NULL,
    plan        text        NOT NULL DEFAULT 'standard'
                REFERENCES tenancy.plans (name) ON UPDATE CASCADE,
    region      text        NOT NULL DEFAULT 'default'
                CONSTRAINT tenants_region_check CHECK (tenancy._valid_region(region)),
    status      text        NOT NULL DEFAULT 'active'
                CONSTRAINT tenants_status_check
                CHECK (status IN ('active', 'read_only', 'suspended', 'offboarded')),
    config      jsonb       NOT NULL DEFAULT '{}'
                CONSTRAINT tenants_config_check CHECK (jsonb_typeof(config) = 'object'),
    -- the version of the last migration applied for the tenant (tenancy.migrate; 0: none)
    schema_version integer  NOT NULL DEFAULT 0
                CONSTRAINT tenants_schema_version_check CHECK (schema_version >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenancy.tenants IS
    'One row per tenant. config holds feature flags (config->''flags''), SLA and anything per tenant.';

-- Where each region's data lives in this cluster (data residency within one cluster): the
-- partitions of tables list-partitioned by tenant belong in the tablespace of their tenant's
-- region; tenancy.check() reports those that are not.
CREATE TABLE tenancy.region_tablespaces (
    region      text        PRIMARY KEY,
    tablespace  name        NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('tenancy.region_tablespaces', '');

-- A tenant's own limits (tenancy.set_limit): a non-NULL column overrides the plan's (a heavy
-- tenant's own rate; 'Infinity' lifts a rate limit). meters: allowances per day by meter name.
CREATE TABLE tenancy.limits (
    tenant                  text        PRIMARY KEY REFERENCES tenancy.tenants (id),
    statements_per_second   double precision CONSTRAINT limits_rate_check CHECK (statements_per_second > 0),
    burst                   double precision CONSTRAINT limits_burst_check CHECK (burst >= 1),
    max_concurrent          integer     CONSTRAINT limits_max_concurrent_check CHECK (max_concurrent > 0),
    storage_bytes           bigint      CONSTRAINT limits_storage_check CHECK (storage_bytes >= 0),
    meters                  jsonb       NOT NULL DEFAULT '{}'
                            CONSTRAINT limits_meters_check CHECK (tenancy._valid_meters(meters)),
    reason                  text,
    set_by                  regrole,
    set_at                  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenancy.limits IS
    'Per-tenant overrides of the plan''s limits (tenancy.set_limit, tenancy.clear_limit).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.limits', '');

-- What tenancy.meter() counted, per tenant, meter and UTC day.
CREATE TABLE tenancy.meter_usage (
    tenant      text        NOT NULL REFERENCES tenancy.tenants (id),
    meter       text        NOT NULL,
    day         date        NOT NULL,
    used        bigint      NOT NULL CONSTRAINT meter_usage_used_check CHECK (used >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, meter, day)
);
COMMENT ON TABLE tenancy.meter_usage IS
    'Metered usage per tenant, meter and UTC day, counted by tenancy.meter(name, amount).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.meter_usage', '');

-- Incidents (runbook sections 4 and 7): opened by tenancy.lockdown(), shown by tenancy.alerts
-- until closed. The customer is told within 72 hours; the post-mortem is due within 5 business
-- days.
CREATE TABLE tenancy.incidents (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant              text        NOT NULL REFERENCES tenancy.tenants (id),
    reason              text        NOT NULL,
    detected_at         timestamptz NOT NULL DEFAULT now(),
    notify_by           timestamptz NOT NULL,
    postmortem_by       timestamptz NOT NULL,
    previous_status     text        NOT NULL,
    key_rotated         boolean     NOT NULL DEFAULT false,
    key_rotation_error  text,
    opened_by           regrole,
    unlocked_at         timestamptz,
    closed_at           timestamptz,
    closed_by           regrole,
    postmortem          text
);
CREATE INDEX incidents_open_idx ON tenancy.incidents (tenant) WHERE closed_at IS NULL;
COMMENT ON TABLE tenancy.incidents IS
    'Security incidents per tenant: tenancy.lockdown() opens one, tenancy.close_incident() closes it.';
SELECT pg_catalog.pg_extension_config_dump('tenancy.incidents', '');

-- Storage per tenant, as tenancy.measure_storage() last measured it: the bytes of the tenant's
-- live rows in every protected table, as stored (see tenancy._measure_storage).
CREATE TABLE tenancy.tenant_storage (
    tenant       text        PRIMARY KEY REFERENCES tenancy.tenants (id),
    bytes        bigint      NOT NULL,
    row_bytes    bigint      NOT NULL,
    rows         bigint      NOT NULL,
    measured_at  timestamptz NOT NULL
);

-- Per tenant and UTC day: statements, failed statements and statement time, added up by
-- tenancy.snapshot_usage() from the counters' growth between snapshots, and the storage
-- tenancy.measure_storage() measured last that day (tenancy.usage_report() reads both). Kept
-- 400 days.
CREATE TABLE tenancy.usage_daily (
    day         date        NOT NULL,
    tenant      text        NOT NULL,
    statements  bigint      NOT NULL DEFAULT 0,
    errors      bigint      NOT NULL DEFAULT 0,
    compute_ms  double precision NOT NULL DEFAULT 0,
    storage_bytes bigint,
    PRIMARY KEY (tenant, day)
);
SELECT pg_catalog.pg_extension_config_dump('tenancy.usage_daily', '');

-- The cost model of tenancy.usage_report() (at most one row; none: the defaults below): what a
-- unit of each resource costs the operator, in `currency`. Change it with
-- INSERT INTO tenancy.cost_model (...) VALUES (...) ON CONFLICT (one) DO UPDATE SET ...
CREATE TABLE tenancy.cost_model (
    one                     boolean     PRIMARY KEY DEFAULT true CONSTRAINT cost_model_one CHECK (one),
    currency                text        NOT NULL DEFAULT 'USD',
    storage_gb_month        numeric     NOT NULL DEFAULT 0.115 CONSTRAINT cost_storage_check CHECK (storage_gb_month >= 0),
    compute_hour            numeric     NOT NULL DEFAULT 0.05 CONSTRAINT cost_compute_check CHECK (compute_hour >= 0),
    backup_gb_month         numeric     NOT NULL DEFAULT 0.023 CONSTRAINT cost_backup_check CHECK (backup_gb_month >= 0),
    meter_unit              jsonb       NOT NULL DEFAULT '{"webhook_events": 0.00001, "egress_bytes": 0.00000000009}'
                            CONSTRAINT cost_meter_check CHECK (jsonb_typeof(meter_unit) = 'object'),
    support_tenant_month    numeric     NOT NULL DEFAULT 0 CONSTRAINT cost_support_check CHECK (support_tenant_month >= 0),
    updated_at              timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenancy.cost_model IS
    'What resources cost the operator (tenancy.usage_report): storage and backups per GB-month, statement time per hour, each meter per unit, support per tenant-month. Empty: the column defaults.';
SELECT pg_catalog.pg_extension_config_dump('tenancy.cost_model', '');

-- Per-tenant usage counters as tenancy.snapshot_usage() read them (cumulative since the last
-- reset or restart): what tenancy.alerts compares over its windows. Kept two hours.
CREATE TABLE tenancy.usage_history (
    at          timestamptz NOT NULL,
    tenant      text        NOT NULL,
    statements  bigint      NOT NULL,
    errors      bigint      NOT NULL,
    denials     bigint      NOT NULL,
    total_ms    double precision NOT NULL,
    histogram   bigint[]    NOT NULL,
    PRIMARY KEY (tenant, at)
);
CREATE INDEX usage_history_at_idx ON tenancy.usage_history (at);

-- Which roles may enter which tenants. tenant = '*' is the explicit all-tenants grant.
CREATE TABLE tenancy.grants (
    role        regrole     NOT NULL,
    tenant      text        NOT NULL,
    scope       text        NOT NULL
                CONSTRAINT grants_scope_check CHECK (scope IN ('read', 'read_write', 'admin')),
    granted_by  regrole,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role, tenant)
);
CREATE INDEX grants_tenant_idx ON tenancy.grants (tenant);
COMMENT ON TABLE tenancy.grants IS
    'Tenant grants: a role enters only the tenants granted to it (directly or through membership).';

-- Tables protected by tenancy.protect(). fingerprint is the text of the generated policies as
-- created, so the guard can tell when they were altered.
CREATE TABLE tenancy.protected_tables (
    rel            regclass    PRIMARY KEY,
    tenant_column  name        NOT NULL,
    column_type    regtype     NOT NULL,
    fingerprint    text,
    protected_by   regrole,
    protected_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tenancy.protected_tables IS
    'Tables whose tenant isolation is generated and guarded by pg_tenancy.';

SELECT pg_catalog.pg_extension_config_dump('tenancy.tenants', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.grants', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.protected_tables', '');

-- Versioned migrations applied by tenant cohorts (tenancy.migrate, sql/migrations.sql): `up`
-- once before any tenant moves (expand), `per_tenant` in each tenant's context and transaction,
-- `down` per tenant when it moves back, `cleanup` once when no tenant is left on the version,
-- `contract` once when every tenant has moved. run_as: the role the per-tenant steps run as;
-- ddl_as: the role the others run as (src/migrations.rs: never as the superuser calling).
CREATE TABLE tenancy.migrations (
    name          text        PRIMARY KEY
                  CONSTRAINT migrations_name_check CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    version       integer     NOT NULL UNIQUE CONSTRAINT migrations_version_check CHECK (version > 0),
    up            text        NOT NULL,
    per_tenant    text,
    down          text,
    cleanup       text,
    contract      text,
    run_as        regrole,
    -- the role up, cleanup and contract run as (the owner of what they change; not a superuser)
    ddl_as        regrole     NOT NULL,
    -- the search_path every step runs with, pg_temp last (NULL: pg_catalog; names qualified)
    search_path   text,
    created_by    regrole,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expanded_at   timestamptz,
    contracted_at timestamptz
);
COMMENT ON TABLE tenancy.migrations IS
    'Versioned migrations applied by tenant cohorts (tenancy.migrate); tenants.schema_version points at the last one applied.';
-- One row per migration and tenant: applied, failed (with the SQLSTATE only: an error message can
-- hold row values) or rolled back; attempts counts the runs that reached the tenant.
CREATE TABLE tenancy.migration_ledger (
    migration    text        NOT NULL REFERENCES tenancy.migrations (name) ON DELETE CASCADE,
    tenant       text        NOT NULL REFERENCES tenancy.tenants (id) ON DELETE CASCADE,
    state        text        NOT NULL
                 CONSTRAINT migration_ledger_state_check CHECK (state IN ('applied', 'failed', 'rolled_back')),
    attempts     integer     NOT NULL DEFAULT 1,
    sqlstate     text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, tenant)
);
SELECT pg_catalog.pg_extension_config_dump('tenancy.migrations', '');
SELECT pg_catalog.pg_extension_config_dump('tenancy.migration_ledger', '');

-- Tenant keys, only ever stored wrapped by the master key (whose identity, a hash, is kek_id).
-- kind 'data' encrypts; kind 'index' keys tenancy.blind_index() and is not rotated with data keys.
CREATE TABLE tenancy.keys (
    tenant        text        NOT NULL REFERENCES tenancy.tenants (id),
    kind          text        NOT NULL CONSTRAINT keys_kind_check CHECK (kind IN ('data', 'index')),
    version       integer     NOT NULL,
    state         text        NOT NULL
                  CONSTRAINT keys_state_check CHECK (state IN ('active', 'decrypt_only', 'destroyed')),
    wrapped       bytea,
    kek_id        text        NOT NULL,
    encryptions   bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    retired_at    timestamptz,
    destroyed_at  timestamptz,
    PRIMARY KEY (tenant, kind, version),
    CONSTRAINT keys_destroyed_check CHECK ((state = 'destroyed') = (wrapped IS NULL))
);
CREATE UNIQUE INDEX keys_one_active ON tenancy.keys (tenant, kind) WHERE state = 'active';
COMMENT ON TABLE tenancy.keys IS
    'Per-tenant keys, wrapped by the master key. A destroyed key cannot be recovered (crypto-shredding).';
SELECT pg_catalog.pg_extension_config_dump('tenancy.keys', '');

-- Functions a superuser approved to run over protected rows (index expressions, constraints,
-- triggers, statistics, generated columns, restrictive policies: see tenancy._row_functions).
-- An approval holds for the definition it was given for (fingerprint): redefining the function
-- or changing its owner lapses it, and tenancy.check() lists the function again.
CREATE TABLE tenancy.approved_functions (
    fn           regprocedure PRIMARY KEY,
    fingerprint  text         NOT NULL,
    approved_by  regrole      NOT NULL,
    approved_at  timestamptz  NOT NULL DEFAULT now(),
    reason       text         NOT NULL CONSTRAINT approved_functions_reason_check CHECK (btrim(reason) <> '')
);
COMMENT ON TABLE tenancy.approved_functions IS
    'Functions a superuser reviewed and approved to run over every tenant''s rows of protected tables.';
SELECT pg_catalog.pg_extension_config_dump('tenancy.approved_functions', '');

-- Change capture for incremental backups (tenancy.enable_change_capture): while it is on, a
-- trigger on every protected table records each row change here, tagged with its tenant and
-- transaction. Holds row copies of every tenant: readable by nobody but pg_tenancy; a tenant's
-- changes go when a backup covers them, and when the tenant is shredded.
CREATE TABLE tenancy.change_capture (
    id           integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    enabled_at   timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    disabled_at  timestamptz
);
CREATE UNIQUE INDEX change_capture_one_on ON tenancy.change_capture ((true)) WHERE disabled_at IS NULL;
COMMENT ON TABLE tenancy.change_capture IS
    'When change capture (for incremental backups) was on: an incremental backup needs it on since its parent.';

CREATE TABLE tenancy.changes (
    tenant   text        NOT NULL,
    rel      oid         NOT NULL,
    op       "char"      NOT NULL CONSTRAINT changes_op_check CHECK (op IN ('I', 'U', 'D')),
    old_row  text,
    new_row  text,
    xid      xid8        NOT NULL,
    -- order within a transaction (a counter of the backend that wrote it)
    seq      bigint      NOT NULL
);
CREATE INDEX changes_tenant_idx ON tenancy.changes (tenant);
COMMENT ON TABLE tenancy.changes IS
    'Row changes of protected tables captured for incremental backups (old and new row in record text form).';
