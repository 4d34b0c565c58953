-- Migrations by tenant cohort (seed section 4, runbook section 3): a migration is versioned DDL
-- applied once (`up`: expand), then tenant by tenant, each in its own transaction with a ledger
-- (`per_tenant`, run in the tenant's context as `run_as`, a role row security confines), so a
-- failure never leaves a tenant half-migrated and a rerun continues where it stopped. A
-- tenant's `schema_version` (tenancy.schema_version() in its context) points at the last
-- migration applied for it; rolling a cohort back moves the pointer back (`down` per tenant
-- when there is one), then `cleanup` undoes `up` once no tenant is left on the version;
-- `contract` runs once every tenant has moved. Superusers only (privileges.sql).
--
-- The procedures commit between tenants, so they take no SET clause: every name, type and
-- operator in them is qualified, and the work is done by functions that pin their search_path. A
-- migration's own SQL never runs as the superuser who calls: `up`, `cleanup` and `contract` run
-- as `ddl_as`, the per-tenant steps as `run_as`, each in a security-restricted operation with
-- the migration's search_path, pg_temp last (tenancy._run_step, src/migrations.rs).

-- A tenant's bucket for percentage cohorts, 0..99, the same on every server and version (md5).
CREATE FUNCTION tenancy._bucket(id text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (('x' || substr(md5(id), 1, 8))::bit(32)::bigint % 100)::integer
$$;

-- The tenants of a cohort, in id order: NULL or {} every tenant not offboarded; otherwise the
-- keys "tenants" (a list), "plan", "flag" (config->'flags'->flag is true) and "percent" (the
-- tenants whose bucket is under it: a 10% cohort is part of the 20% one), combined with AND.
CREATE FUNCTION tenancy.cohort(spec jsonb DEFAULT NULL) RETURNS SETOF text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    k text;
    spec_ jsonb := COALESCE(spec, '{}');
    missing text[];
    pct numeric;
BEGIN
    IF jsonb_typeof(spec_) <> 'object' THEN
        RAISE EXCEPTION 'a cohort is a JSON object' USING ERRCODE = '22023',
            HINT = 'For example {"tenants": ["a", "b"]}, {"plan": "enterprise"}, {"flag": "beta"}, {"percent": 10}, combined with AND; NULL or {} for every tenant.';
    END IF;
    FOR k IN SELECT jsonb_object_keys(spec_) LOOP
        IF k NOT IN ('tenants', 'plan', 'flag', 'percent') THEN
            RAISE EXCEPTION 'unknown cohort key' USING ERRCODE = '22023',
                DETAIL = format('Key %s.', quote_literal(k)),
                HINT = 'A cohort''s keys are "tenants", "plan", "flag" and "percent".';
        END IF;
    END LOOP;
    IF spec_ ? 'tenants' AND (jsonb_typeof(spec_->'tenants') <> 'array'
        OR EXISTS (SELECT 1 FROM jsonb_array_elements(spec_->'tenants') e WHERE jsonb_typeof(e) <> 'string'))
       OR spec_ ? 'plan' AND jsonb_typeof(spec_->'plan') <> 'string'
       OR spec_ ? 'flag' AND jsonb_typeof(spec_->'flag') <> 'string'
       OR spec_ ? 'percent' AND jsonb_typeof(spec_->'percent') <> 'number' THEN
        RAISE EXCEPTION 'malformed cohort' USING ERRCODE = '22023',
            HINT = '"tenants" is a list of tenant ids, "plan" and "flag" are strings, "percent" a number from 0 to 100.';
    END IF;
    IF spec_ ? 'percent' THEN
        pct := (spec_->>'percent')::numeric;
        IF pct < 0 OR pct > 100 THEN
            RAISE EXCEPTION 'malformed cohort' USING ERRCODE = '22023',
                DETAIL = '"percent" is out of range.', HINT = '"percent" is a number from 0 to 100.';
        END IF;
    END IF;
    IF spec_ ? 'tenants' THEN
        SELECT array_agg(x ORDER BY x) INTO missing
          FROM jsonb_array_elements_text(spec_->'tenants') x
         WHERE NOT EXISTS (SELECT 1 FROM tenancy.tenants t WHERE t.id = x);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'unknown tenant in the cohort' USING ERRCODE = '42704',
                DETAIL = format('%s of the listed tenants do not exist, the first %s.', cardinality(missing), quote_literal(missing[1])),
                HINT = 'List tenants of tenancy.tenants.';
        END IF;
    END IF;
    RETURN QUERY
        SELECT t.id FROM tenancy.tenants t
         WHERE t.status <> 'offboarded'
           AND (NOT spec_ ? 'tenants' OR t.id IN (SELECT jsonb_array_elements_text(spec_->'tenants')))
           AND (NOT spec_ ? 'plan' OR t.plan = spec_->>'plan')
           AND (NOT spec_ ? 'flag' OR t.config->'flags'->(spec_->>'flag') = 'true'::jsonb)
           AND (NOT spec_ ? 'percent' OR tenancy._bucket(t.id) < pct)
         ORDER BY t.id;
END
$$;

CREATE FUNCTION tenancy._cohort_array(spec jsonb) RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(c ORDER BY c), '{}') FROM tenancy.cohort(spec) c
$$;

-- Register a migration. Its version is above every existing one (migrations apply in order).
CREATE FUNCTION tenancy.add_migration(name text, version integer, up text, per_tenant text DEFAULT NULL,
                                      down text DEFAULT NULL, cleanup text DEFAULT NULL,
                                      contract text DEFAULT NULL, run_as regrole DEFAULT NULL,
                                      ddl_as regrole DEFAULT NULL, search_path text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    top integer;
BEGIN
    IF add_migration.name IS NULL OR add_migration.name !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        RAISE EXCEPTION 'invalid migration name' USING ERRCODE = '22023',
            HINT = 'A migration''s name is 1 to 63 characters: lowercase letters, digits, ''_'', ''.'' and ''-'', starting with a letter or digit.';
    END IF;
    IF add_migration.up IS NULL OR add_migration.version IS NULL OR add_migration.version <= 0 THEN
        RAISE EXCEPTION 'a migration needs a positive version and its up step' USING ERRCODE = '22023',
            HINT = 'up is the SQL run once before any tenant moves (expand); use ''SELECT 1'' for none.';
    END IF;
    SELECT max(m.version) INTO top FROM tenancy.migrations m;
    IF top IS NOT NULL AND add_migration.version <= top THEN
        RAISE EXCEPTION 'a migration''s version must be above every existing one' USING ERRCODE = '22023',
            DETAIL = format('The highest version is %s.', top),
            HINT = 'Migrations apply in version order; give the new one a higher version.';
    END IF;
    IF (add_migration.per_tenant IS NOT NULL OR add_migration.down IS NOT NULL) THEN
        IF add_migration.run_as IS NULL THEN
            RAISE EXCEPTION 'a migration with per-tenant steps needs run_as' USING ERRCODE = '22023',
                HINT = 'run_as is the role the per-tenant steps run as, in each tenant''s context: one like the application''s, neither superuser nor BYPASSRLS, with a grant in the tenants.';
        END IF;
        IF EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = add_migration.run_as AND (a.rolsuper OR a.rolbypassrls)) THEN
            RAISE EXCEPTION 'run_as may not be a superuser or bypass row security' USING ERRCODE = '22023',
                HINT = 'Row security confines each per-tenant step to its tenant only for a role it applies to.';
        END IF;
    END IF;
    IF add_migration.ddl_as IS NULL OR EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = add_migration.ddl_as AND a.rolsuper) THEN
        RAISE EXCEPTION 'a migration needs ddl_as, a role that is not a superuser' USING ERRCODE = '22023',
            HINT = 'ddl_as is the role up, cleanup and contract run as: the owner of the tables they change. A superuser''s rights would run whatever its objects hold (triggers, functions) with them.';
    END IF;
    IF add_migration.search_path IS NOT NULL THEN
        PERFORM set_config('search_path', add_migration.search_path, true);   -- (checks its syntax)
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
    END IF;
    INSERT INTO tenancy.migrations (name, version, up, per_tenant, down, cleanup, contract, run_as, ddl_as, search_path, created_by)
    VALUES (add_migration.name, add_migration.version, add_migration.up, add_migration.per_tenant,
            add_migration.down, add_migration.cleanup, add_migration.contract, add_migration.run_as,
            add_migration.ddl_as, add_migration.search_path, current_user::regrole);
