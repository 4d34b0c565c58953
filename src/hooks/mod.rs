//! The hooks, each chained to the one installed before it, and each a thin dispatcher.
//!
//! **Invisible where not involved.** A hook calls the previous hook (or PostgreSQL's standard
//! function) directly, from a frame that holds nothing with a destructor and sets no error
//! boundary: an ERROR raised by the statement itself travels through it as through a C frame and
//! reaches the client exactly as PostgreSQL raised it (position, CONTEXT, QUERY, schema, table,
//! column and constraint fields). pg_tenancy's own work runs before and after that call, in
//! `#[pg_guard]` functions, which turn a Rust panic into an ERROR.
//!
//! The executor and permission hooks (with the transaction callback) live in one section,
//! `.text.hot.pg_tenancy`, kept together by the linker (.cargo/config.toml): a statement that
//! passes through them touches a few adjacent cache lines of pg_tenancy's code rather than one
//! page per hook (0.16 to 0.09-0.11 us per statement on unprotected tables, bench/README.md).
//!
//! `ExecutorCheckPerms_hook` (once per statement, before it runs), for each protected table in
//! the range table:
//! - with no tenant context, a statement subject to row security is refused (28000) and
//!   recorded as `no_context`. The policies would refuse it at the first row; this makes the
//!   refusal unconditional, so an empty table does not answer with a silent empty result;
//! - with a context, the context is verified now (for the role running the statement and the
//!   role that set it): a grant revoked or a tenant suspended since refuses the statement even
//!   where no row, and so no policy, is ever evaluated;
//! - a superuser or BYPASSRLS role that reads it is recorded as `bypass_read`;
//! - the table a statement writes is remembered, for events raised while it runs.
//!
//! `ExecutorStart_hook`: after the plan is ready, looks for probes ([`crate::protect::probe`]), and
//! refuses (or prepares to hide) `EXPLAIN ANALYZE` of a statement on a protected table by a role
//! subject to its policies ([`crate::protect::explain`]). `ExecutorFinish_hook`: hides what such an
//! EXPLAIN would count of other tenants' rows, in `hide` mode.
//!
//! `ProcessUtility_hook`: records DDL that would weaken a protected table when it comes from a
//! role that does not own the table (PostgreSQL refuses it for want of ownership, before the
//! guard's event triggers run); refuses rules on protected tables; records `ALTER COLUMN ...
//! TYPE ... USING` on a protected table (an expression run over every tenant's rows); runs the
//! held-cursor checks around `DECLARE` and `FETCH`; notes `EXPLAIN ANALYZE`; and removes the
//! tenant grants of a dropped role. DDL that evaluates a protected table's rows for a role
//! subject to row security runs shielded ([`crate::protect::guard`]); `emit_log_hook` keeps its
//! notices from the client and the log.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int};

use crate::audit::{self, Event};
use crate::catalog::protected::{self as registry, nothing_protected, protected, relations};
use crate::catalog::{self, list_ptrs};
use crate::context::{self, cursors};
use crate::error::TenancyError;
use crate::protect::{explain, guard, param, probe};
use crate::stats::client;

mod logs;

/// PostgreSQL's standard implementations, declared here without pgrx's error boundary (see the
/// module documentation): an error they raise must pass through untouched.
mod standard {
    use pgrx::pg_sys;
    unsafe extern "C-unwind" {
        #[allow(clippy::too_many_arguments)]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query_string: *const std::ffi::c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            query_env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
        pub fn standard_ExecutorStart(query_desc: *mut pg_sys::QueryDesc, eflags: std::ffi::c_int);
        pub fn standard_planner(
            parse: *mut pg_sys::Query,
            query_string: *const std::ffi::c_char,
            cursor_options: std::ffi::c_int,
            bound_params: pg_sys::ParamListInfo,
        ) -> *mut pg_sys::PlannedStmt;
        pub fn standard_ExecutorFinish(query_desc: *mut pg_sys::QueryDesc);
        pub fn standard_ExecutorRun(
            query_desc: *mut pg_sys::QueryDesc,
            direction: pg_sys::ScanDirection::Type,
            count: u64,
            execute_once: bool,
        );
        pub fn standard_ExecutorEnd(query_desc: *mut pg_sys::QueryDesc);
        pub fn AcceptInvalidationMessages();
    }
}

static mut PREV_CHECK_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;
static mut PREV_PLANNER: pg_sys::planner_hook_type = None;
static mut PREV_EXECUTOR_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;

pub fn install() {
    // SAFETY: called once from _PG_init, before any query runs in this backend; the previous
    // hooks are kept and called first.
    unsafe {
        PREV_CHECK_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(check_perms);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(planner);
        PREV_EXECUTOR_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
    }
}

