//! The tenant as a parameter of the statement.
//!
//! The generated policy compares the tenant column with `tenancy.current_tenant(NULL::<type>)`.
//! Left alone, that call would run for every row a scan filters. Written as a sub-select it
//! would run once per statement, as an initPlan, whose setup costs about a quarter of a point
//! lookup. Instead, after a statement on a protected table is planned, each such call in the
//! plan becomes a parameter of the statement (`PARAM_EXEC`, shown as `$n` by EXPLAIN), and
//! when the statement starts (ExecutorStart) the parameter is filled once from the context,
//! verified for the role running it. So:
//! - the value is read once per execution, never per row, and never baked into a plan: a
//!   cached or generic plan reads the tenant of whoever runs it;
//! - the comparison is an index condition, and partition pruning at run time sees it;
//! - parallel workers receive the leader's value (the parameter is added to every `Gather`'s
//!   parameters to send, as PostgreSQL does for initPlans), and the call is parallel safe while
//!   the planner decides;
//! - the parameter's slot is typed with one of the extension's domains (`tenancy._param_text`,
//!   `_int4`, `_int8`, `_uuid`, usable by no one else): that is how ExecutorStart recognizes it;
//! - a call the conversion does not reach (partition pruning done when the statement starts,
//!   custom and foreign scans' own expressions, expressions PostgreSQL plans on its own such as
//!   a COPY's defaults, a statement with no protected table) stays a call of the function, which
//!   reads the context itself: slower, never wrong.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void, CString};

use crate::catalog::{self, list_ptrs};
use crate::catalog::protected::{nothing_protected, protected, relations};
use crate::context;
use crate::error::{OrRaise, TenancyError};

/// Every (domain, base type) pair this backend ever gave a parameter slot: the slots of its
/// plans to fill. It only grows (a plan made before the extension was re-created is
/// invalidated with the function it called, but a slot of it must never go unfilled).
static OURS: crate::util::Backend<RefCell<Vec<(pg_sys::Oid, pg_sys::Oid)>>> = crate::util::Backend::new(RefCell::new(Vec::new()));
/// A conversion is running: the catalog statements it may run are planned without one.
static BUSY: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// Statements being planned (the planner calls the function for its estimates).
static PLANNING: crate::util::Backend<Cell<u32>> = crate::util::Backend::new(Cell::new(0));
/// Started statements whose parameters were filled, with the verification generation they
/// were filled at (see `verify_again`); removed when they end.
static RUNS: crate::util::Backend<RefCell<Vec<(usize, u64)>>> = crate::util::Backend::new(RefCell::new(Vec::new()));
/// The probe mark's type, once this backend marked a plan with it.
static PROBE_MARK: crate::util::Backend<Cell<pg_sys::Oid>> = crate::util::Backend::new(Cell::new(pg_sys::InvalidOid));

/// The planner hook brackets planning with these (no destructor in its frame: an error while
/// planning leaves the count to `reset_planning`, at the abort).
pub fn planning_started() {
    PLANNING.with(|p| p.set(p.get().saturating_add(1)));
}

pub fn planning_ended() {
    PLANNING.with(|p| p.set(p.get().saturating_sub(1)));
}

/// A (sub)transaction aborted: no planning survives it.
pub fn reset_planning() {
    PLANNING.with(|p| p.set(0));
}

/// The base types of the four domains, in `CatalogIds::param_types` order.
const BASES: [pg_sys::Oid; 4] = [pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::UUIDOID];

/// The slot kind for a value of type `ty` (varchar shares text's representation).
fn kind_of(ty: pg_sys::Oid) -> Option<usize> {
    match ty {
        pg_sys::TEXTOID | pg_sys::VARCHAROID => Some(0),
        pg_sys::INT4OID => Some(1),
        pg_sys::INT8OID => Some(2),
        pg_sys::UUIDOID => Some(3),
        _ => None,
    }
}

