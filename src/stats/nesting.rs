//! Which statements are top level: those started while no executor runs and no utility
//! statement is being processed in this backend. The executor and utility hooks [`enter`] and
//! [`leave`] around running; a statement that fails leaves without [`leave`] (the hooks hold no
//! error boundary, see the hooks module), so each entry is also dropped when the memory context it
//! names is reset or deleted, which PostgreSQL does to the failed statement's contexts before the
//! next statement runs (a (sub)transaction's abort cleanup, a portal's drop, the next message).
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::c_void;

/// Memory contexts of executors and utility statements running now, innermost last.
static RUNNING: crate::util::Backend<RefCell<Vec<usize>>> = crate::util::Backend::new(RefCell::new(Vec::new()));
/// Contexts with our reset callback registered.
static WATCHED: crate::util::Backend<RefCell<Vec<usize>>> = crate::util::Backend::new(RefCell::new(Vec::new()));
/// Callback records not registered with any context now (they live for the life of the backend,
/// so registering one allocates nothing on the statement path).
static SPARE: crate::util::Backend<RefCell<Vec<Box<pg_sys::MemoryContextCallback>>>> =
    crate::util::Backend::new(RefCell::new(Vec::new()));

/// Executors and utility statements running now.
pub fn depth() -> usize {
    RUNNING.with(|r| r.borrow().len())
}

/// An executor or a utility statement whose memory lives in `cx` starts running.
///
/// # Safety
/// `cx` is a valid memory context that outlives the run (or is reset or deleted if the run fails).
pub unsafe fn enter(cx: pg_sys::MemoryContext) {
    if cx.is_null() {
        return;
    }
    let key = cx as usize;
    let watched = WATCHED.with(|w| w.borrow().contains(&key));
    if !watched {
        let mut cb = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
        cb.func = Some(forget);
        // the record itself is the argument: `forget` finds the context in it and puts it back
        let raw = Box::into_raw(cb);
        // SAFETY: the record stays allocated (leaked from its Box) until `forget` runs, which
        // PostgreSQL calls exactly once, when `cx` is reset or deleted.
        unsafe {
            (*raw).arg = raw.cast::<c_void>();
            pg_sys::MemoryContextRegisterResetCallback(cx, raw);
        }
        WATCHED.with(|w| w.borrow_mut().push(key));
        CONTEXT_OF.with(|c| c.borrow_mut().push((raw as usize, key)));
    }
    RUNNING.with(|r| r.borrow_mut().push(key));
}

/// The run that [`enter`]ed with `cx` returned.
pub fn leave(cx: pg_sys::MemoryContext) {
    let key = cx as usize;
    RUNNING.with(|r| {
        let mut r = r.borrow_mut();
        if let Some(i) = r.iter().rposition(|&k| k == key) {
            r.remove(i);
        }
    });
}

/// Which context each registered record watches.
static CONTEXT_OF: crate::util::Backend<RefCell<Vec<(usize, usize)>>> = crate::util::Backend::new(RefCell::new(Vec::new()));

/// Reset callback: the context is being reset or deleted (its runs are over, failed or not).
unsafe extern "C-unwind" fn forget(arg: *mut c_void) {
    let record = arg as usize;
    let Some(key) = CONTEXT_OF.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        let i = c.iter().position(|&(r, _)| r == record)?;
        Some(c.swap_remove(i).1)
    }) else {
        return;
    };
    // SAFETY: made by Box::into_raw in `enter`, and PostgreSQL no longer holds it.
    let cb = unsafe { Box::from_raw(arg.cast::<pg_sys::MemoryContextCallback>()) };
    SPARE.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            s.push(cb);
        }
    });
    RUNNING.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.retain(|&k| k != key);
        }
    });
    WATCHED.with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            w.retain(|&k| k != key);
        }
    });
}