/// `emit_log_hook`: while a shielded statement runs, a message below ERROR (a notice or warning
/// raised over a protected table's rows, which could quote them) goes neither to the client nor
/// to the server log. It cannot raise: it only reads a counter and clears two flags.
///
/// # Safety
/// Called by PostgreSQL with the report being emitted.
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    // SAFETY: `edata` is the report PostgreSQL is emitting; the previous hook gets it as we got it.
    unsafe {
        if !edata.is_null() && (*edata).elevel < pg_sys::PGERROR as c_int && guard::shield_up() {
            (*edata).output_to_client = false;
            (*edata).output_to_server = false;
        }
        if !edata.is_null() && (*edata).output_to_server {
            logs::rewrite(edata, TOUCHED.with(|t| t.get().protected));
        }
        if !edata.is_null() && (*edata).elevel >= pg_sys::PGERROR as c_int {
            client::utility_done();
            forget_inserting();
            if crate::stats::counting_any() {
                crate::stats::failed((*edata).sqlerrcode);
            } else if !REFUSING.with(|r| r.replace(false))
                && (*edata).elevel == pg_sys::PGERROR as c_int
                && context::is_set()
            {
                // (a FATAL between statements — a terminated or timed-out idle session — is no
                // statement of the tenant's)
                let code = (*edata).sqlerrcode;
                context::last_verified_tenant(|t| crate::stats::failed_unstarted(t, code));
            }
        }
        if let Some(prev) = PREV_EMIT_LOG {
            prev(edata);
        }
    }
}

/// What the permission check saw of the statement being started.
static TOUCHED: crate::util::Backend<Cell<Touched>> = crate::util::Backend::new(Cell::new(Touched::NONE));

/// What the permission check of the statement being started saw.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Touched {
    /// A protected table is in its range table.
    protected: bool,
    /// ... and row security applies to the role reading it.
    rls: bool,
}

impl Touched {
    const NONE: Touched = Touched { protected: false, rls: false };
}

// ---------------------------------------------------------------------------------------------
// ExecutorCheckPerms_hook
// ---------------------------------------------------------------------------------------------