/// `tenant` as a value of `ty`, in the current memory context: as a cast from text would read
/// it (the type's input function, whose error a tenant id that does not read as the type gets),
/// built directly for the common forms.
fn tenant_datum(ty: pg_sys::Oid, tenant: &str) -> pg_sys::Datum {
    let Some(kind) = kind_of(ty) else {
        TenancyError::InvalidArgument("the type of tenancy.current_tenant's argument (text, varchar, uuid, integer or bigint)")
            .raise()
    };
    match kind {
        0 => {
            // SAFETY: copies the bytes into a new text value in the current memory context.
            return unsafe {
                pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(tenant.as_ptr().cast(), tenant.len() as c_int))
            };
        }
        // (canonical integer ids: no sign, no leading zeros; anything else takes the input function)
        1 if tenant.bytes().all(|b| b.is_ascii_digit()) => {
            if let Ok(n) = tenant.parse::<i32>() {
                return pg_sys::Datum::from(n);
            }
        }
        2 if tenant.bytes().all(|b| b.is_ascii_digit()) => {
            if let Ok(n) = tenant.parse::<i64>() {
                return pg_sys::Datum::from(n);
            }
        }
        _ => {}
    }
    let Ok(text) = CString::new(tenant) else { TenancyError::InvalidTenantId.raise() };
    let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
    // SAFETY: catalog lookups of a built-in type, and a call of its input function on a C
    // string; an error either raises passes through pgrx's boundary.
    unsafe {
        pg_sys::getTypeInputInfo(BASES[kind], &mut input, &mut ioparam);
        pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), ioparam, -1)
    }
}

#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_tenancy_current_tenant_as() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `tenancy.current_tenant(anyelement)`: the verified tenant, as the type of the argument
/// (text, varchar, uuid, integer or bigint; the argument's value is ignored). Raises as
/// `current_tenant()` does. See the module documentation for how policies call it.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn tenancy_current_tenant_as(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: the call's own FmgrInfo, which knows the argument's type from the expression.
    let ty = unsafe { pg_sys::get_fn_expr_argtype((*fcinfo).flinfo, 0) };
    if PLANNING.with(|p| p.get()) > 0 {
        // The planner estimating selectivity (a stable function with constant arguments is
        // evaluated for that): the tenant when the context verifies, else NULL. Nothing is
        // raised or recorded here; the statement is when it starts.
        return match context::peek_tenant() {
            Some(tenant) => tenant_datum(ty, &tenant),
            None => {
                // SAFETY: the call's own fcinfo.
                unsafe { (*fcinfo).isnull = true };
                pg_sys::Datum::from(0)
            }
        };
    }
    let tenant = context::with_context(|v| v.tenant.clone()).or_raise();
    tenant_datum(ty, &tenant)
}

// ---------------------------------------------------------------------------------------------
// After planning: calls become parameters
// ---------------------------------------------------------------------------------------------

/// Whether a plan just made may hold calls to convert (a protected table in its range table, or
/// a protected set not loaded yet). Cell reads and hash lookups only: the planner hook asks it
/// without an error boundary.
///
/// # Safety
/// `stmt` is NULL or the PlannedStmt the planner just returned.
pub unsafe fn worth_converting(stmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: see above.
    unsafe {
        !stmt.is_null()
            && (*stmt).commandType != pg_sys::CmdType::CMD_UTILITY
            && !nothing_protected()
            && !BUSY.with(|b| b.get())
            && crate::catalog::protected::cached_any((*stmt).rtable) != Some(false)
    }
}

/// Whether a started statement may have tenant parameters to fill (its plan has parameter
/// slots, and this backend made plans with ours, or it is a parallel worker). Cell reads only.
///
/// # Safety
/// `query_desc` is a started QueryDesc.
pub unsafe fn may_need_filling(query_desc: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: see above.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        !stmt.is_null()
            && !(*stmt).paramExecTypes.is_null()
            && (pg_sys::ParallelWorkerNumber >= 0 || OURS.with(|o| o.try_borrow().map(|o| !o.is_empty()).unwrap_or(true)))
    }
}

