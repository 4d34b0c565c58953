-- Tenants and grants: the catalogs' constraints and invalidation triggers, and the functions a
-- superuser manages tenants with (the grant functions' checks are in src/context/grants.rs).

ALTER TABLE tenancy.tenants
    ADD CONSTRAINT tenants_id_check CHECK (tenancy.valid_tenant_id(id));
ALTER TABLE tenancy.grants
    ADD CONSTRAINT grants_tenant_check CHECK (tenant = '*' OR tenancy.valid_tenant_id(tenant));

------------------------------------------------------------------------------------------------
-- Catalog changes invalidate every backend's cached context verifications (relcache
-- invalidation of the changed table; see src/context.rs).
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy._catalog_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM tenancy._invalidate(TG_RELID);
    RETURN NULL;
END
$$;
-- (tenants: not for an update of schema_version or updated_at alone, which verifications do not
-- read: a migration moves tenants one transaction each. Every other column is listed.)
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR DELETE OR TRUNCATE ON tenancy.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate_update AFTER UPDATE OF id, name, plan, region, status, config, created_at
    ON tenancy.tenants FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.grants
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.protected_tables
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
-- A tenant's limits are read with its verification: a change of plans or overrides drops every
-- verification, as a change of tenants does (the next statement sees the new limits).
CREATE FUNCTION tenancy._limits_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM tenancy._invalidate('tenancy.tenants'::pg_catalog.regclass);
    RETURN NULL;
END
$$;
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.plans
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._limits_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.limits
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._limits_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR DELETE OR TRUNCATE ON tenancy.keys
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
-- (counting encryptions updates keys often; only changes that matter to cached keys invalidate)
CREATE TRIGGER tenancy_invalidate_update AFTER UPDATE ON tenancy.keys
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.wrapped IS DISTINCT FROM NEW.wrapped
                       OR OLD.kek_id IS DISTINCT FROM NEW.kek_id)
    EXECUTE FUNCTION tenancy._catalog_changed();