/// (No `#[pg_guard]`: see the module documentation.)
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, ereport: bool) -> bool {
    // SAFETY: the previous hook has PostgreSQL's signature; an error it raises passes through.
    unsafe {
        if let Some(prev) = PREV_CHECK_PERMS {
            if !prev(range_table, ereport) {
                return false;
            }
        }
        // Fast path (no error boundary needed: cell reads and a hash lookup): a statement that
        // names no protected table, with the protected set already loaded.
        if !registry::loading() && pg_sys::ParallelWorkerNumber < 0 && registry::cached_any(range_table) == Some(false) {
            TOUCHED.with(|t| t.set(Touched::NONE));
            audit::set_write_target(pg_sys::InvalidOid);
            return true;
        }
        check_perms_ours(range_table)
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_perms_ours(range_table: *mut pg_sys::List) -> bool {
    // Parallel workers check the leader's range table again: the leader already refused or
    // recorded what there was to refuse or record.
    // SAFETY: reads a backend-global.
    if registry::loading() || unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        return true;
    }
    // Nothing protected in this database (the common case for ordinary databases): done.
    if nothing_protected() {
        audit::set_write_target(pg_sys::InvalidOid);
        return true;
    }
    let has_context = context::is_set();
    let mut write_target = pg_sys::InvalidOid;
    let mut touched = Touched::NONE;
    // SAFETY: range_table is a valid List of RangeTblEntry pointers (or NIL).
    for rte in unsafe { relations(range_table) } {
        if protected(rte.relid).is_none() {
            continue;
        }
        touched.protected = true;
        let writes = rte.requiredPerms & (pg_sys::ACL_INSERT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) != 0;
        if writes && write_target == pg_sys::InvalidOid {
            write_target = rte.relid;
        }
        // SAFETY: GetUserId reads a backend-local variable.
        let user = if rte.checkAsUser != pg_sys::InvalidOid { rte.checkAsUser } else { crate::util::pg::user() };
        // SAFETY: catalog reads of the role (syscache).
        let bypass = unsafe { pg_sys::has_bypassrls_privilege(user) };
        if bypass {
            if rte.requiredPerms & pg_sys::ACL_SELECT != 0 && !audit::bypass_reads_quiet() {
                // SAFETY: as above.
                let why = if unsafe { pg_sys::superuser_arg(user) } {
                    "superuser read a protected table; row security does not apply to it"
                } else {
                    "BYPASSRLS role read a protected table; row security does not apply to it"
                };
                audit::record(Event::BypassRead, rte.relid, None, "00000", why);
            }
            continue;
        }
        // SAFETY: check_enable_rls reads the catalogs; noError = true.
        let rls = unsafe { pg_sys::check_enable_rls(rte.relid, rte.checkAsUser, true) }
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as c_int;
        if !rls {
            continue;
        }
        touched.rls = true;
        if !has_context {
            audit::deny(
                Event::NoContext,
                rte.relid,
                None,
                "statement on a protected table without a tenant context",
                TenancyError::NoContext,
            );
        }
    }
    if touched.rls {
        // Authorization as of now, for this statement: refused (and recorded) if the grant, the
        // membership that carried it or the tenant's status changed since the context was set.
        if let Err(e) = context::with_context(|_| ()) {
            e.raise();
        }
        if explain::active() {
            // SAFETY: as above.
            explain::refuse_nested(unsafe { registry::first_protected(range_table) }.unwrap_or(pg_sys::InvalidOid));
        }
    }
    // (Set last: the verification above may run catalog statements of its own through here.)
    TOUCHED.with(|t| t.set(touched));
    audit::set_write_target(write_target);
    true
}

// ---------------------------------------------------------------------------------------------
// planner_hook
// ---------------------------------------------------------------------------------------------

/// (No `#[pg_guard]`: see the module documentation.)
unsafe extern "C-unwind" fn planner(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: the previous hook or the standard function, with PostgreSQL's arguments; an error
    // either raises passes through. Only Copy values live in this frame.
    unsafe {
        param::planning_started();
        let stmt = match PREV_PLANNER {
            Some(prev) => prev(parse, query_string, cursor_options, bound_params),
            None => standard::standard_planner(parse, query_string, cursor_options, bound_params),
        };
        param::planning_ended();
        if param::worth_converting(stmt) {
            after_planning(stmt);
        }
        stmt
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn after_planning(stmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: the PlannedStmt the planner just returned.
    unsafe { param::after_planning(stmt) }
}

// ---------------------------------------------------------------------------------------------
// ExecutorStart_hook, ExecutorFinish_hook
// ---------------------------------------------------------------------------------------------

/// (No `#[pg_guard]`: see the module documentation.)
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: c_int) {
    // SAFETY: the previous hook or the standard function, with PostgreSQL's arguments; an error
    // either raises passes through. Only Copy values live in this frame.
    unsafe {
        // (the fast paths only set cells: no error boundary needed)
        let explain = if explain::pending() {
            before_executor_start(query_desc)
        } else {
            TOUCHED.with(|t| t.set(Touched::NONE));
            false
        };
        if context::is_set() && top_level(query_desc) {
            begin_statement(query_desc as usize, query_desc);
        }
        match PREV_EXECUTOR_START {
            Some(prev) => prev(query_desc, eflags),
            None => standard::standard_ExecutorStart(query_desc, eflags),
        }
        if explain || TOUCHED.with(|t| t.get().protected) || param::may_need_filling(query_desc) {
            after_executor_start(query_desc, eflags, explain);
            if TOUCHED.with(|t| t.get().protected)
                && context::is_set()
                && eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as c_int == 0
                && writes_rows(query_desc)
            {
                storage_before(query_desc);
            }
        }
    }
}

/// A statement the client sent, not one run by another (see [`crate::stats::client`]): counted
/// once, at top level.
///
/// # Safety
/// `query_desc` is the QueryDesc being started.
unsafe fn top_level(query_desc: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: reads backend-globals and the QueryDesc's source text (see client::is_client_text).
    unsafe { !client::in_utility() && pg_sys::ParallelWorkerNumber < 0 && client::is_client_text((*query_desc).sourceText) }
}

/// Enforce the tenant's limits on a top-level statement and start counting it
/// ([`crate::stats`]). A context that does not verify is left to the statement's own checks.
#[pg_guard]
unsafe extern "C-unwind" fn begin_statement(key: usize, query_desc: *mut pg_sys::QueryDesc) {
    let enforce = crate::gucs::enforce_limits();
    let track = crate::gucs::track_stats();
    // (verifying a context may run statements of its own: they are not the client's)
    if (!enforce && !track) || BEGINNING.with(|b| b.replace(true)) {
        return;
    }
    let _done = crate::util::OnDrop(|| BEGINNING.with(|b| b.set(false)));
    REFUSING.with(|r| r.set(false));
    // SAFETY: the QueryDesc being started (or null for a utility statement).
    if !query_desc.is_null() && unsafe { switches_context_only(query_desc) } {
        return;
    }
    let Ok(v) = context::verified_quietly() else { return };
    // SAFETY: reads the statement's start time (set by PostgreSQL for every client message).
    let now = unsafe { pg_sys::GetCurrentStatementStartTimestamp() };
    let exempt = || v.superuser;
    // SAFETY: reads a backend-global.
    let portal = unsafe { pg_sys::ActivePortal } as usize;
    if let Err((why, place)) = crate::stats::begin(&v.tenant, &v.limits, enforce, track, key, portal, now, exempt) {
        refuse(&v, why, place, now);
    }
}

/// Refuse the statement by a limit: the error (53400, the plan in its hint), an audit event at
/// most once a second per tenant, and a refusal (not an error) in the tenant's statistics.
fn refuse(v: &context::Verified, why: crate::stats::Refusal, place: u32, now: i64) -> ! {
    let (what, limit) = match why {
        crate::stats::Refusal::Concurrency => (
            "concurrent statements",
            format!("The limit is {} statements of the tenant at a time.", v.limits.max_concurrent),
        ),
        crate::stats::Refusal::Storage => (
            "storage",
            format!("The limit is {} bytes of stored rows (measured by tenancy.measure_storage()).", v.limits.storage_quota),
        ),
        _ => ("statement rate", format!("The limit is {} statements per second.", v.limits.rate)),
    };
    let e = TenancyError::LimitExceeded(what, v.limits.plan.clone(), limit);
    if crate::stats::audit_refusal_due(place, now) {
        audit::record(Event::LimitExceeded, pg_sys::InvalidOid, Some(&v.tenant), &e.sqlstate_text(), what);
    }
    // (counted as a refusal, not as an error of the tenant)
    REFUSING.with(|r| r.set(true));
    e.raise();
}

/// Statements that insert rows into protected tables under a context, at any level (a client
/// statement, EXECUTE, a function's, a trigger's), and their verified context: their rows are
/// added to the tenant's storage estimate when they finish, and refused if they take it over its
/// quota. Forgotten at every transaction end and error.
static INSERTING: crate::util::Backend<RefCell<Vec<Inserting>>> = crate::util::Backend::new(RefCell::new(Vec::new()));

struct Inserting {
    query: usize,
    verified: context::Rc<context::Verified>,
    /// The protected tables it writes, and the rows this transaction had inserted into them
    /// when it started (PostgreSQL's own per-table counters of the transaction).
    rels: Vec<pg_sys::Oid>,
    before: i64,
    /// An INSERT or MERGE (its processed rows are inserted rows), not a writable CTE.
    insert_command: bool,
}

/// Rows this transaction inserted into `rels` so far, as PostgreSQL's statistics count them
/// (every level of subtransaction still alive; rows of aborted ones are not counted).
fn inserted_in_transaction(rels: &[pg_sys::Oid]) -> i64 {
    let mut n = 0i64;
    for &rel in rels {
        // SAFETY: the backend's pending statistics entry of the relation (or null), and its
        // per-level transaction counters, read only.
        unsafe {
            let e = pg_sys::find_tabstat_entry(rel);
            if e.is_null() {
                continue;
            }
            let mut t = (*e).trans;
            while !t.is_null() {
                n = n.saturating_add((*t).tuples_inserted);
                t = (*t).upper;
            }
        }
    }
    n
}

/// The protected tables a started statement writes (its result relations, those of writable
/// CTEs included).
///
/// # Safety
/// `query_desc` is a started QueryDesc.
unsafe fn protected_results(query_desc: *mut pg_sys::QueryDesc) -> Vec<pg_sys::Oid> {
    // SAFETY: its planned statement's result relations and range table.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        let mut out = Vec::new();
        let results = (*stmt).resultRelations;
        if results.is_null() {
            return out;
        }
        for i in 0..(*results).length as usize {
            let rti = (*(*results).elements.add(i)).int_value;
            let rte = pg_sys::rt_fetch(rti as pg_sys::Index, (*stmt).rtable);
            if !rte.is_null() && protected((*rte).relid).is_some() && !out.contains(&(*rte).relid) {
                out.push((*rte).relid);
            }
        }
        out
    }
}

#[link_section = ".text.hot.pg_tenancy"]
fn inserting() -> bool {
    INSERTING.with(|i| !i.borrow().is_empty())
}

/// Forget the inserting statements (the transaction ended, or an error ended them).
#[link_section = ".text.hot.pg_tenancy"]
pub fn forget_inserting() {
    INSERTING.with(|i| {
        if let Ok(mut i) = i.try_borrow_mut() {
            i.clear();
        }
    });
}

/// Whether a started statement writes rows: INSERT, MERGE, or a writable CTE.
///
/// # Safety
/// `query_desc` is a started QueryDesc.
unsafe fn writes_rows(query_desc: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: its planned statement.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        !stmt.is_null()
            && (matches!((*stmt).commandType, pg_sys::CmdType::CMD_INSERT | pg_sys::CmdType::CMD_MERGE) || (*stmt).hasModifyingCTE)
    }
}

