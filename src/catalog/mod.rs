//! Every read and write of the extension's own tables (`tenancy.tenants`, `tenancy.grants`,
//! `tenancy.protected_tables`, `tenancy.keys`, ...), and the one way SQL runs from Rust.
//!
//! Three rules hold for every statement here, whoever calls it:
//! - **search_path-proof.** `search_path` is pinned to `pg_catalog, pg_temp` for the duration of
//!   each statement (pg_temp last, explicitly), and the text itself schema-qualifies its objects
//!   and operators: nothing resolves through a schema the caller controls, so nothing the caller
//!   planted runs, least of all with the owner's rights.
//! - **As the owner when it must be.** The catalogs are not readable by application roles (that
//!   would list every tenant to every tenant); statements marked [`Who::Owner`] run as the owner
//!   of the extension's schema, as a security-restricted operation, for that statement only.
//! - **Fresh.** Reads that decide access see the catalogs as of now, never the transaction's
//!   snapshot: a REPEATABLE READ or SERIALIZABLE transaction opened before a grant was revoked
//!   must not keep honouring it (the verification caches are dropped by invalidation; what is
//!   read again must be current).
//!
//! Statements are prepared once per backend and kept (PostgreSQL's plan cache replans them when
//! the tables change); SPI errors reach the caller as PostgreSQL errors.
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{CStr, CString};

use crate::error::{Result, TenancyError};

pub mod audit_log;
pub mod backups;
pub mod keys;
pub mod pg;
pub mod protected;
pub mod tenants;
pub mod usage;

/// Who a statement runs as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Who {
    /// The calling role (statements on PostgreSQL's own catalogs, DDL the caller must own).
    Caller,
    /// The owner of the extension's schema (statements on the extension's tables).
    Owner,
}

/// A statement: its text, the types of its parameters, who runs it, and whether it reads with a
/// fresh snapshot.
pub struct Stmt {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    pub who: Who,
    /// Read as of now (a fresh snapshot) instead of the transaction's snapshot. For reads that
    /// decide access; writes always take a new snapshot (and lock what they change).
    pub fresh: bool,
}

/// OIDs of the extension's schema owner and catalog tables in this database.
#[derive(Clone, Copy, Debug)]
pub struct CatalogIds {
    pub owner: pg_sys::Oid,
    pub tenants: pg_sys::Oid,
    pub grants: pg_sys::Oid,
    pub protected: pg_sys::Oid,
    pub keys: pg_sys::Oid,
    /// `tenancy.changes` (change capture writes it directly).
    pub changes: pg_sys::Oid,
    /// `tenancy.current_tenant(anyelement)`, which policies call (InvalidOid if absent).
    pub tenant_fn: pg_sys::Oid,
    /// The domains that mark the statement's tenant parameter: text, int4, int8, uuid.
    pub param_types: [pg_sys::Oid; 4],
    /// The domain of the slot that marks a plan with comparisons a probe check looks at.
    pub probe_mark: pg_sys::Oid,
}

thread_local! {
    /// Prepared, kept plans by statement (the address of its text).
    static PLANS: RefCell<HashMap<usize, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

static IDS: crate::util::Backend<Cell<Option<CatalogIds>>> = crate::util::Backend::new(Cell::new(None));

/// Forget the cached OIDs (called on invalidation).
pub fn forget() {
    IDS.with(|c| c.set(None));
}

pub fn cached_ids() -> Option<CatalogIds> {
    IDS.with(|c| c.get())
}

const EXTENSION: Stmt = Stmt {
    sql: "SELECT n.nspowner, \
                 pg_catalog.to_regclass('tenancy.tenants')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.grants')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.protected_tables')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.keys')::pg_catalog.oid, \
                 pg_catalog.to_regprocedure('tenancy.current_tenant(anyelement)')::pg_catalog.oid, \
                 pg_catalog.to_regtype('tenancy._param_text')::pg_catalog.oid, \
                 pg_catalog.to_regtype('tenancy._param_int4')::pg_catalog.oid, \
                 pg_catalog.to_regtype('tenancy._param_int8')::pg_catalog.oid, \
                 pg_catalog.to_regtype('tenancy._param_uuid')::pg_catalog.oid, \
                 pg_catalog.to_regtype('tenancy._probe_mark')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.changes')::pg_catalog.oid \
            FROM pg_catalog.pg_extension e \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
           WHERE e.extname OPERATOR(pg_catalog.=) 'pg_tenancy'",
    args: &[],
    who: Who::Caller,
    fresh: true,
};

/// The catalog OIDs, looked up once per backend and again after an invalidation.
pub fn ids() -> Result<CatalogIds> {
    if let Some(ids) = cached_ids() {
        return Ok(ids);
    }
    // SAFETY: syscache lookup by name; no schema means the extension is not installed here, and
    // the statement below would not even parse-analyze.
    if unsafe { pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true) } == pg_sys::InvalidOid {
        return Err(TenancyError::NotInstalled);
    }
    let row = run_as(&EXTENSION, &[], pg_sys::InvalidOid, |r| {
        let oid = |i: i32| r.get::<pg_sys::Oid>(i);
        let optional = |i: i32| oid(i).unwrap_or(pg_sys::InvalidOid);
        (
            (oid(1), oid(2), oid(3), oid(4), oid(5)),
            optional(6),
            [optional(7), optional(8), optional(9), optional(10)],
            optional(11),
            optional(12),
        )
    })
    .into_iter()
    .next();
    match row {
        Some(((Some(owner), Some(tenants), Some(grants), Some(protected), Some(keys)), tenant_fn, param_types, probe_mark, changes)) => {
            let ids = CatalogIds { owner, tenants, grants, protected, keys, changes, tenant_fn, param_types, probe_mark };
            IDS.with(|c| c.set(Some(ids)));
            Ok(ids)
        }
        _ => Err(TenancyError::NotInstalled),
    }
}

