//! Every cache pg_tenancy keeps in a backend, and every event that must drop one, in one place.
//!
//! | cache | inputs | dropped on |
//! | --- | --- | --- |
//! | catalog OIDs (`catalog::ids`) | the extension's schema and tables | relcache reset or invalidation of those tables (their rows changed, or DROP EXTENSION dropped them); a schema created or dropped |
//! | protected set (`catalog::protected`) | `tenancy.protected_tables`, `pg_attribute` | the same; while the extension is not installed (an empty set), any relcache invalidation |
//! | verified contexts (`context`) | `tenancy.tenants`, `tenancy.grants`, roles, role memberships, the verification settings | relcache invalidation of the two tables (sent by their triggers); syscache invalidation of `pg_authid` and `pg_auth_members`; the settings' assign hooks |
//! | held cursors' readability (`context::cursors`) | the same as verified contexts | the same |
//! | unwrapped and ready keys (`crypto::keystore`) | `tenancy.keys`, the master-key settings | relcache invalidation of `tenancy.keys` (its triggers); the settings' assign hooks; the abort of a (sub)transaction that may have created a key |
//! | a pending EXPLAIN ANALYZE (`protect::explain`) | the statement | the abort of a (sub)transaction |
//! | statements being planned (`protect::param`) | the planner hook | the abort of a (sub)transaction |
//! | tenant parameter slot types (`protect::param`) | plans this backend made | never (only grows) |
//! | statements whose parameters were filled (`protect::param`) | the executor hooks | ExecutorEnd; the end of the transaction |
//! | partition roots of captured rows (`protect::capture`) | `pg_inherits` | any relcache invalidation |
//! | the statement being counted, its concurrent place (`stats`) | the executor and utility hooks | ExecutorEnd of the statement or the end of its utility statement; its error report; the end of the transaction (not a COMMIT inside a CALL); the next counted statement; the backend's exit |
//! | a client utility statement is running (`stats::client`) | the utility hook | its end; any error report; any (sub)transaction abort |
//! | tenants' places in shared memory (`stats`) | the shared index | never (places are kept for the life of the server) |
//! | tenants' limits (in verified contexts) | `tenancy.plans`, `tenancy.limits` | their triggers invalidate `tenancy.tenants` |
use pgrx::prelude::*;
use std::ffi::{c_char, c_int, c_void};

use crate::catalog;
use crate::context;
use crate::crypto::keystore;
use crate::protect::{explain, param};

/// Register every callback, once, from `_PG_init`.
pub fn init() {
    // SAFETY: registers #[pg_guard] callbacks with the signatures PostgreSQL expects.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHOID,
            pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE,
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(cache as c_int, Some(on_role_change), pg_sys::Datum::from(0));
        }
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as c_int,
            Some(on_namespace_change),
            pg_sys::Datum::from(0),
        );
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

/// Verifications may be stale.
fn verification_inputs_changed() {
    context::clear_cache();
    context::cursors::verification_changed();
}

/// Everything, at once (the extension came or went, or PostgreSQL reset its caches).
fn forget_everything() {
    catalog::forget();
    catalog::protected::forget();
    verification_inputs_changed();
    keystore::forget_keys();
}

/// Relcache invalidations of the extension's tables (their triggers send them when rows change)
/// or a full reset.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::protect::capture::forget_roots();
    if relid == pg_sys::InvalidOid {
        forget_everything();
        return;
    }
    // Invariant: whatever is cached was read through catalog::ids(), and the ids are forgotten
    // only with everything else. While no ids are cached, the one thing cached is the answer
    // "nothing is protected here" (an empty set), which any relation change may end (CREATE
    // EXTENSION into a schema that already exists sends no schema invalidation).
    let Some(ids) = catalog::cached_ids() else {
        catalog::protected::forget();
        return;
    };
    // The extension's tables send these when their rows change (their triggers), and when they
    // are dropped: DROP EXTENSION leaves the `tenancy` schema behind (CREATE EXTENSION made it
    // because of the control file's `schema`, so it is not a member), so no schema invalidation
    // comes, and cached OIDs would name tables that are gone. These changes are rare (grants,
    // tenants, protect(), key states; not the encryption counter): start over.
    if relid == ids.protected || relid == ids.tenants || relid == ids.grants || relid == ids.keys || relid == ids.changes {
        forget_everything();
    }
}

/// A role or a role membership changed anywhere in the cluster.
#[pg_guard]
unsafe extern "C-unwind" fn on_role_change(_arg: pg_sys::Datum, _cacheid: c_int, _hash: u32) {
    verification_inputs_changed();
}

/// A schema was created or dropped (CREATE/DROP EXTENSION in another session, say).
#[pg_guard]
unsafe extern "C-unwind" fn on_namespace_change(_arg: pg_sys::Datum, _cacheid: c_int, _hash: u32) {
    forget_everything();
}

/// (Called at every transaction event: the common ones return after two comparisons, without
/// an error boundary; what does work runs in `on_abort`.)
#[link_section = ".text.hot.pg_tenancy"]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut c_void) {
    use pg_sys::XactEvent::*;
    if event == XACT_EVENT_PRE_COMMIT {
        if crate::crypto::shreds_pending() {
            // SAFETY: a #[pg_guard] function of ours (it may raise: the commit then fails).
            unsafe { on_pre_commit() };
        }
    } else if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT) {
        param::forget_runs();
        crate::hooks::forget_inserting();
        // (not a COMMIT inside a procedure: the CALL is still running)
        if !crate::stats::client::in_utility() {
            crate::stats::transaction_ended();
        }
    } else if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT) {
        param::forget_runs();
        // SAFETY: a #[pg_guard] function of ours.
        unsafe { on_abort() };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_pre_commit() {
    crate::crypto::run_pending_shreds();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_abort() {
    crate::stats::client::utility_done();
    crate::hooks::forget_inserting();
    crate::stats::transaction_ended();
    crate::crypto::forget_pending_shreds(0);
    keystore::forget_keys();
    explain::done();
    param::reset_planning();
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        crate::stats::client::utility_done();
        // SAFETY: reads the nesting level of the subtransaction being aborted.
        crate::crypto::forget_pending_shreds(unsafe { pg_sys::GetCurrentTransactionNestLevel() });
        keystore::forget_keys();
        explain::done();
        param::reset_planning();
    }
}

/// Assign hook of the settings that change how a context value verifies.
#[pg_guard]
pub unsafe extern "C-unwind" fn on_verification_setting(_new: *const c_char, _extra: *mut c_void) {
    verification_inputs_changed();
}

#[pg_guard]
pub unsafe extern "C-unwind" fn on_verification_setting_int(_new: i32, _extra: *mut c_void) {
    verification_inputs_changed();
}

/// Assign hook of the master-key settings.
#[pg_guard]
pub unsafe extern "C-unwind" fn on_master_key_setting(_new: *const c_char, _extra: *mut c_void) {
    keystore::forget_master_keys();
}

/// Invalidate every backend's caches of `rel` (fired by the triggers on the extension's tables).
#[pg_extern(volatile, parallel_unsafe)]
fn _invalidate(rel: pg_sys::Oid) {
    // SAFETY: queues a relcache invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}