fn storage_over(v: &context::Verified, strictly: bool) -> bool {
    if v.limits.storage_quota <= 0 || !crate::gucs::enforce_limits() || v.superuser {
        return false;
    }
    let estimate = crate::stats::storage_estimate(&v.tenant, &v.limits);
    if strictly { estimate > v.limits.storage_quota } else { estimate >= v.limits.storage_quota }
}

/// Storage quota, before a statement that writes a protected table runs (at any level): refused
/// when the tenant is at or over its quota already.
#[pg_guard]
unsafe extern "C-unwind" fn storage_before(query_desc: *mut pg_sys::QueryDesc) {
    let Ok(v) = context::verified_quietly() else { return };
    if storage_over(&v, false) {
        crate::stats::count_refusal(&v.tenant, crate::stats::Refusal::Storage);
        // SAFETY: reads the statement's start time.
        refuse(&v, crate::stats::Refusal::Storage, 0, unsafe { pg_sys::GetCurrentStatementStartTimestamp() });
    }
    // SAFETY: the started QueryDesc.
    let (insert_command, rels) = unsafe {
        (
            matches!((*(*query_desc).plannedstmt).commandType, pg_sys::CmdType::CMD_INSERT | pg_sys::CmdType::CMD_MERGE),
            protected_results(query_desc),
        )
    };
    let before = inserted_in_transaction(&rels);
    INSERTING.with(|i| i.borrow_mut().push(Inserting { query: query_desc as usize, verified: v, rels, before, insert_command }));
}

