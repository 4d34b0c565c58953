//! Executor hooks, each chained to the one installed before it.
//!
//! `ExecutorCheckPerms_hook` (once per statement, before it runs), for each protected table in
//! the range table:
//! - with no tenant context, a statement subject to row security is refused (28000) and
//!   recorded as `no_context`. The policies would refuse it at the first row; this makes the
//!   refusal unconditional, so an empty table does not answer with a silent empty result;
//! - a superuser or BYPASSRLS role that reads it is recorded as `bypass_read` (row security
//!   does not apply to such roles, FORCE or not);
//! - the table a statement writes is remembered, for events raised while it runs.
//!
//! `ProcessUtility_hook`: DDL that would weaken a protected table (disable or un-force row
//! security, disable its triggers, drop or alter its policies, add a permissive one, drop or
//! retype its tenant column) attempted by a role that does not own the table is recorded as
//! `policy_tamper` before PostgreSQL refuses it for want of ownership. (Owners and superusers
//! reach the guard's event triggers, which refuse and record it themselves.)
//!
//! The same hook runs `cursors::before_fetch` before a FETCH/MOVE and `cursors::declared` after a
//! DECLARE (held cursors follow their tenant context; see `cursors`).
//!
//! `ExecutorStart_hook`: after the plan is ready, a statement on a protected table whose
//! filters compare the tenant column with a constant or a parameter naming another tenant is
//! recorded as `cross_tenant_probe` (it returns nothing, but it is a probe). Statements that
//! touch no protected table are not examined.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_int, CStr};

use crate::audit::{self, Event};
use crate::catalog;
use crate::error::TenancyError;
use crate::gucs;

static mut PREV_CHECK_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

pub fn install() {
    // SAFETY: called once from _PG_init, before any query runs in this backend; the previous
    // hooks are kept and called first.
    unsafe {
        PREV_CHECK_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(check_perms);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        // A schema created or dropped (CREATE/DROP EXTENSION in another session) may change
        // whether anything is protected here.
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as c_int,
            Some(on_namespace_change),
            pg_sys::Datum::from(0),
        );
    }
}

thread_local! {
    /// Protected tables of this database and the attribute number of their tenant column;
    /// `None` until loaded or after an invalidation. Empty where pg_tenancy is not installed.
    static PROTECTED: RefCell<Option<HashMap<pg_sys::Oid, i16>>> = const { RefCell::new(None) };
    /// Set while the set is being loaded (the loading query itself passes through this hook).
    static LOADING: Cell<bool> = const { Cell::new(false) };
    /// The protected table the latest statement writes (InvalidOid when none).
    static LAST_WRITE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Whether the statement being started touches a protected table.
    static TOUCHED: Cell<bool> = const { Cell::new(false) };
}

/// Forget the protected set (relcache invalidation of `tenancy.protected_tables`).
pub fn forget() {
    PROTECTED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = None;
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_namespace_change(_arg: pg_sys::Datum, _cacheid: c_int, _hash: u32) {
    forget();
}

/// The protected table written by the statement running now (for events raised inside it).
pub fn last_write_target() -> pg_sys::Oid {
    LAST_WRITE.with(|l| l.get())
}

fn load_protected() -> HashMap<pg_sys::Oid, i16> {
    // The queries below pass through check_perms themselves.
    LOADING.with(|l| l.set(true));
    let _reset = crate::OnDrop(|| LOADING.with(|l| l.set(false)));
    // SAFETY: syscache lookup by name; no extension schema means nothing is protected here.
    let installed = unsafe { pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true) } != pg_sys::InvalidOid
        && catalog::ids().is_ok();
    let map = if installed {
        catalog::as_owner(|| {
            Spi::connect(|c| -> std::result::Result<_, pgrx::spi::Error> {
                let mut map = HashMap::new();
                for row in c.select(
                    "SELECT p.rel::pg_catalog.oid, a.attnum \
                       FROM tenancy.protected_tables p \
                       JOIN pg_catalog.pg_attribute a \
                         ON a.attrelid OPERATOR(pg_catalog.=) p.rel \
                        AND a.attname OPERATOR(pg_catalog.=) p.tenant_column \
                        AND NOT a.attisdropped",
                    None,
                    &[],
                )? {
                    if let (Some(oid), Some(attno)) = (row.get::<pg_sys::Oid>(1)?, row.get::<i16>(2)?) {
                        map.insert(oid, attno);
                    }
                }
                Ok(map)
            })
        })
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default()
    } else {
        HashMap::new()
    };
    PROTECTED.with(|p| *p.borrow_mut() = Some(map.clone()));
    map
}


