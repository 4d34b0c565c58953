//! pg_tenancy: tenant isolation carried by PostgreSQL itself.
//!
//! One module per capability a user can name:
//! - [`gucs`]: every `pg_tenancy.*` setting;
//! - [`context`]: the tenant context (`set_tenant`, `set_tenant_token`, `current_tenant`, ...);
//! - [`token`]: HS256 token verification for the signed context;
//! - [`crypto`]: per-tenant keys, encryption bound to tenant and context, rotation, shredding;
//! - [`catalog`]: reads and writes of the extension's own tables, as their owner;
//! - [`grants`]: which roles may enter which tenants, with which scope;
//! - [`protect`]: generated row-level-security policies and the guard that keeps them;
//! - [`hooks`]: the executor hooks that refuse protected tables without a context and see probes;
//! - [`audit`]: the denial log (shared-memory queue, writer workers, `tenancy.audit_log`);
//! - [`error`]: every error the extension raises, with its SQLSTATE, detail and hint.
use pgrx::prelude::*;

pub mod audit;
pub mod catalog;
pub mod context;
pub mod crypto;
pub mod cursors;
pub mod error;
pub mod explain;
pub mod gcm;
pub mod grants;
pub mod gucs;
pub mod hooks;
pub mod probe;
pub mod protect;
pub mod tenant_id;
pub mod token;

::pgrx::pg_module_magic!();

// Tables, helper functions and roles that are plain SQL live in sql/ and are placed around the
// functions pgrx generates from Rust.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// Runs its closure when dropped, also while unwinding from a PostgreSQL error: for backend
/// flags that must not outlive the call that set them.
pub(crate) struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    context::init();
    hooks::install();
    explain::init();
    crypto::init();
    audit::init();
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_tenancy'"]
    }
}
