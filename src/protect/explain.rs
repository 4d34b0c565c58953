//! `EXPLAIN ANALYZE` of a statement on a protected table, by a role subject to its policies.
//!
//! Its counters describe rows the tenant filter removed: "Rows Removed by Filter" under an index
//! scan on another column counts the other tenants' rows in the searched range (a binary search
//! over such counts recovered exact values), and so, roughly, do buffer counts, heap fetches and
//! bitmap pages. `pg_tenancy.explain_analyze` decides (superuser setting):
//! - `refuse` (default): the statement is refused with 42501 before it runs, and recorded as
//!   `cross_tenant_probe`;
//! - `hide`: it runs, and the counters that can describe other tenants' rows are zeroed before
//!   the plan is printed (rows removed by filters, buffers, heap fetches, bitmap pages) in every
//!   node. Actual rows, loops and timing remain: timing is the residual channel (documented).
//!
//! Plain `EXPLAIN` runs nothing and shows estimates only, which are table-wide (README, Known
//! limits). Roles that bypass row security see every row anyway and are not concerned.
use pgrx::pg_sys;
use pgrx::pg_guard;
use std::cell::Cell;
use std::ffi::{c_void, CStr};

use crate::audit::{self, Event};
use crate::error::TenancyError;
use crate::gucs::{self, ExplainAnalyze};

/// An `EXPLAIN (ANALYZE)` is about to start its statement.
static PENDING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// An `EXPLAIN (ANALYZE)`'s statement is running (with whatever it runs in turn).
static ACTIVE: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// The statement whose counters are to be hidden when it finishes (hide mode).
static HIDE: crate::util::Backend<Cell<*mut pg_sys::QueryDesc>> = crate::util::Backend::new(Cell::new(std::ptr::null_mut()));

/// Before an `ExplainStmt` runs: note it when it has ANALYZE.
///
/// # Safety
/// `stmt` is the ExplainStmt PostgreSQL is about to run.
pub unsafe fn note(stmt: *mut pg_sys::ExplainStmt) {
    // SAFETY: see above; options are DefElem nodes.
    let analyze = unsafe { crate::catalog::list_ptrs((*stmt).options) }.into_iter().any(|o| unsafe {
        let d = o as *mut pg_sys::DefElem;
        !(*d).defname.is_null() && CStr::from_ptr((*d).defname).to_bytes() == b"analyze" && truthy((*d).arg)
    });
    PENDING.with(|p| p.set(analyze));
}

/// The value of an EXPLAIN option as PostgreSQL would read it; an option it would refuse reads
/// as false here (PostgreSQL then refuses the statement itself).
///
/// # Safety
/// `arg` is NULL or a value node of a DefElem.
unsafe fn truthy(arg: *mut pg_sys::Node) -> bool {
    if arg.is_null() {
        return true;
    }
    // SAFETY: the casts follow the node tag.
    unsafe {
        match (*arg).type_ {
            pg_sys::NodeTag::T_Boolean => (*(arg as *mut pg_sys::Boolean)).boolval,
            pg_sys::NodeTag::T_Integer => (*(arg as *mut pg_sys::Integer)).ival != 0,
            pg_sys::NodeTag::T_String => {
                let s = (*(arg as *mut pg_sys::String)).sval;
                !s.is_null()
                    && matches!(CStr::from_ptr(s).to_bytes().to_ascii_lowercase().as_slice(), b"true" | b"on" | b"yes" | b"1")
            }
            _ => false,
        }
    }
}

/// Whether `query_desc` is the statement of a pending `EXPLAIN ANALYZE` (consumed once). It is
/// recognised by its row or timer instrumentation, which EXPLAIN ANALYZE always asks for: a query run by
/// a function while the EXPLAIN plans its statement (a stable function folded for an estimate)
/// does not take it.
///
/// # Safety
/// `query_desc` is the QueryDesc about to be started.
pub unsafe fn take_pending(query_desc: *mut pg_sys::QueryDesc) -> bool {
    if !PENDING.with(|p| p.get()) {
        return false;
    }
    // SAFETY: see above.
    // (EXPLAIN ANALYZE asks for INSTRUMENT_TIMER, or INSTRUMENT_ROWS with TIMING OFF.)
    let rows = pg_sys::InstrumentOption::INSTRUMENT_ROWS as i32 | pg_sys::InstrumentOption::INSTRUMENT_TIMER as i32;
    let instrumented = unsafe { (*query_desc).instrument_options } & rows != 0;
    if instrumented {
        PENDING.with(|p| p.set(false));
        ACTIVE.with(|a| a.set(true));
    }
    instrumented
}

