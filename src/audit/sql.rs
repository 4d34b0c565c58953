//! The audit log's SQL surface: counters, pruning, the append-only trigger, and what the guard
//! and `check()` ask.
use pgrx::prelude::*;

use super::queue::{available, Locked, FREE, QUEUE_CAPACITY};
use super::{Event, PRUNING, WRITER};
use crate::catalog;
use crate::error::TenancyError;

fn require_preload() {
    if !available() {
        TenancyError::PreloadRequired.raise();
    }
}

/// Queue counters: queued now, recorded since start, written, overflowed, discarded, workers.
#[pg_extern(volatile, parallel_safe)]
fn audit_status() -> TableIterator<
    'static,
    (
        name!(queued, i64),
        name!(queued_here, i64),
        name!(capacity, i64),
        name!(recorded, i64),
        name!(written, i64),
        name!(overflowed, i64),
        name!(discarded, i64),
        name!(writers, i32),
        name!(writer_starts, i64),
        name!(writer_start_failures, i64),
    ),
> {
    require_preload();
    let row = {
        let q = Locked::acquire().expect("checked by require_preload");
        let q = &*q.0;
        // SAFETY: reads this backend's database id.
        let here: u32 = unsafe { pg_sys::MyDatabaseId }.into();
        (
            (q.head - q.tail) as i64,
            (q.tail..q.head).filter(|&seq| q.slot(seq).state != FREE && q.slot(seq).db == here).count() as i64,
            QUEUE_CAPACITY as i64,
            q.recorded as i64,
            q.written as i64,
            q.overflowed as i64,
            q.discarded as i64,
            q.drainers.iter().filter(|d| d.db != 0 && d.pid != 0).count() as i32,
            q.worker_starts as i64,
            q.worker_start_failures as i64,
        )
    };
    TableIterator::once(row)
}

/// The only way rows leave tenancy.audit_log: delete those older than `older_than`.
#[pg_extern(volatile, parallel_unsafe)]
fn prune_audit(older_than: Option<pgrx::datum::Interval>) -> i64 {
    require_preload();
    let older_than = older_than.unwrap_or_else(|| TenancyError::InvalidArgument("older_than").raise());
    // SAFETY: superuser() reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::Denied("only a superuser prunes the audit log").raise();
    }
    PRUNING.with(|p| p.set(true));
    let _reset = crate::util::OnDrop(|| PRUNING.with(|p| p.set(false)));
    catalog::audit_log::prune(older_than).unwrap_or_else(|e| e.raise())
}

/// Trigger of tenancy.audit_log: append-only. Only the drain worker inserts (or a superuser
/// restoring a dump with pg_tenancy.guard = off); only prune_audit deletes; nobody updates.
#[pg_trigger]
fn _audit_log_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    use pgrx::PgTriggerOperation as Op;
    let op = trigger.op()?;
    let allowed = match op {
        // SAFETY: superuser() reads the current role's catalog entry.
        Op::Insert => WRITER.with(|w| w.get()) || (!crate::gucs::guard() && unsafe { pg_sys::superuser() }),
        Op::Delete => PRUNING.with(|p| p.get()),
        _ => false,
    };
    if !allowed {
        super::deny(Event::PolicyTamper, trigger.relation()?.oid(), None, "attempt to modify the audit log", TenancyError::AuditAppendOnly);
    }
    Ok(match op {
        Op::Delete => trigger.old(),
        _ => trigger.new(),
    })
}

/// Whether events reach tenancy.audit_log (pg_tenancy is preloaded); read by tenancy.check().
#[pg_extern(stable, parallel_safe)]
fn _audit_available() -> bool {
    available()
}

/// Events that overflowed the queue since the server started (NULL without preload).
#[pg_extern(volatile, parallel_safe)]
fn _audit_overflowed() -> Option<i64> {
    Locked::acquire().map(|q| q.0.overflowed as i64)
}

/// Called by the guard event trigger for DDL on tenancy.audit_log outside extension scripts.
#[pg_extern(volatile, parallel_unsafe)]
fn _refuse_audit_change() {
    let rel = catalog::audit_log::relation().unwrap_or(pg_sys::InvalidOid);
    super::deny(Event::PolicyTamper, rel, None, "attempt to alter the audit log", TenancyError::AuditAppendOnly);
}

/// Whether the current command runs inside CREATE/ALTER EXTENSION's script.
#[pg_extern(stable, parallel_safe)]
fn _in_extension_script() -> bool {
    // SAFETY: reads a backend-global flag.
    unsafe { pg_sys::creating_extension }
}
