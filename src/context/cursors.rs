//! `WITH HOLD` cursors follow the tenant context that declared them.
//!
//! A held cursor outlives its transaction: its rows, computed under one tenant's context, wait in
//! the session. On a connection a pooler hands from one client to the next without a reset, the
//! next client could read them (FETCH, a PL/pgSQL `FETCH` in a `DO` block, a protocol-level
//! Execute). What a cursor reads cannot be known when it is declared (a PL/pgSQL or SQL
//! function can read a protected table), so every held cursor is bound to the value
//! `pg_tenancy.tenant` held when it was declared (no value included), and is readable only
//! while the setting holds that value again:
//! - the setting's assign hook marks the cursor's portal failed whenever the setting takes
//!   another value (including the end of a transaction-scoped context) and ready again when it
//!   takes the declaring value back — PostgreSQL refuses to run a portal that is not ready, by
//!   every route;
//! - a SQL `FETCH`/`MOVE` under another value is refused with 42501 before that, and recorded as
//!   `cross_tenant_probe` (with the cursor's tenant as the attempted one) when either context
//!   named a tenant;
//! - a SQL `FETCH`/`MOVE` of a cursor declared under a tenant verifies the context again, as
//!   every statement on a protected table does; grants, roles or tenants that change lock held
//!   cursors until it does (setting the context back does not: a rollback restores a value
//!   without verifying anything).
//!
//! Cursors without HOLD end with their transaction; within it, a SQL `FETCH` is checked the same
//! way. A cursor declared and fetched with no context at all, as in a database that uses no
//! tenancy, behaves as without pg_tenancy.
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};

use crate::audit::{self, Event};
use crate::error::TenancyError;
use crate::gucs;

struct Held {
    name: CString,
    /// Identifies the portal (a later cursor may reuse the name).
    created: pg_sys::TimestampTz,
    /// `pg_tenancy.tenant` when it was declared (None: unset).
    context: Option<Vec<u8>>,
    /// The verified tenant then, for the audit record.
    tenant: Option<String>,
    /// A protected table it reads (InvalidOid when none is seen), for the audit record.
    rel: pg_sys::Oid,
    /// WITH HOLD (tracked across transactions); without it, only within its transaction.
    hold: bool,
    /// Marked failed by us because the setting holds another value.
    foreign: bool,
    /// Marked failed by us because grants, roles or tenants changed since it was last verified.
    stale: bool,
    /// Its portal is failed because we failed it (and so ours to make ready again).
    flipped: bool,
}

impl Held {
    /// Flip the portal to match the two locks: failed while either holds, ready again when
    /// neither does and it was us who failed it.
    ///
    /// # Safety
    /// `p` is this cursor's live portal.
    unsafe fn settle(&mut self, p: pg_sys::Portal) {
        // SAFETY: see above; the flips are what PostgreSQL itself does to a portal it will not
        // run (MarkPortalFailed without the cleanup a held portal does not need).
        unsafe {
            if self.foreign || self.stale {
                if (*p).status == pg_sys::PortalStatus::PORTAL_READY {
                    (*p).status = pg_sys::PortalStatus::PORTAL_FAILED;
                    self.flipped = true;
                }
            } else if self.flipped && (*p).status == pg_sys::PortalStatus::PORTAL_FAILED {
                (*p).status = pg_sys::PortalStatus::PORTAL_READY;
                self.flipped = false;
            }
        }
    }

}

static HELD: crate::util::Backend<RefCell<Vec<Held>>> = crate::util::Backend::new(RefCell::new(Vec::new()));

/// The live portal of a tracked cursor, or None when it was closed or replaced.
///
/// # Safety
/// Called in a backend with a portal table (any backend running SQL).
unsafe fn portal_of(h: &Held) -> Option<pg_sys::Portal> {
    // SAFETY: a hash lookup in the portal table; NULL when there is no such portal.
    let p = unsafe { pg_sys::GetPortalByName(h.name.as_ptr()) };
    (!p.is_null() && unsafe { (*p).creation_time } == h.created).then_some(p)
}

fn current_context() -> Option<Vec<u8>> {
    gucs::tenant_raw().filter(|s| !s.is_empty()).map(String::into_bytes)
}

/// After a `DECLARE` ran: track it when it is a held cursor.
///
/// # Safety
/// `stmt` is the DeclareCursorStmt PostgreSQL just executed.
pub unsafe fn declared(stmt: *mut pg_sys::DeclareCursorStmt) {
    // SAFETY: see above.
    let (name, options) = unsafe { ((*stmt).portalname, (*stmt).options) };
    if name.is_null() {
        return;
    }
    // SAFETY: a NUL-terminated name from the parser.
    let name = unsafe { CStr::from_ptr(name) }.to_owned();
    HELD.with(|h| h.borrow_mut().retain(|c| c.name != name));
    let hold = options & pg_sys::CURSOR_OPT_HOLD as i32 != 0;
    // SAFETY: lookup of the portal DECLARE just made; its statements are PlannedStmts.
    let (portal, rel) = unsafe {
        let portal = pg_sys::GetPortalByName(name.as_ptr());
        if portal.is_null() {
            return;
        }
        let rel = crate::catalog::list_ptrs((*portal).stmts)
            .into_iter()
            .filter(|s| !s.is_null() && (*(*s as *mut pg_sys::Node)).type_ == pg_sys::NodeTag::T_PlannedStmt)
            .find_map(|s| crate::catalog::protected::first_protected((*(s as *mut pg_sys::PlannedStmt)).rtable))
            .unwrap_or(pg_sys::InvalidOid);
        (portal, rel)
    };
    let context = current_context();
    let tenant = if context.is_some() { crate::context::with_context(|v| v.tenant.clone()).ok() } else { None };
    HELD.with(|h| {
        h.borrow_mut().push(Held {
            name,
            // SAFETY: the portal found above.
            created: unsafe { (*portal).creation_time },
            context,
            tenant,
            rel,
            hold,
            foreign: false,
            stale: false,
            flipped: false,
        })
    });
}

