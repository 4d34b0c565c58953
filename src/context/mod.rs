//! The tenant context: the database side of "X-Tenant-ID is mandatory and validated".
//!
//! The context travels in one setting, `pg_tenancy.tenant`, whose value is a tenant id or a
//! signed token. That makes it transaction-scoped by default (`SET LOCAL` semantics: safe behind
//! transaction-pooling poolers), cleared by `DISCARD ALL`, and able to travel as a single
//! `SET LOCAL` to other nodes, each of which verifies it on its own.
//!
//! The setting is never trusted: a check hook verifies every value when it is set, and
//! [`resolve`] verifies it again, for the role running the statement, every time a policy reads
//! it. Verification results are cached per backend; the cache is dropped when the extension's
//! catalogs change (relcache invalidation, sent by triggers on those tables) or when a setting
//! that governs verification changes.
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::ffi::CStr;
pub use std::rc::Rc;

use pg_tenancy_core::model::{Scope, Status};
use pg_tenancy_core::token::{self, TokenError};

use crate::catalog;
use crate::error::{Result, TenancyError};
use crate::gucs::{self, ContextMode};

pub mod cursors;
pub mod grants;
pub mod setting;
pub mod sql;

pub use setting::{check_tenant_guc, on_tenant_assign};

/// Whether `id` may name a tenant (see `pg_tenancy_core::tenant_id`).
pub fn valid_tenant_id(id: &str) -> bool {
    pg_tenancy_core::tenant_id::valid(id)
}

/// A context value as this backend keeps it: inline when it is a tenant id (at most 63 bytes),
/// on the heap when it is longer (a token). Inline, the comparison of the last verification
/// with the value in place reads the same cache lines as the role it was verified for.
#[derive(Debug, Clone)]
enum Raw {
    Inline { len: u8, bytes: [u8; 63] },
    Heap(Box<[u8]>),
}

impl Raw {
    fn new(b: &[u8]) -> Raw {
        if b.len() <= 63 {
            let mut bytes = [0u8; 63];
            bytes[..b.len()].copy_from_slice(b);
            Raw::Inline { len: b.len() as u8, bytes }
        } else {
            Raw::Heap(b.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Raw::Inline { len, bytes } => &bytes[..*len as usize],
            Raw::Heap(b) => b,
        }
    }

    /// The value as text (it was valid UTF-8 when verified).
    fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

/// A context value verified for one role. (`repr(C)`: the value and the role, which every
/// lookup compares, come first, on the entry's first cache line.)
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Verified {
    user: pg_sys::Oid,
    raw: Raw,
    pub tenant: String,
    pub scope: Scope,
    pub read_only: bool,
    pub config: Option<String>,
    /// `exp` of the token the context came from, re-checked at every use.
    exp: Option<i64>,
    /// The tenant's plan and limits, as of this verification (a change of plans, limits or
    /// tenants drops every verification: the next statement sees it).
    pub limits: crate::stats::Limits,
    /// The role it was verified for is a superuser (a change of roles drops every verification).
    pub superuser: bool,
}

impl Verified {
    /// Whether this context may write: an active tenant and a read_write or admin grant.
    pub fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(TenancyError::ReadOnly)
        } else if self.scope < Scope::ReadWrite {
            Err(TenancyError::ReadScope)
        } else {
            Ok(())
        }
    }
}


/// Distinct (value, role) verifications kept per backend. A pooled connection that serves many
/// tenants keeps them all warm (bench/README.md: 1,000 tenants); past this the cache starts over.
const CACHE_CAPACITY: usize = 4096;

/// Verified context values, one slot per value and role, in one open-addressing table: each
/// slot is one cache line holding the hash of its value (FNV-1a), the role, whether the value is
/// a plain tenant id (not a token: no expiry), whether the role is a superuser, and the value
/// itself when it fits (every tenant id up to 41 bytes, UUIDs included), so that set_tenant(),
/// which only needs to know that a plain id verifies, reads the control bytes and one line of
/// one contiguous array, never the entry the slot points to.
static CACHE: crate::util::Backend<RefCell<hashbrown::HashTable<Slot>>> =
    crate::util::Backend::new(RefCell::new(hashbrown::HashTable::new()));

/// Longest value a slot holds inline.
const SLOT_INLINE: usize = 41;

