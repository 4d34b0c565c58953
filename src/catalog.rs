//! Reads and writes of the extension's own tables (`tenancy.tenants`, `tenancy.grants`, ...).
//!
//! Those tables are not readable by application roles (that would list every tenant to every
//! tenant), so lookups run as the owner of the extension's schema for the duration of one SPI
//! call. Every query here is search_path-proof: objects and operators are schema-qualified, so a
//! caller's `search_path` cannot substitute its own `=` while we run with the owner's rights.
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::{Cell, RefCell};

use crate::error::{Result, TenancyError};

/// OIDs of the extension's schema owner and catalog tables in this database.
#[derive(Clone, Copy, Debug)]
pub struct CatalogIds {
    pub owner: pg_sys::Oid,
    pub tenants: pg_sys::Oid,
    pub grants: pg_sys::Oid,
    pub protected: pg_sys::Oid,
    pub keys: pg_sys::Oid,
}

thread_local! {
    static IDS: Cell<Option<CatalogIds>> = const { Cell::new(None) };
}

/// Forget the cached OIDs (called on relcache invalidation).
pub fn forget() {
    IDS.with(|c| c.set(None));
}

pub fn cached_ids() -> Option<CatalogIds> {
    IDS.with(|c| c.get())
}

/// The catalog OIDs, looked up once per backend and again after an invalidation.
pub fn ids() -> Result<CatalogIds> {
    if let Some(ids) = cached_ids() {
        return Ok(ids);
    }
    let row = Spi::connect(|client| -> std::result::Result<_, pgrx::spi::Error> {
        let t = client.select(
            "SELECT n.nspowner, \
                    pg_catalog.to_regclass('tenancy.tenants')::pg_catalog.oid, \
                    pg_catalog.to_regclass('tenancy.grants')::pg_catalog.oid, \
                    pg_catalog.to_regclass('tenancy.protected_tables')::pg_catalog.oid, \
                    pg_catalog.to_regclass('tenancy.keys')::pg_catalog.oid \
               FROM pg_catalog.pg_extension e \
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
              WHERE e.extname OPERATOR(pg_catalog.=) 'pg_tenancy'",
            Some(1),
            &[],
        )?;
        if t.is_empty() {
            return Ok(None);
        }
        let t = t.first();
        Ok(Some((
            t.get::<pg_sys::Oid>(1)?,
            t.get::<pg_sys::Oid>(2)?,
            t.get::<pg_sys::Oid>(3)?,
            t.get::<pg_sys::Oid>(4)?,
            t.get::<pg_sys::Oid>(5)?,
        )))
    })
    .unwrap_or(None);
    match row {
        Some((Some(owner), Some(tenants), Some(grants), Some(protected), Some(keys))) => {
            let ids = CatalogIds { owner, tenants, grants, protected, keys };
            IDS.with(|c| c.set(Some(ids)));
            Ok(ids)
        }
        _ => Err(TenancyError::NotInstalled),
    }
}

/// Restores the caller's user id and security context when dropped, also while unwinding.
struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned before the switch.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

/// Run `f` as the owner of the extension's schema, as a security-restricted operation.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> Result<R> {
    let ids = ids()?;
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: plain reads and writes of the backend's current user id; the guard restores it,
    // and PostgreSQL itself restores it if the transaction aborts.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        pg_sys::SetUserIdAndSecContext(
            ids.owner,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let _restore = RestoreUser { user, sec_context };
    Ok(f())
}

/// What the catalog says about one tenant, as seen by one role.
#[derive(Debug, Clone)]
pub struct TenantAccess {
    /// `None` when the tenant does not exist.
    pub status: Option<String>,
    pub config: Option<String>,
    /// Scopes of every grant that lets the role in (exact tenant or '*'), through membership.
    pub scopes: Vec<String>,
}

const TENANT_ACCESS_SQL: &str = "SELECT t.status, t.config::pg_catalog.text, \
        ARRAY(SELECT g.scope FROM tenancy.grants g \
               WHERE (g.tenant OPERATOR(pg_catalog.=) $1 OR g.tenant OPERATOR(pg_catalog.=) '*') \
                 AND pg_catalog.pg_has_role($2, g.role::pg_catalog.oid, 'USAGE')) \
   FROM (SELECT 1) AS one \
   LEFT JOIN tenancy.tenants t ON t.id OPERATOR(pg_catalog.=) $1";

thread_local! {
    /// The tenant lookup, prepared once per backend (a lookup costs ~140 us parsed and planned
    /// each time, a few us prepared; bench/README.md). Tagged with the catalog it was planned
    /// against, and replaced at its next use when that catalog is recreated.
    static TENANT_ACCESS_PLAN: RefCell<Option<(pg_sys::Oid, OwnedPreparedStatement)>> =
        const { RefCell::new(None) };
}

pub fn tenant_access(tenant: &str, role: pg_sys::Oid) -> Result<TenantAccess> {
    let tenants_rel = ids()?.tenants;
    as_owner(|| {
        Spi::connect(|client: &SpiClient| -> std::result::Result<_, pgrx::spi::Error> {
            let stale = TENANT_ACCESS_PLAN.with(|p| p.borrow().as_ref().map(|(rel, _)| *rel) != Some(tenants_rel));
            if stale {
                let plan = client
                    .prepare(TENANT_ACCESS_SQL, &[PgOid::from(pg_sys::TEXTOID), PgOid::from(pg_sys::OIDOID)])?
                    .keep();
                TENANT_ACCESS_PLAN.with(|p| *p.borrow_mut() = Some((tenants_rel, plan)));
            }
            let t = TENANT_ACCESS_PLAN.with(|p| -> std::result::Result<_, pgrx::spi::Error> {
                let p = p.borrow();
                let (_, plan) = p.as_ref().expect("prepared above");
                let t = client.select(plan, Some(1), &[tenant.into(), role.into()])?.first();
                Ok((t.get::<String>(1)?, t.get::<String>(2)?, t.get::<Vec<String>>(3)?))
            })?;
            Ok(TenantAccess { status: t.0, config: t.1, scopes: t.2.unwrap_or_default() })
        })
        .unwrap_or_else(|e| pgrx::error!("pg_tenancy catalog lookup failed: {e}"))
    })
}

pub fn tenant_exists(tenant: &str) -> Result<bool> {
    as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT 1 FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1)",
            &[tenant.into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false)
    })
}