/// Turn the calls of `tenancy.current_tenant(anyelement)` in the plan of a statement on a
/// protected table into the statement's tenant parameters.
///
/// # Safety
/// `stmt` is the PlannedStmt the planner just returned, in the memory context it was made in.
pub unsafe fn after_planning(stmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: see above.
    unsafe {
        if stmt.is_null() || (*stmt).commandType == pg_sys::CmdType::CMD_UTILITY || nothing_protected() || BUSY.get() {
            return;
        }
        BUSY.set(true);
        let _done = crate::util::OnDrop(|| BUSY.set(false));
        if !relations((*stmt).rtable).any(|rte| protected(rte.relid).is_some()) {
            return;
        }
        let Ok(ids) = catalog::ids() else { return };
        if ids.tenant_fn == pg_sys::InvalidOid || ids.param_types.contains(&pg_sys::InvalidOid) {
            return;
        }
        let mut pass = Pass { stmt, marker: ids.tenant_fn, domains: ids.param_types, slots: [None; 4], gathers: Vec::new() };
        pass.plan((*stmt).planTree);
        for sub in list_ptrs((*stmt).subplans) {
            pass.plan(sub.cast());
        }
        pass.finish();
        if ids.probe_mark != pg_sys::InvalidOid && crate::protect::probe::candidates(stmt) {
            (*stmt).paramExecTypes = pg_sys::lappend_oid((*stmt).paramExecTypes, ids.probe_mark);
            PROBE_MARK.with(|m| m.set(ids.probe_mark));
        }
    }
}

struct Pass {
    stmt: *mut pg_sys::PlannedStmt,
    marker: pg_sys::Oid,
    domains: [pg_sys::Oid; 4],
    /// The parameter id given to each kind, once one is needed.
    slots: [Option<c_int>; 4],
    /// Gather and GatherMerge nodes: their workers need the values.
    gathers: Vec<*mut pg_sys::Plan>,
}

impl Pass {
    /// # Safety
    /// `p` is NULL or a Plan node of the statement.
    unsafe fn plan(&mut self, p: *mut pg_sys::Plan) {
        use pg_sys::NodeTag::*;
        if p.is_null() {
            return;
        }
        // SAFETY (whole function): `p` is a valid Plan node; the casts follow its tag; every
        // field passed to `expr` is an expression tree (or NIL) of this node.
        unsafe {
            let tag = (*p).type_;
            // Custom and foreign scans may evaluate their own expressions while they are set up,
            // before the parameter is filled: leave their nodes alone (their children are plans).
            if tag == T_CustomScan {
                self.plans((*(p as *mut pg_sys::CustomScan)).custom_plans);
                return;
            }
            self.expr(&mut (*p).targetlist);
            self.expr(&mut (*p).qual);
            match tag {
                T_Result => self.expr(&mut (*(p as *mut pg_sys::Result)).resconstantqual),
                T_ModifyTable => {
                    let m = p as *mut pg_sys::ModifyTable;
                    self.expr(&mut (*m).withCheckOptionLists);
                    self.expr(&mut (*m).returningLists);
                    self.expr(&mut (*m).onConflictSet);
                    self.expr(&mut (*m).onConflictWhere);
                    self.expr(&mut (*m).mergeActionLists);
                }
                // (part_prune_info is left alone: its initial steps run while the plan is set up)
                T_Append => self.plans((*(p as *mut pg_sys::Append)).appendplans),
                T_MergeAppend => self.plans((*(p as *mut pg_sys::MergeAppend)).mergeplans),
                T_BitmapAnd => self.plans((*(p as *mut pg_sys::BitmapAnd)).bitmapplans),
                T_BitmapOr => self.plans((*(p as *mut pg_sys::BitmapOr)).bitmapplans),
                T_SampleScan => self.expr(&mut (*(p as *mut pg_sys::SampleScan)).tablesample),
                T_IndexScan => {
                    let s = p as *mut pg_sys::IndexScan;
                    self.expr(&mut (*s).indexqual);
                    self.expr(&mut (*s).indexqualorig);
                    self.expr(&mut (*s).indexorderby);
                    self.expr(&mut (*s).indexorderbyorig);
                }
                T_IndexOnlyScan => {
                    let s = p as *mut pg_sys::IndexOnlyScan;
                    self.expr(&mut (*s).indexqual);
                    self.expr(&mut (*s).recheckqual);
                    self.expr(&mut (*s).indexorderby);
                }
                T_BitmapIndexScan => {
                    let s = p as *mut pg_sys::BitmapIndexScan;
                    self.expr(&mut (*s).indexqual);
                    self.expr(&mut (*s).indexqualorig);
                }
                T_BitmapHeapScan => self.expr(&mut (*(p as *mut pg_sys::BitmapHeapScan)).bitmapqualorig),
                T_TidScan => self.expr(&mut (*(p as *mut pg_sys::TidScan)).tidquals),
                T_TidRangeScan => self.expr(&mut (*(p as *mut pg_sys::TidRangeScan)).tidrangequals),
                T_SubqueryScan => self.plan((*(p as *mut pg_sys::SubqueryScan)).subplan),
                T_FunctionScan => self.expr(&mut (*(p as *mut pg_sys::FunctionScan)).functions),
                T_ValuesScan => self.expr(&mut (*(p as *mut pg_sys::ValuesScan)).values_lists),
                T_TableFuncScan => self.expr(&mut (*(p as *mut pg_sys::TableFuncScan)).tablefunc),
                T_NestLoop | T_MergeJoin | T_HashJoin => {
                    self.expr(&mut (*(p as *mut pg_sys::Join)).joinqual);
                    match tag {
                        T_MergeJoin => self.expr(&mut (*(p as *mut pg_sys::MergeJoin)).mergeclauses),
                        T_HashJoin => {
                            let h = p as *mut pg_sys::HashJoin;
                            self.expr(&mut (*h).hashclauses);
                            self.expr(&mut (*h).hashkeys);
                        }
                        _ => {}
                    }
                }
                T_Hash => self.expr(&mut (*(p as *mut pg_sys::Hash)).hashkeys),
                T_Memoize => self.expr(&mut (*(p as *mut pg_sys::Memoize)).param_exprs),
                T_WindowAgg => {
                    let w = p as *mut pg_sys::WindowAgg;
                    self.expr(&mut (*w).startOffset);
                    self.expr(&mut (*w).endOffset);
                    self.expr(&mut (*w).runCondition);
                    self.expr(&mut (*w).runConditionOrig);
                }
                T_Limit => {
                    let l = p as *mut pg_sys::Limit;
                    self.expr(&mut (*l).limitOffset);
                    self.expr(&mut (*l).limitCount);
                }
                T_Gather | T_GatherMerge => self.gathers.push(p),
                _ => {}
            }
            self.plan((*p).lefttree);
            self.plan((*p).righttree);
        }
    }