/// Whether an `EXPLAIN ANALYZE`'s statement is running: a statement it runs in turn (a function
/// reading a protected table) is refused as the statement itself would be (its buffers and
/// timing count in the plan EXPLAIN prints).
/// Whether an EXPLAIN ANALYZE was noted and its statement not started yet.
pub fn pending() -> bool {
    PENDING.with(|p| p.get())
}

pub fn active() -> bool {
    ACTIVE.with(|a| a.get())
}

/// A statement of a running `EXPLAIN ANALYZE` (the explained one or one it runs) touches a
/// protected table subject to row security, in refuse mode: refused.
pub fn refuse_nested(rel: pg_sys::Oid) {
    if gucs::explain_analyze() == ExplainAnalyze::Refuse {
        audit::deny(
            Event::CrossTenantProbe,
            rel,
            None,
            "EXPLAIN ANALYZE of a statement on a protected table (its counters describe rows of other tenants)",
            TenancyError::ExplainAnalyze,
        );
    }
}

/// The EXPLAIN is over (or its transaction aborted).
pub fn done() {
    PENDING.with(|p| p.set(false));
    ACTIVE.with(|a| a.set(false));
    HIDE.with(|h| h.set(std::ptr::null_mut()));
}

/// The statement of an `EXPLAIN ANALYZE` reads a protected table subject to its policies:
/// refuse it, or arrange for its counters to be hidden.
///
/// # Safety
/// `query_desc` is the QueryDesc just started.
pub unsafe fn analyze_of_protected(query_desc: *mut pg_sys::QueryDesc) {
    match gucs::explain_analyze() {
        ExplainAnalyze::Refuse => {
            // SAFETY: a started QueryDesc has its plannedstmt.
            let rel = unsafe { crate::catalog::protected::first_protected((*(*query_desc).plannedstmt).rtable) };
            refuse_nested(rel.unwrap_or(pg_sys::InvalidOid));
        }
        ExplainAnalyze::Hide => HIDE.with(|h| h.set(query_desc)),
    }
}

/// Whether a statement's counters are waiting to be hidden.
pub fn hiding() -> bool {
    HIDE.with(|h| !h.get().is_null())
}

/// Zero, in every node of `query_desc`'s plan, the counters that can describe other tenants'
/// rows (hide mode), before EXPLAIN prints them.
///
/// # Safety
/// `query_desc` has finished running; its plan state is alive.
pub unsafe fn hide_counts(query_desc: *mut pg_sys::QueryDesc) {
    if HIDE.with(|h| h.get()) != query_desc {
        return;
    }
    HIDE.with(|h| h.set(std::ptr::null_mut()));
    // SAFETY: see above.
    unsafe {
        let ps = (*query_desc).planstate;
        if !ps.is_null() {
            hide_node(ps, std::ptr::null_mut());
        }
    }
}

/// Zero the counters of one instrumentation.
///
/// # Safety
/// `instr` points to a node's (or a worker's) instrumentation.
unsafe fn zero(instr: *mut pg_sys::Instrumentation) {
    // SAFETY: a node's (or a worker's) instrumentation.
    unsafe {
        (*instr).nfiltered1 = 0.0;
        (*instr).nfiltered2 = 0.0;
        // (heap fetches of an index-only scan)
        (*instr).ntuples2 = 0.0;
        (*instr).bufusage = pg_sys::BufferUsage::default();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn hide_node(ps: *mut pg_sys::PlanState, ctx: *mut c_void) -> bool {
    // SAFETY: a node of a finished plan state tree; casts follow the node tag.
    unsafe {
        let instr = (*ps).instrument;
        if !instr.is_null() {
            zero(instr);
        }
        let workers = (*ps).worker_instrument;
        if !workers.is_null() {
            let n = (*workers).num_workers.max(0) as usize;
            let first = (*workers).instrument.as_mut_ptr();
            for i in 0..n {
                zero(first.add(i));
            }
        }
        match (*ps).type_ {
            pg_sys::NodeTag::T_BitmapHeapScanState => {
                let b = ps as *mut pg_sys::BitmapHeapScanState;
                (*b).exact_pages = 0;
                (*b).lossy_pages = 0;
            }
            _ => {}
        }
        pg_sys::planstate_tree_walker(ps, Some(hide_node), ctx)
    }
}

