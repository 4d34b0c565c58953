//! The setting `pg_tenancy.tenant`: its check hook (verify a value, and keep with it who set
//! it), its assign hook, and how the functions set it.
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr, CString};

use pg_tenancy_core::token;

use super::{valid_tenant_id, with_verified};
use crate::error::TenancyError;

/// Who set the current value of `pg_tenancy.tenant`: a value is honoured only if that role
/// holds the grant too, not only the role using it (a SECURITY DEFINER function owned by an
/// all-tenants role must not turn a context its caller could not set into one it can use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setter {
    /// The role that set it: the current user at `SET`/`set_config`/`set_tenant`, the session
    /// user for start-up options and role or database defaults.
    Role(pg_sys::Oid),
    /// Restored in a parallel worker from its leader: the role the session acts as
    /// (`GetOuterUserId`) stands in for the setter, a bound the leader's setter never exceeds.
    Worker,
    /// Set where no role is known (the server's command line): never honoured.
    Unknown,
}

/// What the check hook keeps with each value (PostgreSQL stores it with the value, restores it
/// with the value at RESET and rollback, and frees it with `free()`).
#[repr(C)]
#[derive(Clone, Copy)]
struct SetterExtra {
    kind: u8,
    role: pg_sys::Oid,
}

unsafe extern "C" {
    fn malloc(size: usize) -> *mut c_void;
}


/// Whether this session was already told that a transaction-scoped context outside a
/// transaction block lasts one statement.
static WARNED: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// Who set the current value (see [`Setter`]); kept by the assign hook.
static SETTER: crate::util::Backend<Cell<Setter>> = crate::util::Backend::new(Cell::new(Setter::Unknown));
/// While set_tenant() sets a value it just verified for the role calling it: that value (in the
/// function's argument, alive for the call) and that role. The check hook does not verify the
/// same value for the same role a second time.
static PREVERIFIED: crate::util::Backend<Cell<Option<(*const u8, usize, pg_sys::Oid)>>> =
    crate::util::Backend::new(Cell::new(None));

/// Who set the value in force.
pub fn setter() -> Setter {
    SETTER.with(|s| s.get())
}

/// Check hook of `pg_tenancy.tenant`: refuses, at SET time, any value the setting role could not
/// use, and keeps with the value which role set it. Outside a transaction (connection start-up
/// options, role and database defaults) only the shape is checked; the value is verified for
/// the role that set it (the session user) and for the role using it at every use.
#[pg_guard]
pub unsafe extern "C-unwind" fn check_tenant_guc(
    newval: *mut *mut c_char,
    extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    use pg_sys::GucSource::*;
    // SAFETY: PostgreSQL passes a valid pointer to a (possibly NULL) C string, which lives
    // until this hook returns.
    let value: &[u8] = unsafe {
        let p = *newval;
        if p.is_null() {
            return true;
        }
        CStr::from_ptr(p).to_bytes()
    };
    if value.is_empty() {
        return true;
    }
    if !crate::util::preloaded() {
        TenancyError::PreloadRequired.to_guc_check();
        return false;
    }
    // SAFETY: a plain read of a backend-global.
    let worker = unsafe { pg_sys::ParallelWorkerNumber >= 0 };
    let (current, session) = (crate::util::pg::user(), crate::util::pg::session_user());
    let setter = if worker {
        Setter::Worker
    } else if crate::util::loading() {
        // set before the library was loaded (a placeholder applied now): nobody vouches for it
        Setter::Unknown
    } else {
        match source {
            PGC_S_SESSION => Setter::Role(current),
            PGC_S_GLOBAL | PGC_S_DATABASE | PGC_S_USER | PGC_S_DATABASE_USER | PGC_S_CLIENT | PGC_S_OVERRIDE
                if session != pg_sys::InvalidOid =>
            {
                Setter::Role(session)
            }
            _ => Setter::Unknown,
        }
    };
    // (SPI needs a transaction and a snapshot or portal: SET and set_config() have them;
    // connection start-up options do not.)
    let in_xact = crate::util::pg::in_transaction()
        && !worker
        // SAFETY: a plain read of a backend-global.
        && (crate::util::pg::snapshot_set() || unsafe { !pg_sys::ActivePortal.is_null() });
    let preverified = matches!((PREVERIFIED.get(), setter), (Some((p, n, r)), Setter::Role(s))
        // SAFETY: set_context_verified's value, alive until it returns (it clears this first).
        if s == current && r == current && unsafe { std::slice::from_raw_parts(p, n) } == value);
    let outcome = match setter {
        Setter::Role(_) if preverified && source == PGC_S_SESSION => Ok(()),
        Setter::Role(role) if in_xact && source == PGC_S_SESSION => with_verified(value, role, |_| ()),
        // ALTER ROLE/DATABASE ... SET validates the value for the role running it: an early
        // refusal (it is verified again for the session user at login, and at every use).
        _ if in_xact && source == PGC_S_TEST && !worker => with_verified(value, current, |_| ()),
        _ => match std::str::from_utf8(value) {
            Ok(v) if token::looks_like_token(v) || valid_tenant_id(v) => Ok(()),
            _ => Err(TenancyError::InvalidTenantId),
        },
    };
    if let Err(e) = outcome {
        e.to_guc_check();
        return false;
    }
    let (kind, role) = match setter {
        Setter::Role(r) => (0u8, r),
        Setter::Worker => (1, pg_sys::InvalidOid),
        Setter::Unknown => (2, pg_sys::InvalidOid),
    };
    // SAFETY: a malloc'd block PostgreSQL keeps with the value and frees with free(); NULL (out
    // of memory) makes the value refused rather than kept without its setter.
    unsafe {
        let p = malloc(std::mem::size_of::<SetterExtra>()) as *mut SetterExtra;
        if p.is_null() {
            return false;
        }
        p.write(SetterExtra { kind, role });
        *extra = p.cast();
    }
    true
}