END
$$;

-- The migration (42704 when unknown).
CREATE FUNCTION tenancy._migration(migration text) RETURNS tenancy.migrations
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations;
BEGIN
    SELECT * INTO m FROM tenancy.migrations x WHERE x.name = migration;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown migration' USING ERRCODE = '42704',
            DETAIL = format('No migration is named %s.', quote_literal(migration)),
            HINT = 'Register it with tenancy.add_migration(); tenancy.migrations lists them.';
    END IF;
    RETURN m;
END
$$;

-- The migration, its row locked until the transaction ends (42704 when unknown).
CREATE FUNCTION tenancy._locked_migration(migration text) RETURNS tenancy.migrations
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations := tenancy._migration(migration);
BEGIN
    SELECT * INTO m FROM tenancy.migrations x WHERE x.name = migration FOR UPDATE;
    RETURN m;
END
$$;

-- The version before `version` (0: none).
CREATE FUNCTION tenancy._prev_version(version integer) RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(max(x.version), 0) FROM tenancy.migrations x WHERE x.version < _prev_version.version
$$;

-- Run a per-tenant step in `tenant`'s context as the migration's run_as (tenancy._run_step:
-- a security-restricted operation, the context pinned, every setting undone after it).
CREATE FUNCTION tenancy._run_in_tenant(m tenancy.migrations, tenant text, sql text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    context text := tenant;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = m.run_as) THEN
        RAISE EXCEPTION 'the migration''s run_as role does not exist' USING ERRCODE = '42704',
            HINT = 'Register the migration again with a role that exists.';
    END IF;
    -- (checked again at every step: the role may have been altered since the migration was added)
    IF EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = m.run_as AND (a.rolsuper OR a.rolbypassrls)) THEN
        RAISE EXCEPTION 'run_as may not be a superuser or bypass row security' USING ERRCODE = '22023',
            HINT = 'Row security confines each per-tenant step to its tenant only for a role it applies to.';
    END IF;
    -- in signed mode a token, minted for the step (one minute): a plain id is refused there to
    -- every role but superusers
    IF current_setting('pg_tenancy.context_mode') = 'signed' THEN
        context := tenancy._sign_token(jsonb_build_object(current_setting('pg_tenancy.tenant_claim'), tenant,
                                                          'exp', extract(epoch FROM now())::bigint + 60));
    END IF;
    PERFORM tenancy._run_step(m.run_as::oid, context, m.search_path, sql, false);
