//! pg_tenancy: tenant isolation carried by PostgreSQL itself.
//!
//! The crate is layered; imports point down (scripts/check_layout.py fails on any that point up
//! or go round in a cycle):
//! 1. `util`, `error` (the SQLSTATE contract), `gucs` (every setting); and, outside this crate,
//!    `pg_tenancy_core` (tenant ids, scopes and statuses, tokens, the ciphertext envelope and key
//!    wrapping, the protection's statements: logic that needs no PostgreSQL);
//! 2. `catalog`: every statement pg_tenancy runs on its own tables (and PostgreSQL's), typed,
//!    search_path-proof, as the owner where it must be, with fresh snapshots where access is
//!    decided; and the per-backend set of protected tables;
//! 3. `audit`: the denial log (event, shared-memory queue, writer workers, SQL surface);
//! 4. `context`: the tenant context (the setting, verification, grants, held cursors);
//! 5. `crypto` (per-tenant keys and encryption) and `protect` (generated policies, the guard,
//!    probes, EXPLAIN);
//! 6. `hooks` (thin dispatchers into the features) and `invalidate` (every cache and what drops
//!    it).
use pgrx::prelude::*;

pub mod audit;
pub mod backup;
pub mod catalog;
pub mod context;
pub mod crypto;
pub mod error;
pub mod gucs;
pub mod hooks;
pub mod invalidate;
pub mod migrations;
pub mod protect;
pub mod stats;
pub mod usage;
pub mod util;

::pgrx::pg_module_magic!();

// Tables are created first; the SQL that refers to functions generated from Rust comes after
// them (requires), feature by feature; privileges last.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/tenants.sql",
    name = "tenants",
    requires = ["schema", context::sql::valid_tenant_id_sql, invalidate::_invalidate, context::grants::_grant_tenant, context::grants::_revoke_tenant]
);
extension_sql_file!(
    "../sql/crypto.sql",
    name = "crypto",
    requires = ["tenants", crypto::active_key_version, crypto::key_version, crypto::rewrap]
);
extension_sql_file!(
    "../sql/protect.sql",
    name = "protect",
    requires = ["crypto", protect::_protect, protect::_unprotect, protect::_protect_schema, protect::_policy_sql]
);
extension_sql_file!(
    "../sql/guard.sql",
    name = "guard",
    requires = [
        "protect",
        protect::guard::_guard_exempt,
        protect::guard::_refuse_weakening,
        protect::guard::_refuse_unapproved,
        protect::guard::truncate_guard,
        protect::guard::_record_protected_ddl,
        protect::guard::_invoker_is_superuser,
        protect::guard::_expr_leaks,
        protect::guard::_holds_rows,
        protect::guard::_guard_on,
        audit::sql::_in_extension_script,
        audit::sql::_refuse_audit_change,
    ]
);
extension_sql_file!("../sql/audit.sql", name = "audit", requires = ["guard", audit::sql::_audit_log_guard]);
extension_sql_file!(
    "../sql/backup.sql",
    name = "backup",
    requires = [
        "audit",
        backup::_restore_check,
        backup::_restore_stage,
        backup::_restore_swap,
        backup::_wait_for_writers,
        backup::_record_restore,
        backup::_restore_error_is_ours,
    ]
);
extension_sql_file!(
    "../sql/check.sql",
    name = "check",
    requires = ["backup", audit::sql::_audit_available, audit::sql::_audit_overflowed]
);
extension_sql_file!(
    "../sql/usage.sql",
    name = "usage",
    requires = [
        "check",
        usage::_stats,
        usage::reset_stats,
        usage::metrics,
        usage::meter,
        usage::stats_status,
        usage::_quantile_ms,
        usage::_record_incident,
        usage::measure_storage,
        crypto::rotate_key,
    ]
);
extension_sql_file!("../sql/migrations.sql", name = "migrations", requires = ["usage", migrations::_run_step]);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reads a backend-global flag.
    util::set_preloaded(unsafe { pg_sys::process_shared_preload_libraries_in_progress });
    util::set_loading(true);
    gucs::init(gucs::Hooks {
        tenant_check: Some(context::check_tenant_guc),
        tenant_assign: Some(context::on_tenant_assign),
        verification_string: Some(invalidate::on_verification_setting),
        verification_int: Some(invalidate::on_verification_setting_int),
        master_key: Some(invalidate::on_master_key_setting),
    });
    util::set_loading(false);
    invalidate::init();
    context::init();
    hooks::install();
    audit::init();
    stats::init();
    usage::http::init();
    usage::worker::init();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_tenancy'"]
    }
}