/// The tenant column's attribute number when `rel` is protected.
fn protected(rel: pg_sys::Oid) -> Option<i16> {
    let cached = PROTECTED.with(|p| p.borrow().as_ref().map(|s| s.get(&rel).copied()));
    match cached {
        Some(hit) => hit,
        None => load_protected().get(&rel).copied(),
    }
}

/// A protected table in a range table, if any.
///
/// # Safety
/// `range_table` is a valid range table (List of RangeTblEntry) or NULL.
pub(crate) unsafe fn first_protected(range_table: *mut pg_sys::List) -> Option<pg_sys::Oid> {
    // SAFETY: see above.
    unsafe { relations(range_table) }.map(|rte| rte.relid).find(|&rel| protected(rel).is_some())
}

/// Every RTE_RELATION entry of a range table.
unsafe fn relations(range_table: *mut pg_sys::List) -> impl Iterator<Item = &'static pg_sys::RangeTblEntry> {
    let len = if range_table.is_null() { 0 } else { (unsafe { (*range_table).length }) as usize };
    (0..len).filter_map(move |i| {
        // SAFETY: i < length; every element of a range table is a RangeTblEntry.
        let rte = unsafe { &*((*(*range_table).elements.add(i)).ptr_value as *const pg_sys::RangeTblEntry) };
        (rte.rtekind == pg_sys::RTEKind::RTE_RELATION).then_some(rte)
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, ereport: bool) -> bool {
    // SAFETY: the previous hook has PostgreSQL's signature; errors it raises propagate.
    if let Some(prev) = unsafe { PREV_CHECK_PERMS } {
        if !unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| prev(range_table, ereport)) } {
            return false;
        }
    }
    // Parallel workers check the leader's range table again: the leader already refused or
    // recorded what there was to refuse or record.
    // SAFETY: reads a backend-global.
    if LOADING.with(|l| l.get()) || unsafe { pg_sys::ParallelWorkerNumber } >= 0 {
        return true;
    }
    // Nothing protected in this database (the common case for ordinary databases): done.
    if PROTECTED.with(|p| p.borrow().as_ref().is_some_and(|m| m.is_empty())) {
        LAST_WRITE.with(|l| l.set(pg_sys::InvalidOid));
        return true;
    }
    let has_context = gucs::has_tenant_value();
    let mut write_target = pg_sys::InvalidOid;
    // SAFETY: range_table is a valid List of RangeTblEntry pointers (or NIL).
    for rte in unsafe { relations(range_table) } {
        if protected(rte.relid).is_none() {
            continue;
        }
        TOUCHED.with(|t| t.set(true));
        let writes = rte.requiredPerms & (pg_sys::ACL_INSERT | pg_sys::ACL_UPDATE | pg_sys::ACL_DELETE) != 0;
        if writes && write_target == pg_sys::InvalidOid {
            write_target = rte.relid;
        }
        // SAFETY: GetUserId reads a backend-local variable.
        let user = if rte.checkAsUser != pg_sys::InvalidOid { rte.checkAsUser } else { unsafe { pg_sys::GetUserId() } };
        // SAFETY: catalog reads of the role (superuser_arg caches its answer).
        let bypass = unsafe { pg_sys::has_bypassrls_privilege(user) };
        if bypass {
            if rte.requiredPerms & pg_sys::ACL_SELECT != 0 {
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
        if !has_context {
            // Row security applies to this role (checked for the role that checks this entry).
            // SAFETY: check_enable_rls reads the catalogs; noError = true.
            let rls = unsafe { pg_sys::check_enable_rls(rte.relid, rte.checkAsUser, true) };
            if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as c_int {
                audit::record(Event::NoContext, rte.relid, None, "28000", "statement on a protected table without a tenant context");
                TenancyError::NoContext.raise();
            }
        }
    }
    LAST_WRITE.with(|l| l.set(write_target));
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: c_int) {
    TOUCHED.with(|t| t.set(false));
    // SAFETY: the previous hook (or the standard function) with PostgreSQL's arguments.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| prev(query_desc, eflags)),
            None => pg_sys::standard_ExecutorStart(query_desc, eflags),
        }
    }
    // SAFETY: reads a backend-global.
    if !TOUCHED.with(|t| t.get())
        || eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as c_int != 0
        || unsafe { pg_sys::ParallelWorkerNumber } >= 0
    {
        return;
    }
    let Ok(tenant) = crate::context::with_context(|v| v.tenant.clone()) else { return };
    // SAFETY: a started QueryDesc has a valid plannedstmt and (possibly NULL) params.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        if stmt.is_null() || (*stmt).commandType == pg_sys::CmdType::CMD_UTILITY {
            return;
        }
        let mut probe = Probe { rtable: (*stmt).rtable, params: (*query_desc).params, tenant: &tenant, seen: Vec::new() };
        probe.plan((*stmt).planTree);
        for sub in list_ptrs((*stmt).subplans) {
            probe.plan(sub.cast());
        }
    }
}