#[repr(C, align(64))]
struct Slot {
    hash: u64,
    v: Rc<Verified>,
    user: pg_sys::Oid,
    /// A plain tenant id (not a token), so it never expires.
    plain: bool,
    superuser: bool,
    /// Length of the value when inline, else `u8::MAX` (compared through `v`).
    len: u8,
    key: [u8; SLOT_INLINE],
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

impl Slot {
    fn new(hash: u64, v: Rc<Verified>) -> Slot {
        let raw = v.raw.as_bytes();
        let mut key = [0u8; SLOT_INLINE];
        let len = if raw.len() <= SLOT_INLINE {
            key[..raw.len()].copy_from_slice(raw);
            raw.len() as u8
        } else {
            u8::MAX
        };
        let plain = v.exp.is_none() && !token::looks_like_token(v.raw.as_str());
        Slot { hash, user: v.user, plain, superuser: v.superuser, len, key, v }
    }

    fn is(&self, hash: u64, raw: &[u8], user: pg_sys::Oid) -> bool {
        self.hash == hash
            && self.user == user
            && if self.len == u8::MAX {
                self.v.raw.as_bytes() == raw
            } else {
                &self.key[..self.len as usize] == raw
            }
    }
}

fn hash_of(raw: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::util::FnvHasher::default();
    h.write(raw);
    h.finish()
}
/// The last verification used: most statements of a session use the one the statement before
/// used, so a byte comparison finds it without hashing.
static LAST: crate::util::Backend<RefCell<Option<Rc<Verified>>>> = crate::util::Backend::new(RefCell::new(None));
/// An input of the verifications changed: the caches are emptied at their next use (an
/// invalidation can arrive while they are being read).
static STALE: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// See `generation`.
static GENERATION: crate::util::Backend<Cell<u64>> = crate::util::Backend::new(Cell::new(0));
/// While a migration step runs (src/migrations.rs): the only context value its statements may
/// use (empty: none), whatever the setting is changed to by SET, set_config() or RESET.
static STEP_PIN: crate::util::Backend<RefCell<Option<Vec<u8>>>> = crate::util::Backend::new(RefCell::new(None));

/// Pin the context to `value` (None: no context) until the returned guard is dropped.
pub fn pin_context(value: Option<&str>) -> crate::util::OnDrop<impl FnMut()> {
    STEP_PIN.with(|p| *p.borrow_mut() = Some(value.unwrap_or("").as_bytes().to_vec()));
    crate::util::OnDrop(|| STEP_PIN.with(|p| *p.borrow_mut() = None))
}

/// Refusals are not recorded (a look at the context that is not an attempt to use it).
static QUIET: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// The verified tenant for the role running the current statement, or None, without recording
/// a refusal: for the planner's estimates, which are not a use of the context (the statement
/// itself is verified, and refused and recorded, when it starts).
pub fn peek_tenant() -> Option<String> {
    QUIET.with(|q| q.set(true));
    let _loud = crate::util::OnDrop(|| QUIET.with(|q| q.set(false)));
    with_context(|v| v.tenant.clone()).ok()
}

/// The verified context, shared, without recording a refusal: for counting a statement and
/// enforcing its tenant's limits, which are not a use of the context (the statement itself is
/// verified, and refused and recorded, where it reads or writes a protected table).
///
/// Invalidations are not taken here (a change of plans or limits reaches the statement at its
/// transaction's start or its first lock): taking them at this point would lock a cursor a
/// change of grants made stale before the statement's own verification could say why.
pub fn verified_quietly() -> Result<Rc<Verified>> {
    QUIET.with(|q| q.set(true));
    let _loud = crate::util::OnDrop(|| QUIET.with(|q| q.set(false)));
    with_context_as_of_now(|_| ())?;
    Ok(LAST.with(|l| l.borrow().clone()).expect("a verification just made is the last one"))
}

/// Drop every cached verification (called by the invalidate module when an input changed): at
/// the next use, never while one is being read.
pub fn clear_cache() {
    STALE.with(|s| s.set(true));
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
}

/// Changes with every change of what verifications read (grants, memberships, roles, tenants,
/// the settings that govern them): a verification made at another generation may be stale.
pub fn generation() -> u64 {
    GENERATION.with(|g| g.get())
}

fn empty_if_stale() {
    if STALE.with(|s| s.replace(false)) {
        CACHE.with(|c| c.borrow_mut().clear());
        LAST.with(|l| *l.borrow_mut() = None);
    }
}

/// Name events after the session's tenant (the audit floor asks through this).
pub fn init() {
    crate::audit::set_session_tenant(session_tenant_for_log);
    crate::audit::set_verified_tenant(|| last_verified_tenant(|t| t.to_string()));
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(crate) fn load_secret() -> Result<Vec<u8>> {
    let secret = if let Some(s) = gucs::jwt_secret() {
        s.into_bytes()
    } else if let Some(path) = gucs::jwt_secret_file() {
        let mut bytes = std::fs::read(path).map_err(|_| TenancyError::BadSecret("the secret file cannot be read"))?;
        while matches!(bytes.last(), Some(b'\n' | b'\r')) {
            bytes.pop();
        }
        bytes
    } else {
        return Err(TenancyError::NoSecret);
    };
    if secret.len() < token::MIN_SECRET_LEN {
        return Err(TenancyError::BadSecret("the secret is shorter than 32 bytes"));
    }
    Ok(secret)
}


fn verify_fresh(raw: &str, user: pg_sys::Oid, now: i64) -> Result<Verified> {
    // SAFETY: superuser_arg only reads the role's catalog entry (syscache: current).
    let is_super = unsafe { pg_sys::superuser_arg(user) };
    let (tenant, exp) = if token::looks_like_token(raw) {
        let secret = load_secret()?;
        let claims = token::verify(raw, &secret, &gucs::tenant_claim(), now, gucs::jwt_leeway())
            .map_err(TenancyError::Token)?;
        (claims.tenant, Some(claims.exp))
    } else {
        if !valid_tenant_id(raw) {
            return Err(TenancyError::InvalidTenantId);
        }
        if gucs::context_mode() == ContextMode::Signed && !is_super {
            return Err(TenancyError::SignedModeRequired);
        }
        (raw.to_string(), None)
    };
    let access = catalog::tenants::tenant_access(&tenant, user)?;
    let scope = if is_super {
        Scope::Admin
    } else {
        // No grant: refuse before saying anything about the tenant, so a role cannot learn
        // which tenants exist.
        access.best_scope.and_then(Scope::from_rank).ok_or(TenancyError::NotPermitted)?
    };
    let read_only = match access.status.as_deref().map(Status::parse) {
        None => return Err(TenancyError::UnknownTenant),
        Some(Some(Status::Active)) => false,
        Some(Some(Status::ReadOnly)) => true,
        Some(Some(Status::Suspended)) => return Err(TenancyError::Unavailable("suspended")),
        Some(_) => return Err(TenancyError::Unavailable("offboarded")),
    };
    served_here(access.region)?;
    Ok(Verified { raw: Raw::new(raw.as_bytes()), user, tenant, scope, read_only, config: access.config, exp, limits: access.limits, superuser: is_super })
}

/// Data residency: a tenant of `region` is served by this cluster (`pg_tenancy.region` unset,
/// the tenant's region `default`, or the cluster's own), else WrongRegion.
pub(crate) fn served_here(region: String) -> Result<()> {
    match gucs::region() {
        Some(here) if region != "default" && region != here => Err(TenancyError::WrongRegion { tenant: region, here }),
        _ => Ok(()),
    }
}

fn check_expiry(v: &Verified, now: i64) -> Result<()> {
    match v.exp {
        Some(exp) if now > exp.saturating_add(gucs::jwt_leeway()) => {
            Err(TenancyError::Token(TokenError::Expired))
        }
        _ => Ok(()),
    }
}

/// Verify `raw` for `user` (from the cache when possible) and hand the result to `f`.
pub(crate) fn with_verified<R>(raw: &[u8], user: pg_sys::Oid, f: impl FnOnce(&Verified) -> R) -> Result<R> {
    empty_if_stale();
    let hit = LAST
        .with(|l| l.borrow().as_ref().filter(|v| v.user == user && v.raw.as_bytes() == raw).cloned())
        .or_else(|| {
            let hash = hash_of(raw);
            CACHE.with(|c| c.borrow().find(hash, |s| s.is(hash, raw, user)).map(|s| s.v.clone()))
        });
    if let Some(v) = hit {
        if v.exp.is_some() {
            if let Err(e) = check_expiry(&v, unix_now()) {
                refused(&e, v.raw.as_str());
                return Err(e);
            }
        }
        LAST.with(|l| *l.borrow_mut() = Some(v.clone()));
        return Ok(f(&v));
    }
    let raw = match std::str::from_utf8(raw) {
        Ok(r) => r.to_owned(),
        Err(_) => {
            refused(&TenancyError::InvalidTenantId, "");
            return Err(TenancyError::InvalidTenantId);
        }
    };
    let now = unix_now();
    let v = verify_fresh(&raw, user, now).and_then(|v| check_expiry(&v, now).map(|_| v));
    let v = match v {
        Ok(v) => Rc::new(v),
        Err(e) => {
            refused(&e, &raw);
            return Err(e);
        }
    };
    // (the lookup may have taken invalidations: what it read is as of now, the rest is not)
    empty_if_stale();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_CAPACITY {
            c.clear();
        }
        let hash = hash_of(v.raw.as_bytes());
        c.insert_unique(hash, Slot::new(hash, v.clone()), |s| s.hash);
    });
    LAST.with(|l| *l.borrow_mut() = Some(v.clone()));
    Ok(f(&v))
}