    /// # Safety
    /// `list` is NIL or a List of Plan nodes of the statement.
    unsafe fn plans(&mut self, list: *mut pg_sys::List) {
        // SAFETY: see above.
        for p in unsafe { list_ptrs(list) } {
            // SAFETY: see above.
            unsafe { self.plan(p.cast()) };
        }
    }

    /// Replace, in one expression field, every call of the marker function by the parameter of
    /// its kind. The tree is copied only when it holds a call.
    ///
    /// # Safety
    /// `field` points at an expression tree (any node type expression_tree_walker knows) or NULL.
    unsafe fn expr<T>(&mut self, field: &mut *mut T) {
        let node = (*field).cast::<pg_sys::Node>();
        if node.is_null() {
            return;
        }
        // SAFETY: walker and mutator over a valid expression tree, with callbacks of the
        // signatures they expect; the context pointers outlive the calls.
        unsafe {
            let mut marker = self.marker;
            if !pg_sys::expression_tree_walker(node, Some(calls_marker), (&mut marker as *mut pg_sys::Oid).cast()) {
                return;
            }
            *field = replace_calls(node, (self as *mut Pass).cast()).cast();
        }
    }

    /// The parameter for a call of the marker function, or None for a type it has no kind for.
    ///
    /// # Safety
    /// `call` is a FuncExpr of the marker function in this statement's plan.
    unsafe fn param_for(&mut self, call: *mut pg_sys::FuncExpr) -> Option<*mut pg_sys::Node> {
        // SAFETY: see above; list_length/lappend_oid on the statement's own list, palloc0 in
        // the plan's memory context (the current one).
        unsafe {
            let kind = kind_of((*call).funcresulttype)?;
            let id = match self.slots[kind] {
                Some(id) => id,
                None => {
                    let id = list_oids((*self.stmt).paramExecTypes).count() as c_int;
                    (*self.stmt).paramExecTypes = pg_sys::lappend_oid((*self.stmt).paramExecTypes, self.domains[kind]);
                    self.slots[kind] = Some(id);
                    id
                }
            };
            let p = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast::<pg_sys::Param>();
            (*p).xpr.type_ = pg_sys::NodeTag::T_Param;
            (*p).paramkind = pg_sys::ParamKind::PARAM_EXEC;
            (*p).paramid = id;
            (*p).paramtype = (*call).funcresulttype;
            (*p).paramtypmod = -1;
            (*p).paramcollid = (*call).funccollid;
            (*p).location = (*call).location;
            Some(p.cast())
        }
    }

