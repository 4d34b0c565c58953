//! `tenancy.tenants` and `tenancy.grants`: who may enter which tenant.
use pgrx::prelude::*;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

/// What the catalog says about one tenant, as seen by one role.
#[derive(Debug, Clone)]
pub struct TenantAccess {
    /// `None` when the tenant does not exist.
    pub status: Option<String>,
    pub config: Option<String>,
    /// The strongest scope of every grant that lets the role in (exact tenant or '*'), through
    /// membership (1 read, 2 read_write, 3 admin); `None` without one. Grants of roles that no
    /// longer exist do not count, nor do any for a role that no longer exists.
    pub best_scope: Option<i32>,
    /// The tenant's plan and the limits that apply to it (its own overrides, else its plan's).
    pub limits: crate::stats::Limits,
    /// The tenant's region (`default`: none declared).
    pub region: String,
}

const TENANT_ACCESS: Stmt = Stmt {
    sql: "SELECT t.status, t.config::pg_catalog.text, \
            (SELECT pg_catalog.max(CASE g.scope WHEN 'read' THEN 1 WHEN 'read_write' THEN 2 \
                                                 WHEN 'admin' THEN 3 END) \
               FROM tenancy.grants g \
              WHERE (g.tenant OPERATOR(pg_catalog.=) $1 OR g.tenant OPERATOR(pg_catalog.=) '*') \
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid a \
                             WHERE a.oid OPERATOR(pg_catalog.=) g.role::pg_catalog.oid) \
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid a \
                             WHERE a.oid OPERATOR(pg_catalog.=) $2) \
                AND pg_catalog.pg_has_role($2, g.role::pg_catalog.oid, 'USAGE')), \
            t.plan, COALESCE(l.statements_per_second, p.statements_per_second), \
            COALESCE(l.burst, p.burst), COALESCE(l.max_concurrent, p.max_concurrent), \
            p.pinned_stats, COALESCE(l.storage_bytes, p.storage_bytes), s.bytes, \
            COALESCE(s.bytes::pg_catalog.float8 OPERATOR(pg_catalog./) NULLIF(s.rows, 0), \
                     (SELECT pg_catalog.sum(a.bytes)::pg_catalog.float8 \
                             OPERATOR(pg_catalog./) NULLIF(pg_catalog.sum(a.rows), 0) \
                        FROM tenancy.tenant_storage a)), \
            t.region \
       FROM (SELECT 1) AS one \
       LEFT JOIN tenancy.tenants t ON t.id OPERATOR(pg_catalog.=) $1 \
       LEFT JOIN tenancy.plans p ON p.name OPERATOR(pg_catalog.=) t.plan \
       LEFT JOIN tenancy.limits l ON l.tenant OPERATOR(pg_catalog.=) t.id \
       LEFT JOIN tenancy.tenant_storage s ON s.tenant OPERATOR(pg_catalog.=) t.id",
    args: &[pg_sys::TEXTOID, pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

pub fn tenant_access(tenant: &str, role: pg_sys::Oid) -> Result<TenantAccess> {
    let row = one(&TENANT_ACCESS, &[arg(tenant), arg(role)], |r| TenantAccess {
        status: r.get::<String>(1),
        config: r.get::<String>(2),
        best_scope: r.get::<i32>(3),
        limits: crate::stats::Limits {
            plan: r.get::<String>(4).unwrap_or_default(),
            rate: r.get::<f64>(5).filter(|r| r.is_finite()).unwrap_or(0.0),
            burst: r.get::<f64>(6).filter(|b| b.is_finite()).unwrap_or(0.0),
            max_concurrent: r.get::<i32>(7).unwrap_or(0),
            pinned: r.get::<bool>(8).unwrap_or(false),
            storage_quota: r.get::<i64>(9).unwrap_or(0),
            storage_measured: r.get::<i64>(10).unwrap_or(0),
            bytes_per_row: r.get::<f64>(11).filter(|b| b.is_finite()).unwrap_or(0.0),
        },
        region: r.get::<String>(12).unwrap_or_else(|| "default".into()),
    })?;
    Ok(row.unwrap_or(TenantAccess {
        status: None,
        config: None,
        best_scope: None,
        limits: Default::default(),
        region: "default".into(),
    }))
}

const TENANT_REGION: Stmt = Stmt {
    sql: "SELECT region FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant's region (None: no such tenant).
pub fn tenant_region(tenant: &str) -> Result<Option<String>> {
    Ok(one(&TENANT_REGION, &[arg(tenant)], |r| r.get::<String>(1))?.flatten())
}

const SCHEMA_VERSION: Stmt = Stmt {
    sql: "SELECT schema_version FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant's schema version as of the statement's snapshot (None: no such tenant). Read at
/// each call rather than kept with the verification: a migration moves one tenant per
/// transaction, and sending every backend an invalidation for each would cost more than this.
pub fn schema_version(tenant: &str) -> Result<Option<i32>> {
    Ok(one(&SCHEMA_VERSION, &[arg(tenant)], |r| r.get::<i32>(1))?.flatten())
}

const TENANT_EXISTS: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1)",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// Whether `tenant` exists. Fails closed: an error is raised, never taken for `false`.
pub fn tenant_exists(tenant: &str) -> Result<bool> {
    Ok(one(&TENANT_EXISTS, &[arg(tenant)], |r| r.get::<bool>(1))?.flatten().unwrap_or(false))
}

const GRANT: Stmt = Stmt {
    sql: "INSERT INTO tenancy.grants (role, tenant, scope, granted_by) \
          VALUES ($1::pg_catalog.regrole, $2, $3, $4::pg_catalog.regrole) \
          ON CONFLICT (role, tenant) DO UPDATE \
             SET scope = EXCLUDED.scope, granted_by = EXCLUDED.granted_by, granted_at = pg_catalog.now()",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn grant(role: pg_sys::Oid, tenant: &str, scope: &str, grantor: pg_sys::Oid) -> Result<()> {
    run(&GRANT, &[arg(role), arg(tenant), arg(scope), arg(grantor)], |_| ())?;
    Ok(())
}

const REVOKE: Stmt = Stmt {
    sql: "DELETE FROM tenancy.grants \
           WHERE role::pg_catalog.oid OPERATOR(pg_catalog.=) $1 AND tenant OPERATOR(pg_catalog.=) $2 \
       RETURNING 1",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Remove a grant; whether there was one.
pub fn revoke(role: pg_sys::Oid, tenant: &str) -> Result<bool> {
    Ok(!run(&REVOKE, &[arg(role), arg(tenant)], |_| ())?.is_empty())
}

const FORGET_ROLE: Stmt = Stmt {
    sql: "DELETE FROM tenancy.grants WHERE role::pg_catalog.oid OPERATOR(pg_catalog.=) $1 RETURNING 1",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

/// Remove every grant of a dropped role (a later role must never inherit them by OID).
pub fn forget_role(role: pg_sys::Oid) -> Result<usize> {
    Ok(run(&FORGET_ROLE, &[arg(role)], |_| ())?.len())
}

