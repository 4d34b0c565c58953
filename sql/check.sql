-- tenancy.check(): the pre-go-live checklist items the database can verify itself.

CREATE FUNCTION tenancy.check()
RETURNS TABLE (severity text, object text, problem text, fix text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
WITH prot AS (
    SELECT p.rel, p.tenant_column,
           (SELECT a.attnum FROM pg_attribute a
             WHERE a.attrelid = p.rel AND a.attname = p.tenant_column AND NOT a.attisdropped) AS attnum
      FROM tenancy.protected_tables p
), col AS (
    SELECT coalesce(nullif(current_setting('pg_tenancy.tenant_column', true), ''), 'tenant_id')::name AS name
), dbspc AS (
    SELECT s.spcname FROM pg_database d JOIN pg_tablespace s ON s.oid = d.dattablespace
     WHERE d.datname = current_database()
), parts AS (
    -- each tenant of each partition of a protected table list-partitioned by the tenant column,
    -- with the tablespace its region maps to (tenancy.region_tablespaces; 'default' tenants:
    -- anywhere)
    SELECT i.inhrelid AS part, t.id AS tenant, t.region, rt.tablespace AS wanted
      FROM prot p
      JOIN pg_partitioned_table pp ON pp.partrelid = p.rel AND pp.partstrat = 'l'
                                  AND pp.partnatts = 1 AND pp.partattrs[0] = p.attnum
      JOIN pg_inherits i ON i.inhparent = p.rel
      JOIN pg_class c ON c.oid = i.inhrelid
      -- (the bound's values: quoted text or uuid, or bare integers)
     CROSS JOIN LATERAL regexp_matches(pg_get_expr(c.relpartbound, c.oid), '''([^'']*)''|(-?[0-9]+)', 'g') m
      JOIN tenancy.tenants t ON t.id = coalesce(m[1], m[2]) AND t.region <> 'default'
      JOIN tenancy.region_tablespaces rt ON rt.region = t.region
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
    -- foreign keys into tables that are not protected on a paired tenant column
    SELECT 'ERROR', format('constraint %I on %s', ck.constraint_name, p.rel),
           'foreign key references ' || ck.referenced::text
               || ' without pairing two protected tenant columns: its actions change every tenant''s '
               || 'rows as the table''s owner, and its checks tell whoever deletes from it which keys other tenants hold',
           'Make the key (tenant column, ...) on both sides with a protected referenced table.'
      FROM prot p CROSS JOIN LATERAL tenancy._cascading_keys(p.rel, p.tenant_column) ck
    UNION ALL
    -- statistics functions that count other tenants' rows for whoever calls them
    SELECT 'WARNING', 'function ' || f.oid::regprocedure::text,
           'per-relation statistics are executable by PUBLIC: their counters (tuples fetched by a '
               || 'session''s own scans, for instance) count rows of other tenants',
           format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC; GRANT EXECUTE ON FUNCTION %s TO pg_read_all_stats;',
                  f.oid::regprocedure, f.oid::regprocedure)
      FROM pg_proc f
     WHERE f.pronamespace = 'pg_catalog'::regnamespace
       AND f.proname ~ '^pg_stat_get_' AND f.pronargs = 1 AND f.proargtypes[0] = 'oid'::regtype
       AND has_function_privilege('public', f.oid, 'EXECUTE')
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
     WHERE NOT tenancy._guard_on()
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
    -- foreign keys into protected tables that do not pair a protected tenant column with theirs
    SELECT 'ERROR', format('constraint %I on %s', k.conname, k.conrelid::regclass),
           'foreign key to protected table ' || k.confrelid::regclass::text
               || CASE WHEN a.rel IS NULL THEN ' from a table that is not protected'
                       ELSE ' does not pair the two tenant columns' END
               || ': its check runs without row security, so a row that references another '
               || 'tenant''s key tells whether that row exists',
           'Protect the referencing table and make the key (tenant column, ...) on both sides, with a matching unique constraint.'
      FROM pg_constraint k
      JOIN prot b ON b.rel = k.confrelid
      LEFT JOIN prot a ON a.rel = k.conrelid
     WHERE k.contype = 'f' AND k.conparentid = 0
       AND a.rel IS NULL  -- (from a protected table: listed with its other foreign keys)
       AND NOT (a.attnum IS NOT NULL AND b.attnum IS NOT NULL
                AND array_position(k.conkey, a.attnum) IS NOT NULL
                AND array_position(k.conkey, a.attnum) = array_position(k.confkey, b.attnum))
    UNION ALL
    -- views over protected tables that run unapproved functions on each tenant's reads or writes
    SELECT DISTINCT 'WARNING', 'function ' || vf.fn::text,
           'runs on every tenant''s reads or writes through ' || vf.via
               || ', which reads a protected table, and no superuser approved it',
           format('SELECT tenancy.approve_function(%L, ''<why it is safe>''); -- after reviewing it',
                  vf.fn::text)
      FROM pg_class v
     CROSS JOIN LATERAL tenancy._view_functions(v.oid) vf
     WHERE v.relkind IN ('v', 'm') AND NOT vf.approved
       AND v.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    UNION ALL
    -- roles other than the owner that may add triggers to, or point foreign keys at, a protected table
    SELECT 'WARNING', format('privilege %s on %s', x.privilege_type, p.rel),
           'role ' || quote_ident(x.grantee) || ' holds ' || x.privilege_type || ' on protected table '
               || p.rel::text || CASE x.privilege_type
                   WHEN 'TRIGGER' THEN ': pg_tenancy refuses its triggers, but it should not hold it'
                   ELSE ': a foreign key of its onto the table would tell whether other tenants'' rows exist' END,
           format('REVOKE %s ON %s FROM %s;', x.privilege_type, p.rel, quote_ident(x.grantee))
      FROM prot p
      JOIN pg_class c ON c.oid = p.rel
     CROSS JOIN LATERAL (SELECT CASE WHEN a.grantee = 0 THEN 'public' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type
                           FROM aclexplode(c.relacl) a
                          WHERE a.privilege_type IN ('TRIGGER', 'REFERENCES') AND a.grantee <> c.relowner) x(grantee, privilege_type)
    UNION ALL
    -- statistics of expression indexes (pg_stats) readable by PUBLIC: their samples are every tenant's values
    SELECT 'ERROR', 'view pg_catalog.pg_stats',
           'PUBLIC may read pg_stats: the statistics of an expression index on a protected table '
               || '(most common values, histograms) sample every tenant''s rows, and its owner sees them',
           'REVOKE SELECT ON pg_catalog.pg_stats FROM PUBLIC; GRANT SELECT ON pg_catalog.pg_stats TO pg_read_all_stats;'
     WHERE has_table_privilege('public', 'pg_catalog.pg_stats', 'SELECT')
       AND EXISTS (SELECT 1 FROM prot)
    UNION ALL
    -- unique constraints without the tenant column
    SELECT 'WARNING', i.indexrelid::regclass::text,
           'unique index or exclusion constraint on protected table ' || p.rel::text
               || ' does not include the tenant column: a conflict error tells a tenant '
               || 'that another tenant has that value',
           format('Make it unique on (%I, ...) instead.', p.tenant_column)
      FROM pg_index i
      JOIN prot p ON p.rel = i.indrelid
     WHERE (i.indisunique OR i.indisexclusion) AND NOT (p.attnum = ANY (i.indkey::int2[]))
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
    -- data residency: rows of a tenant of another region in this cluster (as last measured)
    SELECT 'ERROR', 'tenant ' || t.id,
           format('tenant of region %s has %s rows in this cluster, which serves region %s (as measure_storage() last counted them)',
                  t.region, s.rows, current_setting('pg_tenancy.region', true)),
           CASE WHEN t.status = 'offboarded'
                THEN format('SELECT tenancy.purge_tenant(%L);  -- once its archive is kept elsewhere', t.id)
                ELSE format('-- move it to a cluster of region %s: docs/RUNBOOK.md, "Move a tenant to another region"', t.region) END
      FROM tenancy.tenants t
      JOIN tenancy.tenant_storage s ON s.tenant = t.id
     WHERE coalesce(current_setting('pg_tenancy.region', true), '') <> ''
       AND t.region NOT IN ('default', current_setting('pg_tenancy.region', true))
       AND s.rows > 0
    UNION ALL
    -- data residency within the cluster: a partition (and its indexes) outside the tablespace
    -- of its tenants' region
    SELECT CASE WHEN count(DISTINCT x.wanted) > 1 THEN 'ERROR' ELSE 'WARNING' END,
           x.part::regclass::text,
           CASE WHEN count(DISTINCT x.wanted) > 1
                THEN format('partition holds tenants of %s regions with different tablespaces: it cannot be in each one''s tablespace',
                            count(DISTINCT x.region))
                ELSE format('partition of region %s is in tablespace %s, not in its region''s %s',
                            min(x.region), min(x.spc), min(x.wanted)) END,
           CASE WHEN count(DISTINCT x.wanted) > 1
                THEN '-- one partition per region (or per tenant)'
                ELSE format('ALTER TABLE %s SET TABLESPACE %I;', x.part::regclass, min(x.wanted)) END
      FROM (SELECT pa.*, coalesce((SELECT s.spcname FROM pg_tablespace s WHERE s.oid = c.reltablespace),
                                  (SELECT spcname FROM dbspc)) AS spc
              FROM parts pa JOIN pg_class c ON c.oid = pa.part) x
     GROUP BY x.part
    HAVING count(DISTINCT x.wanted) > 1 OR min(x.wanted) <> min(x.spc)
    UNION ALL
    SELECT 'WARNING', ix.indexrelid::regclass::text,
           format('index of a partition of region %s is in tablespace %s, not in its region''s %s',
                  min(pa.region), coalesce(min(s.spcname), min(d.spcname)), min(pa.wanted)),
           format('ALTER INDEX %s SET TABLESPACE %I;', ix.indexrelid::regclass, min(pa.wanted))
      FROM parts pa
      JOIN pg_index ix ON ix.indrelid = pa.part
      JOIN pg_class ic ON ic.oid = ix.indexrelid
      LEFT JOIN pg_tablespace s ON s.oid = ic.reltablespace
     CROSS JOIN dbspc d
     GROUP BY ix.indexrelid
    HAVING count(DISTINCT pa.wanted) = 1 AND min(pa.wanted) <> coalesce(min(s.spcname), min(d.spcname))
    UNION ALL
    SELECT 'WARNING', 'setting pg_tenancy.region',
           format('%s tenants declare a region but this cluster declares none: data residency is not enforced', count(*)),
           'ALTER SYSTEM SET pg_tenancy.region = ''<region>''; SELECT pg_reload_conf();'
      FROM tenancy.tenants t
     WHERE t.region <> 'default' AND t.status <> 'offboarded'
       AND coalesce(current_setting('pg_tenancy.region', true), '') = ''
    HAVING count(*) > 0
    UNION ALL
    -- backups (once the database uses them): every tenant backed up and its restore drilled
    SELECT 'WARNING', 'tenant ' || t.id, 'no backup of the tenant kept here in the last 8 days',
           format('SELECT tenancy.backup(%L);  -- and schedule it (docs/BACKUPS.md)', t.id)
      FROM tenancy.tenants t
     WHERE t.status IN ('active', 'read_only') AND EXISTS (SELECT 1 FROM tenancy.backups)
       AND NOT EXISTS (SELECT 1 FROM tenancy.backups b WHERE b.tenant = t.id AND b.location NOT IN ('exported', 'imported')
                          AND b.created_at > now() - interval '8 days')
    UNION ALL
    SELECT 'WARNING', 'tenant ' || t.id, 'no successful restore drill of the tenant in the last 8 days',
           format('SELECT tenancy.drill(%L);  -- and schedule it weekly', t.id)
      FROM tenancy.tenants t
     WHERE t.status IN ('active', 'read_only') AND EXISTS (SELECT 1 FROM tenancy.drills)
       AND NOT EXISTS (SELECT 1 FROM tenancy.drills d WHERE d.tenant = t.id AND d.ok AND d.at > now() - interval '8 days')
    UNION ALL
    SELECT 'ERROR', 'tenant ' || r.tenant,
           format('a restore started %s did not finish (its session ended): the tenant stays %s', r.started_at, t.status),
           format('SELECT tenancy.resume_tenant(%L);', r.tenant)
      FROM tenancy.restores r JOIN tenancy.tenants t ON t.id = r.tenant
     WHERE r.state = 'running' AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid AND a.backend_start <= r.started_at)
    UNION ALL
    SELECT 'WARNING', 'setting pg_tenancy.tenant_key_command',
           format('%s tenant keys are not bound to their tenant''s own key: a shred would not reach copies of them', count(*)),
           'SELECT tenancy.rotate_master_key();'
      FROM tenancy.keys k
     WHERE coalesce(current_setting('pg_tenancy.tenant_key_command', true), '') <> ''
       AND k.wrapped IS NOT NULL AND k.kek_id NOT LIKE '%+tenant:%'
    HAVING count(*) > 0
    UNION ALL
    SELECT 'ERROR', 'setting track_commit_timestamp', 'change capture is on but commit times are not kept: incremental backups will be refused',
           'ALTER SYSTEM SET track_commit_timestamp = on;  -- then restart the server'
     WHERE EXISTS (SELECT 1 FROM tenancy.change_capture WHERE disabled_at IS NULL)
       AND current_setting('track_commit_timestamp') = 'off'
    UNION ALL
    -- migrations by cohort: tenants whose step failed, and roles that can no longer run steps
    SELECT 'WARNING', 'migration ' || l.migration,
           format('%s tenant(s) failed its per-tenant step (SQLSTATE %s); they stay on the version before',
                  count(*), string_agg(DISTINCT l.sqlstate, ', ' ORDER BY l.sqlstate)),
           format('SELECT tenant, sqlstate FROM tenancy.migration_ledger WHERE migration = %L AND state = ''failed''; -- then CALL tenancy.migrate(%L, ...) again', l.migration, l.migration)
      FROM tenancy.migration_ledger l
     WHERE l.state = 'failed'
     GROUP BY l.migration
    UNION ALL
    SELECT 'ERROR', 'migration ' || m.name,
           'its ddl_as or run_as role no longer exists, is a superuser, or (run_as) bypasses row security: its steps are refused',
           'Register the migration again (tenancy.add_migration) with roles that are neither.'
      FROM tenancy.migrations m
     WHERE m.contracted_at IS NULL
       AND (NOT EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = m.ddl_as AND NOT a.rolsuper)
            OR (m.run_as IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM pg_authid a WHERE a.oid = m.run_as AND NOT a.rolsuper AND NOT a.rolbypassrls)))
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


