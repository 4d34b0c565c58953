-- Protection: the functions table owners call (the work is in src/protect/mod.rs; these give
-- the arguments their SQL types).

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