END
$$;

-- Run an up, cleanup or contract step as the migration's ddl_as, with no tenant context.
CREATE FUNCTION tenancy._run_ddl(m tenancy.migrations, sql text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = m.ddl_as AND NOT a.rolsuper) THEN
        RAISE EXCEPTION 'the migration''s ddl_as role does not exist or is a superuser' USING ERRCODE = '22023',
            HINT = 'Register the migration again with the owner of the tables it changes as ddl_as.';
    END IF;
    PERFORM tenancy._run_step(m.ddl_as::oid, NULL, m.search_path, sql, true);
END
$$;

CREATE FUNCTION tenancy._ledger(migration text, tenant text, state text, code text, started timestamptz)
RETURNS void LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO tenancy.migration_ledger AS l (migration, tenant, state, attempts, sqlstate, started_at, finished_at)
    VALUES (migration, tenant, state, 1, code, started, clock_timestamp())
    ON CONFLICT ON CONSTRAINT migration_ledger_pkey DO UPDATE
       SET state = EXCLUDED.state, attempts = l.attempts + 1, sqlstate = EXCLUDED.sqlstate,
           started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at
$$;

-- Expand: run `up` once, the migration's row locked (a second migrator waits, then finds it
-- done). True when it ran now.
CREATE FUNCTION tenancy._expand(migration text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations;
    prev integer;
BEGIN
    m := tenancy._locked_migration(migration);
    prev := tenancy._prev_version(m.version);
    IF m.expanded_at IS NOT NULL THEN
        RETURN false;
    END IF;
    IF prev > 0 AND EXISTS (SELECT 1 FROM tenancy.migrations x WHERE x.version = prev AND x.expanded_at IS NULL) THEN
        RAISE EXCEPTION 'the previous migration is not applied' USING ERRCODE = '55000',
            DETAIL = format('Version %s is not expanded.', prev),
            HINT = 'Migrations apply in version order: migrate the previous one first.';
    END IF;
    PERFORM tenancy._run_ddl(m, m.up);
    UPDATE tenancy.migrations x SET expanded_at = clock_timestamp(), contracted_at = NULL WHERE x.name = migration;
    RETURN true;
END
$$;

-- One tenant, in the caller's transaction. Forward: 'applied', 'already' (at or past the
-- version), 'blocked' (an earlier migration is not applied for it: recorded as failed, 55000).
-- Back (to the version before): 'rolled_back', 'not_on_version'. Either way 'failed' (its step
-- raised: nothing of it is kept, the tenant stays where it was, the SQLSTATE is recorded) or
-- 'busy' (its row is locked by another migrator or session: left for the next run).
CREATE FUNCTION tenancy._move_tenant(migration text, tenant text, forward boolean) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations;
    prev integer;
    v integer;
    step text;
    target integer;
    done text;
    started timestamptz := clock_timestamp();
    code text;
