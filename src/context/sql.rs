//! The context's SQL surface for applications.
use pgrx::prelude::*;
use pgrx::JsonB;

use pg_tenancy_core::token::{self, TokenError};

use super::setting::{set_context, set_context_verified};
use super::{load_secret, valid_tenant_id, verified_plain, with_context, with_verified};
use crate::error::{OrRaise, TenancyError};

#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_tenancy_set_tenant() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `tenancy.set_tenant(tenant text, session boolean DEFAULT false) RETURNS text` (declared in
/// sql/tenants.sql): enter a tenant for the rest of the transaction (or the session, when
/// asked), and return it. Written against the function-call interface directly: it runs at the
/// start of every pooled transaction.
///
/// # Safety
/// Called by PostgreSQL's function manager with a valid `fcinfo` of two arguments.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn tenancy_set_tenant(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: two arguments, as declared; a non-null text argument is a valid varlena, detoasted
    // (copied into the call's memory context) when it is compressed or stored out of line, as
    // pg_detoast_datum_packed() does.
    let (arg, bytes, session) = unsafe {
        let args = (*fcinfo).args.as_slice(2);
        if args[0].isnull {
            TenancyError::InvalidArgument("tenant").raise();
        }
        let mut text = args[0].value.cast_mut_ptr::<pg_sys::varlena>();
        if pgrx::varlena::varatt_is_4b_c(text) || pgrx::varlena::varatt_is_1b_e(text) {
            text = pg_sys::pg_detoast_datum_packed(text);
        }
        let bytes =
            std::slice::from_raw_parts(pgrx::varlena::vardata_any(text).cast::<u8>(), pgrx::varlena::varsize_any_exhdr(text));
        (pg_sys::Datum::from(text), bytes, !args[1].isnull && args[1].value.value() != 0)
    };
    // What is verified, set and compared by the check hook is one copy of the argument, on the
    // stack (every tenant id fits), not the argument's memory itself.
    let copy = ArgCopy::new(bytes);
    let bytes = copy.as_bytes();
    if !crate::util::preloaded() {
        TenancyError::PreloadRequired.raise();
    }
    let user = crate::util::pg::user();
    // Verified once, here, for the role calling (the setter); the setting's check hook is told
    // it was (see setting::set_context_verified). A plain id is its own tenant: returned as given.
    let (tenant, superuser) = match verified_plain(bytes, user) {
        // SAFETY: the bytes equal a value verified as a plain tenant id, which is UTF-8.
        Some(superuser) => (unsafe { std::str::from_utf8_unchecked(bytes) }, superuser),
        None => {
            let tenant = std::str::from_utf8(bytes).unwrap_or_else(|_| TenancyError::InvalidTenantId.raise());
            if tenant.is_empty() || token::looks_like_token(tenant) {
                // A token is not a tenant id: refuse rather than guess what the caller meant. (A
                // malformed id, or an alias such as `007` for `7`, is refused and recorded below.)
                TenancyError::InvalidTenantId.raise();
            }
            (tenant, with_verified(bytes, user, |v| v.superuser).or_raise())
        }
    };
    set_context_verified(tenant, user, superuser, session);
    arg
}

/// A copy of set_tenant()'s argument: on the stack when short (every tenant id), else on the heap.
enum ArgCopy {
    Short(u8, [u8; 127]),
    Long(Vec<u8>),
}

impl ArgCopy {
    fn new(b: &[u8]) -> ArgCopy {
        if b.len() <= 127 {
            let mut a = [0u8; 127];
            a[..b.len()].copy_from_slice(b);
            ArgCopy::Short(b.len() as u8, a)
        } else {
            ArgCopy::Long(b.to_vec())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            ArgCopy::Short(n, a) => &a[..*n as usize],
            ArgCopy::Long(v) => v,
        }
    }
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
            crate::audit::write_target(),
            None,
            &e.sqlstate_text(),
            if *e == TenancyError::ReadOnly { "write to a read_only tenant" } else { "write with a read-scope grant" },
        );
    }
    r.or_raise()
}

/// The current tenant's schema version: the version of the last migration applied for it
/// (tenancy.migrate; 0 when none). Raises as current_tenant() does without a usable context.
#[pg_extern(stable, parallel_safe)]
fn schema_version() -> i32 {
    let tenant = with_context(|v| v.tenant.clone()).or_raise();
    crate::catalog::tenants::schema_version(&tenant).or_raise().unwrap_or(0)
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

/// Mint a token: for tests, the demo and the benchmark. Superuser-only (see finalize.sql).
#[pg_extern(volatile, parallel_unsafe)]
fn _sign_token(payload: JsonB) -> String {
    let secret = load_secret().or_raise();
    token::sign(&payload.0, &secret)
}
