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

/// FNV-1a, for the per-backend maps the hooks consult on every statement: their keys are OIDs
/// and context values this backend was given (no keyed hash needed against collision attacks: a
/// colliding key only slows its own lookups).
#[derive(Default)]
pub struct FnvHasher(u64);

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

pub type Fnv = std::hash::BuildHasherDefault<FnvHasher>;

/// Shared memory segments of the modules that keep one (the audit queue, the usage statistics).
pub mod shmem {
    use pgrx::pg_sys;
    use std::ffi::CStr;

    /// Ask for `size` bytes and one LWLock of `tranche` (from a `shmem_request_hook`).
    ///
    /// # Safety
    /// Called by the postmaster while it sizes shared memory.
    pub unsafe fn request(size: usize, tranche: &CStr) {
        // SAFETY: see the function's contract.
        unsafe {
            pg_sys::RequestAddinShmemSpace(size);
            pg_sys::RequestNamedLWLockTranche(tranche.as_ptr(), 1);
        }
    }

    /// Find the segment `name` of `size` bytes, or make it: zeroed, then `init` on it. Returns it
    /// and the lock of `tranche`. Under AddinShmemInitLock, as PostgreSQL's own modules do.
    ///
    /// # Safety
    /// Called from a `shmem_startup_hook`, after [`request`] asked for them.
    pub unsafe fn attach(name: &CStr, size: usize, tranche: &CStr, init: impl FnOnce(*mut u8)) -> (*mut u8, *mut pg_sys::LWLock) {
        // SAFETY: see the function's contract.
        unsafe {
            let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
            pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
            let mut found = false;
            let base = pg_sys::ShmemInitStruct(name.as_ptr(), size, &mut found).cast::<u8>();
            if !found {
                std::ptr::write_bytes(base, 0, size);
                init(base);
            }
            let lock = &raw mut (*pg_sys::GetNamedLWLockTranche(tranche.as_ptr())).lock;
            pg_sys::LWLockRelease(init_lock);
            (base, lock)
        }
    }
}

/// Copy `s` into a fixed, NUL-padded field of shared memory, whole UTF-8 characters only (cut
/// short if it does not fit).
pub fn put_str(dst: &mut [u8], s: &str) {
    dst.fill(0);
    let s = truncate(s, dst.len());
    dst[..s.len()].copy_from_slice(s.as_bytes());
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while n > 0 && !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

/// PostgreSQL functions that only read backend-local state and never raise, declared without
/// pgrx's error boundary (which costs a `sigsetjmp` per call) for the per-statement paths.
/// Anything that can raise goes through `pgrx::pg_sys` as usual.
pub mod pg {
    use pgrx::pg_sys::Oid;

    unsafe extern "C" {
        #[link_name = "GetUserId"]
        fn get_user_id() -> Oid;
        #[link_name = "GetSessionUserId"]
        fn get_session_user_id() -> Oid;
        #[link_name = "GetOuterUserId"]
        fn get_outer_user_id() -> Oid;
        #[link_name = "IsTransactionState"]
        fn is_transaction_state() -> bool;
        #[link_name = "IsTransactionBlock"]
        fn is_transaction_block() -> bool;
        #[link_name = "ActiveSnapshotSet"]
        fn active_snapshot_set() -> bool;
    }

    /// The role running the current statement (`GetUserId`).
    pub fn user() -> Oid {
        // SAFETY: reads a backend-local variable; cannot raise.
        unsafe { get_user_id() }
    }

    /// The session user (`GetSessionUserId`).
    pub fn session_user() -> Oid {
        // SAFETY: reads a backend-local variable; cannot raise.
        unsafe { get_session_user_id() }
    }

    /// The role the session acts as (`GetOuterUserId`: SET ROLE's, outside SECURITY DEFINER).
    pub fn outer_user() -> Oid {
        // SAFETY: reads a backend-local variable; cannot raise.
        unsafe { get_outer_user_id() }
    }

    /// `IsTransactionState()`.
    pub fn in_transaction() -> bool {
        // SAFETY: reads backend-local state; cannot raise.
        unsafe { is_transaction_state() }
    }

    /// `IsTransactionBlock()`.
    pub fn in_transaction_block() -> bool {
        // SAFETY: reads backend-local state; cannot raise.
        unsafe { is_transaction_block() }
    }

    /// `ActiveSnapshotSet()`.
    pub fn snapshot_set() -> bool {
        // SAFETY: reads backend-local state; cannot raise.
        unsafe { active_snapshot_set() }
    }
}

/// While a migration step runs (src/migrations.rs): the role it runs as. The session's outer
/// user is then still the superuser who called `migrate()`; the checks that judge "the role the
/// session acts as" must judge the step's role instead ([`acting_role`]).
static STEP_ROLE: Backend<std::cell::Cell<pgrx::pg_sys::Oid>> =
    Backend::new(std::cell::Cell::new(pgrx::pg_sys::InvalidOid));

/// Mark a migration step as running as `role` until the returned guard is dropped.
pub fn step_as(role: pgrx::pg_sys::Oid) -> OnDrop<impl FnMut()> {
    STEP_ROLE.set(role);
    OnDrop(|| STEP_ROLE.set(pgrx::pg_sys::InvalidOid))
}

/// The role the session acts as: `GetOuterUserId()` (SET ROLE's, not the owner of a SECURITY
/// DEFINER function that happens to run), or, during a migration step, the step's role.
pub fn acting_role() -> pgrx::pg_sys::Oid {
    let step = STEP_ROLE.get();
    if step != pgrx::pg_sys::InvalidOid {
        step
    } else {
        pg::outer_user()
    }
}

/// Backend state in a plain `static`. PostgreSQL runs each backend as a single-threaded process
/// and pg_tenancy starts no thread that touches this state (the master key command's reader
/// threads touch only their pipe), so no second thread ever sees it; and unlike `thread_local!`
/// in a shared library, whose every access calls `__tls_get_addr`, a plain static costs nothing
/// on the per-statement paths. Same shape as `LocalKey::with`.
pub struct Backend<T>(T);

// SAFETY: see above: one thread per backend process uses it.
unsafe impl<T> Sync for Backend<T> {}

impl<T> Backend<T> {
    pub const fn new(value: T) -> Self {
        Backend(value)
    }

    pub fn with<R>(&'static self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.0)
    }
}

impl<T: Copy> Backend<std::cell::Cell<T>> {
    pub fn get(&'static self) -> T {
        self.0.get()
    }

    pub fn set(&'static self, value: T) {
        self.0.set(value)
    }
}
