//! The denial log: every cross-tenant attempt is recorded, and the record survives the
//! rollback of the statement that made the attempt.
//!
//! A backend that sees an event copies it into a bounded queue in shared memory (never
//! blocking: when the queue is full the event is counted as overflowed) and writes one
//! structured line to the server log. A background worker per database drains the queue into
//! `tenancy.audit_log` in its own transactions, so the row exists whatever becomes of the
//! transaction that caused it. Workers are started on demand by the first event of a database
//! and leave after a few idle seconds (a worker connected to a database would otherwise block
//! `DROP DATABASE`). A clean shutdown drains the queue before the workers exit.
//!
//! What an event carries: names and ids only (event, role, tenants, relation, command,
//! SQLSTATE, query id, pid) and a fixed detail chosen here. Never row values, query text,
//! parameters, plaintext, tokens or keys.
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{c_char, c_int, CStr, CString};

use crate::catalog;
use crate::error::TenancyError;

mod queue;
pub mod sql;
mod worker;

pub use queue::init;

/// Event names, as stored in `tenancy.audit_log.event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    NoContext = 1,
    CrossTenantWrite = 2,
    CrossTenantProbe = 3,
    ForbiddenTenant = 4,
    BypassRead = 5,
    PolicyTamper = 6,
    ReadOnlyWrite = 7,
    WrongTenantKey = 8,
    ProtectedDdl = 9,
    TenantRestored = 10,
    LimitExceeded = 11,
    TenantLockdown = 12,
    TenantUnlock = 13,
    TenantPurged = 14,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::NoContext => "no_context",
            Event::CrossTenantWrite => "cross_tenant_write",
            Event::CrossTenantProbe => "cross_tenant_probe",
            Event::ForbiddenTenant => "forbidden_tenant",
            Event::BypassRead => "bypass_read",
            Event::PolicyTamper => "policy_tamper",
            Event::ReadOnlyWrite => "read_only_write",
            Event::WrongTenantKey => "wrong_tenant_key",
            Event::ProtectedDdl => "protected_ddl",
            Event::TenantRestored => "tenant_restored",
            Event::LimitExceeded => "limit_exceeded",
            Event::TenantLockdown => "tenant_lockdown",
            Event::TenantUnlock => "tenant_unlock",
            Event::TenantPurged => "tenant_purged",
        }
    }
    fn from_u8(v: u8) -> Option<Event> {
        Some(match v {
            1 => Event::NoContext,
            2 => Event::CrossTenantWrite,
            3 => Event::CrossTenantProbe,
            4 => Event::ForbiddenTenant,
            5 => Event::BypassRead,
            6 => Event::PolicyTamper,
            7 => Event::ReadOnlyWrite,
            8 => Event::WrongTenantKey,
            9 => Event::ProtectedDdl,
            10 => Event::TenantRestored,
            11 => Event::LimitExceeded,
            12 => Event::TenantLockdown,
            13 => Event::TenantUnlock,
            14 => Event::TenantPurged,
            _ => return None,
        })
    }
}


/// Set in the drain worker and in prune_audit: the audit log's guard trigger lets their
/// writes through and nothing else.
pub(crate) static WRITER: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
pub(crate) static PRUNING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// Depth of recording: an event raised while one is being recorded is not recorded again.
static RECORDING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// Set while pg_tenancy itself reads protected tables as a superuser (a backup, a restore): those
/// reads are recorded as what they are (`tenancy.backups`, `tenant_restored`), not as
/// `bypass_read` events, one per table.
static QUIET_BYPASS: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// While alive, superuser reads of protected tables are not recorded as `bypass_read`.
pub struct QuietBypassReads(bool);

impl QuietBypassReads {
    pub fn new() -> Self {
        QuietBypassReads(QUIET_BYPASS.with(|q| q.replace(true)))
    }
}

