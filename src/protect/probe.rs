//! `cross_tenant_probe` seen in a plan: a statement on a protected table whose filters compare
//! the tenant column with a constant or a bound parameter naming another tenant returns nothing,
//! but it is a probe, and it is recorded. Looked for after the plan is ready (ExecutorStart), for
//! statements that touch a protected table only.
use pgrx::pg_sys;
use std::ffi::{c_int, CStr};

use crate::audit::{self, Event};
use crate::catalog::list_ptrs;
use crate::catalog::protected::protected;

/// Record a probe in the plan of `query_desc` if its filters name a tenant other than `tenant`.
///
/// # Safety
/// `query_desc` is a started QueryDesc.
pub unsafe fn examine(query_desc: *mut pg_sys::QueryDesc, tenant: &str) {
    // SAFETY: a started QueryDesc has a valid plannedstmt and (possibly NULL) params.
    unsafe {
        let stmt = (*query_desc).plannedstmt;
        if stmt.is_null() || (*stmt).commandType == pg_sys::CmdType::CMD_UTILITY {
            return;
        }
        let mut probe = Probe { rtable: (*stmt).rtable, params: (*query_desc).params, tenant, seen: Vec::new(), candidates: None };
        probe.plan((*stmt).planTree);
        for sub in list_ptrs((*stmt).subplans) {
            probe.plan(sub.cast());
        }
    }
}

struct Probe<'a> {
    rtable: *mut pg_sys::List,
    params: pg_sys::ParamListInfo,
    tenant: &'a str,
    seen: Vec<pg_sys::Oid>,
    /// At planning time: whether a comparison could name a tenant (no value is looked at).
    candidates: Option<bool>,
}

/// Whether a plan compares a protected table's tenant column with a constant or a bound
/// parameter, which `examine` has to look at when the statement starts (asked once, when the
/// plan is made: most plans have no such comparison and are not walked at every execution).
///
/// # Safety
/// `stmt` is a PlannedStmt the planner just returned.
pub unsafe fn candidates(stmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: see above.
    unsafe {
        let mut probe =
            Probe { rtable: (*stmt).rtable, params: std::ptr::null_mut(), tenant: "", seen: Vec::new(), candidates: Some(false) };
        probe.plan((*stmt).planTree);
        for sub in list_ptrs((*stmt).subplans) {
            probe.plan(sub.cast());
        }
        probe.candidates == Some(true)
    }
}

/// Whether `node` is a constant or an external parameter (or an array of them), as a probe
/// compares (see `scalar` and `array`).
///
/// # Safety
/// `node` is an expression node of a plan.
unsafe fn constant_or_parameter(node: *mut pg_sys::Node) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: casts follow the node tag.
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_Const => true,
            pg_sys::NodeTag::T_Param => (*(node as *mut pg_sys::Param)).paramkind == pg_sys::ParamKind::PARAM_EXTERN,
            pg_sys::NodeTag::T_ArrayExpr => list_ptrs((*(node as *mut pg_sys::ArrayExpr)).elements)
                .into_iter()
                .any(|e| constant_or_parameter(strip(e.cast()))),
            _ => false,
        }
    }
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
    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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

    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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

    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
    unsafe fn quals(&mut self, list: *mut pg_sys::List, t: Target) {
        // SAFETY: a List of expression nodes.
        for e in unsafe { list_ptrs(list) } {
            unsafe { self.expr(e.cast(), t) };
        }
    }

    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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
                    if let Some(found) = self.candidates.as_mut() {
                        *found |= constant_or_parameter(other);
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
                    if let Some(found) = self.candidates.as_mut() {
                        *found |= constant_or_parameter(strip(args[1].cast()));
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

    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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
    ///
    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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

    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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
    ///
    /// # Safety
    /// The nodes and lists given belong to the plan of the statement being started.
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
///
/// # Safety
/// The nodes and lists given belong to the plan of the statement being started.
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

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn tenant_values_compare_by_type() {
        assert!(same_tenant("42", pg_sys::INT4OID, "042"));
        assert!(!same_tenant("43", pg_sys::INT8OID, "42"));
        assert!(same_tenant("7C9E6679-7425-40DE-944B-E07FC1F90AE7", pg_sys::UUIDOID, "7c9e6679-7425-40de-944b-e07fc1f90ae7"));
        assert!(!same_tenant("Acme", pg_sys::TEXTOID, "acme"));
        assert!(same_tenant("acme", pg_sys::TEXTOID, "acme"));
    }
}
