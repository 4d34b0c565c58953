//! Server log lines, per tenant and masked (`emit_log_hook`, called for every report going to
//! the server log, before it is written):
//! - a tenant token never reaches the log, whatever the line (a statement's text, its
//!   parameters, a detail, a query, a context): `<token>` instead;
//! - under a tenant context, or for a statement on a protected table (`pg_tenancy.log_masking`,
//!   on by default), the statement text PostgreSQL logs (`log_statement`,
//!   `log_min_duration_statement`, the `STATEMENT:` of an error, an internal query) loses its
//!   literal values (`$n`, as `pg_stat_statements` shows statements), bound parameters their
//!   values, and the details of constraint violations the row values they quote;
//! - under a tenant context (`pg_tenancy.log_tenant`), a line only for the log starts with
//!   `[tenant=<id>]`, and the log's copy of a message the client also gets carries `tenant=<id>`
//!   in its DETAIL (the server-only detail). The client's message and detail are never changed;
//!   its CONTEXT and QUERY fields, which PostgreSQL writes to the log and the client alike, are
//!   masked for both under a context.
//!
//! It runs inside error reporting: nothing here raises, panics or takes a lock; new strings are
//! allocated in `ErrorContext`, which lives as long as the report.
use pgrx::pg_sys;
use std::ffi::{c_char, CStr, CString};

use pg_tenancy_core::logmask;

use crate::context;

/// A field of the report as text (bytes that are not UTF-8, in a LATIN1 or SQL_ASCII
/// database, become U+FFFD: the line is still masked).
fn text(p: *const c_char) -> Option<std::borrow::Cow<'static, str>> {
    if p.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated string of the report (or debug_query_string), alive during it.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy())
}

/// `standard_conforming_strings = off`: backslashes escape in every string constant.
fn backslashes() -> bool {
    // SAFETY: reads a backend-global setting.
    !unsafe { pg_sys::standard_conforming_strings }
}

fn alloc(s: &str) -> *mut c_char {
    let c = CString::new(s.replace('\0', "")).unwrap_or_default();
    // SAFETY: copies into ErrorContext, which lives until the report is done.
    unsafe { pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, c.as_ptr()) }
}

fn token_or_setting(s: &str) -> bool {
    logmask::has_token(s) || s.contains("pg_tenancy.tenant")
}

/// Mask the statement part of a line logged for `log_statement` / `log_min_duration_statement`.
fn mask_statement_line(msg: &str, literals: bool) -> Option<String> {
    let start = logmask::statement_start(msg)?;
    let stmt = &msg[start..];
    if literals || token_or_setting(stmt) {
        Some(format!("{}{}", &msg[..start], logmask::mask_statement_with(stmt, backslashes())))
    } else {
        None
    }
}

/// # Safety
/// `edata` is the report being emitted, going to the server log.
pub unsafe fn rewrite(edata: *mut pg_sys::ErrorData, protected_statement: bool) {
    // SAFETY: the report's fields are NULL or strings of ErrorContext; replaced by strings of
    // ErrorContext. debug_query_string is replaced only for an ERROR or FATAL of a client
    // backend: PostgreSQL resets it right after reporting the error (and a FATAL ends the
    // process), so the replacement is never used after ErrorContext is reset.
    unsafe {
        let e = &mut *edata;
        let under_context = context::is_set();
        let literals = crate::gucs::log_masking() && (under_context || protected_statement);
        let log_only = !e.output_to_client;
        let tag = if under_context && crate::gucs::log_tenant() {
            Some(context::last_verified_tenant(|t| t.to_string()).unwrap_or_else(|| "(unverified)".to_string()))
        } else {
            None
        };

        // the message: a statement line of the log, or any line carrying a token
        if let Some(msg) = text(e.message) {
            let msg: &str = &msg;
            let mut new = if log_only { mask_statement_line(msg, literals) } else { None };
            if new.is_none() && logmask::has_token(msg) {
                new = Some(logmask::mask_tokens(msg));
            }
            if let (Some(t), true) = (&tag, log_only) {
                new = Some(format!("[tenant={t}] {}", new.as_deref().unwrap_or(msg)));
            }
            if let Some(n) = new {
                e.message = alloc(&n);
            }
        }

        // details of a line only for the log: parameters of a logged statement, row values,
        // tokens (a message the client also gets keeps its details: see below)
        let fields: [&mut *mut c_char; 2] = [&mut e.detail, &mut e.detail_log];
        for field in fields.into_iter().filter(|_| log_only) {
            if let Some(d) = text(*field) {
                let d: &str = &d;
                let masked = if literals && d.starts_with("parameters: ") {
                    logmask::mask_parameters(d)
                } else if literals && log_only {
                    logmask::mask_detail(d)
                } else {
                    logmask::mask_tokens(d)
                };
                if masked != d {
                    *field = alloc(&masked);
                }
            }
        }
        // the log's copy of a message the client also gets: masked values and the tenant tag in
        // the server-only detail
        if !log_only {
            let base = text(e.detail_log).or(text(e.detail));
            let masked = base.as_deref().map(|d| if literals { logmask::mask_detail(d) } else { logmask::mask_tokens(d) });
            let with_tag = match (&tag, masked) {
                (Some(t), Some(d)) => Some(format!("{d}\ntenant={t}")),
                (Some(t), None) => Some(format!("tenant={t}")),
                (None, Some(d)) if Some(d.as_str()) != base.as_deref() => Some(d),
                _ => None,
            };
            if let Some(d) = with_tag {
                e.detail_log = alloc(&d);
            }
        }

        // an internal query (QUERY:) and the context (CONTEXT:, with portal parameters)
        if let Some(q) = text(e.internalquery) {
            if literals || token_or_setting(&q) {
                e.internalquery = alloc(&logmask::mask_statement_with(&q, backslashes()));
            }
        }
        if let Some(c) = text(e.context) {
            let masked = if literals { logmask::mask_context(&c, backslashes()) } else { logmask::mask_tokens(&c) };
            if masked != *c {
                e.context = alloc(&masked);
            }
        }

        // the STATEMENT: line of an error
        if e.elevel >= pg_sys::PGERROR as i32 && pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND {
            if let Some(q) = text(pg_sys::debug_query_string) {
                if literals || token_or_setting(&q) {
                    pg_sys::debug_query_string = alloc(&logmask::mask_statement_with(&q, backslashes()));
                }
            }
        }
    }
}
