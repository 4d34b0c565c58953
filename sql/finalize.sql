-- pg_tenancy: the SQL half. Runs after the Rust functions exist.

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
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.grants
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenancy.protected_tables
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
CREATE TRIGGER tenancy_invalidate AFTER INSERT OR DELETE OR TRUNCATE ON tenancy.keys
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._catalog_changed();
-- (counting encryptions updates keys often; only changes that matter to cached keys invalidate)
CREATE TRIGGER tenancy_invalidate_update AFTER UPDATE ON tenancy.keys
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.wrapped IS DISTINCT FROM NEW.wrapped
                       OR OLD.kek_id IS DISTINCT FROM NEW.kek_id)
    EXECUTE FUNCTION tenancy._catalog_changed();

-- Tenants whose active data key is older than pg_tenancy.key_rotation_interval.
CREATE VIEW tenancy.keys_due AS
SELECT k.tenant, k.version, k.created_at, now() - k.created_at AS age
  FROM tenancy.keys k
 WHERE k.kind = 'data' AND k.state = 'active'
   AND k.created_at < now() - current_setting('pg_tenancy.key_rotation_interval')::interval;

------------------------------------------------------------------------------------------------
-- Tenants
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.create_tenant(
    id text, name text, plan text DEFAULT 'standard', region text DEFAULT 'default',
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
    IF name IS NULL OR btrim(name) = '' THEN
        RAISE EXCEPTION 'tenant name must not be empty' USING ERRCODE = '22023',
            HINT = 'Pass a display name as the second argument.';
    END IF;
    IF plan IS NULL OR region IS NULL THEN
        RAISE EXCEPTION 'tenant plan and region must not be null' USING ERRCODE = '22023',
            HINT = 'Omit them to get ''standard'' and ''default''.';
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

------------------------------------------------------------------------------------------------
-- Protection (the work is in src/protect.rs; these give the arguments their SQL types)
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.protect(rel regclass, tenant_column name DEFAULT 'tenant_id',
                                create_index boolean DEFAULT false)
RETURNS SETOF text LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._protect($1::pg_catalog.oid, $2::pg_catalog.text, $3) $$;

CREATE FUNCTION tenancy.unprotect(rel regclass)
RETURNS SETOF text LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._unprotect($1::pg_catalog.oid) $$;

CREATE FUNCTION tenancy.protect_schema(schema name, tenant_column name DEFAULT 'tenant_id',
                                       create_index boolean DEFAULT false)
RETURNS SETOF text LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._protect_schema($1::pg_catalog.text, $2::pg_catalog.text, $3) $$;

CREATE FUNCTION tenancy.policy_sql(rel regclass, tenant_column name DEFAULT 'tenant_id')
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT tenancy._policy_sql($1::pg_catalog.oid, $2::pg_catalog.text) $$;

------------------------------------------------------------------------------------------------
-- Online re-encryption: one batch of the current tenant's rows whose ciphertext is older than the
-- active key. Returns how many it moved; call it until it returns 0. Skips rows that writers hold
-- locked (a later batch picks them up), so it never blocks the application. Runs as the caller;
-- context_expr is an SQL expression over the row, e.g. $$'orders.card:' || id$$.
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.reencrypt(rel regclass, col name, context_expr text DEFAULT $$''$$,
                                  batch_size integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    active integer := tenancy.active_key_version();
    n bigint;
BEGIN
    IF batch_size IS NULL OR batch_size < 1 THEN
        RAISE EXCEPTION 'batch_size must be positive' USING ERRCODE = '22023',
            HINT = 'For example 1000.';
    END IF;
    EXECUTE format(
        'WITH todo AS (SELECT tableoid, ctid FROM %1$s '
        '               WHERE %2$I IS NOT NULL AND tenancy.key_version(%2$I) OPERATOR(pg_catalog.<) $1 '
        '               LIMIT $2 FOR UPDATE SKIP LOCKED) '
        'UPDATE %1$s AS t SET %2$I = tenancy.rewrap(t.%2$I, %3$s) FROM todo '
        ' WHERE t.tableoid OPERATOR(pg_catalog.=) todo.tableoid AND t.ctid OPERATOR(pg_catalog.=) todo.ctid',
        rel, col, coalesce(context_expr, $$''$$))
    USING active, batch_size;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;

------------------------------------------------------------------------------------------------
-- Protection guard
------------------------------------------------------------------------------------------------
-- The generated policies of a table, as text, for the guard to compare with what protect() made.
CREATE FUNCTION tenancy._policy_fingerprint(rel regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT string_agg(concat_ws('|', p.polname, p.polcmd, p.polpermissive, p.polroles::text,
                                pg_get_expr(p.polqual, p.polrelid),
                                pg_get_expr(p.polwithcheck, p.polrelid)), E'\n' ORDER BY p.polname)
      FROM pg_policy p
     WHERE p.polrelid = $1 AND p.polname IN ('tenancy_isolation', 'tenancy_write_guard')
$$;

-- What, if anything, weakens the protection of a protected table; NULL when intact.
CREATE FUNCTION tenancy._protection_problem(rel regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE
        WHEN c.oid IS NULL THEN NULL
        WHEN NOT c.relrowsecurity THEN 'row level security was disabled'
        WHEN NOT c.relforcerowsecurity THEN 'row level security is no longer forced on the owner'
        WHEN a.attnum IS NULL THEN 'the tenant column was dropped or renamed'
        WHEN a.atttypid <> p.column_type THEN 'the tenant column was retyped'
        WHEN tenancy._policy_fingerprint(c.oid) IS DISTINCT FROM p.fingerprint
            THEN 'a generated tenancy policy was dropped or altered'
        WHEN EXISTS (SELECT 1 FROM pg_policy x
                      WHERE x.polrelid = c.oid AND x.polpermissive
                        AND x.polname <> 'tenancy_isolation')
            THEN 'another permissive policy was added: it would widen what each tenant can see'
        WHEN NOT EXISTS (SELECT 1 FROM pg_trigger t
                          WHERE t.tgrelid = c.oid AND t.tgname = 'tenancy_truncate_guard'
                            AND t.tgenabled IN ('O', 'A'))
            THEN 'the TRUNCATE guard trigger was dropped or disabled'
        END
      FROM tenancy.protected_tables p
      LEFT JOIN pg_class c ON c.oid = p.rel
      LEFT JOIN pg_attribute a ON a.attrelid = p.rel AND a.attname = p.tenant_column
                              AND NOT a.attisdropped
     WHERE p.rel = $1
$$;

-- Supported tenant column types for auto-protection.
CREATE FUNCTION tenancy._has_tenant_column(rel regclass, col name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'uuid'::regtype,
                                         'int4'::regtype, 'int8'::regtype))
$$;

-- Whether a table holds any row (read by the guard, as the extension's owner: all of them).
CREATE FUNCTION tenancy._has_rows(rel regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    found boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', rel) INTO found;
    RETURN found;
END
$$;

-- The fingerprint of a function's definition: an approval holds for this definition only.
-- Redefining the function, changing its owner (whose rights a SECURITY DEFINER function runs
-- with), its volatility, leakproofness or settings lapses the approval.
CREATE FUNCTION tenancy._function_fingerprint(fn oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT encode(sha256(convert_to(concat_ws(E'\n', p.proowner::regrole::text, p.prosecdef::text,
                  p.proleakproof::text, p.provolatile::text, p.proconfig::text, p.prolang::regproc::text,
                  l.lanname::text, pg_get_function_identity_arguments(p.oid), p.probin, p.prosrc), 'UTF8')), 'hex')
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.oid = $1
$$;

-- Functions (not PostgreSQL's own, not pg_tenancy's) that run over a protected table's rows:
-- called by its index expressions and predicates, CHECK and exclusion constraints, triggers
-- (function and WHEN clause), extended statistics, generated columns and policies other than
-- pg_tenancy's. Index builds, constraint validation, ANALYZE and table rewrites run them with
-- the owner's rights over every tenant's rows; triggers run them on every tenant's writes; a
-- restrictive policy runs them before the tenant filter. Each is listed by tenancy.check() until a
-- superuser approves it (tenancy.approve_function).
CREATE FUNCTION tenancy._row_functions(rel regclass)
RETURNS TABLE (fn regprocedure, via text, approved boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH objs(classid, objid, via) AS (
    SELECT 'pg_class'::regclass, i.indexrelid, 'index ' || i.indexrelid::regclass::text
      FROM pg_index i WHERE i.indrelid = $1
    UNION ALL
    SELECT 'pg_constraint'::regclass, c.oid, 'constraint ' || quote_ident(c.conname)
      FROM pg_constraint c WHERE c.conrelid = $1
    UNION ALL
    SELECT 'pg_trigger'::regclass, t.oid, 'trigger ' || quote_ident(t.tgname)
      FROM pg_trigger t WHERE t.tgrelid = $1 AND NOT t.tgisinternal
    UNION ALL
    SELECT 'pg_policy'::regclass, p.oid, 'policy ' || quote_ident(p.polname)
      FROM pg_policy p WHERE p.polrelid = $1
    UNION ALL
    SELECT 'pg_statistic_ext'::regclass, s.oid, 'statistics ' || quote_ident(s.stxname)
      FROM pg_statistic_ext s WHERE s.stxrelid = $1
    UNION ALL
    SELECT 'pg_attrdef'::regclass, d.oid, 'generated column ' || quote_ident(a.attname)
      FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
     WHERE d.adrelid = $1 AND a.attgenerated <> ''
), deps(fn, via) AS (
    SELECT d.refobjid, o.via
      FROM objs o JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
     WHERE d.refclassid = 'pg_proc'::regclass
    UNION
    SELECT op.oprcode::oid, o.via
      FROM objs o JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
      JOIN pg_operator op ON op.oid = d.refobjid
     WHERE d.refclassid = 'pg_operator'::regclass
)
SELECT DISTINCT f.oid::regprocedure, deps.via,
       EXISTS (SELECT 1 FROM tenancy.approved_functions a
                WHERE a.fn = f.oid AND a.fingerprint = tenancy._function_fingerprint(f.oid))
  FROM deps
  JOIN pg_proc f ON f.oid = deps.fn
  JOIN pg_namespace n ON n.oid = f.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
$$;

-- ddl_command_end: refuse changes that weaken a protected table; protect new partitions and
-- inheritance children of protected tables (refusing one that already holds rows, and any
-- unprotected parent of a protected table); refuse restrictive policies that would run
-- non-leakproof functions before the tenant filter; record DDL that puts unapproved functions
-- over a protected table's rows; protect new tables when pg_tenancy.auto_protect.
CREATE FUNCTION tenancy._guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    ch record;
    problem text;
    parent_col name;
    fns text;
    col name := coalesce(nullif(current_setting('pg_tenancy.tenant_column', true), ''), 'tenant_id');
    loaded_child constant text := 'a table that already holds rows cannot become a partition or child of a '
                                  'protected table: its rows were not written under the tenant policies';
    unprotected_parent constant text := 'a protected table cannot inherit from, or be a partition of, a table '
                                        'that is not protected: the parent would return its rows without its policies';
BEGIN
    IF current_setting('pg_tenancy.guard', true) = 'off' THEN
        RETURN;  -- a superuser restoring a dump (see README, "Backups")
    END IF;
    FOR r IN
        SELECT DISTINCT x.relid, x.tag, c.relpersistence
          FROM (SELECT CASE d.classid
                         WHEN 'pg_class'::regclass THEN d.objid
                         WHEN 'pg_policy'::regclass
                             THEN (SELECT polrelid FROM pg_policy WHERE oid = d.objid)
                         WHEN 'pg_trigger'::regclass
                             THEN (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid)
                       END AS relid,
                       d.command_tag AS tag
                  FROM pg_event_trigger_ddl_commands() d) x
          JOIN pg_class c ON c.oid = x.relid AND c.relkind IN ('r', 'p')
    LOOP
        -- the audit log keeps its definition (and its append-only trigger) outside upgrades
        IF r.relid = to_regclass('tenancy.audit_log') AND NOT tenancy._in_extension_script() THEN
            PERFORM tenancy._refuse_audit_change();
        END IF;
        -- protect()/unprotect() of this very table is under way in this backend
        CONTINUE WHEN tenancy._guard_exempt(r.relid);
        IF EXISTS (SELECT 1 FROM tenancy.protected_tables WHERE rel = r.relid) THEN
            problem := tenancy._protection_problem(r.relid);
            IF problem IS NOT NULL THEN
                PERFORM tenancy._refuse_weakening(r.relid::oid, problem);
            END IF;
        ELSE
            SELECT p.tenant_column INTO parent_col
              FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
             WHERE i.inhrelid = r.relid
             LIMIT 1;
            IF parent_col IS NOT NULL THEN
                -- a new partition or child of a protected table (CREATE ... PARTITION OF,
                -- INHERITS, or ALTER TABLE ... INHERIT)
                IF NOT tenancy._invoker_is_superuser() AND tenancy._has_rows(r.relid) THEN
                    PERFORM tenancy._refuse_weakening(r.relid::oid,
                        loaded_child);
                END IF;
                PERFORM tenancy.protect(r.relid::regclass, parent_col);
            ELSIF r.tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
                  AND r.relpersistence <> 't'
                  AND coalesce(current_setting('pg_tenancy.auto_protect', true), 'off')::boolean
                  AND tenancy._has_tenant_column(r.relid, col) THEN
                PERFORM tenancy.protect(r.relid::regclass, col);
            END IF;
        END IF;
        IF EXISTS (SELECT 1 FROM tenancy.protected_tables WHERE rel = r.relid) THEN
            -- partitions or children attached to a protected table are protected too; one that
            -- already holds rows (written outside the policies, for any tenant) is refused
            FOR ch IN
                SELECT i.inhrelid, p.tenant_column
                  FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                 WHERE i.inhparent = r.relid
                   AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhrelid)
            LOOP
                IF NOT tenancy._invoker_is_superuser() AND tenancy._has_rows(ch.inhrelid) THEN
                    PERFORM tenancy._refuse_weakening(r.relid::oid,
                        loaded_child);
                END IF;
                PERFORM tenancy.protect(ch.inhrelid::regclass, ch.tenant_column);
            END LOOP;
            -- a protected table under a parent that is not protected: the parent would return
            -- its rows without its policies (row security applies the parent's policies only)
            IF EXISTS (SELECT 1 FROM pg_inherits i
                        WHERE i.inhrelid = r.relid
                          AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhparent)) THEN
                PERFORM tenancy._refuse_weakening(r.relid::oid,
                    unprotected_parent);
            END IF;
        ELSE
            -- ... nor become one (ATTACH PARTITION of a protected table to an unprotected one)
            PERFORM 1
               FROM pg_inherits i JOIN tenancy.protected_tables q ON q.rel = i.inhrelid
              WHERE i.inhparent = r.relid;
            IF FOUND THEN
                PERFORM tenancy._refuse_weakening(r.relid::oid,
                    unprotected_parent);
            END IF;
        END IF;
    END LOOP;
    -- restrictive policies run before the tenant filter, on every tenant's rows: from roles
    -- other than superusers, only leakproof ones
    FOR r IN
        SELECT p.polrelid, p.polname, p.polqual
          FROM pg_event_trigger_ddl_commands() d
          JOIN pg_policy p ON d.classid = 'pg_policy'::regclass AND p.oid = d.objid
          JOIN tenancy.protected_tables t ON t.rel = p.polrelid
         WHERE NOT p.polpermissive AND p.polname NOT IN ('tenancy_isolation', 'tenancy_write_guard')
    LOOP
        CONTINUE WHEN tenancy._guard_exempt(r.polrelid) OR tenancy._invoker_is_superuser();
        IF tenancy._expr_leaks(r.polqual::text) THEN
            PERFORM tenancy._refuse_weakening(r.polrelid::oid,
                format('restrictive policy %I calls a function that is not leakproof on the row: it would run before '
                       'the tenant filter, on every tenant''s rows', r.polname));
        END IF;
    END LOOP;
    -- code put over a protected table's rows that no superuser approved: recorded
    FOR r IN
        SELECT x.relid, string_agg(DISTINCT x.tag, ', ') AS tags
          FROM (SELECT CASE d.classid
                         WHEN 'pg_class'::regclass
                             THEN coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = d.objid), d.objid)
                         WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid)
                         WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = d.objid)
                         WHEN 'pg_statistic_ext'::regclass
                             THEN (SELECT stxrelid FROM pg_statistic_ext WHERE oid = d.objid)
                       END AS relid,
                       d.command_tag AS tag
                  FROM pg_event_trigger_ddl_commands() d
                 WHERE d.command_tag IN ('CREATE INDEX', 'ALTER TABLE', 'CREATE TRIGGER', 'CREATE STATISTICS',
                                         'ALTER STATISTICS', 'CREATE POLICY', 'ALTER POLICY')) x
          JOIN tenancy.protected_tables p ON p.rel = x.relid
         GROUP BY x.relid
    LOOP
        CONTINUE WHEN tenancy._guard_exempt(r.relid);
        SELECT string_agg(DISTINCT f.fn::text, ', ') INTO fns
          FROM tenancy._row_functions(r.relid) f WHERE NOT f.approved;
        IF fns IS NOT NULL THEN
            PERFORM tenancy._record_protected_ddl(r.relid::oid,
                left(r.tags || ' puts unapproved functions over every tenant''s rows: ' || fns, 200));
        END IF;
    END LOOP;
END
$$;

-- sql_drop: forget dropped tables; refuse dropping a generated policy, the TRUNCATE guard or
-- the tenant column of a protected table that stays.
CREATE FUNCTION tenancy._guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    problem text;
BEGIN
    DELETE FROM tenancy.protected_tables p
     USING pg_event_trigger_dropped_objects() d
     WHERE d.classid = 'pg_class'::regclass AND d.objsubid = 0 AND d.objid = p.rel::oid;
    IF current_setting('pg_tenancy.guard', true) = 'off' THEN
        RETURN;
    END IF;
    FOR r IN
        SELECT DISTINCT p.rel
          FROM pg_event_trigger_dropped_objects() d
          JOIN tenancy.protected_tables p
            ON p.rel::oid = to_regclass(quote_ident(d.address_names[1]) || '.'
                                        || quote_ident(d.address_names[2]))::oid
         WHERE d.object_type IN ('policy', 'trigger', 'table column', 'default value')
    LOOP
        IF NOT tenancy._guard_exempt(r.rel) THEN
            problem := tenancy._protection_problem(r.rel);
            IF problem IS NOT NULL THEN
                PERFORM tenancy._refuse_weakening(r.rel::oid, problem);
            END IF;
        END IF;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER tenancy_guard_ddl ON ddl_command_end
    EXECUTE FUNCTION tenancy._guard_ddl();
CREATE EVENT TRIGGER tenancy_guard_drop ON sql_drop
    EXECUTE FUNCTION tenancy._guard_drop();

------------------------------------------------------------------------------------------------
-- Approving the functions that run over protected rows (superusers)
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.approve_function(fn regprocedure, reason text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF fn IS NULL OR reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a function and the reason it is safe are required' USING ERRCODE = '22023',
            HINT = 'SELECT tenancy.approve_function(''app.normalize(text)'', ''reviewed: pure, no side effects'');';
    END IF;
    INSERT INTO tenancy.approved_functions (fn, fingerprint, approved_by, reason)
    VALUES (fn, tenancy._function_fingerprint(fn), current_user::regrole, reason)
    ON CONFLICT ON CONSTRAINT approved_functions_pkey DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, approved_by = EXCLUDED.approved_by,
           approved_at = now(), reason = EXCLUDED.reason;
END
$$;

CREATE FUNCTION tenancy.revoke_approval(fn regprocedure)
RETURNS boolean
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH d AS (DELETE FROM tenancy.approved_functions a WHERE a.fn = $1 RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

------------------------------------------------------------------------------------------------
-- tenancy.check(): the pre-go-live checklist items the database can verify itself.
------------------------------------------------------------------------------------------------
CREATE FUNCTION tenancy.check()
RETURNS TABLE (severity text, object text, problem text, fix text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH prot AS (
    SELECT p.rel, p.tenant_column,
           (SELECT a.attnum FROM pg_attribute a
             WHERE a.attrelid = p.rel AND a.attname = p.tenant_column AND NOT a.attisdropped) AS attnum
      FROM tenancy.protected_tables p
), col AS (
    SELECT coalesce(nullif(current_setting('pg_tenancy.tenant_column', true), ''), 'tenant_id')::name AS name
), findings AS (
    -- tables with the tenant column that are not protected
    SELECT 'ERROR' AS severity, c.oid::regclass::text AS object,
           'table has a tenant column but is not protected' AS problem,
           format('SELECT tenancy.protect(%L);', c.oid::regclass::text) AS fix
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = (SELECT name FROM col)
                         AND NOT a.attisdropped
     WHERE c.relkind IN ('r', 'p')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
       AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
       AND NOT EXISTS (SELECT 1 FROM prot WHERE prot.rel = c.oid)
    UNION ALL
    -- protected tables whose protection was weakened (RLS off, not forced, policies changed)
    SELECT 'ERROR', p.rel::text, tenancy._protection_problem(p.rel),
           format('SELECT tenancy.protect(%L, %L);', p.rel::text, p.tenant_column)
      FROM prot p
     WHERE tenancy._protection_problem(p.rel) IS NOT NULL
    UNION ALL
    -- code over every tenant's rows that no superuser approved
    SELECT DISTINCT 'WARNING', 'function ' || rf.fn::text,
           'runs over every tenant''s rows of protected table ' || p.rel::text || ' (' || rf.via
               || ') with the rights of the table owner or of each writer, and no superuser approved it',
           format('SELECT tenancy.approve_function(%L, ''<why it is safe>''); -- after reviewing it',
                  rf.fn::text)
      FROM prot p
     CROSS JOIN LATERAL tenancy._row_functions(p.rel) rf
     WHERE NOT rf.approved
    UNION ALL
    -- restrictive policies that run leaky functions before the tenant filter (a superuser's)
    SELECT 'WARNING', format('policy %I on %s', x.polname, x.polrelid::regclass),
           'restrictive policy calls a function that is not leakproof on the row: it runs before the '
               || 'tenant filter, on every tenant''s rows',
           format('DROP POLICY %I ON %s; -- or make its functions leakproof', x.polname, x.polrelid::regclass)
      FROM pg_policy x JOIN prot p ON p.rel = x.polrelid
     WHERE NOT x.polpermissive AND x.polname NOT IN ('tenancy_isolation', 'tenancy_write_guard')
       AND tenancy._expr_leaks(x.polqual::text)
    UNION ALL
    -- protected tables under a parent that is not protected
    SELECT 'ERROR', i.inhparent::regclass::text,
           'parent of protected table ' || p.rel::text
               || ' is not protected: it returns the child''s rows without the child''s policies',
           format('SELECT tenancy.protect(%L, %L);', i.inhparent::regclass::text, p.tenant_column)
      FROM prot p JOIN pg_inherits i ON i.inhrelid = p.rel
     WHERE NOT EXISTS (SELECT 1 FROM prot q WHERE q.rel = i.inhparent)
    UNION ALL
    -- registry rows of tables that no longer exist (a temporary table ended with its session)
    SELECT 'INFO', 'protected table ' || p.rel::oid::text,
           'tenancy.protected_tables lists a table that no longer exists',
           format('DELETE FROM tenancy.protected_tables WHERE rel = %s;', p.rel::oid)
      FROM tenancy.protected_tables p
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = p.rel::oid)
    UNION ALL
    -- publications that send protected tables elsewhere whole
    SELECT 'WARNING', 'publication ' || quote_ident(pub.pubname),
           'publishes protected table ' || p.rel::text || ': a subscriber receives every tenant''s rows',
           'Make sure every subscriber is as trusted as a superuser, or publish per tenant with a row filter.'
      FROM pg_publication pub
      JOIN prot p ON pub.puballtables
                  OR EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = pub.oid AND pr.prrelid = p.rel)
    UNION ALL
    -- statement statistics shared by every tenant of one role
    SELECT 'WARNING', 'view ' || c.oid::regclass::text,
           'readable by PUBLIC: with one application role for all tenants, each tenant sees the statement '
               || 'statistics (calls, rows, buffers) of the others'' sessions',
           format('REVOKE SELECT ON %s FROM PUBLIC;', c.oid::regclass)
      FROM pg_class c
     WHERE c.relname IN ('pg_stat_statements', 'pg_stat_statements_info') AND c.relkind = 'v'
       AND has_table_privilege('public', c.oid, 'SELECT')
    UNION ALL
    -- the guard itself switched off
    SELECT 'ERROR', 'event trigger ' || e.evtname, 'the pg_tenancy guard is disabled',
           format('ALTER EVENT TRIGGER %I ENABLE;', e.evtname)
      FROM pg_event_trigger e
     WHERE e.evtname IN ('tenancy_guard_ddl', 'tenancy_guard_drop') AND e.evtenabled = 'D'
    UNION ALL
    SELECT 'ERROR', 'setting pg_tenancy.guard', 'the guard is off in this session',
           'RESET pg_tenancy.guard; -- and look for ALTER DATABASE/ROLE ... SET pg_tenancy.guard'
     WHERE current_setting('pg_tenancy.guard', true) = 'off'
    UNION ALL
    -- the token secret where every role can read it
    SELECT 'ERROR', 'settings of ' || coalesce('database ' || quote_ident(d.datname), 'all databases')
                    || coalesce(' for role ' || quote_ident(r.rolname), ''),
           'pg_tenancy.jwt_secret is stored in pg_db_role_setting, which every role can read',
           format('ALTER %s RESET pg_tenancy.jwt_secret; -- then rotate the secret',
                  CASE WHEN r.rolname IS NOT NULL THEN 'ROLE ' || quote_ident(r.rolname)
                       ELSE 'DATABASE ' || quote_ident(d.datname) END)
      FROM pg_db_role_setting s
      LEFT JOIN pg_database d ON d.oid = s.setdatabase
      LEFT JOIN pg_roles r ON r.oid = s.setrole
     WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
       AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c WHERE c LIKE 'pg\_tenancy.jwt\_secret=%')
    UNION ALL
    -- roles that row level security does not apply to
    SELECT 'WARNING', 'role ' || quote_ident(r.rolname),
           CASE WHEN r.rolsuper
                THEN 'role can log in as SUPERUSER: row level security does not apply to it'
                ELSE 'role can log in with BYPASSRLS: row level security does not apply to it' END,
           format('ALTER ROLE %I NOSUPERUSER NOBYPASSRLS; -- or NOLOGIN for a break-glass role',
                  r.rolname)
      FROM pg_roles r
     WHERE r.rolcanlogin AND (r.rolsuper OR r.rolbypassrls)
    UNION ALL
    -- SECURITY DEFINER functions that mention a protected table
    SELECT DISTINCT 'WARNING', 'function ' || f.oid::regprocedure::text,
           'SECURITY DEFINER function mentions protected table ' || c.oid::regclass::text
               || ': it runs with its owner''s rights',
           format('ALTER FUNCTION %s SECURITY INVOKER;', f.oid::regprocedure)
      FROM pg_proc f
      JOIN pg_namespace n ON n.oid = f.pronamespace
      CROSS JOIN prot p
      JOIN pg_class c ON c.oid = p.rel
     WHERE f.prosecdef
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenancy')
       AND f.prosrc ~* ('\m' || regexp_replace(c.relname, '([^[:alnum:]_])', '\\\1', 'g') || '\M')
    UNION ALL
    -- views without security_invoker and materialized views over protected tables
    SELECT DISTINCT 'WARNING', v.oid::regclass::text,
           CASE v.relkind WHEN 'm'
                THEN 'materialized view copies protected table ' || p.rel::text
                     || ' without row level security'
                ELSE 'view over protected table ' || p.rel::text
                     || ' is not security_invoker: it reads with its owner''s rights' END,
           CASE v.relkind WHEN 'm'
                THEN format('DROP MATERIALIZED VIEW %s; -- or protect a tenant-keyed table instead',
                            v.oid::regclass)
                ELSE format('ALTER VIEW %s SET (security_invoker = true);', v.oid::regclass) END
      FROM pg_depend d
      JOIN pg_rewrite rw ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
      JOIN pg_class v ON v.oid = rw.ev_class
      JOIN prot p ON d.refclassid = 'pg_class'::regclass AND d.refobjid = p.rel
     WHERE v.oid <> p.rel
       AND (v.relkind = 'm'
            OR (v.relkind = 'v' AND NOT EXISTS (
                    SELECT 1 FROM unnest(v.reloptions) o
                     WHERE lower(o) IN ('security_invoker=true', 'security_invoker=on',
                                        'security_invoker=1', 'security_invoker=yes'))))
    UNION ALL
    -- foreign keys to protected tables that do not carry the tenant column on both sides
    SELECT 'WARNING', format('constraint %I on %s', k.conname, k.conrelid::regclass),
           'foreign key to protected table ' || k.confrelid::regclass::text
               || ' does not include the tenant column: a row can point at another tenant''s row, '
               || 'and the error tells whether it exists',
           'Make the key (tenant column, ...) on both sides, with a matching unique constraint.'
      FROM pg_constraint k
      JOIN prot b ON b.rel = k.confrelid
      LEFT JOIN prot a ON a.rel = k.conrelid
     WHERE k.contype = 'f' AND k.conparentid = 0
       AND NOT (a.attnum IS NOT NULL AND b.attnum IS NOT NULL
                AND array_position(k.conkey, a.attnum) IS NOT NULL
                AND array_position(k.conkey, a.attnum) = array_position(k.confkey, b.attnum))
    UNION ALL
    -- unique constraints without the tenant column
    SELECT 'WARNING', i.indexrelid::regclass::text,
           'unique index on protected table ' || p.rel::text
               || ' does not include the tenant column: a duplicate-key error tells a tenant '
               || 'that another tenant has that value',
           format('Make it unique on (%I, ...) instead.', p.tenant_column)
      FROM pg_index i
      JOIN prot p ON p.rel = i.indrelid
     WHERE i.indisunique AND NOT (p.attnum = ANY (i.indkey::int2[]))
       AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
    UNION ALL
    -- no index leads with the tenant column
    SELECT 'WARNING', p.rel::text, 'no index leads with the tenant column',
           format('CREATE INDEX CONCURRENTLY ON %s (%I);', p.rel, p.tenant_column)
      FROM prot p
     WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = p.rel AND i.indkey[0] = p.attnum)
    UNION ALL
    -- nullable tenant column
    SELECT 'WARNING', p.rel::text,
           'tenant column allows NULL: such rows belong to no tenant and nobody can see them',
           format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL;', p.rel, p.tenant_column)
      FROM prot p
      JOIN pg_attribute a ON a.attrelid = p.rel AND a.attnum = p.attnum
     WHERE NOT a.attnotnull
    UNION ALL
    -- the extension's catalogs readable by PUBLIC
    SELECT 'ERROR', c.oid::regclass::text,
           'pg_tenancy catalog is readable by PUBLIC: every tenant could list the others',
           format('REVOKE ALL ON %s FROM PUBLIC;', c.oid::regclass)
      FROM pg_class c
     WHERE c.relnamespace = 'tenancy'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'p')
       AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) x WHERE x.grantee = 0)
    UNION ALL
    -- explicit all-tenants grants
    SELECT 'WARNING', 'role ' || g.role::text,
           format('role may enter every tenant (all-tenants grant, scope %s)', g.scope),
           format('SELECT tenancy.revoke_tenant(%L, ''*'');', g.role::text)
      FROM tenancy.grants g
     WHERE g.tenant = '*'
    UNION ALL
    -- grants that point at nothing
    SELECT 'INFO', 'grant ' || g.role::text || ' -> ' || g.tenant,
           'grant for a tenant that does not exist or a role that was dropped',
           format('DELETE FROM tenancy.grants WHERE role = %s AND tenant = %L;', g.role::oid, g.tenant)
      FROM tenancy.grants g
     WHERE (g.tenant <> '*' AND NOT EXISTS (SELECT 1 FROM tenancy.tenants t WHERE t.id = g.tenant))
        OR NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = g.role)
    UNION ALL
    -- the denial log
    SELECT 'ERROR', 'setting shared_preload_libraries',
           'pg_tenancy is not preloaded: cross-tenant attempts are not recorded in tenancy.audit_log',
           'ALTER SYSTEM SET shared_preload_libraries = ''pg_tenancy''; -- then restart the server'
     WHERE NOT tenancy._audit_available()
    UNION ALL
    SELECT 'WARNING', 'tenancy.audit_log',
           format('%s events overflowed the audit queue since the server started: they are only in the server log',
                  tenancy._audit_overflowed()),
           'Find what floods it: SELECT event, role, count(*) FROM tenancy.audit_log WHERE at > now() - interval ''1 hour'' GROUP BY 1, 2 ORDER BY 3 DESC;'
     WHERE tenancy._audit_overflowed() > 0
    UNION ALL
    SELECT 'ERROR', 'tenancy.audit_log', format('trigger %s is not enabled ALWAYS: the log is not append-only', t.tgname),
           format('ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER %I;', t.tgname)
      FROM pg_trigger t
     WHERE t.tgrelid = to_regclass('tenancy.audit_log')
       AND t.tgname IN ('audit_log_append_only', 'audit_log_no_truncate') AND t.tgenabled <> 'A'
    UNION ALL
    SELECT 'INFO', 'setting pg_tenancy.context_mode',
           'the tenant context can be set with a plain tenant id (open mode)',
           'ALTER SYSTEM SET pg_tenancy.context_mode = ''signed''; -- once the gateway mints tokens'
     WHERE coalesce(current_setting('pg_tenancy.context_mode', true), 'open') = 'open'
)
SELECT f.severity, f.object, f.problem, f.fix
  FROM findings f
 ORDER BY CASE f.severity WHEN 'ERROR' THEN 0 WHEN 'WARNING' THEN 1 ELSE 2 END, f.object, f.problem