    /// Record the kinds used, and send their values to parallel workers.
    ///
    /// # Safety
    /// Called once, after the walk, on the statement's nodes.
    unsafe fn finish(self) {
        let used: Vec<(usize, c_int)> = self.slots.iter().enumerate().filter_map(|(k, s)| s.map(|id| (k, id))).collect();
        if used.is_empty() {
            return;
        }
        OURS.with(|o| {
            let mut o = o.borrow_mut();
            for &(k, _) in &used {
                if !o.iter().any(|&(d, _)| d == self.domains[k]) {
                    o.push((self.domains[k], BASES[k]));
                }
            }
        });
        for &g in &self.gathers {
            // SAFETY: Gather or GatherMerge nodes of this plan (tags checked in `plan`).
            unsafe {
                let params = if (*g).type_ == pg_sys::NodeTag::T_Gather {
                    &mut (*(g as *mut pg_sys::Gather)).initParam
                } else {
                    &mut (*(g as *mut pg_sys::GatherMerge)).initParam
                };
                for &(_, id) in &used {
                    *params = pg_sys::bms_add_member(*params, id);
                }
            }
        }
    }
}

/// expression_tree_walker callback: whether the tree calls the marker function.
#[pg_guard]
unsafe extern "C-unwind" fn calls_marker(node: *mut pg_sys::Node, context: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: a node of the tree being walked; the context is the marker's OID.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_FuncExpr && (*node.cast::<pg_sys::FuncExpr>()).funcid == *context.cast::<pg_sys::Oid>() {
            return true;
        }
        pg_sys::expression_tree_walker(node, Some(calls_marker), context)
    }
}

/// expression_tree_mutator callback: a copy of the tree with the marker's calls replaced.
#[pg_guard]
unsafe extern "C-unwind" fn replace_calls(node: *mut pg_sys::Node, context: *mut c_void) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    // SAFETY: a node of the tree being copied; the context is the running Pass.
    unsafe {
        let pass = &mut *context.cast::<Pass>();
        if (*node).type_ == pg_sys::NodeTag::T_FuncExpr && (*node.cast::<pg_sys::FuncExpr>()).funcid == pass.marker {
            if let Some(param) = pass.param_for(node.cast()) {
                return param;
            }
            return node;
        }
        // The binding declares the callback without arguments; it is called with these two.
        let mutator = std::mem::transmute::<
            unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut c_void) -> *mut pg_sys::Node,
            unsafe extern "C-unwind" fn() -> *mut pg_sys::Node,
        >(replace_calls);
        pg_sys::expression_tree_mutator(node, Some(mutator), context)
    }
}

// ---------------------------------------------------------------------------------------------
// When the statement starts: the parameters are filled
// ---------------------------------------------------------------------------------------------

/// Whether a statement about to run (again) had its parameters filled: a cursor's statement runs
/// at every fetch, long after it started. Cell reads only.
///
/// # Safety
/// `query_desc` is a started QueryDesc.
pub unsafe fn filled(query_desc: *mut pg_sys::QueryDesc) -> bool {
    RUNS.with(|r| r.try_borrow().map(|r| r.iter().any(|&(q, _)| q == query_desc as usize)).unwrap_or(false))
        // (an entry left by a statement that failed is harmless: its address must also hold a
        // plan with tenant parameters)
        // SAFETY: see above.
        && unsafe { has_tenant_params(query_desc) }
}

/// Whether a started statement's plan has tenant parameter slots.
///
/// # Safety
/// `query_desc` is a started QueryDesc.
unsafe fn has_tenant_params(query_desc: *mut pg_sys::QueryDesc) -> bool {
    // SAFETY: see above.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        !stmt.is_null()
            && OURS.with(|o| {
                o.try_borrow().is_ok_and(|o| list_oids((*stmt).paramExecTypes).any(|t| o.iter().any(|&(d, _)| d == t)))
            })
    }
}

/// The transaction ended: no statement of it runs again.
pub fn forget_runs() {
    RUNS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.clear();
        }
    });
}

