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
use pgrx::JsonB;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::catalog;
use crate::error::{OrRaise, Result, TenancyError};
use crate::gucs::{self, ContextMode};
use crate::token::{self, TokenError};

/// 1 to 63 characters of letters, digits, `_`, `-` and `.` (UUID text fits), and an id that
/// reads as an integer or a UUID is in that type's canonical form (see [`crate::tenant_id`]).
pub fn valid_tenant_id(id: &str) -> bool {
    crate::tenant_id::valid(id)
}

/// What a role may do inside a tenant, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    ReadWrite,
    Admin,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "read_write" => Some(Scope::ReadWrite),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::ReadWrite => "read_write",
            Scope::Admin => "admin",
        }
    }

    /// The rank the catalog query computes (1 read, 2 read_write, 3 admin).
    fn from_rank(rank: i32) -> Option<Scope> {
        match rank {
            1 => Some(Scope::Read),
            2 => Some(Scope::ReadWrite),
            3 => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A context value verified for one role.
#[derive(Debug, Clone)]
pub struct Verified {
    raw: String,
    user: pg_sys::Oid,
    pub tenant: String,
    pub scope: Scope,
    pub read_only: bool,
    pub config: Option<String>,
    /// `exp` of the token the context came from, re-checked at every use.
    exp: Option<i64>,
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

/// Who set the current value of `pg_tenancy.tenant`: a value is honoured only if that role
/// holds the grant too, not only the role using it (a SECURITY DEFINER function owned by an
/// all-tenants role must not turn a context its caller could not set into one it can use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setter {
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

thread_local! {
    /// Verified context values, by raw setting value; each entry lists the roles it was verified for.
    static CACHE: RefCell<HashMap<Vec<u8>, Vec<Verified>>> = RefCell::new(HashMap::new());
    static CACHE_LEN: Cell<usize> = const { Cell::new(0) };
    /// Whether this session was already told that a transaction-scoped context outside a
    /// transaction block lasts one statement.
    static WARNED: Cell<bool> = const { Cell::new(false) };
    /// Who set the current value (see [`Setter`]); kept by the assign hook.
    static SETTER: Cell<Setter> = const { Cell::new(Setter::Unknown) };
}

/// Drop every cached verification.
pub fn clear_cache() {
    CACHE.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.clear();
        }
    });
    CACHE_LEN.with(|n| n.set(0));
}

/// Register the callbacks that drop what depends on the catalogs. Every input of an access
/// decision has one: the extension's tables (relcache invalidation, sent by their triggers),
/// roles (`pg_authid`: SUPERUSER, BYPASSRLS, DROP ROLE, renames) and role memberships
/// (`pg_auth_members`: a revoked membership that carried a tenant grant).
pub fn init() {
    // SAFETY: registers #[pg_guard] callbacks once, from _PG_init.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHOID,
            pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE,
            pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(cache as c_int, Some(on_role_change), pg_sys::Datum::from(0));
        }
    }
}

/// Relcache invalidations of `tenancy.tenants` / `tenancy.grants` (sent by their triggers when
/// rows change) or a full reset mean a cached verification may be stale; of
/// `tenancy.protected_tables`, that the executor hook's set of protected tables is.
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Invariant: whatever is cached was read through catalog::ids(), so while no ids are
    // cached nothing else is either. (DROP EXTENSION invalidates these relations too.)
    let Some(ids) = catalog::cached_ids() else { return };
    if relid == pg_sys::InvalidOid || [ids.tenants, ids.grants, ids.protected, ids.keys].contains(&relid) {
        catalog::forget();
        crate::hooks::forget();
        crate::crypto::forget_keys();
        clear_cache();
    }
}

/// A role or a role membership changed anywhere in the cluster: verifications may be stale.
#[pg_guard]
unsafe extern "C-unwind" fn on_role_change(_arg: pg_sys::Datum, _cacheid: c_int, _hash: u32) {
    clear_cache();
}

/// Assign hook of every setting that changes how a value verifies.
#[pg_guard]
pub unsafe extern "C-unwind" fn on_setting_string(_new: *const c_char, _extra: *mut c_void) {
    clear_cache();
}

/// Assign hook of the master-key settings: drop the cached master and tenant keys.
#[pg_guard]
pub unsafe extern "C-unwind" fn on_master_key_setting(_new: *const c_char, _extra: *mut c_void) {
    crate::crypto::forget_master_keys();
}