/// The pointers of a pointer List (empty for NIL).
///
/// # Safety
/// `list` is NIL or a valid pointer List.
pub unsafe fn list_ptrs(list: *mut pg_sys::List) -> Vec<*mut std::ffi::c_void> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: a pointer List of `length` elements.
    unsafe { (0..(*list).length as usize).map(|i| (*(*list).elements.add(i)).ptr_value).collect() }
}

/// A relation's schema-qualified, quoted name (empty when it is gone).
pub fn relation_name(rel: pg_sys::Oid) -> String {
    if rel == pg_sys::InvalidOid {
        return String::new();
    }
    // SAFETY: syscache lookups by OID; NULL when the relation is gone.
    unsafe {
        let name = pg_sys::get_rel_name(rel);
        if name.is_null() {
            return String::new();
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(rel));
        let q = pg_sys::quote_qualified_identifier(nsp, name);
        std::ffi::CStr::from_ptr(q).to_string_lossy().into_owned()
    }
}

/// One row of a result, read while the statement's memory is alive.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    /// Column `col` (1-based), `None` for NULL.
    pub fn get<T: FromDatum>(&self, col: i32) -> Option<T> {
        let mut isnull = false;
        // SAFETY: tuple and descriptor come from SPI_tuptable of the statement just run, still
        // alive (the SPI connection is open); out-of-range columns give NULL with SPI_result set.
        unsafe {
            if col < 1 || col > (*self.desc).natts {
                return None;
            }
            let d = pg_sys::SPI_getbinval(self.tuple, self.desc, col, &mut isnull);
            T::from_datum(d, isnull)
        }
    }
}

/// Restores the caller's user id and security context when dropped, also while unwinding.
struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned before the switch.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

/// Becomes `owner` for as long as the guard lives (a security-restricted operation).
fn become_user(owner: pg_sys::Oid) -> RestoreUser {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: plain reads and writes of the backend's current user id; the guard restores it,
    // and PostgreSQL itself restores it if the transaction aborts.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    RestoreUser { user, sec_context }
}

/// Settings changed for as long as the guard lives: a GUC nest level, as a function's `SET`
/// clauses make. On success it is popped here; on an error the transaction's (or
/// subtransaction's) abort pops it, as it does for functions.
pub struct GucScope(i32);

impl GucScope {
    pub fn new(settings: &[(&CStr, &CStr)]) -> Self {
        // SAFETY: a new GUC nest level and SAVE-action settings in it, exactly what
        // fmgr_security_definer does for proconfig; allowed in parallel mode (SAVE action). The
        // context is that of a superuser's SET: the callers set only what they must.
        unsafe {
            let level = pg_sys::NewGUCNestLevel();
            for (name, value) in settings {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_SUSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
            GucScope(level)
        }
    }
}

impl Drop for GucScope {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // An error is unwinding: the abort that follows pops this nest level (and any a
            // subtransaction abort already popped must not be popped twice).
            return;
        }
        // SAFETY: pops the nest level made in new(), restoring the previous values.
        unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
    }
}

/// `search_path = pg_catalog, pg_temp` (pg_temp last, explicitly) while alive.
pub struct PinnedSearchPath {
    _scope: GucScope,
}

impl PinnedSearchPath {
    pub fn new() -> Self {
        PinnedSearchPath { _scope: GucScope::new(&[(c"search_path", c"pg_catalog, pg_temp")]) }
    }
}