/// Before a filled statement runs (again): if what verifications read changed since it was
/// filled (a grant revoked, a tenant suspended), verify the context again, raising as a policy
/// would. (PL/pgSQL's FETCH and a protocol-level Execute reach a cursor's portal without a SQL
/// FETCH, whose own check would catch it.)
pub fn verify_again(query_desc: *mut pg_sys::QueryDesc) {
    let now = context::generation();
    let stale = RUNS.with(|r| r.borrow().iter().any(|&(q, g)| q == query_desc as usize && g != now));
    if stale {
        context::verified().or_raise();
        RUNS.with(|r| {
            for e in r.borrow_mut().iter_mut().filter(|e| e.0 == query_desc as usize) {
                e.1 = now;
            }
        });
    }
}

/// A statement ended: forget it.
pub fn ended(query_desc: *mut pg_sys::QueryDesc) {
    RUNS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.retain(|&(q, _)| q != query_desc as usize);
        }
    });
}

/// Whether the plan of a started statement is marked as comparing a tenant column with a
/// constant or a bound parameter (see `probe::candidates`).
///
/// # Safety
/// `query_desc` is a started QueryDesc.
pub unsafe fn probe_marked(query_desc: *mut pg_sys::QueryDesc) -> bool {
    let mark = PROBE_MARK.with(|m| m.get());
    if mark == pg_sys::InvalidOid {
        return false;
    }
    // SAFETY: see above.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        !stmt.is_null() && list_oids((*stmt).paramExecTypes).any(|t| t == mark)
    }
}

/// The OIDs of an OID List (empty for NIL).
///
/// # Safety
/// `list` is NIL or a valid OID List.
unsafe fn list_oids(list: *mut pg_sys::List) -> impl Iterator<Item = pg_sys::Oid> {
    // SAFETY: an OID List's cells hold OIDs, `length` of them.
    let cells: &[pg_sys::ListCell] =
        unsafe { if list.is_null() { &[] } else { std::slice::from_raw_parts((*list).elements, (*list).length as usize) } };
    // SAFETY: reading the oid member of a cell of an OID List.
    cells.iter().map(|c| unsafe { c.oid_value })
}

/// Fill the statement's tenant parameters from the verified context (raising as a policy would
/// when there is none, or it does not verify). Not for EXPLAIN without ANALYZE (nothing runs),
/// nor for the part of a parallel plan a worker runs for its leader (the leader sends the
/// values); statements a worker plans itself (in a function it runs) are filled here.
///
/// # Safety
/// `query_desc` was just started by standard_ExecutorStart (its estate is set up).
pub unsafe fn fill(query_desc: *mut pg_sys::QueryDesc) {
    // SAFETY: see above; the slots exist for every entry of paramExecTypes.
    unsafe {
        if pg_sys::ParallelWorkerNumber >= 0 {
            let dest = (*query_desc).dest;
            if !dest.is_null() && (*dest).mydest == pg_sys::CommandDest::DestTupleQueue {
                return;
            }
        } else if OURS.with(|o| o.borrow().is_empty()) {
            return; // this backend never made such a plan
        }
        let stmt = (*query_desc).plannedstmt;
        let estate = (*query_desc).estate;
        if stmt.is_null() || estate.is_null() || (*stmt).paramExecTypes.is_null() || (*estate).es_param_exec_vals.is_null() {
            return;
        }
        let mut tenant: Option<context::Rc<context::Verified>> = None;
        for (i, ty) in list_oids((*stmt).paramExecTypes).enumerate() {
            let Some(base) = OURS.with(|o| o.borrow().iter().find(|&&(d, _)| d == ty).map(|&(_, b)| b)) else {
                continue;
            };
            if tenant.is_none() {
                let generation = context::generation();
                RUNS.with(|r| {
                    let mut r = r.borrow_mut();
                    r.retain(|&(q, _)| q != query_desc as usize);
                    r.push((query_desc as usize, generation));
                });
                // Verified now, for this statement (a statement run while this one was being set
                // up, by a function its partition pruning called, say, may have verified another
                // context since the permission check: nothing is carried over).
                tenant = Some(context::verified().or_raise());
            }
            let t = tenant.as_deref().map(|v| v.tenant.as_str()).unwrap_or_default();
            let old = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = (*estate).es_query_cxt;
            let _back = crate::util::OnDrop(|| pg_sys::CurrentMemoryContext = old);
            let value = tenant_datum(base, t);
            let slot = (*estate).es_param_exec_vals.add(i as usize);
            (*slot).execPlan = std::ptr::null_mut();
            (*slot).value = value;
            (*slot).isnull = false;
        }
    }
}
