//! Which statements are the client's: a utility statement PostgreSQL processes at top level
//! (`PROCESS_UTILITY_TOPLEVEL`), or an executor started for the text the client sent (its
//! source text is `debug_query_string`, the text of the client's message) while no such utility
//! statement is being processed. Statements run by others — inside functions, procedures and
//! `DO` blocks, triggers and foreign-key checks (at the statement or at COMMIT), the planner's
//! folding of a function, `EXECUTE` of a prepared statement, `EXPLAIN ANALYZE`, `CREATE TABLE AS`,
//! cursors — have another text, or run inside the client's utility statement: they are part of
//! the client's statement, counted with it.
//!
//! The one piece of state, "a client utility statement is being processed", is set around it
//! and cleared when it returns, when a (sub)transaction aborts (an error anywhere ends every
//! statement it interrupted) and when an error is reported; so a failure never leaves it set for
//! later statements.
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::{c_char, CStr};

static IN_UTILITY: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// A client utility statement starts (it and what it runs are one statement).
pub fn utility_started() {
    IN_UTILITY.with(|u| u.set(true));
}

/// It ended, or an error or an abort ended it.
pub fn utility_done() {
    IN_UTILITY.with(|u| u.set(false));
}

/// Whether a client utility statement is being processed.
pub fn in_utility() -> bool {
    IN_UTILITY.with(|u| u.get())
}

/// Whether an executor whose source text is `source` runs the text of the client's message.
///
/// # Safety
/// `source` is NULL or a NUL-terminated string.
pub unsafe fn is_client_text(source: *const c_char) -> bool {
    // SAFETY: debug_query_string is NULL or the client's message text, alive while it runs.
    unsafe {
        let sent = pg_sys::debug_query_string;
        if source.is_null() || sent.is_null() {
            return false;
        }
        std::ptr::eq(source, sent) || CStr::from_ptr(source) == CStr::from_ptr(sent)
    }
}
