//! Executor hooks, each chained to the one installed before it.
//!
//! `ExecutorCheckPerms_hook`: a statement that reads or writes a protected table with no tenant
//! context is refused before it runs (28000). The policies already refuse it as soon as they
//! look at a row; this makes the refusal unconditional, so a table that happens to be empty (or a
//! plan that never evaluates the policy) does not answer with a silent empty result. It costs
//! nothing when a context is set: the range table is only examined when there is none.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

use crate::catalog;
use crate::error::TenancyError;
use crate::gucs;

static mut PREV_CHECK_PERMS: pg_sys::ExecutorCheckPerms_hook_type = None;

pub fn install() {
    // SAFETY: called once from _PG_init, before any query runs in this backend; the previous
    // hook is kept and called first.
    unsafe {
        PREV_CHECK_PERMS = pg_sys::ExecutorCheckPerms_hook;
        pg_sys::ExecutorCheckPerms_hook = Some(check_perms);
    }
}

thread_local! {
    /// OIDs of protected tables in this database; `None` until loaded or after invalidation.
    static PROTECTED: RefCell<Option<HashSet<pg_sys::Oid>>> = const { RefCell::new(None) };
    /// Set while the set is being loaded (the loading query itself passes through this hook).
    static LOADING: Cell<bool> = const { Cell::new(false) };
}

/// Forget the protected set (relcache invalidation of `tenancy.protected_tables`).
pub fn forget() {
    PROTECTED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = None;
        }
    });
}

fn load_protected() -> Option<HashSet<pg_sys::Oid>> {
    // SAFETY: syscache lookup by name; no extension schema means nothing is protected here.
    if unsafe { pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true) } == pg_sys::InvalidOid {
        return None;
    }
    LOADING.with(|l| l.set(true));
    let _reset = scopeguard(|| LOADING.with(|l| l.set(false)));
    let set = catalog::as_owner(|| {
        Spi::connect(|c| -> std::result::Result<_, pgrx::spi::Error> {
            let mut set = HashSet::new();
            for row in c.select("SELECT rel::pg_catalog.oid FROM tenancy.protected_tables", None, &[])? {
                if let Some(oid) = row.get::<pg_sys::Oid>(1)? {
                    set.insert(oid);
                }
            }
            Ok(set)
        })
    })
    .ok()?
    .ok()?;
    PROTECTED.with(|p| *p.borrow_mut() = Some(set.clone()));
    Some(set)
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

fn is_protected(rel: pg_sys::Oid) -> bool {
    let cached = PROTECTED.with(|p| p.borrow().as_ref().map(|s| s.contains(&rel)));
    match cached {
        Some(hit) => hit,
        None => load_protected().is_some_and(|s| s.contains(&rel)),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_perms(range_table: *mut pg_sys::List, ereport: bool) -> bool {
    // SAFETY: the previous hook has PostgreSQL's signature; errors it raises propagate.
    if let Some(prev) = unsafe { PREV_CHECK_PERMS } {
        if !unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| prev(range_table, ereport)) } {
            return false;
        }
    }
    if gucs::has_tenant_value() || LOADING.with(|l| l.get()) {
        return true;
    }
    if range_table.is_null() {
        return true;
    }
    // SAFETY: range_table is a valid List (NIL checked above) of `length` RangeTblEntry pointers.
    let len = unsafe { (*range_table).length } as usize;
    for i in 0..len {
        // SAFETY: i < length; every element of a range table is a RangeTblEntry.
        let rte = unsafe { &*((*(*range_table).elements.add(i)).ptr_value as *const pg_sys::RangeTblEntry) };
        if rte.rtekind != pg_sys::RTEKind::RTE_RELATION || !is_protected(rte.relid) {
            continue;
        }
        // Row security applies to the role that checks this entry (superusers and BYPASSRLS
        // roles read without a context, as they would without pg_tenancy).
        // SAFETY: check_enable_rls reads the catalogs; noError = true.
        let rls = unsafe { pg_sys::check_enable_rls(rte.relid, rte.checkAsUser, true) };
        if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as std::ffi::c_int {
            TenancyError::NoContext.raise();
        }
    }
    true
}