/// Storage quota, when a statement that writes a protected table has run: the rows it inserted
/// are added to the estimate, and the statement that takes the tenant over its quota is refused
/// (its rows go with it).
#[pg_guard]
unsafe extern "C-unwind" fn storage_after(key: usize, processed: u64) {
    let Some(ins) = INSERTING.with(|i| {
        let mut i = i.borrow_mut();
        let at = i.iter().rposition(|x| x.query == key)?;
        Some(i.remove(at))
    }) else {
        return;
    };
    // the rows it inserted into protected tables (writable CTEs and triggers included); an
    // INSERT or MERGE into a partitioned table counts on its partitions: its processed rows then
    let counted = inserted_in_transaction(&ins.rels).saturating_sub(ins.before).max(0);
    let processed = processed.min(i64::MAX as u64) as i64;
    let rows = if ins.insert_command { counted.max(processed) } else { counted };
    let v = ins.verified;
    if rows == 0 {
        return;
    }
    crate::stats::inserted(&v.tenant, v.limits.pinned, rows);
    if storage_over(&v, true) {
        // (the rows are rolled back with the statement)
        crate::stats::inserted(&v.tenant, v.limits.pinned, -rows);
        crate::stats::count_refusal(&v.tenant, crate::stats::Refusal::Storage);
        // SAFETY: reads the statement's start time.
        refuse(&v, crate::stats::Refusal::Storage, 0, unsafe { pg_sys::GetCurrentStatementStartTimestamp() });
    }
}