/// Whether the cache holds a verification of `raw` as a plain tenant id (not a token: nothing
/// to re-check) for `user`, and if so whether `user` is a superuser, without reading the
/// verified entry (set_tenant(): the first statement that uses the context reads it). None
/// when [`with_verified`] must say.
pub(crate) fn verified_plain(raw: &[u8], user: pg_sys::Oid) -> Option<bool> {
    empty_if_stale();
    let hash = hash_of(raw);
    CACHE.with(|c| c.borrow().find(hash, |s| s.plain && s.is(hash, raw, user)).map(|s| s.superuser))
}

/// A context value was refused: record `forbidden_tenant` (configuration errors are not attempts).
pub(crate) fn refused(e: &TenancyError, raw: &str) {
    if QUIET.with(|q| q.get()) {
        return;
    }
    let detail = match e {
        TenancyError::NotPermitted => "role has no grant for the tenant",
        TenancyError::UnknownTenant => "tenant does not exist",
        TenancyError::Unavailable("suspended") => "tenant is suspended",
        TenancyError::Unavailable(_) => "tenant is offboarded",
        TenancyError::WrongRegion { .. } => "tenant's region is not this cluster's (data residency)",
        TenancyError::InvalidTenantId => "malformed tenant context",
        TenancyError::SignedModeRequired => "plain tenant id refused in signed mode",
        TenancyError::Token(TokenError::Expired) => "token expired",
        TenancyError::Token(_) => "token rejected (bad signature, algorithm or claims)",
        _ => return,
    };
    let attempted = if token::looks_like_token(raw) {
        token::unverified_tenant(raw, &gucs::tenant_claim())
    } else {
        Some(raw.to_string())
    };
    crate::audit::record(
        crate::audit::Event::ForbiddenTenant,
        pg_sys::InvalidOid,
        attempted.as_deref(),
        &e.sqlstate_text(),
        detail,
    );
}