#[pg_guard]
pub unsafe extern "C-unwind" fn on_setting_int(_new: i32, _extra: *mut c_void) {
    clear_cache();
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
    let access = catalog::tenant_access(&tenant, user)?;
    let scope = if is_super {
        Scope::Admin
    } else {
        // No grant: refuse before saying anything about the tenant, so a role cannot learn
        // which tenants exist.
        access.best_scope.and_then(Scope::from_rank).ok_or(TenancyError::NotPermitted)?
    };
    let read_only = match access.status.as_deref() {
        None => return Err(TenancyError::UnknownTenant),
        Some("active") => false,
        Some("read_only") => true,
        Some("suspended") => return Err(TenancyError::Unavailable("suspended")),
        Some(_) => return Err(TenancyError::Unavailable("offboarded")),
    };
    Ok(Verified { raw: raw.to_string(), user, tenant, scope, read_only, config: access.config, exp })
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
fn with_verified<R>(raw: &[u8], user: pg_sys::Oid, f: impl FnOnce(&Verified) -> R) -> Result<R> {
    let now = unix_now();
    let mut f = Some(f);
    let hit = CACHE.with(|c| {
        let c = c.borrow();
        c.get(raw).and_then(|vs| vs.iter().find(|v| v.user == user)).map(|v| {
            if let Err(e) = check_expiry(v, now) {
                refused(&e, &v.raw);
                return Err(e);
            }
            Ok((f.take().expect("called once"))(v))
        })
    });
    if let Some(result) = hit {
        return result;
    }
    let raw = match std::str::from_utf8(raw) {
        Ok(r) => r.to_owned(),
        Err(_) => {
            refused(&TenancyError::InvalidTenantId, "");
            return Err(TenancyError::InvalidTenantId);
        }
    };
    let v = verify_fresh(&raw, user, now).and_then(|v| check_expiry(&v, now).map(|_| v));
    let v = match v {
        Ok(v) => v,
        Err(e) => {
            refused(&e, &raw);
            return Err(e);
        }
    };
    let result = (f.take().expect("called once"))(&v);
    if CACHE_LEN.with(|n| n.get()) >= CACHE_CAPACITY {
        clear_cache();
    }
    CACHE.with(|c| c.borrow_mut().entry(v.raw.as_bytes().to_vec()).or_default().push(v));
    CACHE_LEN.with(|n| n.set(n.get() + 1));
    Ok(result)
}

/// A context value was refused: record `forbidden_tenant` (configuration errors are not attempts).
fn refused(e: &TenancyError, raw: &str) {
    let detail = match e {
        TenancyError::NotPermitted => "role has no grant for the tenant",
        TenancyError::UnknownTenant => "tenant does not exist",
        TenancyError::Unavailable("suspended") => "tenant is suspended",
        TenancyError::Unavailable(_) => "tenant is offboarded",
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
    CACHE
        .with(|c| c.try_borrow().ok().and_then(|c| c.get(raw.as_bytes()).and_then(|vs| vs.first().map(|v| v.tenant.clone()))))
        .unwrap_or_else(|| "(unverified token)".to_string())
}

/// The raw context value in place (NULL or empty: none).
fn raw_value<'a>() -> Option<&'a [u8]> {
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

/// The role that set the value must hold the grant too (see [`Setter`]).
fn verify_setter(raw: &[u8], user: pg_sys::Oid) -> Result<()> {
    let setter = match SETTER.with(|s| s.get()) {
        Setter::Role(s) => s,
        // SAFETY: reads a backend-local variable.
        Setter::Worker => unsafe { pg_sys::GetOuterUserId() },
        Setter::Unknown => {
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
    let raw = raw_value().ok_or(TenancyError::NoContext)?;
    // SAFETY: GetUserId only reads a backend-local variable.
    let user = unsafe { pg_sys::GetUserId() };
    verify_setter(raw, user)?;
    with_verified(raw, user, f)
}

/// The verified context for the role running the current statement.
pub fn resolve() -> Result<Verified> {
    with_context(|v| v.clone())
}

/// Whether a context value is set at all (not whether it verifies).
pub fn is_set() -> bool {
    raw_value().is_some()
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
    // SAFETY: PostgreSQL passes a valid pointer to a (possibly NULL) C string.
    let value = unsafe {
        let p = *newval;
        if p.is_null() {
            return true;
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    };
    if value.is_empty() {
        return true;
    }
    // SAFETY: plain reads of backend state.
    let (worker, current, session) =
        unsafe { (pg_sys::ParallelWorkerNumber >= 0, pg_sys::GetUserId(), pg_sys::GetSessionUserId()) };
    let setter = if worker {
        Setter::Worker
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
    // SAFETY: plain reads of backend state.
    // (SPI needs a transaction and a snapshot or portal: SET and set_config() have them;
    // connection start-up options do not.)
    let in_xact = unsafe {
        pg_sys::IsTransactionState()
            && !worker
            && (pg_sys::ActiveSnapshotSet() || !pg_sys::ActivePortal.is_null())
    };
    let outcome = match setter {
        Setter::Role(role) if in_xact && source == PGC_S_SESSION => with_verified(value.as_bytes(), role, |_| ()),
        // ALTER ROLE/DATABASE ... SET validates the value for the role running it: an early
        // refusal (it is verified again for the session user at login, and at every use).
        _ if in_xact && source == PGC_S_TEST && !worker => with_verified(value.as_bytes(), current, |_| ()),
        _ if token::looks_like_token(&value) || valid_tenant_id(&value) => Ok(()),
        _ => Err(TenancyError::InvalidTenantId),
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
    unsafe { crate::cursors::on_tenant_assign(newval) };
}

fn set_context(value: &str, session: bool) {
    let name = c"pg_tenancy.tenant";
    let value = CString::new(value).unwrap_or_default();
    // SAFETY: valid NUL-terminated strings; errors are raised (elevel ERROR) as PostgreSQL errors.
    unsafe {
        let context = if pg_sys::superuser() {
            pg_sys::GucContext::PGC_SUSET
        } else {
            pg_sys::GucContext::PGC_USERSET
        };
        let action =
            if session { pg_sys::GucAction::GUC_ACTION_SET } else { pg_sys::GucAction::GUC_ACTION_LOCAL };
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            context,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
        // Once per session: the mistake it points at is a pattern, and procedures that COMMIT
        // in a loop (where the context rightly lasts until the COMMIT) would repeat it forever.
        if !session && !pg_sys::IsTransactionBlock() && !value.is_empty() && !WARNED.with(|w| w.replace(true)) {
            pgrx::ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_NO_ACTIVE_SQL_TRANSACTION,
                "the tenant context lasts only until the end of this statement",
                "Call it inside BEGIN ... COMMIT, or pass session => true for a session-wide context."
            );
        }
    }
}

/// Enter a tenant for the rest of the transaction (or the session, when asked).
#[pg_extern(volatile, parallel_unsafe)]
fn set_tenant(tenant: Option<&str>, session: default!(bool, false)) -> String {
    let tenant = tenant.ok_or(TenancyError::InvalidArgument("tenant")).or_raise();
    if tenant.is_empty() || token::looks_like_token(tenant) {
        // A token is not a tenant id: refuse rather than guess what the caller meant. (A
        // malformed id, or an alias such as `007` for `7`, is refused and recorded by the
        // setting's check hook.)
        TenancyError::InvalidTenantId.raise();
    }
    set_context(tenant, session);
    with_context(|v| v.tenant.clone()).or_raise()
}

/// Enter the tenant named by a signed token (HS256 JWT) for the transaction or the session.
#[pg_extern(volatile, parallel_unsafe)]
fn set_tenant_token(token: Option<&str>, session: default!(bool, false)) -> String {
    let token = token.ok_or(TenancyError::InvalidArgument("token")).or_raise();
    if !token::looks_like_token(token) {
        TenancyError::Token(TokenError::Malformed).raise();
    }
    set_context(token, session);
    with_context(|v| v.tenant.clone()).or_raise()
}

/// Leave the tenant: no context, so protected tables refuse every statement.
#[pg_extern(volatile, parallel_unsafe)]
fn reset_tenant() {
    set_context("", true);
}

/// The current tenant; raises 28000 when there is none. Policies call it once per statement.
#[pg_extern(stable, parallel_safe)]
fn current_tenant() -> String {
    with_context(|v| v.tenant.clone()).or_raise()
}

/// The current tenant, if it may be written: raises 25006 for a read_only tenant and 42501 for
/// a role whose grant has scope 'read'. Write policies call it.
#[pg_extern(stable, parallel_safe)]
fn writable_tenant() -> String {
    let r = with_context(|v| v.writable().map(|_| v.tenant.clone())).and_then(|r| r);
    if let Err(e @ (TenancyError::ReadOnly | TenancyError::ReadScope)) = &r {
        crate::audit::record(
            crate::audit::Event::ReadOnlyWrite,
            crate::hooks::last_write_target(),
            None,
            &e.sqlstate_text(),
            if *e == TenancyError::ReadOnly { "write to a read_only tenant" } else { "write with a read-scope grant" },
        );
    }
    r.or_raise()
}

/// Called by the generated WITH CHECK policy only when a written row carries a tenant other
/// than the current one: records `cross_tenant_write` against the protected table the
/// statement writes, and returns false, so PostgreSQL refuses the row (42501) as it would
/// without pg_tenancy. Calling it directly records nothing an attempted write would not: it
/// needs a statement that writes a protected table, and a row of the current tenant records
/// nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn _write_denied(attempted: Option<&str>) -> bool {
    let current = with_context(|v| v.tenant.clone()).ok();
    let rel = crate::hooks::last_write_target();
    if rel != pg_sys::InvalidOid && (attempted.is_none() || attempted != current.as_deref()) {
        crate::audit::record(
            crate::audit::Event::CrossTenantWrite,
            rel,
            attempted,
            "42501",
            "row carries another tenant's id",
        );
    }
    false
}

/// Whether a usable tenant context is set (never raises for a missing or refused context).
#[pg_extern(stable, parallel_safe)]
fn has_tenant() -> bool {
    with_context(|_| ()).is_ok()
}

/// The scope the current role holds in the current tenant: read, read_write or admin.
#[pg_extern(stable, parallel_safe)]
fn tenant_scope() -> &'static str {
    with_context(|v| v.scope.as_str()).or_raise()
}

fn current_config() -> serde_json::Value {
    with_context(|v| {
        v.config
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
            .unwrap_or(serde_json::Value::Null)
    })
    .or_raise()
}

/// Feature flag of the current tenant: `config -> 'flags' -> name` is JSON true.
#[pg_extern(stable, parallel_safe)]
fn flag(name: &str) -> bool {
    current_config().get("flags").and_then(|f| f.get(name)) == Some(&serde_json::Value::Bool(true))
}

/// One key of the current tenant's configuration (NULL when absent).
#[pg_extern(stable, parallel_safe)]
fn config(key: &str) -> Option<JsonB> {
    current_config().get(key).cloned().map(JsonB)
}

/// Whether `id` is a well-formed tenant id.
#[pg_extern(immutable, parallel_safe, strict, name = "valid_tenant_id")]
fn valid_tenant_id_sql(id: &str) -> bool {
    valid_tenant_id(id)
}

/// Invalidate every backend's cached context verifications (fired by the catalog triggers).
#[pg_extern(volatile, parallel_unsafe)]
fn _invalidate(rel: pg_sys::Oid) {
    // SAFETY: queues a relcache invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}

/// Mint a token: for tests, the demo and the benchmark. Superuser-only (see finalize.sql).
#[pg_extern(volatile, parallel_unsafe)]
fn _sign_token(payload: JsonB) -> String {
    let secret = load_secret().or_raise();
    token::sign(&payload.0, &secret)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn tenant_ids() {
        for ok in ["acme", "a.b_c-1", "42", "7c9e6679-7425-40de-944b-e07fc1f90ae7", &"x".repeat(63)] {
            assert!(valid_tenant_id(ok), "{ok}");
        }
        for bad in ["", " ", "a b", "a'b", "a;b", "a/b", "é", &"x".repeat(64), "a\0b"] {
            assert!(!valid_tenant_id(bad), "{bad}");
        }
    }

    #[pg_test]
    fn scopes_are_ordered() {
        assert!(Scope::Read < Scope::ReadWrite && Scope::ReadWrite < Scope::Admin);
        for s in [Scope::Read, Scope::ReadWrite, Scope::Admin] {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("owner"), None);
    }

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