/// Before a SQL `FETCH` or `MOVE`: refuse (42501, recorded) a cursor declared under another
/// context; for one declared under a tenant, verify the context again (as every statement on a
/// protected table does: a grant revoked, a membership lost, a tenant suspended or a token
/// expired since the cursor was declared refuse it, and a `SET ROLE` to a role without the grant
/// too).
///
/// # Safety
/// `stmt` is the FetchStmt PostgreSQL is about to execute.
pub unsafe fn before_fetch(stmt: *mut pg_sys::FetchStmt) {
    // SAFETY: see above.
    let name = unsafe { (*stmt).portalname };
    if name.is_null() || HELD.with(|h| h.borrow().is_empty()) {
        return;
    }
    // SAFETY: a NUL-terminated name from the parser.
    let name = unsafe { CStr::from_ptr(name) };
    let now = current_context();
    let found = HELD.with(|h| {
        h.borrow()
            .iter()
            // SAFETY: portal lookup only.
            .find(|c| c.name.as_c_str() == name && unsafe { portal_of(c) }.is_some())
            .map(|c| (c.rel, c.tenant.clone(), c.context.is_some(), c.context != now))
    });
    let Some((rel, tenant, declared_in_tenant, foreign)) = found else { return };
    if foreign {
        if declared_in_tenant || now.is_some() {
            audit::record(
                Event::CrossTenantProbe,
                rel,
                tenant.as_deref(),
                "42501",
                "fetch from a held cursor declared in another tenant context",
            );
        }
        TenancyError::ForeignCursor.raise();
    }
    if declared_in_tenant {
        if let Err(e) = crate::context::with_context(|_| ()) {
            e.raise();
        }
        // verified now: a portal locked when the grants changed is readable again
        HELD.with(|h| {
            for c in h.borrow_mut().iter_mut().filter(|c| c.name.as_c_str() == name && c.stale) {
                // SAFETY: portal lookup; settle only undoes our flips.
                unsafe {
                    if let Some(p) = portal_of(c) {
                        c.stale = false;
                        c.settle(p);
                    }
                }
            }
        });
    }
}

/// Grants, roles or tenants changed (an invalidation): held cursors declared under a tenant
/// become unreadable by every route until a SQL FETCH verifies the context again. Only flips
/// portal states, as an invalidation callback must.
pub fn verification_changed() {
    HELD.with(|h| {
        let Ok(mut held) = h.try_borrow_mut() else { return };
        for c in held.iter_mut().filter(|c| c.context.is_some()) {
            // SAFETY: portal lookup; the flip is what PostgreSQL does to a portal it will not run.
            unsafe {
                if let Some(p) = portal_of(c) {
                    // (a held cursor of the current transaction is left alone: failing it would
                    // drop it at COMMIT; a SQL FETCH of it is verified)
                    if (*p).createSubid == 0 || !c.hold {
                        c.stale = true;
                        c.settle(p);
                    }
                }
            }
        }
    });
}

/// From the assign hook of `pg_tenancy.tenant`: held cursors declared under another value become
/// unreadable, those declared under this one readable again. Only flips portal states (no
/// allocation in PostgreSQL, no error), as an assign hook must.
///
/// # Safety
/// `newval` is the setting's new value (a C string or NULL).
pub unsafe fn on_tenant_assign(newval: *const c_char) {
    HELD.with(|h| {
        let Ok(mut held) = h.try_borrow_mut() else { return };
        if held.is_empty() {
            return;
        }
        // SAFETY: PostgreSQL passes the new value, a C string or NULL.
        let new = (!newval.is_null())
            .then(|| unsafe { CStr::from_ptr(newval) }.to_bytes())
            .filter(|v| !v.is_empty());
        held.retain_mut(|c| {
            // SAFETY: portal lookup; the state flips are what PostgreSQL itself does to a portal
            // it will not run (MarkPortalFailed without the cleanup a held portal does not need).
            unsafe {
                let Some(p) = portal_of(c) else { return false };
                // A cursor of the current transaction is not held yet: committing a failed one
                // would drop it. It is flipped once held (the setting reverts after that).
                // (createSubid 0 = InvalidSubTransactionId: held over from a previous transaction.)
                if (*p).createSubid != 0 || !c.hold {
                    return true;
                }
                c.foreign = c.context.as_deref() != new;
                c.settle(p);
                true
            }
        });
    });
}