/// The session's tenant as it may appear in the audit log: a plain id, or the tenant of a
/// token this backend already verified (a token itself is never logged).
pub fn session_tenant_for_log() -> String {
    let Some(raw) = gucs::tenant_raw() else { return String::new() };
    if !token::looks_like_token(&raw) {
        return crate::audit::loggable_tenant(&raw);
    }
    let hash = hash_of(raw.as_bytes());
    CACHE
        .with(|c| {
            let c = c.try_borrow().ok()?;
            c.find(hash, |s| s.hash == hash && s.v.raw.as_bytes() == raw.as_bytes()).map(|s| s.v.tenant.clone())
        })
        .unwrap_or_else(|| "(unverified token)".to_string())
}


/// The raw context value in place (NULL or empty: none).
pub(crate) fn raw_value<'a>() -> Option<&'a [u8]> {
    // SAFETY: the setting's storage is a NUL-terminated string owned by the GUC machinery (or
    // NULL). It changes only when the setting is assigned, which nothing below does while the
    // slice is in use (a cache miss copies the value before it runs SPI).
    unsafe {
        let p = *gucs::TENANT.as_ptr();
        if p.is_null() {
            return None;
        }
        let raw = CStr::from_ptr(p).to_bytes();
        (!raw.is_empty()).then_some(raw)
    }
}

/// The role that set the value must hold the grant too (see [`setting::Setter`]).
fn verify_setter(raw: &[u8], user: pg_sys::Oid) -> Result<()> {
    let setter = match setting::setter() {
        setting::Setter::Role(s) => s,
        setting::Setter::Worker => crate::util::pg::outer_user(),
        setting::Setter::Unknown => {
            refused(&TenancyError::NotPermitted, std::str::from_utf8(raw).unwrap_or(""));
            return Err(TenancyError::NotPermitted);
        }
    };
    if setter == user {
        return Ok(());
    }
    with_verified(raw, setter, |_| ())
}

/// Run `f` on the verified context of the role running the current statement.
///
/// The value must verify for that role and for the role that set it. Invalidation messages are
/// taken first, so that a change committed by another session (a revoked grant or membership,
/// a suspension) reaches this one at its next statement even inside an open transaction that
/// already holds every lock it needs. On a cache hit this reads the setting in place and runs
/// no query.
pub fn with_context<R>(f: impl FnOnce(&Verified) -> R) -> Result<R> {
    // SAFETY: processes pending invalidation messages, as any lock acquisition does.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    with_context_as_of_now(f)
}

