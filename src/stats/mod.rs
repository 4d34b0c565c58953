//! Per-tenant usage in shared memory: what each tenant's statements cost (count, rows, time, a
//! latency histogram, errors by class), what was refused to it (denials, limits), and the state
//! of its limits (the statement-rate token bucket, statements running now).
//!
//! **Bounded.** `pg_tenancy.stats_max_tenants` places (16,000 by default), reserved at server
//! start: a fixed array of entries and an open-addressing index twice its size. A tenant gets a
//! place at its first statement and keeps it for the life of the server (`reset_stats` zeroes
//! counters, never moves a tenant): so no lookup ever waits for an eviction, unlike
//! `pg_stat_statements`, whose full table evicts under an exclusive lock. Past the bound, new
//! tenants are counted together in the entry `(other)` (not a tenant id: no tenant can be named
//! so); the last tenth of the places is kept for tenants whose plan has `pinned_stats`.
//!
//! **Cheap.** No lock on the statement path but a rate-limited tenant's spinlock: the index is
//! read without a lock (a place is published with a release store after its key is written, and
//! places are never freed); the one LWLock is taken only to give a tenant its place. A
//! statement's count, time, rows and latency bucket go to the backend's own slot in shared
//! memory (one per backend, its cache lines written by that backend only) while the backend stays with one tenant, and move
//! to the tenant's entry when it switches tenants or exits; readers add the slots to the entries
//! (a slot moving is seen by them through its sequence number, so nothing is counted twice or
//! missed). So two backends running the same tenant do not write the same cache lines on every
//! statement. The rate limit's token bucket and the running count sit on a cache line of their
//! own, the bucket under a spinlock held for a few arithmetic operations.
//!
//! **Attribution** comes from the verified tenant context, never from the statement's text: the
//! hooks call [`begin`] for every top-level statement run under a context and [`end`] (or
//! [`failed`]) when it is done.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering::*};
use std::sync::OnceLock;
use std::time::Instant;

use pg_tenancy_core::metrics::{self, Bucket, BUCKETS, ERROR_CLASSES};

pub mod client;

/// The name `(other)` tenants beyond the bound are counted under.
pub const OTHER: &str = "(other)";
const KEY_LEN: usize = 64;

/// What a tenant's plan (or its own override) limits. `rate` 0 = no rate limit; `max_concurrent`
/// 0 = no cap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    pub plan: String,
    pub rate: f64,
    pub burst: f64,
    pub max_concurrent: i32,
    pub pinned: bool,
    /// Storage quota in bytes (0 = none), the tenant's storage as last measured, and the bytes a
    /// row takes (the tenant's measured average, else every tenant's) for the rows inserted since.
    pub storage_quota: i64,
    pub storage_measured: i64,
    pub bytes_per_row: f64,
}

/// Why a statement was refused by a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Rate = 0,
    Concurrency = 1,
    Storage = 2,
    Meter = 3,
}

pub const REFUSAL_NAMES: [&str; 4] = ["rate", "concurrency", "storage", "meter"];

/// A tenant's place. Laid out by how it is written: what every statement reads (and rarely
/// writes) first, the counters slots move into next, and the limits' state, which every
/// statement of a limited tenant writes, on a cache line of its own.
#[repr(C)]
pub struct Entry {
    /// The tenant's database (tenants are per database; shared memory is the cluster's).
    db: u32,
    /// Incremented by each reset of the entry: counts a slot took before it are dropped.
    epoch: AtomicU32,
    max_us: AtomicU64,
    /// Last statement (microseconds since the PostgreSQL epoch; written at most once a second).
    last_active: AtomicI64,
    key: [u8; KEY_LEN],
    /// Statements that failed before they started running (the rest are counted by `hist`).
    unstarted: AtomicU64,
    rows: AtomicU64,
    time_us: AtomicU64,
    denials: AtomicU64,
    refusals: [AtomicU64; 4],
    errors: [AtomicU64; ERROR_CLASSES.len()],
    hist: [AtomicU64; BUCKETS],
    /// When a refusal by a limit was last written to the audit log (microseconds): at most one
    /// a second per tenant, so a flood cannot fill the audit queue.
    last_refusal_audit: AtomicI64,
    /// Rows the tenant inserted since its storage was last measured.
    inserted_since: AtomicI64,
    limiter: Limiter,
}