pub(crate) unsafe fn list_ptrs(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: a pointer List of `length` elements.
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).ptr_value).collect() }
}

struct Probe<'a> {
    rtable: *mut pg_sys::List,
    params: pg_sys::ParamListInfo,
    tenant: &'a str,
    seen: Vec<pg_sys::Oid>,
}

/// The scan being examined: its range-table index, relation and tenant column.
#[derive(Clone, Copy)]
struct Target {
    scanrelid: u32,
    rel: pg_sys::Oid,
    attno: i16,
    /// For index-only scans, the index's target list (quals use INDEX_VAR references).
    indextlist: *mut pg_sys::List,
}

impl Probe<'_> {
    unsafe fn plan(&mut self, p: *mut pg_sys::Plan) {
        use pg_sys::NodeTag::*;
        if p.is_null() {
            return;
        }
        // SAFETY (whole function): `p` is a valid Plan node; the casts follow its tag.
        unsafe {
            let tag = (*p).type_;
            let scanrelid = match tag {
                T_SeqScan | T_SampleScan | T_IndexScan | T_IndexOnlyScan | T_BitmapIndexScan | T_BitmapHeapScan
                | T_TidScan | T_TidRangeScan => (*(p as *mut pg_sys::Scan)).scanrelid,
                _ => 0,
            };
            if scanrelid > 0 {
                if let Some(mut t) = self.target(scanrelid) {
                    self.quals((*p).qual, t);
                    match tag {
                        T_IndexScan => self.quals((*(p as *mut pg_sys::IndexScan)).indexqualorig, t),
                        T_BitmapIndexScan => self.quals((*(p as *mut pg_sys::BitmapIndexScan)).indexqualorig, t),
                        T_BitmapHeapScan => self.quals((*(p as *mut pg_sys::BitmapHeapScan)).bitmapqualorig, t),
                        T_IndexOnlyScan => {
                            let ios = p as *mut pg_sys::IndexOnlyScan;
                            t.indextlist = (*ios).indextlist;
                            self.quals((*ios).indexqual, t);
                        }
                        _ => {}
                    }
                }
            }
            self.plan((*p).lefttree);
            self.plan((*p).righttree);
            let children = match tag {
                T_Append => (*(p as *mut pg_sys::Append)).appendplans,
                T_MergeAppend => (*(p as *mut pg_sys::MergeAppend)).mergeplans,
                T_BitmapAnd => (*(p as *mut pg_sys::BitmapAnd)).bitmapplans,
                T_BitmapOr => (*(p as *mut pg_sys::BitmapOr)).bitmapplans,
                T_CustomScan => (*(p as *mut pg_sys::CustomScan)).custom_plans,
                T_SubqueryScan => {
                    self.plan((*(p as *mut pg_sys::SubqueryScan)).subplan);
                    std::ptr::null_mut()
                }
                _ => std::ptr::null_mut(),
            };
            for c in list_ptrs(children) {
                self.plan(c.cast());
            }
        }
    }

    unsafe fn target(&self, scanrelid: u32) -> Option<Target> {
        // SAFETY: scanrelid indexes the statement's range table (1-based), checked against its
        // length.
        let rte = unsafe {
            if self.rtable.is_null() || scanrelid as usize > (*self.rtable).length as usize {
                return None;
            }
            (*(*self.rtable).elements.add(scanrelid as usize - 1)).ptr_value as *const pg_sys::RangeTblEntry
        };
        // SAFETY: a RangeTblEntry of this statement.
        let rel = unsafe { (*rte).relid };
        let attno = protected(rel)?;
        Some(Target { scanrelid, rel, attno, indextlist: std::ptr::null_mut() })
    }

    unsafe fn quals(&mut self, list: *mut pg_sys::List, t: Target) {
        // SAFETY: a List of expression nodes.
        for e in unsafe { list_ptrs(list) } {
            unsafe { self.expr(e.cast(), t) };
        }
    }

    unsafe fn expr(&mut self, node: *mut pg_sys::Node, t: Target) {
        use pg_sys::NodeTag::*;
        if node.is_null() || self.seen.contains(&t.rel) {
            return;
        }
        // SAFETY (whole function): casts follow the node tag.
        unsafe {
            match (*node).type_ {
                T_BoolExpr => {
                    for a in list_ptrs((*(node as *mut pg_sys::BoolExpr)).args) {
                        self.expr(a.cast(), t);
                    }
                }
                T_OpExpr => {
                    let op = node as *mut pg_sys::OpExpr;
                    let args = list_ptrs((*op).args);
                    if args.len() != 2 {
                        return;
                    }
                    let (l, r) = (strip(args[0].cast()), strip(args[1].cast()));
                    let other = if self.is_tenant_var(l, t) {
                        r
                    } else if self.is_tenant_var(r, t) {
                        l
                    } else {
                        return;
                    };
                    if !is_equality((*op).opno) {
                        return;
                    }
                    if let Some(v) = self.scalar(other) {
                        self.compare(&v, t);
                    }
                }
                T_ScalarArrayOpExpr => {
                    let op = node as *mut pg_sys::ScalarArrayOpExpr;
                    let args = list_ptrs((*op).args);
                    if args.len() != 2 || !(*op).useOr || !self.is_tenant_var(strip(args[0].cast()), t) {
                        return;
                    }
                    if !is_equality((*op).opno) {
                        return;
                    }
                    for v in self.array(strip(args[1].cast())) {
                        self.compare(&v, t);
                    }
                }
                _ => {}
            }
        }
    }

    unsafe fn is_tenant_var(&self, node: *mut pg_sys::Node, t: Target) -> bool {
        // SAFETY: casts follow the node tag.
        unsafe {
            if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Var {
                return false;
            }
            let v = node as *mut pg_sys::Var;
            if (*v).varlevelsup != 0 {
                return false;
            }
            if (*v).varno == pg_sys::INDEX_VAR && !t.indextlist.is_null() {
                let tl = list_ptrs(t.indextlist);
                let Some(tle) = tl.get((*v).varattno as usize - 1) else { return false };
                let inner = strip((*(*tle as *mut pg_sys::TargetEntry)).expr.cast());
                return !inner.is_null()
                    && (*inner).type_ == pg_sys::NodeTag::T_Var
                    && (*(inner as *mut pg_sys::Var)).varattno == t.attno;
            }
            (*v).varno == t.scanrelid as i32 && (*v).varattno == t.attno
        }
    }

    /// A constant or external parameter, as (text, type).
    unsafe fn scalar(&self, node: *mut pg_sys::Node) -> Option<(String, pg_sys::Oid)> {
        // SAFETY: casts follow the node tag; parameters come from this execution's list.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_Const => {
                    let c = node as *mut pg_sys::Const;
                    if (*c).constisnull {
                        return None;
                    }
                    Some((output((*c).constvalue, (*c).consttype)?, (*c).consttype))
                }
                pg_sys::NodeTag::T_Param => {
                    let (value, ty) = self.param(node as *mut pg_sys::Param)?;
                    Some((output(value, ty)?, ty))
                }
                _ => None,
            }
        }
    }

    unsafe fn param(&self, p: *mut pg_sys::Param) -> Option<(pg_sys::Datum, pg_sys::Oid)> {
        // SAFETY: PARAM_EXTERN ids are 1-based indexes into the execution's ParamListInfo.
        unsafe {
            if (*p).paramkind != pg_sys::ParamKind::PARAM_EXTERN || self.params.is_null() {
                return None;
            }
            let id = (*p).paramid;
            let params = self.params;
            if id < 1 || id > (*params).numParams {
                return None;
            }
            let mut workspace = pg_sys::ParamExternData::default();
            let prm: *mut pg_sys::ParamExternData = match (*params).paramFetch {
                Some(fetch) => fetch(params, id, true, &mut workspace),
                None => (*params).params.as_mut_ptr().add(id as usize - 1),
            };
            if prm.is_null() || (*prm).isnull || (*prm).ptype == pg_sys::InvalidOid {
                return None;
            }
            Some(((*prm).value, (*prm).ptype))
        }
    }

    /// The elements of a constant array, an ARRAY[...] of constants or an array parameter.
    unsafe fn array(&self, node: *mut pg_sys::Node) -> Vec<(String, pg_sys::Oid)> {
        // SAFETY: casts follow the node tag.
        unsafe {
            match (*node).type_ {
                pg_sys::NodeTag::T_ArrayExpr => list_ptrs((*(node as *mut pg_sys::ArrayExpr)).elements)
                    .into_iter()
                    .filter_map(|e| self.scalar(strip(e.cast())))
                    .collect(),
                pg_sys::NodeTag::T_Const => {
                    let c = node as *mut pg_sys::Const;
                    if (*c).constisnull {
                        return Vec::new();
                    }
                    elements((*c).constvalue)
                }
                pg_sys::NodeTag::T_Param => match self.param(node as *mut pg_sys::Param) {
                    Some((value, _)) => elements(value),
                    None => Vec::new(),
                },
                _ => Vec::new(),
            }
        }
    }

    fn compare(&mut self, value: &(String, pg_sys::Oid), t: Target) {
        if same_tenant(&value.0, value.1, self.tenant) || self.seen.contains(&t.rel) {
            return;
        }
        self.seen.push(t.rel);
        audit::record(
            Event::CrossTenantProbe,
            t.rel,
            Some(&value.0),
            "00000",
            "filter on the tenant column names another tenant",
        );
    }
}