/// [`with_context`] without taking invalidation messages first: as of the last time this
/// backend took them (every transaction start and lock acquisition does).
fn with_context_as_of_now<R>(f: impl FnOnce(&Verified) -> R) -> Result<R> {
    if !crate::util::preloaded() {
        return Err(TenancyError::PreloadRequired);
    }
    let pinned = STEP_PIN.with(|p| p.borrow().as_ref().map(|pin| raw_value().unwrap_or(b"") != pin.as_slice()));
    if pinned == Some(true) {
        return Err(TenancyError::StepContext);
    }
    let raw = raw_value().ok_or(TenancyError::NoContext)?;
    let user = crate::util::pg::user();
    verify_setter(raw, user)?;
    with_verified(raw, user, f)
}

/// The verified context for the role running the current statement, shared (no copy).
pub fn verified() -> Result<Rc<Verified>> {
    with_context(|_| ())?;
    Ok(LAST.with(|l| l.borrow().clone()).expect("a verification just made is the last one"))
}

/// The verified context for the role running the current statement.
pub fn resolve() -> Result<Verified> {
    with_context(|v| v.clone())
}

/// The tenant of the context, if this backend holds a verification of the value in place for the
/// role running now (the last one used, or one in the cache: set_tenant() verifies from the
/// cache without making it the last one), with no query and no check of expiry: for attributing
/// an error report or a log line, where nothing may be run. None otherwise.
pub fn last_verified_tenant<R>(f: impl FnOnce(&str) -> R) -> Option<R> {
    let raw = raw_value()?;
    let user = crate::util::pg::user();
    let v = LAST
        .with(|l| l.try_borrow().ok()?.as_ref().filter(|v| v.user == user && v.raw.as_bytes() == raw).cloned())
        .or_else(|| {
            // (a plain id's verification from the cache, unless an invalidation has come since)
            if STALE.get() {
                return None;
            }
            let hash = hash_of(raw);
            CACHE.with(|c| c.try_borrow().ok()?.find(hash, |s| s.plain && s.is(hash, raw, user)).map(|s| s.v.clone()))
        })?;
    Some(f(&v.tenant))
}


/// Whether a context value is set at all (not whether it verifies).
pub fn is_set() -> bool {
    raw_value().is_some()
}


#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    fn setup_tenants() {
        Spi::run("SELECT tenancy.create_tenant('ut_a', 'A'), tenancy.create_tenant('ut_b', 'B')").unwrap();
        Spi::run("CREATE ROLE ut_app").unwrap();
        Spi::run("SELECT tenancy.grant_tenant('ut_app', 'ut_a', 'read')").unwrap();
    }

    #[pg_test]
    fn context_is_checked_for_the_role_using_it() {
        setup_tenants();
        Spi::run("SET LOCAL ROLE ut_app").unwrap();
        assert_eq!(Spi::get_one::<String>("SELECT tenancy.set_tenant('ut_a')").unwrap().as_deref(), Some("ut_a"));
        assert_eq!(resolve().map(|v| (v.tenant, v.scope)), Ok(("ut_a".to_string(), Scope::Read)));
        // the role has no grant for ut_b: the setting cannot be pointed there
        assert!(with_verified(b"ut_b", unsafe { pg_sys::GetUserId() }, |_| ()).is_err());
        assert_eq!(
            with_verified(b"ut_b", unsafe { pg_sys::GetUserId() }, |_| ()).unwrap_err(),
            TenancyError::NotPermitted
        );
    }

    #[pg_test]
    fn catalog_changes_reach_the_cache() {
        setup_tenants();
        Spi::run("SET LOCAL ROLE ut_app").unwrap();
        Spi::run("SELECT tenancy.set_tenant('ut_a')").unwrap();
        assert!(resolve().is_ok());
        Spi::run("RESET ROLE").unwrap();
        Spi::run("SELECT tenancy.set_status('ut_a', 'suspended')").unwrap();
        // the statement boundary processes the invalidation the trigger queued
        Spi::run("SET LOCAL ROLE ut_app").unwrap();
        assert_eq!(resolve().unwrap_err(), TenancyError::Unavailable("suspended"));
    }

    #[pg_test]
    fn no_context_fails_closed() {
        assert_eq!(resolve().unwrap_err(), TenancyError::NoContext);
        assert_eq!(TenancyError::NoContext.sqlstate(), PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION);
    }

    #[pg_test(error = "no tenant context is set")]
    fn current_tenant_raises_without_context() {
        Spi::get_one::<String>("SELECT tenancy.current_tenant()").unwrap();
    }
}
