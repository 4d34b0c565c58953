-- Protection: the functions table owners call (the work is in src/protect/mod.rs; these give
-- the arguments their SQL types).

-- The tenant as the type of its argument (text, varchar, uuid, integer or bigint; its value is
-- ignored). Policies compare the tenant column with it; in the plan of a statement on a
-- protected table each call becomes a parameter filled once when the statement starts
-- (src/protect/param.rs). The domains type those parameters' slots, and mark them: no value of
-- SQL's can have them (NOT NULL and CHECK (false)), so no other slot is ever mistaken for one.
CREATE FUNCTION tenancy.current_tenant(anyelement) RETURNS anyelement
LANGUAGE c STABLE PARALLEL SAFE AS 'MODULE_PATHNAME', 'tenancy_current_tenant_as';
CREATE DOMAIN tenancy._param_text AS pg_catalog.text NOT NULL CONSTRAINT no_value CHECK (false);
CREATE DOMAIN tenancy._param_int4 AS pg_catalog.int4 NOT NULL CONSTRAINT no_value CHECK (false);
CREATE DOMAIN tenancy._param_int8 AS pg_catalog.int8 NOT NULL CONSTRAINT no_value CHECK (false);
CREATE DOMAIN tenancy._param_uuid AS pg_catalog.uuid NOT NULL CONSTRAINT no_value CHECK (false);
-- An unused slot of this type marks a plan that compares a tenant column with a constant or a
-- bound parameter: the probe check looks at those plans only when they start.
CREATE DOMAIN tenancy._probe_mark AS pg_catalog.int4 NOT NULL CONSTRAINT no_value CHECK (false);
REVOKE USAGE ON DOMAIN tenancy._param_text, tenancy._param_int4, tenancy._param_int8, tenancy._param_uuid,
    tenancy._probe_mark FROM PUBLIC;

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