#[repr(C, align(64))]
struct Limiter {
    /// Top-level statements of the tenant running now (counted only while a cap applies).
    running: AtomicI32,
    /// Guards the bucket (held for a few arithmetic operations).
    spin: AtomicBool,
    /// The rate limit's token bucket: tokens (an f64's bits) as of `bucket_at` (microseconds).
    bucket_tokens: AtomicU64,
    bucket_at: AtomicI64,
}

/// A backend's own counts of the tenant it ran last (see the module's "Cheap"), written by that
/// backend only.
#[repr(C, align(64))]
struct Slot {
    /// Odd while the slot's counts move into their entry (a reader then reads again).
    seq: AtomicU32,
    /// The place the counts are of, + 1 (0: none).
    place: AtomicU32,
    /// The entry's epoch when the counts were taken (an entry reset since: they are dropped).
    epoch: AtomicU32,
    rows: AtomicU64,
    time_us: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

#[repr(C)]
struct Header {
    capacity: u32,
    index_len: u32,
    used: AtomicU32,
    reset_at: AtomicI64,
    /// Slots, one per backend id (MaxBackends + 1: ids start at 1).
    slots: u32,
}

/// Shared memory: header, index (`index_len` u32s: 0 empty, else entry number + 1), entries,
/// slots.
struct Segment {
    base: AtomicPtr<u8>,
    lock: AtomicPtr<pg_sys::LWLock>,
}

static SEGMENT: Segment = Segment { base: AtomicPtr::new(std::ptr::null_mut()), lock: AtomicPtr::new(std::ptr::null_mut()) };
const TRANCHE: &CStr = c"pg_tenancy_stats";

struct PrevHooks {
    request: pg_sys::shmem_request_hook_type,
    startup: pg_sys::shmem_startup_hook_type,
}
static PREV: OnceLock<PrevHooks> = OnceLock::new();

/// (index length, offset of the entries, offset of the slots, size)
fn layout(capacity: usize, slots: usize) -> (usize, usize, usize, usize) {
    let index_len = (capacity * 2).next_power_of_two();
    let header = std::mem::size_of::<Header>().next_multiple_of(64);
    let index = (index_len * 4).next_multiple_of(64);
    let slots_at = (header + index + capacity * std::mem::size_of::<Entry>()).next_multiple_of(64);
    (index_len, header + index, slots_at, slots_at + slots * std::mem::size_of::<Slot>())
}

/// Bytes of shared memory for `capacity` places and `slots` backends (the README states it).
pub fn segment_size(capacity: usize, slots: usize) -> usize {
    layout(capacity, slots).3
}

/// Bytes of shared memory the statistics take.
pub fn memory() -> Option<usize> {
    header().map(|h| segment_size(h.capacity as usize, h.slots as usize))
}

fn slot_count() -> usize {
    // SAFETY: MaxBackends is set before shared memory is requested (PostgreSQL 15).
    (unsafe { pg_sys::MaxBackends }).max(0) as usize + 1
}

/// Called from _PG_init (only when preloading: the segment is sized at server start).
pub fn init() {
    // SAFETY: _PG_init runs once per process before any query; hooks are chained.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        let _ = PREV.set(PrevHooks { request: pg_sys::shmem_request_hook, startup: pg_sys::shmem_startup_hook });
        pg_sys::shmem_request_hook = Some(shmem_request);
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

fn capacity() -> usize {
    // one more for (other)
    crate::gucs::stats_max_tenants() + 1
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while it sizes shared memory.
    unsafe {
        if let Some(prev) = PREV.get().and_then(|p| p.request) {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        crate::util::shmem::request(segment_size(capacity(), slot_count()), TRANCHE);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: ShmemInitStruct under AddinShmemInitLock, as PostgreSQL's own modules do; a new
    // segment is zeroed (every counter 0, the index empty) and then given its sizes and the
    // entry (other) at place 0.
    unsafe {
        if let Some(prev) = PREV.get().and_then(|p| p.startup) {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        let cap = capacity();
        let slots = slot_count();
        let (index_len, _, _, size) = layout(cap, slots);
        let (base, lock) = crate::util::shmem::attach(c"pg_tenancy tenant stats", size, TRANCHE, |base| {
            // (PostgreSQL aligns shared memory to cache lines: entries and slots rely on it)
            assert_eq!(base as usize % 64, 0, "pg_tenancy: shared memory not aligned to 64 bytes");
            let h = &mut *base.cast::<Header>();
            h.capacity = cap as u32;
            h.index_len = index_len as u32;
            h.used = AtomicU32::new(1);
            h.reset_at = AtomicI64::new(pg_sys::GetCurrentTimestamp());
            h.slots = slots as u32;
            crate::util::put_str(&mut (*entries(base)).key, OTHER);
        });
        SEGMENT.base.store(base, Relaxed);
        SEGMENT.lock.store(lock, Relaxed);
    }
}

fn header() -> Option<&'static Header> {
    let base = SEGMENT.base.load(Relaxed);
    // SAFETY: set once at shmem startup to a segment that lives as long as the server.
    (!base.is_null()).then(|| unsafe { &*base.cast::<Header>() })
}

/// # Safety
/// `base` is the segment's start.
unsafe fn entries(base: *mut u8) -> *mut Entry {
    // SAFETY: within the segment (see layout).
    unsafe { base.add(layout((*base.cast::<Header>()).capacity as usize, 0).1).cast::<Entry>() }
}

/// Slot `i` (a backend id).
fn slot(h: &'static Header, i: usize) -> &'static Slot {
    assert!(i < h.slots as usize);
    let base = (h as *const Header).cast::<u8>();
    // SAFETY: i < slots; the slots follow the entries (see layout), for the life of the server.
    unsafe { &*base.add(layout(h.capacity as usize, 0).2).cast::<Slot>().add(i) }
}

/// This backend's slot (None for a process without a backend id).
fn my_slot(h: &'static Header) -> Option<&'static Slot> {
    // SAFETY: reads a backend-global.
    let id = unsafe { pg_sys::MyBackendId };
    (id >= 1 && (id as usize) < h.slots as usize).then(|| slot(h, id as usize))
}

fn index(h: &'static Header) -> &'static [AtomicU32] {
    let base = (h as *const Header).cast::<u8>();
    // SAFETY: the index follows the header (see layout), index_len u32s, for the life of the server.
    unsafe {
        std::slice::from_raw_parts(base.add(std::mem::size_of::<Header>().next_multiple_of(64)).cast::<AtomicU32>(), h.index_len as usize)
    }
}

fn entry_ptr(h: &'static Header, i: u32) -> *mut Entry {
    assert!(i < h.capacity);
    // SAFETY: i < capacity; entries live as long as the server.
    unsafe { entries((h as *const Header).cast_mut().cast::<u8>()).add(i as usize) }
}

fn entry(h: &'static Header, i: u32) -> &'static Entry {
    // SAFETY: see entry_ptr.
    unsafe { &*entry_ptr(h, i) }
}

fn key_of(e: &Entry) -> &str {
    let n = e.key.iter().position(|&b| b == 0).unwrap_or(KEY_LEN);
    std::str::from_utf8(&e.key[..n]).unwrap_or("")
}

fn hash(db: u32, s: &str) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::util::FnvHasher::default();
    h.write(&db.to_le_bytes());
    h.write(s.as_bytes());
    h.finish()
}

fn my_db() -> u32 {
    // SAFETY: reads a backend-global.
    unsafe { pg_sys::MyDatabaseId }.into()
}

/// The place of `tenant` of database `db` in the index, without a lock (None: no place yet).
fn find(h: &'static Header, db: u32, tenant: &str) -> Option<u32> {
    let idx = index(h);
    let mask = idx.len() - 1;
    let mut i = hash(db, tenant) as usize & mask;
    for _ in 0..idx.len() {
        let v = idx[i].load(Acquire);
        if v == 0 {
            return None;
        }
        let e = entry(h, v - 1);
        if e.db == db && key_of(e) == tenant {
            return Some(v - 1);
        }
        i = (i + 1) & mask;
    }
    None
}

/// Give `tenant` a place (under the LWLock), or (other) when none is left for it.
fn insert(h: &'static Header, db: u32, tenant: &str, pinned: bool) -> u32 {
    let lock = SEGMENT.lock.load(Relaxed);
    // SAFETY: the tranche's lock, for the life of the server; nothing below raises.
    unsafe { pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
    let _release = crate::util::OnDrop(|| {
        // SAFETY: acquired above.
        unsafe { pg_sys::LWLockRelease(lock) }
    });
    if let Some(i) = find(h, db, tenant) {
        return i;
    }
    let used = h.used.load(Relaxed);
    let reserve = h.capacity / 10;
    if used >= h.capacity || (!pinned && used >= h.capacity - reserve) {
        return 0;
    }
    let e = entry_ptr(h, used);
    // SAFETY: the place is not yet published (no reader can reach it: `used` and the index are
    // written after) and the lock is held.
    unsafe {
        (*e).db = db;
        crate::util::put_str(&mut (*e).key, tenant);
    }
    h.used.store(used + 1, Relaxed);
    let idx = index(h);
    let mask = idx.len() - 1;
    let mut i = hash(db, tenant) as usize & mask;
    while idx[i].load(Relaxed) != 0 {
        i = (i + 1) & mask;
    }
    idx[i].store(used + 1, Release);
    used
}

thread_local! {
    /// Places this backend looked up, by tenant.
    static PLACES: RefCell<HashMap<String, u32, crate::util::Fnv>> = RefCell::new(HashMap::default());
    /// Token buckets of tenants counted under (other): kept per backend, so that a tenant beyond
    /// the bound is still limited (per session) and never by another tenant's statements.
    static LOCAL_BUCKETS: RefCell<HashMap<String, Bucket, crate::util::Fnv>> = RefCell::new(HashMap::default());
}

/// The place of `tenant` (given one if it has none), or None without shared memory.
pub fn place(tenant: &str, pinned: bool) -> Option<u32> {
    let h = header()?;
    if let Some(i) = LAST_PLACE.with(|l| l.borrow().as_ref().filter(|(t, _)| t == tenant).map(|(_, i)| *i)) {
        return Some(i);
    }
    if let Some(i) = PLACES.with(|p| p.borrow().get(tenant).copied()) {
        // (the common switch between cached tenants: no allocation, the String is reused)
        LAST_PLACE.with(|l| {
            let mut l = l.borrow_mut();
            match l.as_mut() {
                Some((t, p)) => {
                    t.clear();
                    t.push_str(tenant);
                    *p = i;
                }
                None => *l = Some((tenant.to_string(), i)),
            }
        });
        return Some(i);
    }
    let i = match PLACES.with(|p| p.borrow().get(tenant).copied()) {
        Some(i) => i,
        None => {
            let db = my_db();
            let i = find(h, db, tenant).unwrap_or_else(|| insert(h, db, tenant, pinned));
            // (a tenant counted under (other) asks again next time: a pinned plan may get it a place)
            if i != 0 {
                PLACES.with(|p| p.borrow_mut().insert(tenant.to_string(), i));
            }
            i
        }
    };
    LAST_PLACE.with(|l| *l.borrow_mut() = Some((tenant.to_string(), i)));
    Some(i)
}

/// The place looked up last: most statements of a session are of the tenant of the one before.
static LAST_PLACE: crate::util::Backend<RefCell<Option<(String, u32)>>> = crate::util::Backend::new(RefCell::new(None));

/// The statement being counted (top level, under a context).
#[derive(Clone, Copy)]
struct Current {
    place: u32,
    /// The statement (its QueryDesc's address): nested statements end too.
    query: usize,
    /// The portal it runs in (ActivePortal when it started).
    portal: usize,
    /// Count it (pg_tenancy.track_stats); otherwise it is here only to give back its place.
    track: bool,
    start: Instant,
    /// It took one of its tenant's concurrent places (given back when it ends).
    holds: bool,
}

static CURRENT: crate::util::Backend<Cell<Option<Current>>> = crate::util::Backend::new(Cell::new(None));

/// Take a token of the tenant's rate limit; whether there was one. (The limits of now apply to
/// the time since the bucket was last brought up to date: a raised limit applies at once.)
fn take_token(h: &'static Header, place: u32, tenant: &str, l: &Limits, now_us: i64) -> bool {
    let burst = if l.burst >= 1.0 { l.burst } else { l.rate.max(1.0) };
    if place == 0 {
        return LOCAL_BUCKETS.with(|b| b.borrow_mut().entry(tenant.to_string()).or_default().take(now_us, l.rate, burst));
    }
    let m = &entry(h, place).limiter;
    while m.spin.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
        std::hint::spin_loop();
    }
    let mut b = Bucket { tokens: f64::from_bits(m.bucket_tokens.load(Relaxed)), at_us: m.bucket_at.load(Relaxed) };
    let ok = b.take(now_us, l.rate, burst);
    m.bucket_tokens.store(b.tokens.to_bits(), Relaxed);
    m.bucket_at.store(b.at_us, Relaxed);
    m.spin.store(false, Release);
    ok
}

/// Whether a refusal of this tenant by a limit should be written to the audit log now (at most
/// one a second per tenant; the rest are counted only).
pub fn audit_refusal_due(place: u32, now_us: i64) -> bool {
    let Some(h) = header() else { return true };
    let e = entry(h, place);
    let last = e.last_refusal_audit.load(Relaxed);
    now_us - last >= 1_000_000 && e.last_refusal_audit.compare_exchange(last, now_us, Relaxed, Relaxed).is_ok()
}

/// A top-level statement of `tenant` starts: enforce its limits (when `enforce`), then start
/// counting it. On refusal nothing is counted but the refusal.
pub fn begin(
    tenant: &str,
    l: &Limits,
    enforce: bool,
    track: bool,
    query: usize,
    portal: usize,
    now_us: i64,
    exempt: impl FnOnce() -> bool,
) -> Result<(), (Refusal, u32)> {
    // a statement with the client's text run while the client's counted statement runs in the
    // same portal (a function running EXECUTE current_query()) is part of it
    if CURRENT.with(|c| c.get()).is_some_and(|c| c.portal == portal && portal_active(portal)) {
        return Ok(());
    }
    finish_abandoned();
    let Some(h) = header() else { return Ok(()) };
    let Some(place) = place(tenant, l.pinned) else { return Ok(()) };
    let e = entry(h, place);
    // (asked only of a statement of a limited tenant)
    let enforce = enforce && (l.rate > 0.0 || (l.max_concurrent > 0 && place != 0)) && !exempt();
    if enforce && l.rate > 0.0 && !take_token(h, place, tenant, l, now_us) {
        e.refusals[Refusal::Rate as usize].fetch_add(1, Relaxed);
        return Err((Refusal::Rate, place));
    }
    let mut holds = false;
    if enforce && l.max_concurrent > 0 && place != 0 {
        release_at_exit();
        if !wait_for_place(e, l.max_concurrent) {
            e.refusals[Refusal::Concurrency as usize].fetch_add(1, Relaxed);
            return Err((Refusal::Concurrency, place));
        }
        holds = true;
    }
    // (to the second: a store per statement would bounce the line between the tenant's backends)
    if now_us - e.last_active.load(Relaxed) >= 1_000_000 {
        e.last_active.store(now_us, Relaxed);
    }
    CURRENT.with(|c| c.set(Some(Current { place, query, portal, track, start: Instant::now(), holds })));
    Ok(())
}

/// Whether `portal` (an address from ActivePortal) is running now.
fn portal_active(portal: usize) -> bool {
    // SAFETY: compares with the backend's ActivePortal, which is null or a live portal; the
    // stored address is only dereferenced when it is that one.
    unsafe {
        let p = pg_sys::ActivePortal;
        !p.is_null() && p as usize == portal && (*p).status == pg_sys::PortalStatus::PORTAL_ACTIVE
    }
}

/// Take one of the tenant's `cap` concurrent places, waiting up to `pg_tenancy.concurrency_wait`.
fn wait_for_place(e: &Entry, cap: i32) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_millis(crate::gucs::concurrency_wait_ms().max(0) as u64);
    loop {
        if e.limiter.running.fetch_add(1, AcqRel) < cap {
            return true;
        }
        e.limiter.running.fetch_sub(1, AcqRel);
        if Instant::now() >= deadline {
            return false;
        }
        pgrx::check_for_interrupts!();
        // SAFETY: sleeps; interrupts are checked above, each millisecond.
        unsafe { pg_sys::pg_usleep(1000) };
    }
}

fn release(c: &Current) {
    if c.holds {
        if let Some(h) = header() {
            entry(h, c.place).limiter.running.fetch_sub(1, AcqRel);
        }
    }
}

/// A place held when the backend exits (a client that disconnects mid-statement, a FATAL) is
/// given back: registered once per backend, at its first held place.
fn release_at_exit() {
    static REGISTERED: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers a callback with PostgreSQL's signature.
        unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0)) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    finish_abandoned();
    if let Some(h) = header() {
        if let Some(s) = my_slot(h) {
            flush(h, s);
        }
    }
}

/// A statement left without [`end`] or [`failed`] (its error was not reported to the server log):
/// give back what it held.
fn finish_abandoned() {
    if let Some(c) = CURRENT.with(|c| c.take()) {
        release(&c);
    }
}

/// Whether `query` is the statement being counted.
pub fn counting(query: usize) -> bool {
    CURRENT.with(|c| c.get()).is_some_and(|c| c.query == query)
}

/// Whether a statement is being counted.
pub fn counting_any() -> bool {
    CURRENT.with(|c| c.get()).is_some()
}

/// The counted statement ended: `rows` processed. (A few relaxed atomic additions; the
/// statement count is the histogram's total.)
pub fn end(rows: u64) {
    let Some(c) = CURRENT.with(|c| c.take()) else { return };
    release(&c);
    let Some(h) = header().filter(|_| c.track) else { return };
    record(h, &c, rows);
}

/// Whether this backend's slot holds counts not yet in their entry.
static PENDING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));
/// Whether this process emptied its slot once (what a slot holds before is nobody's).
static SLOT_CLEAN: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// Add `v` to a counter only this backend writes (a plain store: no locked instruction).
fn bump(a: &AtomicU64, v: u64) {
    a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
}

fn record(h: &'static Header, c: &Current, rows: u64) {
    let us = c.start.elapsed().as_micros() as u64;
    let e = entry(h, c.place);
    if us > e.max_us.load(Relaxed) {
        e.max_us.fetch_max(us, Relaxed);
    }
    let k = metrics::bucket_of(us);
    if let Some(s) = my_slot(h) {
        claim(s);
        let epoch = e.epoch.load(Relaxed);
        if s.place.load(Relaxed) == c.place + 1 && s.epoch.load(Relaxed) == epoch {
            bump(&s.hist[k], 1);
            bump(&s.time_us, us);
            if rows > 0 {
                bump(&s.rows, rows);
            }
            PENDING.with(|p| p.set(true));
            return;
        }
        // another tenant (or a reset since): what the slot holds goes to its entry, the slot is
        // this tenant's from the next statement on, and this one goes to the entry directly
        flush(h, s);
        release_at_exit();
        s.epoch.store(epoch, Relaxed);
        s.place.store(c.place + 1, Release);
    }
    e.hist[k].fetch_add(1, Relaxed);
    e.time_us.fetch_add(us, Relaxed);
    if rows > 0 {
        e.rows.fetch_add(rows, Relaxed);
    }
}

/// Empty slot `s` the first time this process uses it: what it holds then (nothing, unless a
/// process with the same backend id left without its exit callbacks) is nobody's.
fn claim(s: &Slot) {
    if SLOT_CLEAN.with(|c| c.replace(true)) {
        return;
    }
    s.seq.fetch_add(1, AcqRel);
    std::sync::atomic::fence(Release);
    for a in s.hist.iter().chain([&s.rows, &s.time_us]) {
        a.store(0, Relaxed);
    }
    s.place.store(0, Release);
    s.seq.fetch_add(1, Release);
}

/// Move the counts of slot `s` (this backend's) to their entry (dropped if the entry was reset
/// since they were taken) and leave the slot without a tenant.
fn flush(h: &'static Header, s: &Slot) {
    let place = s.place.load(Relaxed);
    if place == 0 {
        return;
    }
    if !PENDING.with(|p| p.replace(false)) {
        s.place.store(0, Release);
        return;
    }
    s.seq.fetch_add(1, AcqRel);
    // (the seqlock's writer: the odd sequence is visible before any count moves)
    std::sync::atomic::fence(Release);
    let e = entry(h, place - 1);
    let keep = s.epoch.load(Relaxed) == e.epoch.load(Relaxed);
    let moved = |from: &AtomicU64, to: &AtomicU64| {
        let v = from.load(Relaxed);
        if v != 0 {
            if keep {
                to.fetch_add(v, Relaxed);
            }
            from.store(0, Relaxed);
        }
    };
    moved(&s.rows, &e.rows);
    moved(&s.time_us, &e.time_us);
    for (from, to) in s.hist.iter().zip(e.hist.iter()) {
        moved(from, to);
    }
    s.place.store(0, Release);
    s.seq.fetch_add(1, Release);
}

/// The counted statement failed with the packed SQLSTATE `code` (from the error report, in
/// `emit_log_hook`: cannot raise).
pub fn failed(code: i32) {
    let Some(c) = CURRENT.with(|c| c.take()) else { return };
    release(&c);
    let Some(h) = header().filter(|_| c.track) else { return };
    let sqlstate = sqlstate_text(code);
    record(h, &c, 0);
    entry(h, c.place).errors[metrics::error_class(&sqlstate)].fetch_add(1, Relaxed);
}

/// A statement of `tenant` failed before it started running (parse analysis, planning, a check
/// of pg_tenancy's before the executor): counted with its error, no time. Only for a tenant that
/// already has a place (no lock is taken while an error is being reported).
pub fn failed_unstarted(tenant: &str, code: i32) {
    let Some(h) = header() else { return };
    let Some(i) = find(h, my_db(), tenant) else { return };
    let e = entry(h, i);
    e.unstarted.fetch_add(1, Relaxed);
    e.errors[metrics::error_class(&sqlstate_text(code))].fetch_add(1, Relaxed);
}

fn sqlstate_text(code: i32) -> String {
    // PostgreSQL packs each of the five characters into 6 bits (MAKE_SQLSTATE).
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}

/// The transaction ended: a statement still counted (its error was not reported to the server
/// log, or it was abandoned) gives back its concurrent place.
pub fn transaction_ended() {
    finish_abandoned();
}

/// The tenant's storage now, estimated: as last measured, plus the rows inserted since at the
/// bytes a row takes.
pub fn storage_estimate(tenant: &str, l: &Limits) -> i64 {
    let since = match (header(), place(tenant, l.pinned)) {
        (Some(h), Some(p)) if p != 0 => entry(h, p).inserted_since.load(Relaxed),
        _ => 0,
    };
    l.storage_measured.saturating_add((since as f64 * l.bytes_per_row) as i64)
}

/// `rows` more rows inserted by `tenant` since its last measurement (fewer, when negative: a
/// refused statement's rows go back).
pub fn inserted(tenant: &str, pinned: bool, rows: i64) {
    if let (Some(h), Some(p)) = (header(), place(tenant, pinned)) {
        if p != 0 {
            entry(h, p).inserted_since.fetch_add(rows, Relaxed);
        }
    }
}

/// `tenant`'s storage was just measured: the rows inserted since start from zero.
pub fn storage_measured(tenant: &str) {
    if let Some(h) = header() {
        if let Some(i) = find(h, my_db(), tenant) {
            entry(h, i).inserted_since.store(0, Relaxed);
        }
    }
}

/// A denial (an audit event) in the context of `tenant`, a tenant this backend verified.
pub fn count_denial(tenant: &str) {
    if let (Some(h), Some(p)) = (header(), place(tenant, false)) {
        entry(h, p).denials.fetch_add(1, Relaxed);
    }
}

/// A refusal by a limit counted outside [`begin`] (a meter over its allowance).
pub fn count_refusal(tenant: &str, why: Refusal) {
    if let (Some(h), Some(p)) = (header(), place(tenant, false)) {
        entry(h, p).refusals[why as usize].fetch_add(1, Relaxed);
    }
}

/// One tenant's counters, read.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub tenant: String,
    pub statements: u64,
    pub rows: u64,
    pub time_us: u64,
    pub max_us: u64,
    pub denials: u64,
    pub refusals: [u64; 4],
    pub errors: [u64; ERROR_CLASSES.len()],
    pub hist: [u64; BUCKETS],
    pub running: i32,
    pub last_active: i64,
}

/// Every tenant of this database with a place, and (other) (the cluster's), and when counters
/// were last reset. Empty without shared memory.
pub fn snapshot() -> (Vec<Snapshot>, Option<i64>) {
    let Some(h) = header() else { return (Vec::new(), None) };
    let used = h.used.load(Acquire).min(h.capacity);
    let db = my_db();
    // the backends' slots by the place they count (a slot taking a place after this is new
    // counts, seen by the next read)
    let mut by_place: HashMap<u32, Vec<&'static Slot>> = HashMap::new();
    for i in 0..h.slots as usize {
        let s = slot(h, i);
        let p = s.place.load(Acquire);
        if p != 0 {
            by_place.entry(p - 1).or_default().push(s);
        }
    }
    let load = |a: &AtomicU64| a.load(Relaxed);
    let mut out = Vec::with_capacity(used as usize);
    for i in 0..used {
        let e = entry(h, i);
        let tenant = key_of(e).to_string();
        if tenant.is_empty() || (i != 0 && e.db != db) {
            continue;
        }
        let slots = by_place.get(&i).map(Vec::as_slice).unwrap_or(&[]);
        // the entry and its slots read together: a slot that moved its counts into the entry
        // meanwhile (its sequence changed) is read again with it
        let mut tries = 0;
        let (rows, time_us, hist) = loop {
            let seqs: Vec<u32> = slots.iter().map(|s| s.seq.load(Acquire)).collect();
            let mut rows = load(&e.rows);
            let mut time_us = load(&e.time_us);
            let mut hist: [u64; BUCKETS] = std::array::from_fn(|k| load(&e.hist[k]));
            let epoch = e.epoch.load(Relaxed);
            for s in slots {
                if s.place.load(Relaxed) == i + 1 && s.epoch.load(Relaxed) == epoch {
                    rows += load(&s.rows);
                    time_us += load(&s.time_us);
                    for (k, b) in hist.iter_mut().enumerate() {
                        *b += load(&s.hist[k]);
                    }
                }
            }
            std::sync::atomic::fence(Acquire);
            tries += 1;
            let stable = seqs.iter().all(|q| q % 2 == 0) && slots.iter().zip(&seqs).all(|(s, q)| s.seq.load(Relaxed) == *q);
            if stable {
                break (rows, time_us, hist);
            }
            // (a backend moving its counts is a few instructions away from done, unless it was
            // descheduled: never return a read that may count them twice; after 100,000 tries
            // (a second or more), the entry alone, which never counts them twice)
            if tries > 100 {
                // SAFETY: sleeps 10 microseconds; interrupts are checked.
                unsafe { pg_sys::pg_usleep(10) };
                pgrx::check_for_interrupts!();
            }
            if tries > 100_000 {
                break (load(&e.rows), load(&e.time_us), std::array::from_fn(|k| load(&e.hist[k])));
            }
        };
        out.push(Snapshot {
            tenant,
            statements: load(&e.unstarted) + hist.iter().sum::<u64>(),
            rows,
            time_us,
            max_us: load(&e.max_us),
            denials: load(&e.denials),
            refusals: std::array::from_fn(|k| load(&e.refusals[k])),
            errors: std::array::from_fn(|k| load(&e.errors[k])),
            hist,
            running: e.limiter.running.load(Relaxed).max(0),
            last_active: e.last_active.load(Relaxed),
        });
    }
    (out, Some(h.reset_at.load(Relaxed)))
}

/// Zero the counters of `tenant`, or of every tenant of this database and (other) (places are
/// kept; limits' state too).
/// Returns how many entries were reset.
pub fn reset(tenant: Option<&str>) -> usize {
    let Some(h) = header() else { return 0 };
    // (the epoch first: counts backends' slots hold from before are dropped, not added after)
    let zero = |e: &Entry| {
        e.epoch.fetch_add(1, AcqRel);
        for a in [&e.unstarted, &e.rows, &e.time_us, &e.max_us, &e.denials] {
            a.store(0, Relaxed);
        }
        for a in e.refusals.iter().chain(e.errors.iter()).chain(e.hist.iter()) {
            a.store(0, Relaxed);
        }
    };
    match tenant {
        Some(t) => match find(h, my_db(), t) {
            Some(i) => {
                zero(entry(h, i));
                1
            }
            None => 0,
        },
        None => {
            let used = h.used.load(Acquire).min(h.capacity);
            let db = my_db();
            (0..used).filter(|&i| i == 0 || entry(h, i).db == db).for_each(|i| zero(entry(h, i)));
            // SAFETY: reads the clock.
            h.reset_at.store(unsafe { pg_sys::GetCurrentTimestamp() }, Relaxed);
            used as usize
        }
    }
}

/// Places in use (including (other)) and the bound.
pub fn occupancy() -> Option<(u32, u32)> {
    header().map(|h| (h.used.load(Relaxed), h.capacity))
}
