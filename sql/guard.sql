-- The guard: what a weakened protection looks like, the event triggers that refuse it, the
-- functions that run over protected rows and their approval (src/protect/guard.rs has the Rust
-- half; what "weakening" means is decided here, on the catalogs as DDL leaves them).

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
        WHEN NOT coalesce((SELECT co.collisdeterministic FROM pg_collation co WHERE co.oid = a.attcollation), true)
            THEN 'the tenant column has a nondeterministic collation: two tenant ids could compare equal'
        WHEN EXISTS (SELECT 1 FROM pg_rewrite w WHERE w.ev_class = c.oid AND w.rulename <> '_RETURN')
            THEN 'a rule was added: it could copy or redirect every tenant''s rows'
        WHEN EXISTS (SELECT 1 FROM pg_inherits i JOIN tenancy.protected_tables q ON q.rel = i.inhparent
                      WHERE i.inhrelid = c.oid AND q.tenant_column <> p.tenant_column)
            THEN 'its protected parent uses another tenant column: through the parent its rows would answer to other tenants'
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
    SELECT 'pg_constraint'::regclass, k.oid, 'domain ' || k.contypid::regtype::text || ' of column ' || quote_ident(a.attname)
      FROM pg_attribute a JOIN pg_constraint k ON k.contypid = a.atttypid
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
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

-- Foreign keys of a protected table whose actions change its rows (CASCADE, SET NULL, SET DEFAULT)
-- from a table that is not protected, or that does not carry the tenant column at the same place
-- on both sides: PostgreSQL runs those actions as the table's owner without row security, so
-- whoever may change the referenced table changes every tenant's rows.
CREATE FUNCTION tenancy._cascading_keys(rel regclass, tenant_column name)
RETURNS TABLE (constraint_name name, referenced regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT k.conname, k.confrelid::regclass
      FROM pg_constraint k
      JOIN pg_attribute aa ON aa.attrelid = k.conrelid AND aa.attname = $2
      LEFT JOIN tenancy.protected_tables b ON b.rel = k.confrelid
      LEFT JOIN pg_attribute ba ON ba.attrelid = b.rel AND ba.attname = b.tenant_column
     WHERE k.conrelid = $1 AND k.contype = 'f'
       AND (k.confupdtype NOT IN ('a', 'r') OR k.confdeltype NOT IN ('a', 'r'))
       AND NOT (b.rel IS NOT NULL
                AND array_position(k.conkey, aa.attnum) IS NOT NULL
                AND array_position(k.conkey, aa.attnum) = array_position(k.confkey, ba.attnum))
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
    IF NOT tenancy._guard_on() THEN
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
            IF NOT tenancy._invoker_is_superuser()
               AND EXISTS (SELECT 1 FROM tenancy.protected_tables q, tenancy._cascading_keys(q.rel, q.tenant_column)
                            WHERE q.rel = r.relid) THEN
                PERFORM tenancy._refuse_weakening(r.relid::oid,
                    'a foreign key of a protected table cascades from a table that is not protected (or not '
                    'on the tenant column): changing that table would change every tenant''s rows');
            END IF;
        ELSE
            SELECT p.tenant_column INTO parent_col
              FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
             WHERE i.inhrelid = r.relid
             LIMIT 1;
            IF parent_col IS NOT NULL THEN
                -- a new partition or child of a protected table (CREATE ... PARTITION OF,
                -- INHERITS, or ALTER TABLE ... INHERIT)
                IF NOT tenancy._invoker_is_superuser() AND tenancy._holds_rows(r.relid) THEN
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
            -- (children already protected must agree with it: same column, nothing weakened)
            FOR ch IN
                SELECT i.inhrelid FROM pg_inherits i JOIN tenancy.protected_tables q ON q.rel = i.inhrelid
                 WHERE i.inhparent = r.relid AND tenancy._protection_problem(i.inhrelid) IS NOT NULL
            LOOP
                PERFORM tenancy._refuse_weakening(ch.inhrelid::oid, tenancy._protection_problem(ch.inhrelid));
            END LOOP;
            FOR ch IN
                SELECT i.inhrelid, p.tenant_column
                  FROM pg_inherits i JOIN tenancy.protected_tables p ON p.rel = i.inhparent
                 WHERE i.inhparent = r.relid
                   AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables q WHERE q.rel = i.inhrelid)
            LOOP
                IF NOT tenancy._invoker_is_superuser() AND tenancy._holds_rows(ch.inhrelid) THEN
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
    -- a partition or child of a protected table that is not a plain table (a foreign table) holds
    -- rows outside any policy: refused
    FOR r IN
        SELECT i.inhrelid, i.inhparent
          FROM pg_event_trigger_ddl_commands() d
          JOIN pg_inherits i ON d.classid = 'pg_class'::regclass AND (i.inhrelid = d.objid OR i.inhparent = d.objid)
          JOIN tenancy.protected_tables p ON p.rel = i.inhparent
          JOIN pg_class c ON c.oid = i.inhrelid
         WHERE c.relkind NOT IN ('r', 'p')
    LOOP
        PERFORM tenancy._refuse_weakening(r.inhparent::oid,
            'a foreign table (or any relation that is not a table) cannot be a partition or child of a '
            'protected table: its rows live outside the policies');
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
    IF NOT tenancy._guard_on() THEN
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

