//! Which roles may enter which tenants, and with what scope.
//!
//! A superuser grants anything, including the explicit all-tenants grant `'*'` (reported by
//! `tenancy.check()`). A role holding `admin` scope in a tenant may grant and revoke access to
//! that tenant only, and only while its context is that tenant: admins never cross tenants.
use pgrx::prelude::*;

use pg_tenancy_core::model::Scope;

use crate::catalog;
use crate::context;
use crate::error::{OrRaise, Result, TenancyError};

fn authorize(tenant: &str) -> Result<()> {
    // SAFETY: superuser() reads the current role's catalog entry.
    if unsafe { pg_sys::superuser() } {
        return Ok(());
    }
    if tenant == "*" {
        return Err(TenancyError::Denied("only a superuser may grant or revoke all tenants"));
    }
    match context::resolve() {
        Ok(v) if v.tenant == tenant && v.scope == Scope::Admin => Ok(()),
        _ => Err(TenancyError::Denied("only a superuser, or an admin working inside that tenant, may change its grants")),
    }
}

fn check_tenant_arg(tenant: Option<&str>) -> Result<&str> {
    match tenant {
        Some("*") => Ok("*"),
        Some(t) if context::valid_tenant_id(t) => Ok(t),
        Some(_) => Err(TenancyError::InvalidTenantId),
        None => Err(TenancyError::InvalidArgument("tenant")),
    }
}

/// `tenancy.grant_tenant(role regrole, tenant text, scope text)` (SQL wrapper in finalize.sql).
#[pg_extern(volatile, parallel_unsafe)]
fn _grant_tenant(role: Option<pg_sys::Oid>, tenant: Option<&str>, scope: Option<&str>) {
    let role = role.ok_or(TenancyError::InvalidArgument("role")).or_raise();
    let tenant = check_tenant_arg(tenant).or_raise();
    let scope = scope
        .and_then(Scope::parse)
        .ok_or(TenancyError::InvalidArgument("scope (read, read_write or admin)"))
        .or_raise();
    authorize(tenant).or_raise();
    if tenant != "*" && !catalog::tenants::tenant_exists(tenant).or_raise() {
        TenancyError::UnknownTenant.raise();
    }
    // SAFETY: GetUserId reads a backend-local variable.
    let grantor = unsafe { pg_sys::GetUserId() };
    catalog::tenants::grant(role, tenant, scope.as_str(), grantor).or_raise();
}

/// `tenancy.revoke_tenant(role regrole, tenant text)`: returns whether a grant was removed.
#[pg_extern(volatile, parallel_unsafe)]
fn _revoke_tenant(role: Option<pg_sys::Oid>, tenant: Option<&str>) -> bool {
    let role = role.ok_or(TenancyError::InvalidArgument("role")).or_raise();
    let tenant = check_tenant_arg(tenant).or_raise();
    authorize(tenant).or_raise();
    catalog::tenants::revoke(role, tenant).or_raise()
}