fn same_tenant(value: &str, ty: pg_sys::Oid, tenant: &str) -> bool {
    match ty {
        pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID => {
            matches!((value.parse::<i64>(), tenant.parse::<i64>()), (Ok(a), Ok(b)) if a == b)
        }
        pg_sys::UUIDOID => value.eq_ignore_ascii_case(tenant),
        _ => value == tenant,
    }
}

/// Skip binary-compatible casts (varchar column compared as text, and the like).
unsafe fn strip(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    // SAFETY: casts follow the node tag.
    unsafe {
        while !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_RelabelType {
            node = (*(node as *mut pg_sys::RelabelType)).arg.cast();
        }
    }
    node
}

fn is_equality(opno: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookup; NULL for an unknown operator.
    unsafe {
        let name = pg_sys::get_opname(opno);
        !name.is_null() && CStr::from_ptr(name).to_bytes() == b"="
    }
}

fn output(value: pg_sys::Datum, ty: pg_sys::Oid) -> Option<String> {
    let mut func = pg_sys::InvalidOid;
    let mut varlena = false;
    // SAFETY: the type's output function applied to a non-null value of that type.
    unsafe {
        pg_sys::getTypeOutputInfo(ty, &mut func, &mut varlena);
        let s = pg_sys::OidOutputFunctionCall(func, value);
        if s.is_null() {
            return None;
        }
        Some(CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

fn elements(array: pg_sys::Datum) -> Vec<(String, pg_sys::Oid)> {
    // SAFETY: `array` is a non-null array datum; deconstruct_array copies out its elements.
    unsafe {
        let arr = pg_sys::pg_detoast_datum(array.cast_mut_ptr()) as *mut pg_sys::ArrayType;
        let elemtype = (*arr).elemtype;
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(elemtype, &mut len, &mut byval, &mut align);
        let mut values: *mut pg_sys::Datum = std::ptr::null_mut();
        let mut nulls: *mut bool = std::ptr::null_mut();
        let mut n: c_int = 0;
        pg_sys::deconstruct_array(arr, elemtype, len as c_int, byval, align, &mut values, &mut nulls, &mut n);
        (0..n as usize)
            .filter(|&i| !*nulls.add(i))
            .filter_map(|i| output(*values.add(i), elemtype).map(|s| (s, elemtype)))
            .collect()
    }
}


#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: pstmt is the utility statement PostgreSQL is about to run.
    unsafe {
        let node = (*pstmt).utilityStmt;
        if let Some((rel, what)) = weakening_target(node) {
            if !pg_sys::pg_class_ownercheck(rel, pg_sys::GetUserId()) {
                audit::record(Event::PolicyTamper, rel, None, "42501", what);
            }
        }
        if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_FetchStmt {
            crate::cursors::before_fetch(node as *mut pg_sys::FetchStmt);
        }
        match PREV_PROCESS_UTILITY {
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc)
            }),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
        if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_DeclareCursorStmt {
            crate::cursors::declared(node as *mut pg_sys::DeclareCursorStmt);
        }
    }
}