static BEGINNING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// A limit is refusing the statement: its error report is not an error of the tenant.
static REFUSING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// Whether the statement only enters or leaves a tenant (`SELECT tenancy.set_tenant(...)`,
/// `set_tenant_token`, `reset_tenant`, and nothing else, on no table): not a statement of the
/// tenant it leaves (not counted), and never refused by its limits, so that a connection can
/// always go on to serve another.
///
/// # Safety
/// `query_desc` is the QueryDesc being started.
unsafe fn switches_context_only(query_desc: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: the planned statement of a QueryDesc, its range table and plan tree, read only;
    // syscache lookups of the functions' names.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        if stmt.is_null() || (*stmt).commandType != pg_sys::CmdType::CMD_SELECT {
            return false;
        }
        for rte in list_ptrs((*stmt).rtable) {
            if (*rte.cast::<pg_sys::RangeTblEntry>()).rtekind != pg_sys::RTEKind::RTE_RESULT {
                return false;
            }
        }
        // no subquery, init-plan, filter or one-time filter: nothing but the calls runs
        let plan = (*stmt).planTree;
        if plan.is_null()
            || (*plan).type_ != pg_sys::NodeTag::T_Result
            || !(*plan).lefttree.is_null()
            || !(*plan).qual.is_null()
            || !(*plan).initPlan.is_null()
            || !(*plan.cast::<pg_sys::Result>()).resconstantqual.is_null()
            || !(*stmt).subplans.is_null()
        {
            return false;
        }
        let targets = list_ptrs((*plan).targetlist);
        !targets.is_empty()
            && targets.into_iter().all(|te| {
                let expr = (*te.cast::<pg_sys::TargetEntry>()).expr;
                if expr.is_null() || (*expr).type_ != pg_sys::NodeTag::T_FuncExpr {
                    return false;
                }
                let f = expr.cast::<pg_sys::FuncExpr>();
                let nsp = pg_sys::get_namespace_name(pg_sys::get_func_namespace((*f).funcid));
                let name = pg_sys::get_func_name((*f).funcid);
                !nsp.is_null()
                    && !name.is_null()
                    && std::ffi::CStr::from_ptr(nsp).to_bytes() == b"tenancy"
                    && matches!(std::ffi::CStr::from_ptr(name).to_bytes(), b"set_tenant" | b"set_tenant_token" | b"reset_tenant")
                    && list_ptrs((*f).args).into_iter().all(|a| match (*a.cast::<pg_sys::Node>()).type_ {
                        pg_sys::NodeTag::T_Const => true,
                        // a bound parameter of the client, not a subquery's output
                        pg_sys::NodeTag::T_Param => (*a.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_EXTERN,
                        _ => false,
                    })
            })
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn before_executor_start(query_desc: *mut pg_sys::QueryDesc) -> bool {
    TOUCHED.with(|t| t.set(Touched::NONE));
    // SAFETY: the QueryDesc about to be started.
    unsafe { explain::take_pending(query_desc) }
}

#[pg_guard]
unsafe extern "C-unwind" fn after_executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: c_int, explain: bool) {
    if eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as c_int != 0 {
        return;
    }
    // SAFETY: the QueryDesc PostgreSQL just started.
    unsafe { param::fill(query_desc) };
    // SAFETY: reads a backend-global.
    if unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        return;
    }
    let touched = TOUCHED.with(|t| t.get());
    if !touched.protected {
        return;
    }
    if explain && touched.rls {
        // SAFETY: the QueryDesc PostgreSQL just started.
        unsafe { explain::analyze_of_protected(query_desc) };
    }
    // SAFETY: the QueryDesc PostgreSQL just started.
    if unsafe { param::probe_marked(query_desc) } {
        if let Ok(tenant) = context::with_context(|v| v.tenant.clone()) {
            // SAFETY: the QueryDesc PostgreSQL just started.
            unsafe { probe::examine(query_desc, &tenant) };
        }
    }
}