/// Assign hook of `pg_tenancy.tenant`: remember who set the value now in force, and let held
/// cursors follow the context.
#[pg_guard]
pub unsafe extern "C-unwind" fn on_tenant_assign(newval: *const c_char, extra: *mut c_void) {
    let setter = if extra.is_null() {
        Setter::Unknown
    } else {
        // SAFETY: made by check_tenant_guc for this value.
        let e = unsafe { *(extra as *const SetterExtra) };
        match e.kind {
            0 => Setter::Role(e.role),
            1 => Setter::Worker,
            _ => Setter::Unknown,
        }
    };
    SETTER.with(|s| s.set(setter));
    // SAFETY: forwards PostgreSQL's arguments.
    unsafe { super::cursors::on_tenant_assign(newval) };
}


/// `set_context` for a value the caller just verified for `user`, the current role (a superuser
/// or not, as the verification says).
pub(super) fn set_context_verified(value: &str, user: pg_sys::Oid, superuser: bool, session: bool) {
    PREVERIFIED.set(Some((value.as_ptr(), value.len(), user)));
    let _done = crate::util::OnDrop(|| PREVERIFIED.set(None));
    set_context_as(value, superuser, session);
}

/// `value` NUL-terminated: on the stack when short (every tenant id), else on the heap.
enum CValue {
    Short([u8; 128]),
    Long(CString),
}

impl CValue {
    fn new(value: &str) -> CValue {
        if value.len() < 128 && !value.as_bytes().contains(&0) {
            let mut b = [0u8; 128];
            b[..value.len()].copy_from_slice(value.as_bytes());
            CValue::Short(b)
        } else {
            CValue::Long(CString::new(value).unwrap_or_default())
        }
    }

    fn as_ptr(&self) -> *const c_char {
        match self {
            CValue::Short(b) => b.as_ptr().cast(),
            CValue::Long(c) => c.as_ptr(),
        }
    }
}

pub(super) fn set_context(value: &str, session: bool) {
    // SAFETY: a catalog lookup through the syscache; an error is raised as a PostgreSQL error.
    set_context_as(value, unsafe { pg_sys::superuser() }, session)
}

/// Set the setting as the current role, a superuser or not.
fn set_context_as(value: &str, superuser: bool, session: bool) {
    let name = c"pg_tenancy.tenant";
    let cvalue = CValue::new(value);
    // SAFETY: valid NUL-terminated strings; errors are raised (elevel ERROR) as PostgreSQL errors.
    unsafe {
        let context = if superuser {
            pg_sys::GucContext::PGC_SUSET
        } else {
            pg_sys::GucContext::PGC_USERSET
        };
        let action =
            if session { pg_sys::GucAction::GUC_ACTION_SET } else { pg_sys::GucAction::GUC_ACTION_LOCAL };
        pg_sys::set_config_option(
            name.as_ptr(),
            cvalue.as_ptr(),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
        // Once per session: the mistake it points at is a pattern, and procedures that COMMIT
        // in a loop (where the context rightly lasts until the COMMIT) would repeat it forever.
        if !session && !crate::util::pg::in_transaction_block() && !value.is_empty() && !WARNED.with(|w| w.replace(true)) {
            pgrx::ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_NO_ACTIVE_SQL_TRANSACTION,
                "the tenant context lasts only until the end of this statement",
                "Call it inside BEGIN ... COMMIT, or pass session => true for a session-wide context."
            );
        }
    }
}
