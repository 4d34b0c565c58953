-- The guard: what a weakened protection looks like, the event triggers that refuse it, the
-- functions that run over protected rows and their approval (src/protect/guard.rs has the Rust
-- half; what "weakening" means is decided here, on the catalogs as DDL leaves them).

-- The generated policies of a table, as text, for the guard to compare with what protect() made.
CREATE FUNCTION tenancy._policy_fingerprint(rel regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT string_agg(concat_ws('|', p.polname, p.polcmd, p.polpermissive, p.polroles::text,
                                pg_get_expr(p.polqual, p.polrelid),
                                pg_get_expr(p.polwithcheck, p.polrelid)), E'\n' ORDER BY p.polname)
      FROM pg_policy p
     WHERE p.polrelid = $1 AND p.polname IN ('tenancy_isolation', 'tenancy_write_guard')
$$;

-- What, if anything, weakens the protection of a protected table; NULL when intact.
CREATE FUNCTION tenancy._protection_problem(rel regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
        WHEN EXISTS (SELECT 1 FROM pg_trigger t
                      WHERE t.tgrelid = c.oid AND t.tgfoid = 'tenancy._capture()'::regprocedure
                        AND NOT (t.tgname = 'tenancy_capture' AND t.tgtype = 29 AND t.tgqual IS NULL
                                 AND t.tgattr = ''::int2vector))
            THEN 'a trigger other than pg_tenancy''s tenancy_capture calls tenancy._capture(), or it was redefined'
        WHEN EXISTS (SELECT 1 FROM tenancy.change_capture k WHERE k.disabled_at IS NULL)
         AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                          WHERE t.tgrelid = c.oid AND t.tgname = 'tenancy_capture'
                            AND t.tgfoid = 'tenancy._capture()'::regprocedure AND t.tgenabled IN ('O', 'A'))
            THEN 'the change capture trigger was dropped or disabled, or the partition detached (incremental backups would miss changes)'
        END
      FROM tenancy.protected_tables p
      LEFT JOIN pg_class c ON c.oid = p.rel
      LEFT JOIN pg_attribute a ON a.attrelid = p.rel AND a.attname = p.tenant_column
                              AND NOT a.attisdropped
     WHERE p.rel = $1
$$;

-- Supported tenant column types for auto-protection.
CREATE FUNCTION tenancy._has_tenant_column(rel regclass, col name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = $1 AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.atttypid IN ('text'::regtype, 'varchar'::regtype, 'uuid'::regtype,
                                         'int4'::regtype, 'int8'::regtype))
$$;


-- The fingerprint of a function's definition: an approval holds for this definition only.
-- Redefining the function, changing its owner (whose rights a SECURITY DEFINER function runs
-- with), its volatility, leakproofness or settings lapses the approval.
CREATE FUNCTION tenancy._function_fingerprint(fn oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT encode(sha256(convert_to(concat_ws(E'\n', p.proowner::regrole::text, p.prosecdef::text,
                  p.proleakproof::text, p.provolatile::text, p.proconfig::text, p.prolang::regproc::text,
                  l.lanname::text, pg_get_function_identity_arguments(p.oid), p.probin, p.prosrc,
                  p.prosqlbody::text, p.prorettype::regtype::text, p.proretset::text, p.proparallel::text,
                  p.prosupport::text, p.prokind::text), 'UTF8')), 'hex')
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.oid = $1
$$;

-- Whether a function needs a superuser's approval before it may run over protected rows: every
-- function except pg_tenancy's and PostgreSQL's own that are immutable or stable (they change
-- nothing: what they see goes nowhere but into the statement) or among a few volatile ones whose
-- effects no one else can observe (clocks, gen_random_uuid, the built-in trigger functions). In a column's or a domain's default (which
-- sees no row), nextval and random are harmless too; anywhere a row is seen they are a channel
-- (a shared sequence, or the random state of the session validating a constraint).
-- set_config, pg_notify, query_to_xml, setval, lo_from_bytea and the like can carry what they
-- see elsewhere: they need approval everywhere.
CREATE FUNCTION tenancy._needs_approval(f oid, in_default boolean DEFAULT false) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT NOT (p.pronamespace = 'tenancy'::regnamespace
                OR (p.oid < 16384
                    AND (p.provolatile IN ('i', 's')
                         OR p.oid = ANY (ARRAY['pg_catalog.now()'::regprocedure,
                                               'pg_catalog.clock_timestamp()'::regprocedure,
                                               'pg_catalog.statement_timestamp()'::regprocedure,
                                               'pg_catalog.transaction_timestamp()'::regprocedure,
                                               'pg_catalog.gen_random_uuid()'::regprocedure,
                                               'pg_catalog.suppress_redundant_updates_trigger()'::regprocedure,
                                               'pg_catalog.tsvector_update_trigger()'::regprocedure,
                                               'pg_catalog.tsvector_update_trigger_column()'::regprocedure]::oid[])
                         OR ($2 AND p.oid = ANY (ARRAY['pg_catalog.nextval(regclass)'::regprocedure,
                                                      'pg_catalog.random()'::regprocedure]::oid[])))))
      FROM pg_proc p WHERE p.oid = $1
$$;

-- Whether a superuser approved the function as it is now defined and owned.
CREATE FUNCTION tenancy._approved(f oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT EXISTS (SELECT 1 FROM tenancy.approved_functions a
                    WHERE a.fn = $1 AND a.fingerprint = tenancy._function_fingerprint($1))
$$;

-- The functions an expression (a pg_node_tree, as text) calls: by function, operator,
-- aggregate or window function. (PostgreSQL records no dependency on its own functions, so the
-- expression itself is read.)
CREATE FUNCTION tenancy._functions_in(expr text) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT m[1]::oid
      FROM regexp_matches(coalesce($1, ''), ':(?:funcid|opfuncid|aggfnoid|winfnoid) ([0-9]+)', 'g') m
    UNION
    SELECT op.oprcode::oid
      FROM regexp_matches(coalesce($1, ''), ':opno ([0-9]+)', 'g') m
      JOIN pg_operator op ON op.oid = m[1]::oid
    UNION
    SELECT op.oprcode::oid
      FROM regexp_matches(coalesce($1, ''), ':opnos \(o([ 0-9]+)\)', 'g') m
     CROSS JOIN LATERAL regexp_split_to_table(btrim(m[1]), ' +') x
      JOIN pg_operator op ON op.oid = x::oid
$$;

-- The functions an object calls, as (fn, via): those its expression names, and those it depends
-- on in pg_depend (directly or through an operator).
CREATE FUNCTION tenancy._functions_of(classid oid, objid oid, via text, expr text)
RETURNS TABLE (fn oid, via text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT f, $3 FROM tenancy._functions_in($4) f
    UNION
    SELECT d.refobjid, $3
      FROM pg_depend d
     WHERE d.classid = $1 AND d.objid = $2 AND d.refclassid = 'pg_proc'::regclass
    UNION
    SELECT op.oprcode::oid, $3
      FROM pg_depend d JOIN pg_operator op ON op.oid = d.refobjid
     WHERE d.classid = $1 AND d.objid = $2 AND d.refclassid = 'pg_operator'::regclass
$$;

-- The types an expression (a pg_node_tree, as text) names that are not PostgreSQL's own.
CREATE FUNCTION tenancy._types_in(expr text) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT DISTINCT m[1]::oid
      FROM regexp_matches(coalesce($1, ''), ':[a-z_]*type[a-z_]* ([0-9]+)', 'g') m
     WHERE m[1]::oid >= 16384
$$;

-- The code types run, for the types given and every type they are built on (a domain's base, an
-- array's element, a composite type's attributes, a range's subtype, the types their
-- constraints and defaults name), as (fn, via, in_default): domain constraints, domain defaults,
-- a range's canonical and subtype_diff functions.
CREATE FUNCTION tenancy._type_functions(types oid[])
RETURNS TABLE (fn oid, via text, in_default boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
WITH RECURSIVE ts(t, depth) AS (
    SELECT DISTINCT x, 0 FROM unnest($1) x WHERE x >= 16384
    UNION
    SELECT n.next, ts.depth + 1
      FROM ts JOIN pg_type ty ON ty.oid = ts.t
     CROSS JOIN LATERAL (SELECT nullif(ty.typbasetype, 0)
                         UNION ALL SELECT nullif(ty.typelem, 0)
                         UNION ALL SELECT ca.atttypid FROM pg_attribute ca
                                    WHERE ca.attrelid = ty.typrelid AND ty.typrelid <> 0
                                      AND ca.attnum > 0 AND NOT ca.attisdropped
                         UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid
                         UNION ALL SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = ty.oid
                         UNION ALL SELECT x FROM pg_constraint k, tenancy._types_in(k.conbin::text) x
                                    WHERE k.contypid = ty.oid
                         UNION ALL SELECT x FROM tenancy._types_in(ty.typdefaultbin::text) x) n(next)
     WHERE n.next IS NOT NULL AND n.next >= 16384 AND ts.depth < 16
)
SELECT f, 'constraint of type ' || ts.t::regtype::text, false
  FROM ts JOIN pg_constraint k ON k.contypid = ts.t CROSS JOIN LATERAL tenancy._functions_in(k.conbin::text) f
UNION
SELECT f, 'default of type ' || ts.t::regtype::text, true
  FROM ts JOIN pg_type ty ON ty.oid = ts.t CROSS JOIN LATERAL tenancy._functions_in(ty.typdefaultbin::text) f
UNION
SELECT r.rngcanonical::oid, 'range type ' || ts.t::regtype::text, false
  FROM ts JOIN pg_range r ON r.rngtypid = ts.t WHERE r.rngcanonical <> 0
UNION
SELECT r.rngsubdiff::oid, 'range type ' || ts.t::regtype::text, false
  FROM ts JOIN pg_range r ON r.rngtypid = ts.t WHERE r.rngsubdiff <> 0
$$;

-- Functions that run over a protected table's rows and need a superuser's approval
-- (_needs_approval): called by its index expressions and predicates, CHECK and exclusion
-- constraints, triggers (function and WHEN clause), extended statistics, column defaults and
-- generated columns, the partition key, the constraints of its columns' domains (at any depth,
-- arrays and composite types included) and policies other than pg_tenancy's. Index builds,
-- constraint validation, ANALYZE and table rewrites run them with the owner's rights over every
-- tenant's rows; triggers and defaults run them in every tenant's writes, with that tenant's
-- context; a restrictive policy runs them before the tenant filter. Roles other than superusers
-- cannot add them unapproved (the guard refuses the DDL); tenancy.check() lists any there are.
CREATE FUNCTION tenancy._row_functions(rel regclass)
RETURNS TABLE (fn regprocedure, via text, approved boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
WITH objs(classid, objid, via, expr, in_default) AS (
    SELECT 'pg_class'::regclass::oid, i.indexrelid, 'index ' || i.indexrelid::regclass::text,
           concat(i.indexprs::text, i.indpred::text), false
      FROM pg_index i WHERE i.indrelid = $1
    UNION ALL
    SELECT 'pg_class'::regclass::oid, $1::oid, 'partition key',
           (SELECT pt.partexprs::text FROM pg_partitioned_table pt WHERE pt.partrelid = $1), false
    UNION ALL
    SELECT 'pg_constraint'::regclass::oid, c.oid, 'constraint ' || quote_ident(c.conname),
           concat(c.conbin::text, ' ', (SELECT string_agg(':opno ' || x::text, ' ') FROM unnest(c.conexclop) x)), false
      FROM pg_constraint c WHERE c.conrelid = $1
    UNION ALL
    SELECT 'pg_trigger'::regclass::oid, t.oid, 'trigger ' || quote_ident(t.tgname),
           concat(':funcid ', t.tgfoid::text, ' ', t.tgqual::text), false
      FROM pg_trigger t WHERE t.tgrelid = $1 AND NOT t.tgisinternal
    UNION ALL
    SELECT 'pg_policy'::regclass::oid, p.oid, 'policy ' || quote_ident(p.polname),
           concat(p.polqual::text, p.polwithcheck::text), false
      FROM pg_policy p WHERE p.polrelid = $1
    UNION ALL
    SELECT 'pg_statistic_ext'::regclass::oid, s.oid, 'statistics ' || quote_ident(s.stxname), s.stxexprs::text, false
      FROM pg_statistic_ext s WHERE s.stxrelid = $1
    UNION ALL
    SELECT 'pg_attrdef'::regclass::oid, d.oid,
           CASE WHEN a.attgenerated <> '' THEN 'generated column ' ELSE 'default of column ' END || quote_ident(a.attname),
           d.adbin::text, a.attgenerated = ''
      FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
     WHERE d.adrelid = $1
), types AS (
    -- the columns' types, and the types the expressions above name
    SELECT array_agg(DISTINCT t) AS ts FROM (
        SELECT a.atttypid AS t FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT x FROM objs o CROSS JOIN LATERAL tenancy._types_in(o.expr) x) u
), fns AS (
    SELECT f.fn, f.via, o.in_default
      FROM objs o CROSS JOIN LATERAL tenancy._functions_of(o.classid, o.objid, o.via, o.expr) f
    UNION ALL
    SELECT tf.fn, tf.via, tf.in_default FROM types CROSS JOIN LATERAL tenancy._type_functions(types.ts) tf
)
SELECT DISTINCT fns.fn::regprocedure, fns.via, tenancy._approved(fns.fn)
  FROM fns WHERE tenancy._needs_approval(fns.fn, fns.in_default)
$$;

-- Tables with a column of type t, or of a type built on it (a domain over it, an array of it, a
-- composite type with an attribute of it), at any depth.
CREATE FUNCTION tenancy._tables_using_type(t oid) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
WITH RECURSIVE users(t, depth) AS (
    SELECT $1, 0
    UNION
    SELECT x.t, u.depth + 1
      FROM users u
     CROSS JOIN LATERAL (SELECT ty.oid FROM pg_type ty WHERE ty.typbasetype = u.t OR ty.typelem = u.t
                         UNION ALL
                         SELECT c.reltype FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                          WHERE a.atttypid = u.t AND c.relkind = 'c' AND a.attnum > 0 AND NOT a.attisdropped) x(t)
     WHERE u.depth < 16
)
SELECT DISTINCT a.attrelid
  FROM users u JOIN pg_attribute a ON a.atttypid = u.t AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_class c ON c.oid = a.attrelid AND c.relkind IN ('r', 'p')
$$;

-- Views (and the triggers on them) that call functions needing approval: in a database with
-- protected tables, a view reads them (directly, through other views, or through the functions
-- it calls), and put in an application's path it would run its functions on every tenant's
-- reads and writes, with that tenant's context.
CREATE FUNCTION tenancy._view_functions(view regclass)
RETURNS TABLE (fn regprocedure, via text, approved boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
WITH objs(classid, objid, via, expr) AS (
    SELECT 'pg_rewrite'::regclass::oid, w.oid, 'view ' || $1::text, concat(w.ev_qual::text, w.ev_action::text)
      FROM pg_rewrite w WHERE w.ev_class = $1
    UNION ALL
    SELECT 'pg_trigger'::regclass::oid, t.oid, 'trigger ' || quote_ident(t.tgname) || ' on view ' || $1::text,
           concat(':funcid ', t.tgfoid::text, ' ', t.tgqual::text)
      FROM pg_trigger t WHERE t.tgrelid = $1 AND NOT t.tgisinternal
), types AS (
    SELECT array_agg(DISTINCT x) AS ts FROM objs o CROSS JOIN LATERAL tenancy._types_in(o.expr) x
), fns AS (
    SELECT f.fn, f.via, false AS in_default
      FROM objs o CROSS JOIN LATERAL tenancy._functions_of(o.classid, o.objid, o.via, o.expr) f
    UNION ALL
    SELECT tf.fn, tf.via, tf.in_default FROM types CROSS JOIN LATERAL tenancy._type_functions(types.ts) tf
)
SELECT DISTINCT fns.fn::regprocedure, fns.via, tenancy._approved(fns.fn)
  FROM fns WHERE tenancy._needs_approval(fns.fn, fns.in_default)
$$;

-- Foreign keys into a protected table from a table that is not protected, or whose key does not
-- pair its own tenant column with the referenced one: the key's check runs as the referenced
-- table's owner without row security, so inserting a row that references another tenant's key
-- tells whether that row exists.
CREATE FUNCTION tenancy._keys_into_protected(rel regclass)
RETURNS TABLE (constraint_name name, referenced regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT k.conname, k.confrelid::regclass
      FROM pg_constraint k
      JOIN tenancy.protected_tables q ON q.rel = k.confrelid
      JOIN pg_attribute qa ON qa.attrelid = q.rel AND qa.attname = q.tenant_column
     WHERE k.conrelid = $1 AND k.contype = 'f'
       AND NOT EXISTS (
           SELECT 1 FROM tenancy.protected_tables p
             JOIN pg_attribute pa ON pa.attrelid = p.rel AND pa.attname = p.tenant_column
            WHERE p.rel = k.conrelid
              AND array_position(k.conkey, pa.attnum) IS NOT NULL
              AND array_position(k.conkey, pa.attnum) = array_position(k.confkey, qa.attnum))
$$;

-- Foreign keys of a protected table into a table that is not protected, or that does not carry
-- the tenant column at the same place on both sides. Their CASCADE/SET NULL/SET DEFAULT actions
-- run as the table's owner without row security: whoever may change the referenced table
-- changes every tenant's rows. Their NO ACTION/RESTRICT checks too: deleting a referenced row
-- tells whether any tenant still references it. (The name is historical.)
CREATE FUNCTION tenancy._cascading_keys(rel regclass, tenant_column name)
RETURNS TABLE (constraint_name name, referenced regclass)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    SELECT k.conname, k.confrelid::regclass
      FROM pg_constraint k
      JOIN pg_attribute aa ON aa.attrelid = k.conrelid AND aa.attname = $2
      LEFT JOIN tenancy.protected_tables b ON b.rel = k.confrelid
      LEFT JOIN pg_attribute ba ON ba.attrelid = b.rel AND ba.attname = b.tenant_column
     WHERE k.conrelid = $1 AND k.contype = 'f'
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
                    'a foreign key of a protected table references a table that is not protected on a paired '
                    'tenant column: its actions would change every tenant''s rows, and its checks tell which keys '
                    'other tenants hold');
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
    -- foreign keys into a protected table, from a table that is not protected on a tenant column
    -- paired with the referenced one: the key check would tell whether another tenant's row exists
    -- (a table created with such a key on a column paired with the referenced tenant column is
    -- protected on that column, as a new partition is)
    FOR r IN
        SELECT d.objid AS relid, bool_or(d.command_tag = 'CREATE TABLE') AS created
          FROM pg_event_trigger_ddl_commands() d
         WHERE d.classid = 'pg_class'::regclass
           AND EXISTS (SELECT 1 FROM tenancy._keys_into_protected(d.objid))
         GROUP BY d.objid
    LOOP
        CONTINUE WHEN tenancy._guard_exempt(r.relid);
        IF r.created AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables WHERE rel = r.relid) THEN
            SELECT a.attname INTO parent_col
              FROM pg_constraint k
              JOIN tenancy.protected_tables q ON q.rel = k.confrelid
              JOIN pg_attribute qa ON qa.attrelid = q.rel AND qa.attname = q.tenant_column
              JOIN pg_attribute a ON a.attrelid = k.conrelid
                                 AND a.attnum = k.conkey[array_position(k.confkey, qa.attnum)]
             WHERE k.conrelid = r.relid AND k.contype = 'f'
             ORDER BY k.conname
             LIMIT 1;
            IF parent_col IS NOT NULL THEN
                PERFORM tenancy.protect(r.relid::regclass, parent_col);
            END IF;
        END IF;
        IF NOT tenancy._invoker_is_superuser() AND EXISTS (SELECT 1 FROM tenancy._keys_into_protected(r.relid)) THEN
            PERFORM tenancy._refuse_weakening(
                (SELECT k.referenced FROM tenancy._keys_into_protected(r.relid) k LIMIT 1)::oid,
                format('foreign key %s of %s references a protected table from a table that is not protected on a '
                       'tenant column paired with the referenced one: its check would tell whether another '
                       'tenant''s row exists (protect the referencing table and include its tenant column in the key)',
                       (SELECT string_agg(quote_ident(k.constraint_name), ', ') FROM tenancy._keys_into_protected(r.relid) k),
                       r.relid::regclass));
        END IF;
    END LOOP;
    -- code put over a protected table's rows (or over the rows a view of one reads) that no
    -- superuser approved: refused to other roles, recorded for superusers
    FOR r IN
        SELECT x.relid, string_agg(DISTINCT x.tag, ', ') AS tags
          FROM (SELECT CASE d.classid
                         WHEN 'pg_class'::regclass
                             THEN coalesce((SELECT i.indrelid FROM pg_index i WHERE i.indexrelid = d.objid), d.objid)
                         WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid)
                         WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = d.objid)
                         WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = d.objid)
                         WHEN 'pg_statistic_ext'::regclass
                             THEN (SELECT stxrelid FROM pg_statistic_ext WHERE oid = d.objid)
                       END AS relid,
                       d.command_tag AS tag
                  FROM pg_event_trigger_ddl_commands() d
                UNION ALL
                -- a domain's constraints run on every column of that type, at any depth
                SELECT u.rel, d.command_tag
                  FROM pg_event_trigger_ddl_commands() d
                 CROSS JOIN LATERAL tenancy._tables_using_type(d.objid) u(rel)
                 WHERE d.classid = 'pg_type'::regclass) x
         WHERE x.relid IS NOT NULL
         GROUP BY x.relid
    LOOP
        CONTINUE WHEN tenancy._guard_exempt(r.relid);
        fns := NULL;
        IF EXISTS (SELECT 1 FROM tenancy.protected_tables WHERE rel = r.relid) THEN
            SELECT string_agg(DISTINCT f.fn::text, ', ') INTO fns
              FROM tenancy._row_functions(r.relid) f WHERE NOT f.approved;
        ELSIF EXISTS (SELECT 1 FROM pg_class WHERE oid = r.relid AND relkind IN ('v', 'm')) THEN
            SELECT string_agg(DISTINCT f.fn::text, ', ') INTO fns
              FROM tenancy._view_functions(r.relid) f WHERE NOT f.approved;
        END IF;
        CONTINUE WHEN fns IS NULL;
        IF tenancy._invoker_is_superuser() THEN
            PERFORM tenancy._record_protected_ddl(r.relid::oid,
                left(r.tags || ' puts unapproved functions over every tenant''s rows: ' || fns, 200));
        ELSE
            PERFORM tenancy._refuse_unapproved(r.relid::oid, fns);
        END IF;
    END LOOP;
END
$$;

-- sql_drop: forget dropped tables; refuse dropping a generated policy, the TRUNCATE guard or
-- the tenant column of a protected table that stays.
CREATE FUNCTION tenancy._guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
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
LANGUAGE sql SET search_path = pg_catalog, pg_temp SET jit = off AS $$
    WITH d AS (DELETE FROM tenancy.approved_functions a WHERE a.fn = $1 RETURNING 1)
    SELECT count(*) > 0 FROM d
$$;