/// (No `#[pg_guard]`: see the module documentation.) A statement whose tenant parameters were
/// filled is verified again before it runs again, if grants or tenants changed since: a cursor
/// runs at every fetch.
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn executor_run(
    query_desc: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    // SAFETY: as in executor_start; AcceptInvalidationMessages is what any lock acquisition
    // does, and an error it raises passes through as from PostgreSQL itself.
    unsafe {
        if param::filled(query_desc) {
            standard::AcceptInvalidationMessages();
            before_executor_run(query_desc);
        }
        // a client's Execute of a cursor's portal (declared by SQL, started then): a statement of
        // the tenant, counted and limited as it runs
        let run_counted = context::is_set()
            && !client::in_utility()
            && !crate::stats::counting(query_desc as usize)
            && pg_sys::ParallelWorkerNumber < 0
            && client::is_client_text((*query_desc).sourceText);
        if run_counted {
            begin_statement(query_desc as usize, query_desc);
        }
        match PREV_EXECUTOR_RUN {
            Some(prev) => prev(query_desc, direction, count, execute_once),
            None => standard::standard_ExecutorRun(query_desc, direction, count, execute_once),
        }
        if run_counted && crate::stats::counting(query_desc as usize) {
            let estate = (*query_desc).estate;
            crate::stats::end(if estate.is_null() { 0 } else { (*estate).es_processed });
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn before_executor_run(query_desc: *mut pg_sys::QueryDesc) {
    param::verify_again(query_desc);
}

/// (No `#[pg_guard]`: see the module documentation.)
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn executor_end(query_desc: *mut pg_sys::QueryDesc) {
    // SAFETY: as in executor_start (forgetting a statement only touches a cell; counting it only
    // atomics in shared memory).
    unsafe {
        param::ended(query_desc);
        if crate::stats::counting(query_desc as usize) {
            let estate = (*query_desc).estate;
            crate::stats::end(if estate.is_null() { 0 } else { (*estate).es_processed });
        }
        match PREV_EXECUTOR_END {
            Some(prev) => prev(query_desc),
            None => standard::standard_ExecutorEnd(query_desc),
        }
    }
}

/// (No `#[pg_guard]`: see the module documentation.)
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn executor_finish(query_desc: *mut pg_sys::QueryDesc) {
    // SAFETY: as in executor_start.
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => prev(query_desc),
            None => standard::standard_ExecutorFinish(query_desc),
        }
        if inserting() {
            let estate = (*query_desc).estate;
            let rows = if estate.is_null() { 0 } else { (*estate).es_processed };
            storage_after(query_desc as usize, rows);
        }
        if explain::hiding() {
            after_executor_finish(query_desc);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn after_executor_finish(query_desc: *mut pg_sys::QueryDesc) {
    // SAFETY: the QueryDesc PostgreSQL just finished (its plan state still alive).
    unsafe { explain::hide_counts(query_desc) };
}

// ---------------------------------------------------------------------------------------------
// ProcessUtility_hook
// ---------------------------------------------------------------------------------------------

/// (No `#[pg_guard]`: see the module documentation.)
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the previous hook or the standard function, with PostgreSQL's arguments; an error
    // either raises passes through. Only Copy values live in this frame.
    unsafe {
        let node = (*pstmt).utilityStmt;
        // Transaction control and settings are none of the guard's business (and COMMIT ends
        // every pooled transaction): straight through, never counted nor limited.
        if !node.is_null()
            && matches!(
                (*node).type_,
                pg_sys::NodeTag::T_TransactionStmt | pg_sys::NodeTag::T_VariableSetStmt | pg_sys::NodeTag::T_VariableShowStmt
            )
        {
            match PREV_PROCESS_UTILITY {
                Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
                None => standard::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            }
            return;
        }
        // A utility statement the client sent is a statement of the tenant (counted and
        // limited, and what it runs is part of it), except those that only end or clean up
        // (a pooler's DISCARD ALL, CLOSE, DEALLOCATE).
        let client = context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            && !node.is_null()
            && !matches!(
                (*node).type_,
                pg_sys::NodeTag::T_DiscardStmt | pg_sys::NodeTag::T_ClosePortalStmt | pg_sys::NodeTag::T_DeallocateStmt
            )
            && pg_sys::ParallelWorkerNumber < 0;
        let counted = client && context::is_set();
        if counted {
            begin_statement(pstmt as usize, std::ptr::null_mut());
        }
        if client {
            client::utility_started();
        }
        if !node.is_null() && matches!((*node).type_, pg_sys::NodeTag::T_CallStmt | pg_sys::NodeTag::T_DoStmt) {
            next_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
            if client {
                client::utility_done();
            }
            if counted && crate::stats::counting(pstmt as usize) {
                crate::stats::end(if qc.is_null() { 0 } else { (*qc).nprocessed });
            }
            return;
        }
        let noted = before_utility(node);
        let shield = shield_for(node);
        if shield.on {
            run_shielded(shield.rel, pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
        } else {
            next_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
        }
        if client {
            client::utility_done();
        }
        if noted {
            after_utility(node);
        }
        if counted && crate::stats::counting(pstmt as usize) {
            crate::stats::end(if qc.is_null() { 0 } else { (*qc).nprocessed });
        }
    }
}

/// Whether a utility statement is to be shielded, and for which table.
#[repr(C)]
#[derive(Clone, Copy)]
struct Shield {
    on: bool,
    rel: pg_sys::Oid,
}

/// Whether the statement is DDL that evaluates a protected table's rows for a role subject to
/// row security (`crate::protect::guard`: shielded), and the table.
#[pg_guard]
unsafe extern "C-unwind" fn shield_for(node: *mut pg_sys::Node) -> Shield {
    let off = Shield { on: false, rel: pg_sys::InvalidOid };
    if node.is_null() || nothing_protected() {
        return off;
    }
    // SAFETY: the utility statement about to run.
    match unsafe { guard::needs_shield(node) } {
        Some(rel) => Shield { on: true, rel },
        None => off,
    }
}

/// The shielded path: this is the statement pg_tenancy is involved in, and its errors are the
/// ones it reshapes.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn run_shielded(
    rel: pg_sys::Oid,
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    guard::shielded(rel, || {
        // SAFETY: PostgreSQL's arguments, passed on.
        unsafe { next_process_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc) }
    });
}

/// The previous ProcessUtility hook, or the standard function.
///
/// # Safety
/// PostgreSQL's arguments to the hook. (No `#[pg_guard]`: see the module documentation.)
#[allow(clippy::too_many_arguments)]
unsafe fn next_process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: see above; an error raised passes through.
    unsafe {
        match PREV_PROCESS_UTILITY {
            Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
            None => standard::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        }
    }
}

/// Roles a DROP ROLE is removing (their grants go with them once it succeeds).
static DROPPING: crate::util::Backend<RefCell<Vec<pg_sys::Oid>>> = crate::util::Backend::new(RefCell::new(Vec::new()));

/// Before a utility statement runs. Returns whether `after_utility` has something to do.
#[pg_guard]
unsafe extern "C-unwind" fn before_utility(node: *mut pg_sys::Node) -> bool {
    use pg_sys::NodeTag::*;
    if node.is_null() {
        return false;
    }
    // SAFETY (whole function): `node` is the utility statement PostgreSQL is about to run; the
    // casts follow its tag.
    unsafe {
        match (*node).type_ {
            T_FetchStmt => {
                cursors::before_fetch(node as *mut pg_sys::FetchStmt);
                false
            }
            T_DeclareCursorStmt => true,
            T_ExplainStmt => {
                explain::note(node as *mut pg_sys::ExplainStmt);
                true
            }
            T_DropRoleStmt => note_dropped_roles(node as *mut pg_sys::DropRoleStmt),
            T_DropStmt if (*(node as *mut pg_sys::DropStmt)).removeType == pg_sys::ObjectType::OBJECT_EXTENSION => {
                lock_audit_log_before_drop(node as *mut pg_sys::DropStmt);
                false
            }
            _ => {
                if !nothing_protected() {
                    guard::before_ddl(node);
                }
                false
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn after_utility(node: *mut pg_sys::Node) {
    use pg_sys::NodeTag::*;
    // SAFETY: the utility statement that just ran; the casts follow its tag.
    unsafe {
        match (*node).type_ {
            T_DeclareCursorStmt => cursors::declared(node as *mut pg_sys::DeclareCursorStmt),
            T_ExplainStmt => explain::done(),
            T_DropRoleStmt => forget_dropped_roles(),
            _ => {}
        }
    }
}

/// Before DROP EXTENSION pg_tenancy: take the audit log first. The audit writer holds it while
/// its insert reads the extension's other tables (the protected set, through the hooks), and
/// DROP EXTENSION would lock those first and the log last: a deadlock. Waiting for the writer
/// here gives both the same order.
///
/// # Safety
/// `stmt` is the DropStmt (of extensions) PostgreSQL is about to run.
unsafe fn lock_audit_log_before_drop(stmt: *mut pg_sys::DropStmt) {
    // SAFETY: the objects of a DROP EXTENSION are String nodes.
    let ours = unsafe { list_ptrs((*stmt).objects) }.into_iter().any(|o| unsafe {
        let name = (*(o as *mut pg_sys::String)).sval;
        !name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == b"pg_tenancy"
    });
    if !ours {
        return;
    }
    if let Some(log) = catalog::audit_log::relation() {
        // SAFETY: a lock on an existing relation, held to the end of the transaction (as the
        // DROP itself would).
        unsafe { pg_sys::LockRelationOid(log, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    }
}

/// Note the OIDs of the roles a DROP ROLE names, where pg_tenancy is installed.
///
/// # Safety
/// `stmt` is the DropRoleStmt PostgreSQL is about to run.
unsafe fn note_dropped_roles(stmt: *mut pg_sys::DropRoleStmt) -> bool {
    if catalog::ids().is_err() {
        return false;
    }
    // SAFETY: a DropRoleStmt's roles are RoleSpec nodes; lookups with missing_ok.
    let oids: Vec<pg_sys::Oid> = unsafe { list_ptrs((*stmt).roles) }
        .into_iter()
        .map(|r| unsafe { pg_sys::get_rolespec_oid(r as *mut pg_sys::RoleSpec, true) })
        .filter(|&o| o != pg_sys::InvalidOid)
        .collect();
    let any = !oids.is_empty();
    DROPPING.with(|d| *d.borrow_mut() = oids);
    any
}

/// After a DROP ROLE succeeded: its tenant grants in this database go with it, so that a role
/// created later can never inherit them by OID. (Grants in other databases are reported by
/// their `tenancy.check()` and never honoured: a grant counts only while its role exists.)
fn forget_dropped_roles() {
    let roles = DROPPING.with(|d| std::mem::take(&mut *d.borrow_mut()));
    for role in roles {
        if let Err(e) = catalog::tenants::forget_role(role) {
            e.raise();
        }
    }
}