impl Default for PinnedSearchPath {
    fn default() -> Self {
        Self::new()
    }
}

/// Run `f` as the owner of the extension's schema with a pinned search_path: for code that runs
/// SQL of its own (SPI) with the owner's rights.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> Result<R> {
    let ids = ids()?;
    let _path = PinnedSearchPath::new();
    let _user = become_user(ids.owner);
    Ok(f())
}

fn plan_for(stmt: &Stmt) -> pg_sys::SPIPlanPtr {
    let key = stmt.sql.as_ptr() as usize;
    if let Some(p) = PLANS.with(|p| p.borrow().get(&key).copied()) {
        return p;
    }
    let sql = CString::new(stmt.sql).expect("statement text has no NUL");
    let mut types = stmt.args.to_vec();
    // SAFETY: called inside an SPI connection with a pinned search_path; SPI_keepplan moves the
    // plan out of the SPI procedure's memory so that it outlives this connection.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            pgrx::error!("pg_tenancy: could not prepare a catalog statement (SPI code {code})");
        }
        pg_sys::SPI_keepplan(plan);
        PLANS.with(|p| p.borrow_mut().insert(key, plan));
        plan
    }
}

/// Forget the prepared plans (after DROP EXTENSION they would no longer parse).
pub fn forget_plans() {
    PLANS.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            for (_, plan) in p.drain() {
                // SAFETY: a plan kept by plan_for and used by nobody else.
                unsafe { pg_sys::SPI_freeplan(plan) };
            }
        }
    });
}

/// Run `stmt` with `args` (one per parameter, None for NULL) and map each result row.
pub fn run<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], f: impl FnMut(&Row) -> T) -> Result<Vec<T>> {
    let owner = match stmt.who {
        Who::Owner => ids()?.owner,
        Who::Caller => pg_sys::InvalidOid,
    };
    Ok(run_as(stmt, args, owner, f))
}

/// Run `stmt` read-only with the calling statement's snapshot (not a new one, even in READ
/// COMMITTED): what a backup records must be what its reads saw.
pub fn run_in_statement_snapshot<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], f: impl FnMut(&Row) -> T) -> Result<Vec<T>> {
    let owner = match stmt.who {
        Who::Owner => ids()?.owner,
        Who::Caller => pg_sys::InvalidOid,
    };
    Ok(run_with(stmt, args, owner, true, f))
}

fn run_as<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], owner: pg_sys::Oid, f: impl FnMut(&Row) -> T) -> Vec<T> {
    run_with(stmt, args, owner, false, f)
}

fn run_with<T>(
    stmt: &Stmt,
    args: &[Option<pg_sys::Datum>],
    owner: pg_sys::Oid,
    statement_snapshot: bool,
    mut f: impl FnMut(&Row) -> T,
) -> Vec<T> {
    assert_eq!(args.len(), stmt.args.len(), "statement arguments");
    let _path = PinnedSearchPath::new();
    let _user = (owner != pg_sys::InvalidOid).then(|| become_user(owner));
    let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.unwrap_or(pg_sys::Datum::from(0))).collect();
    let nulls: Vec<std::ffi::c_char> = args.iter().map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char).collect();
    Spi::connect(|_client| {
        let plan = plan_for(stmt);
        // SAFETY: an open SPI connection, a kept plan with stmt.args parameters, and arrays of
        // that length. A parallel operation can neither take a new snapshot nor advance the
        // command counter: it reads with the statement's snapshot (its leader already verified
        // what it decides, with a fresh one).
        unsafe {
            let parallel = pg_sys::IsInParallelMode();
            let fresh = stmt.fresh && !parallel;
            let snapshot = if fresh { pg_sys::GetLatestSnapshot() } else { std::ptr::null_mut() };
            let rc = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                snapshot,
                std::ptr::null_mut(),
                parallel || statement_snapshot,
                true,
                0,
            );
            if rc < 0 {
                pgrx::error!("pg_tenancy: a catalog statement failed (SPI code {rc})");
            }
            let table = pg_sys::SPI_tuptable;
            let n = if table.is_null() { 0 } else { pg_sys::SPI_processed as usize };
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let row = Row { tuple: *(*table).vals.add(i), desc: (*table).tupdesc };
                out.push(f(&row));
            }
            out
        }
    })
}

/// The first row of `stmt`, if any.
pub fn one<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], f: impl FnMut(&Row) -> T) -> Result<Option<T>> {
    Ok(run(stmt, args, f)?.into_iter().next())
}

/// `Some(datum)` of a value for a statement argument.
pub fn arg<T: IntoDatum>(v: T) -> Option<pg_sys::Datum> {
    v.into_datum()
}