------------------------------------------------------------------------------------------------
-- Tenants
------------------------------------------------------------------------------------------------
-- An invalid region (not tenancy._valid_region): 22023 with what a region is.
CREATE FUNCTION tenancy._check_region(region text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT tenancy._valid_region(region) THEN
        RAISE EXCEPTION 'invalid region' USING ERRCODE = '22023',
            DETAIL = 'A region is 1 to 63 characters: lowercase letters, digits, ''-'' and ''_'', as pg_tenancy.region.',
            HINT = 'For example ''eu-west''; ''default'' for a tenant served in any region.';
    END IF;
END
$$;

CREATE FUNCTION tenancy.create_tenant(
    id text, name text DEFAULT NULL, plan text DEFAULT 'standard', region text DEFAULT 'default',
    config jsonb DEFAULT '{}')
RETURNS tenancy.tenants
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    r tenancy.tenants;
BEGIN
    IF id IS NULL OR NOT tenancy.valid_tenant_id(id) THEN
        RAISE EXCEPTION 'invalid tenant id' USING ERRCODE = '22023',
            DETAIL = 'A tenant id is 1 to 63 characters: letters, digits, ''_'', ''-'' and ''.''; one that reads as an integer or a UUID is written in that type''s canonical form (no leading zeros; a lowercase UUID with hyphens).',
            HINT = 'Write 7, not 007; a UUID as lowercase 8-4-4-4-12. Two spellings of one integer or UUID would name the same rows of an integer or uuid tenant column.';
    END IF;
    name := coalesce(name, id);
    IF btrim(name) = '' THEN
        RAISE EXCEPTION 'tenant name must not be empty' USING ERRCODE = '22023',
            HINT = 'Pass a display name as the second argument, or omit it to use the id.';
    END IF;
    IF plan IS NULL OR region IS NULL THEN
        RAISE EXCEPTION 'tenant plan and region must not be null' USING ERRCODE = '22023',
            HINT = 'Omit them to get ''standard'' and ''default''.';
    END IF;
    PERFORM tenancy._check_region(region);
    IF NOT EXISTS (SELECT 1 FROM tenancy.plans p WHERE p.name = plan) THEN
        RAISE EXCEPTION 'plan does not exist' USING ERRCODE = '42704',
            HINT = 'Plans are rows of tenancy.plans (INSERT INTO tenancy.plans (name, ...) VALUES (...)).';
    END IF;
    IF config IS NULL OR jsonb_typeof(config) <> 'object' THEN
        RAISE EXCEPTION 'tenant config must be a JSON object' USING ERRCODE = '22023',
            HINT = 'For example ''{"flags": {"beta": true}}''.';
    END IF;
    IF EXISTS (SELECT 1 FROM tenancy.tenants t WHERE t.id = id) THEN
        RAISE EXCEPTION 'tenant already exists' USING ERRCODE = '42710',
            HINT = 'Change it with tenancy.alter_tenant() or tenancy.set_status().';
    END IF;
    INSERT INTO tenancy.tenants (id, name, plan, region, config)
    VALUES (id, name, plan, region, config)
    RETURNING * INTO r;
    RETURN r;
END
$$;

CREATE FUNCTION tenancy.set_status(id text, status text)
RETURNS tenancy.tenants
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    r tenancy.tenants;
BEGIN
    IF status IS NULL OR status NOT IN ('active', 'read_only', 'suspended', 'offboarded') THEN
        RAISE EXCEPTION 'invalid tenant status' USING ERRCODE = '22023',
            HINT = 'One of active, read_only, suspended, offboarded.';
    END IF;
    SELECT * INTO r FROM tenancy.tenants t WHERE t.id = id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant does not exist' USING ERRCODE = '42704',
            HINT = 'Create it with tenancy.create_tenant(...).';
    END IF;
    IF r.status = 'offboarded' AND status <> 'offboarded' THEN
        RAISE EXCEPTION 'an offboarded tenant cannot be reactivated' USING ERRCODE = '55000',
            HINT = 'Offboarding is final; create a new tenant instead.';
    END IF;
    UPDATE tenancy.tenants t SET status = status, updated_at = now()
     WHERE t.id = id RETURNING * INTO r;
    RETURN r;
END
$$;

CREATE FUNCTION tenancy.alter_tenant(
    id text, name text DEFAULT NULL, plan text DEFAULT NULL, region text DEFAULT NULL,
    config jsonb DEFAULT NULL)
RETURNS tenancy.tenants
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    r tenancy.tenants;
BEGIN
    IF config IS NOT NULL AND jsonb_typeof(config) <> 'object' THEN
        RAISE EXCEPTION 'tenant config must be a JSON object' USING ERRCODE = '22023',
            HINT = 'config replaces the whole object; merge with old_config || patch first.';
    END IF;
    IF plan IS NOT NULL AND NOT EXISTS (SELECT 1 FROM tenancy.plans p WHERE p.name = plan) THEN
        RAISE EXCEPTION 'plan does not exist' USING ERRCODE = '42704',
            HINT = 'Plans are rows of tenancy.plans (INSERT INTO tenancy.plans (name, ...) VALUES (...)).';
    END IF;
    IF region IS NOT NULL THEN
        PERFORM tenancy._check_region(region);
    END IF;
    UPDATE tenancy.tenants t
       SET name = coalesce(name, t.name), plan = coalesce(plan, t.plan),
           region = coalesce(region, t.region), config = coalesce(config, t.config),
           updated_at = now()
     WHERE t.id = id RETURNING * INTO r;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant does not exist' USING ERRCODE = '42704',
            HINT = 'Create it with tenancy.create_tenant(...).';
    END IF;
    RETURN r;
END
$$;

------------------------------------------------------------------------------------------------
-- Grants (the checks live in src/grants.rs; these give the arguments their SQL types)
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.grant_tenant(role regrole, tenant text, scope text DEFAULT 'read_write')
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._grant_tenant($1::pg_catalog.oid, $2, $3) $$;

CREATE FUNCTION tenancy.revoke_tenant(role regrole, tenant text)
RETURNS boolean LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._revoke_tenant($1::pg_catalog.oid, $2) $$;

-- Enter a tenant for the rest of the transaction (or the session, when asked); returns it
-- (src/context/sql.rs).
CREATE FUNCTION tenancy.set_tenant(tenant text, session boolean DEFAULT false) RETURNS text
LANGUAGE c VOLATILE PARALLEL UNSAFE AS 'MODULE_PATHNAME', 'tenancy_set_tenant';