$$;


------------------------------------------------------------------------------------------------
-- The denial log (src/audit.rs). Rows come only from pg_tenancy's audit writer; they leave only
-- through tenancy.prune_audit(). tenancy_auditor reads it; application roles do not.
------------------------------------------------------------------------------------------------
CREATE TABLE tenancy.audit_log (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                timestamptz NOT NULL,
    event             text        NOT NULL CONSTRAINT audit_log_event_check CHECK (event IN (
                          'no_context', 'cross_tenant_write', 'cross_tenant_probe',
                          'forbidden_tenant', 'bypass_read', 'policy_tamper',
                          'read_only_write', 'wrong_tenant_key', 'protected_ddl')),
    database          name        NOT NULL,
    role              name        NOT NULL,
    session_tenant    text,
    attempted_tenant  text,
    relation          text,
    command           text,
    sqlstate          text        NOT NULL,
    query_id          bigint,
    backend_pid       integer     NOT NULL,
    detail            text,
    written_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE INDEX audit_log_at_idx ON tenancy.audit_log (at);
CREATE INDEX audit_log_event_at_idx ON tenancy.audit_log (event, at);
COMMENT ON TABLE tenancy.audit_log IS
    'Every cross-tenant attempt pg_tenancy saw, written outside the attempt''s transaction. Append-only.';
CREATE TRIGGER audit_log_append_only
    BEFORE INSERT OR UPDATE OR DELETE ON tenancy.audit_log
    FOR EACH ROW EXECUTE FUNCTION tenancy._audit_log_guard();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON tenancy.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION tenancy._audit_log_guard();
-- ALWAYS: session_replication_role = replica does not silence them.
ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;
ALTER TABLE tenancy.audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_log', '');
-- (and its id sequence, or a restored log would hand out ids it already holds)
SELECT pg_catalog.pg_extension_config_dump('tenancy.audit_log_id_seq', '');

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tenancy_auditor') THEN
        CREATE ROLE tenancy_auditor NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE tenancy_auditor IS 'Reads pg_tenancy''s audit log (tenancy.audit_log) and its reports.';

-- Denials an operator did not plan for, per event, role, tenant and relation, over the last
-- `since`: the runbook's "unexpected RLS denials" alert. Left out: bypass_read (not a denial;
-- listed in the log) and read_only_write (the consequence of a status an operator set).
CREATE FUNCTION tenancy.unexpected_denials(since interval DEFAULT '5 minutes')
RETURNS TABLE (event text, role name, session_tenant text, relation text,
               attempts bigint, first_at timestamptz, last_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.event, a.role, a.session_tenant, a.relation,
           count(*), min(a.at), max(a.at)
      FROM tenancy.audit_log a
     WHERE a.at >= now() - $1
       AND a.event IN ('no_context', 'cross_tenant_write', 'cross_tenant_probe',
                       'forbidden_tenant', 'policy_tamper', 'wrong_tenant_key')
     GROUP BY 1, 2, 3, 4
     ORDER BY count(*) DESC, 1, 2
$$;

------------------------------------------------------------------------------------------------
-- Privileges: nothing by default, then exactly what applications and owners need.
------------------------------------------------------------------------------------------------
REVOKE ALL ON ALL TABLES IN SCHEMA tenancy FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA tenancy FROM PUBLIC;
GRANT USAGE ON SCHEMA tenancy TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    tenancy.set_tenant(text, boolean),
    tenancy.set_tenant_token(text, boolean),
    tenancy.reset_tenant(),
    tenancy.current_tenant(),
    tenancy.writable_tenant(),
    tenancy.has_tenant(),
    tenancy.tenant_scope(),
    tenancy.flag(text),
    tenancy.config(text),
    tenancy.valid_tenant_id(text),
    tenancy.grant_tenant(regrole, text, text),
    tenancy.revoke_tenant(regrole, text),
    tenancy._grant_tenant(oid, text, text),
    tenancy._revoke_tenant(oid, text),
    tenancy.protect(regclass, name, boolean),
    tenancy._protect(oid, text, boolean),
    tenancy.protect_schema(name, name, boolean),
    tenancy._protect_schema(text, text, boolean),
    tenancy.policy_sql(regclass, name),
    tenancy._policy_sql(oid, text),
    tenancy.truncate_guard(),
    tenancy._guard_exempt(oid),
    tenancy._guard_ddl(),
    tenancy._guard_drop(),
    tenancy.encrypt(bytea, text),
    tenancy.encrypt(text, text),
    tenancy.decrypt(bytea, text),
    tenancy.decrypt_text(bytea, text),
    tenancy.rewrap(bytea, text),
    tenancy.key_version(bytea),
    tenancy.blind_index(text, text),
    tenancy.active_key_version(),
    tenancy.cipher_implementation(),
    tenancy.reencrypt(regclass, name, text, integer),
    tenancy._write_denied(text)
TO PUBLIC;
-- The auditor reads the log and the reports; pruning stays with superusers.
GRANT SELECT ON tenancy.audit_log TO tenancy_auditor;
GRANT EXECUTE ON FUNCTION tenancy.unexpected_denials(interval), tenancy.audit_status() TO tenancy_auditor;
