//! How a migration's steps run (sql/migrations.sql): each as a role that is not a superuser,
//! inside a security-restricted operation, as PostgreSQL runs an index's functions as the
//! table's owner during VACUUM or ANALYZE. The step cannot SET ROLE, RESET ROLE or SET SESSION
//! AUTHORIZATION back to the superuser who called `migrate()`, and it cannot create temporary
//! objects that would outlive it in that session. Every setting it changes, `SET` without
//! `LOCAL` included, is rolled back when it ends. Its tenant context is pinned: a statement
//! under any other value is refused (42501), whatever the setting is changed to. The guard and
//! the audit log judge the step's role, not the superuser the session started as
//! (`util::acting_role`). On an error, the (sub)transaction's abort restores the role and the
//! settings. Not undone: session-level advisory locks the step takes or releases.
use pgrx::prelude::*;
use std::ffi::CString;

/// `tenancy._run_step(role, context, search_path, sql, allow_bypassrls)`: run `sql` as `role`
/// (never a superuser; nor a role that bypasses row security unless `allow_bypassrls`), in the
/// tenant context `context` (NULL: none; verified for `role` by the setting's check hook), with
/// `search_path` followed by `pg_temp` (NULL: `pg_catalog`).
#[pg_extern(volatile, parallel_unsafe)]
fn _run_step(role: pg_sys::Oid, context: Option<&str>, search_path: Option<&str>, sql: &str, allow_bypassrls: bool) {
    // SAFETY: catalog lookups by role oid; they raise as PostgreSQL errors.
    let (superuser, bypass) = unsafe { (pg_sys::superuser_arg(role), pg_sys::has_bypassrls_privilege(role)) };
    if superuser || (bypass && !allow_bypassrls) {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "a migration step may not run as a superuser or, per tenant, as a role that bypasses row security",
            "pg_tenancy",
        )
        .set_hint("Register the migration with run_as and ddl_as roles that are neither (tenancy.add_migration).")
        .report(PgLogLevel::ERROR);
    }
    let path = format!("{}, pg_temp", search_path.unwrap_or("pg_catalog"));
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
    // SAFETY: the user id and security context are restored below, and by the (sub)transaction's
    // abort on an error; the nest level's settings likewise.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec);
        let nest = pg_sys::NewGUCNestLevel();
        let restricted = (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32;
        pg_sys::SetUserIdAndSecContext(role, sec | restricted);
        // (from here on, a refusal, the context's included, is recorded against the step's role)
        let step = crate::util::step_as(role);
        set("search_path", &path);
        set("pg_tenancy.tenant", context.unwrap_or(""));
        {
            let _pin = crate::context::pin_context(context);
            Spi::run(sql).unwrap_or_else(|e| {
                pgrx::pg_sys::panic::ErrorReport::new(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string(), "pg_tenancy")
                    .report(PgLogLevel::ERROR);
                unreachable!()
            });
        }
        pg_sys::AtEOXact_GUC(false, nest);
        drop(step);
        pg_sys::SetUserIdAndSecContext(user, sec);
    }
}

/// Set a setting for the step (undone with its nest level).
///
/// # Safety
/// Called inside the step's GUC nest level, in a transaction.
unsafe fn set(name: &str, value: &str) {
    let (name, value) = (CString::new(name).unwrap_or_default(), CString::new(value).unwrap_or_default());
    // SAFETY: NUL-terminated strings; an invalid value raises as a PostgreSQL error.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
    }
}