BEGIN
    m := tenancy._migration(migration);
    prev := tenancy._prev_version(m.version);
    IF forward AND m.expanded_at IS NULL THEN
        RAISE EXCEPTION 'the migration is not expanded' USING ERRCODE = '55000',
            HINT = 'CALL tenancy.migrate() runs its up step first.';
    END IF;
    SELECT t.schema_version INTO v FROM tenancy.tenants t WHERE t.id = tenant FOR NO KEY UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN 'busy';
    END IF;
    IF forward THEN
        IF v >= m.version THEN
            RETURN 'already';
        ELSIF v <> prev THEN
            PERFORM tenancy._ledger(migration, tenant, 'failed', '55000', started);
            RETURN 'blocked';
        END IF;
        step := m.per_tenant; target := m.version; done := 'applied';
    ELSE
        IF v <> m.version THEN
            RETURN 'not_on_version';
        END IF;
        step := m.down; target := prev; done := 'rolled_back';
    END IF;
    BEGIN
        IF step IS NOT NULL THEN
            PERFORM tenancy._run_in_tenant(m, tenant, step);
        END IF;
        UPDATE tenancy.tenants t SET schema_version = target, updated_at = now() WHERE t.id = tenant;
        PERFORM tenancy._ledger(migration, tenant, done, NULL, started);
        RETURN done;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE;
        PERFORM tenancy._ledger(migration, tenant, 'failed', code, started);
        RETURN 'failed';
    END;
END
$$;

-- Move a whole cohort's pointer back in one statement (a migration without a down step).
CREATE FUNCTION tenancy._switch_back(migration text, tenants text[]) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations;
    prev integer;
    moved text[];
    started timestamptz := clock_timestamp();
BEGIN
    m := tenancy._migration(migration);
    prev := tenancy._prev_version(m.version);
    WITH back AS (
        UPDATE tenancy.tenants t SET schema_version = prev, updated_at = now()
         WHERE t.id = ANY (tenants) AND t.schema_version = m.version
        RETURNING t.id)
    SELECT array_agg(id) INTO moved FROM back;
    PERFORM tenancy._ledger(migration, id, 'rolled_back', NULL, started) FROM unnest(moved) id;
    RETURN COALESCE(cardinality(moved), 0);
END
$$;