impl Default for QuietBypassReads {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for QuietBypassReads {
    fn drop(&mut self) {
        QUIET_BYPASS.with(|q| q.set(self.0));
    }
}

/// Whether superuser reads are being made by pg_tenancy itself (see [`QuietBypassReads`]).
pub fn bypass_reads_quiet() -> bool {
    QUIET_BYPASS.with(|q| q.get())
}

/// The protected table the statement running now writes (InvalidOid when none), for events
/// raised while it runs (set once per statement by the permission hook).
static WRITE_TARGET: crate::util::Backend<Cell<pg_sys::Oid>> = crate::util::Backend::new(Cell::new(pg_sys::InvalidOid));
/// How the session's tenant is named in events (set by the context feature at start-up, so
/// that this floor imports nothing above it).
static SESSION_TENANT: crate::util::Backend<Cell<fn() -> String>> = crate::util::Backend::new(Cell::new(String::new));

/// The protected table the statement running now writes.
pub fn write_target() -> pg_sys::Oid {
    WRITE_TARGET.with(|w| w.get())
}

pub fn set_write_target(rel: pg_sys::Oid) {
    WRITE_TARGET.with(|w| w.set(rel));
}

/// Register how events name the session's tenant.
/// How to name the tenant this backend verified for the role running now (for the per-tenant
/// denial counter: an unverified context value, which anyone can set, never counts).
pub fn set_verified_tenant(f: fn() -> Option<String>) {
    VERIFIED_TENANT.with(|s| s.set(f));
}

static VERIFIED_TENANT: crate::util::Backend<Cell<fn() -> Option<String>>> = crate::util::Backend::new(Cell::new(|| None));

pub fn set_session_tenant(f: fn() -> String) {
    SESSION_TENANT.with(|s| s.set(f));
}

fn session_tenant() -> String {
    SESSION_TENANT.with(|s| s.get())()
}

/// A tenant id as it may appear in the log: ids that do not have the shape of a tenant id
/// (anything a caller typed) are not copied.
pub fn loggable_tenant(s: &str) -> String {
    if pg_tenancy_core::tenant_id::valid(s) {
        s.to_string()
    } else if s.is_empty() {
        String::new()
    } else {
        "(not a tenant id)".to_string()
    }
}


fn current_command() -> String {
    // SAFETY: ActivePortal is NULL or a valid portal of this backend.
    unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() {
            return String::new();
        }
        let tag = pg_sys::GetCommandTagName((*portal).commandTag);
        if tag.is_null() {
            String::new()
        } else {
            CStr::from_ptr(tag).to_string_lossy().into_owned()
        }
    }
}

fn current_role() -> String {
    // SAFETY: syscache lookup of the current user id; noerr = true.
    unsafe {
        // The role the session acts as (after SET ROLE), not the owner of a SECURITY DEFINER
        // function that happens to be running (the guard's event triggers are such functions);
        // during a migration step, the step's role.
        let n = pg_sys::GetUserNameFromId(crate::util::acting_role(), true);
        if n.is_null() {
            String::new()
        } else {
            CStr::from_ptr(n).to_string_lossy().into_owned()
        }
    }
}

// (pgrx does not bind these: its own reports always add a CONTEXT line and the statement.)
unsafe extern "C-unwind" {
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
}

/// One line in the server log only (never sent to the client), without the statement text
/// (which may carry values) or the error context.
pub fn log_line(msg: &str) {
    let msg = CString::new(msg.replace('\0', "")).unwrap_or_default();
    // SAFETY: the standard errstart/errmsg_internal/errfinish sequence at LOG_SERVER_ONLY, which
    // returns; "%s" keeps the message from being read as a format.
    unsafe {
        if errstart(pg_sys::LOG_SERVER_ONLY as c_int, std::ptr::null()) {
            pg_sys::errmsg_internal(c"%s".as_ptr(), msg.as_ptr());
            pg_sys::errhidestmt(true);
            pg_sys::errhidecontext(true);
            errfinish(c"audit.rs".as_ptr(), line!() as c_int, c"pg_tenancy_audit".as_ptr());
        }
    }
}


