//! Small things every floor uses.

/// Runs its closure when dropped, also while unwinding from a PostgreSQL error: for backend
/// flags that must not outlive the call that set them.
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

static PRELOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static LOADING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Note, in `_PG_init`, whether the library is being loaded by `shared_preload_libraries` (the
/// postmaster sets it once; every backend inherits it).
pub fn set_preloaded(yes: bool) {
    PRELOADED.store(yes, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the library was preloaded: pg_tenancy refuses to act on a context otherwise (its
/// hooks, its settings and its checks would start only at its first function call, after
/// statements it should have seen).
pub fn preloaded() -> bool {
    PRELOADED.load(std::sync::atomic::Ordering::Relaxed)
}

/// While `_PG_init` defines the settings: a value set before the library was loaded (a
/// placeholder) is applied then, with no trustworthy record of who set it.
pub fn set_loading(yes: bool) {
    LOADING.store(yes, std::sync::atomic::Ordering::Relaxed);
}

pub fn loading() -> bool {
    LOADING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while n > 0 && !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}