/// A protected table `rv` names (without locking it; NULL or unknown names give None).
unsafe fn protected_rangevar(rv: *mut pg_sys::RangeVar) -> Option<(pg_sys::Oid, i16)> {
    if rv.is_null() {
        return None;
    }
    // SAFETY: name lookup only, missing_ok.
    let rel = unsafe { pg_sys::RangeVarGetRelidExtended(rv, pg_sys::NoLock as _, pg_sys::RVROption::RVR_MISSING_OK as _, None, std::ptr::null_mut()) };
    if rel == pg_sys::InvalidOid {
        return None;
    }
    protected(rel).map(|attno| (rel, attno))
}

/// The protected table a utility statement would weaken, and how.
#[allow(non_upper_case_globals)]
unsafe fn weakening_target(node: *mut pg_sys::Node) -> Option<(pg_sys::Oid, &'static str)> {
    use pg_sys::AlterTableType::*;
    use pg_sys::NodeTag::*;
    if node.is_null() {
        return None;
    }
    // SAFETY (whole function): casts follow the node tag.
    unsafe {
        match (*node).type_ {
            T_AlterTableStmt => {
                let stmt = node as *mut pg_sys::AlterTableStmt;
                let (rel, attno) = protected_rangevar((*stmt).relation)?;
                let tenant_col = {
                    let n = pg_sys::get_attname(rel, attno, true);
                    (!n.is_null()).then(|| CStr::from_ptr(n).to_bytes().to_vec())
                };
                for c in list_ptrs((*stmt).cmds) {
                    let cmd = c as *mut pg_sys::AlterTableCmd;
                    let on_tenant_col = !(*cmd).name.is_null()
                        && tenant_col.as_deref() == Some(CStr::from_ptr((*cmd).name).to_bytes());
                    let what = match (*cmd).subtype {
                        AT_DisableRowSecurity => Some("attempt to disable row level security"),
                        AT_NoForceRowSecurity => Some("attempt to stop forcing row level security"),
                        AT_DisableTrig | AT_DisableTrigAll | AT_DisableTrigUser | AT_EnableReplicaTrig => {
                            Some("attempt to disable a trigger of a protected table")
                        }
                        AT_DropColumn | AT_AlterColumnType | AT_ColumnDefault | AT_DropNotNull if on_tenant_col => {
                            Some("attempt to drop or alter the tenant column")
                        }
                        _ => None,
                    };
                    if let Some(what) = what {
                        return Some((rel, what));
                    }
                }
                None
            }
            T_AlterPolicyStmt => {
                let stmt = node as *mut pg_sys::AlterPolicyStmt;
                protected_rangevar((*stmt).table).map(|(rel, _)| (rel, "attempt to alter a policy of a protected table"))
            }
            T_CreatePolicyStmt => {
                let stmt = node as *mut pg_sys::CreatePolicyStmt;
                if !(*stmt).permissive {
                    return None;
                }
                protected_rangevar((*stmt).table)
                    .map(|(rel, _)| (rel, "attempt to add a permissive policy to a protected table"))
            }
            T_DropStmt => {
                let stmt = node as *mut pg_sys::DropStmt;
                if (*stmt).removeType != pg_sys::ObjectType::OBJECT_POLICY
                    && (*stmt).removeType != pg_sys::ObjectType::OBJECT_TRIGGER
                {
                    return None;
                }
                for o in list_ptrs((*stmt).objects) {
                    let names = o as *mut pg_sys::List;
                    if names.is_null() || (*names).length < 2 {
                        continue;
                    }
                    let table = pg_sys::list_copy_head(names, (*names).length - 1);
                    if let Some((rel, _)) = protected_rangevar(pg_sys::makeRangeVarFromNameList(table)) {
                        return Some((rel, "attempt to drop a policy or trigger of a protected table"));
                    }
                }
                None
            }
            _ => None,
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn tenant_values_compare_by_type() {
        assert!(same_tenant("42", pg_sys::INT4OID, "042"));
        assert!(!same_tenant("43", pg_sys::INT8OID, "42"));
        assert!(same_tenant("7C9E6679-7425-40DE-944B-E07FC1F90AE7", pg_sys::UUIDOID, "7c9e6679-7425-40de-944b-e07fc1f90ae7"));
        assert!(!same_tenant("Acme", pg_sys::TEXTOID, "acme"));
        assert!(same_tenant("acme", pg_sys::TEXTOID, "acme"));
    }
}