/// Record a refusal and raise it: one path, so that the event's SQLSTATE is the error's.
pub fn deny(event: Event, rel: pg_sys::Oid, attempted: Option<&str>, detail: &str, error: TenancyError) -> ! {
    record(event, rel, attempted, &error.sqlstate_text(), detail);
    error.raise()
}

/// Record one event. `sqlstate` is the refusal the statement gets ("00000" when it is not
/// refused), `detail` a fixed description written here, never a value from the statement.
pub fn record(event: Event, rel: pg_sys::Oid, attempted: Option<&str>, sqlstate: &str, detail: &str) {
    if RECORDING.with(|r| r.replace(true)) {
        return;
    }
    let _reset = crate::util::OnDrop(|| RECORDING.with(|r| r.set(false)));
    let tenant = session_tenant();
    if !matches!(
        event,
        Event::TenantRestored
            | Event::ProtectedDdl
            | Event::LimitExceeded
            | Event::TenantLockdown
            | Event::TenantUnlock
            | Event::TenantPurged
            | Event::BypassRead
    ) {
        if let Some(t) = VERIFIED_TENANT.with(|v| v.get())() {
            crate::stats::count_denial(&t);
        }
    }
    let attempted = attempted.map(loggable_tenant).unwrap_or_default();
    let relation = catalog::relation_name(rel);
    let command = current_command();
    let role = current_role();
    // SAFETY: plain reads of backend globals.
    let (at, db, pid, query_id) = unsafe {
        (pg_sys::GetCurrentTimestamp(), pg_sys::MyDatabaseId, pg_sys::MyProcPid, pg_sys::pgstat_get_my_query_id() as i64)
    };

    let queued = queue::enqueue(&queue::Entry {
        event: event as u8,
        at,
        query_id,
        db,
        pid,
        sqlstate,
        command: &command,
        role: &role,
        tenant: &tenant,
        attempted: &attempted,
        relation: &relation,
        detail,
    });
    let line = serde_json::json!({
        "event": event.name(),
        "role": role,
        "tenant": tenant,
        "attempted_tenant": attempted,
        "relation": relation,
        "command": command,
        "sqlstate": sqlstate,
        "query_id": query_id,
        "pid": pid,
        "detail": detail,
        "queued": !queued.overflow && queue::available(),
    });
    log_line(&format!(
        "pg_tenancy audit{}: {line}",
        if queued.overflow { " (queue full, not written to tenancy.audit_log)" } else { "" }
    ));
    if let Some(latch) = queued.wake {
        if !latch.is_null() {
            // SAFETY: the latch is a PGPROC latch in shared memory, valid while the server runs.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
    if queued.start_writer {
        worker::register_writer(db);
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn only_tenant_shaped_ids_are_logged() {
        assert_eq!(loggable_tenant("acme-1"), "acme-1");
        assert_eq!(loggable_tenant(""), "");
        assert_eq!(loggable_tenant("x'; DROP TABLE t;--"), "(not a tenant id)");
        assert_eq!(loggable_tenant("line\nbreak"), "(not a tenant id)");
    }

    #[pg_test]
    fn sqlstates_are_spelled_out() {
        use crate::error::TenancyError;
        assert_eq!(TenancyError::NoContext.sqlstate_text(), "28000");
        assert_eq!(TenancyError::NotPermitted.sqlstate_text(), "42501");
        assert_eq!(TenancyError::ReadOnly.sqlstate_text(), "25006");
        assert_eq!(TenancyError::CiphertextInvalid.sqlstate_text(), "22000");
    }

    #[pg_test]
    fn event_names_round_trip() {
        for e in [
            Event::NoContext,
            Event::CrossTenantWrite,
            Event::CrossTenantProbe,
            Event::ForbiddenTenant,
            Event::BypassRead,
            Event::PolicyTamper,
            Event::ReadOnlyWrite,
            Event::WrongTenantKey,
            Event::ProtectedDdl,
        ] {
            assert_eq!(Event::from_u8(e as u8), Some(e));
        }
        assert_eq!(Event::from_u8(0), None);
    }
}