-- Once no tenant is on the version (nor past it): run `cleanup` (undo `up`). True when it ran.
CREATE FUNCTION tenancy._cleanup(migration text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations := tenancy._locked_migration(migration);
BEGIN
    IF m.expanded_at IS NULL OR EXISTS (SELECT 1 FROM tenancy.tenants t WHERE t.schema_version >= m.version)
       OR EXISTS (SELECT 1 FROM tenancy.migrations x WHERE x.version > m.version AND x.expanded_at IS NOT NULL) THEN
        RETURN false;
    END IF;
    IF m.cleanup IS NOT NULL THEN
        PERFORM tenancy._run_ddl(m, m.cleanup);
    END IF;
    UPDATE tenancy.migrations x SET expanded_at = NULL WHERE x.name = migration;
    RETURN true;
END
$$;

CREATE FUNCTION tenancy._migration_report(migration text, counts jsonb, started timestamptz) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_build_object('migration', migration,
                              'version', (SELECT m.version FROM tenancy.migrations m WHERE m.name = migration),
                              'seconds', round(extract(epoch FROM clock_timestamp() - started)::numeric, 3))
           || counts
$$;

CREATE FUNCTION tenancy._count(counts jsonb, outcome text) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT counts || jsonb_build_object(outcome, COALESCE((counts->>outcome)::integer, 0) + 1)
$$;

-- Apply a migration to a cohort: expand once, then each tenant in its own transaction. Run it
-- from several sessions at once for parallelism: each takes the tenants no other holds (SKIP
-- LOCKED), and a tenant's step touches only its tenant's rows, so they cannot deadlock. The
-- report counts applied, already, failed, blocked and busy tenants. CALL it outside a
-- transaction block.
CREATE PROCEDURE tenancy.migrate(migration text, cohort jsonb DEFAULT NULL, INOUT report jsonb DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    t pg_catalog.text;
    tenants pg_catalog.text[];
    counts pg_catalog.jsonb := '{"applied": 0, "already": 0, "failed": 0, "blocked": 0, "busy": 0}'::pg_catalog.jsonb;
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
BEGIN
    PERFORM tenancy._expand(migration);
    tenants := tenancy._cohort_array(cohort);
    COMMIT;
    FOREACH t IN ARRAY tenants LOOP
        counts := tenancy._count(counts, tenancy._move_tenant(migration, t, true));
        COMMIT;
    END LOOP;
    report := tenancy._migration_report(migration, counts, started);
END
$$;

-- Move a cohort back to the version before the migration's (every tenant on it when cohort is
-- NULL): with a down step, each tenant in its own transaction; without one, the pointer of the
-- whole cohort in one statement. Then, once no tenant is left on the version, `cleanup`.
CREATE PROCEDURE tenancy.rollback_migration(migration text, cohort jsonb DEFAULT NULL, INOUT report jsonb DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
    t pg_catalog.text;
    tenants pg_catalog.text[];
    counts pg_catalog.jsonb := '{"rolled_back": 0, "not_on_version": 0, "failed": 0, "busy": 0}'::pg_catalog.jsonb;
    started pg_catalog.timestamptz := pg_catalog.clock_timestamp();
    cleaned pg_catalog.bool;
BEGIN
    tenants := tenancy._cohort_array(cohort);
    IF tenancy._has_down(migration) THEN
        COMMIT;
        FOREACH t IN ARRAY tenants LOOP
            counts := tenancy._count(counts, tenancy._move_tenant(migration, t, false));
            COMMIT;
        END LOOP;
    ELSE
        counts := pg_catalog.jsonb_set(counts, '{rolled_back}', pg_catalog.to_jsonb(tenancy._switch_back(migration, tenants)));
        COMMIT;
    END IF;
    cleaned := tenancy._cleanup(migration);
    COMMIT;
    report := tenancy._migration_report(migration, pg_catalog.jsonb_set(counts, '{cleaned_up}', pg_catalog.to_jsonb(cleaned)), started);
END
$$;

CREATE FUNCTION tenancy._has_down(migration text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (tenancy._migration(migration)).down IS NOT NULL
$$;

-- Contract: once every tenant (not offboarded) is at the migration's version or past it, run
-- `contract` (drop what only the old version used). 55000 while a tenant is behind.
CREATE FUNCTION tenancy.contract_migration(migration text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    m tenancy.migrations;
    behind bigint;
BEGIN
    m := tenancy._locked_migration(migration);
    SELECT count(*) INTO behind FROM tenancy.tenants t WHERE t.status <> 'offboarded' AND t.schema_version < m.version;
    IF behind > 0 OR m.expanded_at IS NULL THEN
        RAISE EXCEPTION 'tenants are still on an earlier version' USING ERRCODE = '55000',
            DETAIL = format('%s tenant(s) are not at version %s.', behind, m.version),
            HINT = 'CALL tenancy.migrate() for every tenant first; tenancy.migration_ledger says which failed.';
    END IF;
    IF m.contracted_at IS NOT NULL THEN
        RETURN;
    END IF;
    IF m.contract IS NOT NULL THEN
        PERFORM tenancy._run_ddl(m, m.contract);
    END IF;
    UPDATE tenancy.migrations x SET contracted_at = clock_timestamp() WHERE x.name = migration;
END
$$;
