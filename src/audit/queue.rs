//! The shared-memory queue of events: bounded, never waiting for room (a full queue counts the
//! event as overflowed), guarded by one LWLock. Writers take events of their database from it
//! and give them back if they fail.
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub const QUEUE_CAPACITY: usize = 8192;
/// Databases with a drain worker at the same time.
pub(super) const MAX_DRAINERS: usize = 64;
/// Rows written per transaction of a drain worker.
pub(super) const BATCH: usize = 1000;
/// A drain worker leaves after this long without events for its database.
pub(super) const IDLE_EXIT: Duration = Duration::from_secs(2);
/// A worker registered this long ago that never reported in is assumed lost and replaced.
pub(super) const START_TIMEOUT_US: i64 = 10_000_000;

#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Slot {
    pub(super) seq: u64,
    pub(super) at: i64,
    pub(super) query_id: i64,
    pub(super) db: u32,
    pub(super) pid: i32,
    /// FREE, READY (queued) or TAKEN (being written by the writer whose pid is `taker`).
    pub(super) state: u8,
    pub(super) taker: i32,
    pub(super) event: u8,
    pub(super) sqlstate: [u8; 5],
    pub(super) command: [u8; 32],
    pub(super) role: [u8; 64],
    pub(super) tenant: [u8; 64],
    pub(super) attempted: [u8; 64],
    pub(super) relation: [u8; 160],
    pub(super) detail: [u8; 200],
}

#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Drainer {
    pub(super) db: u32,
    /// 0 while starting.
    pub(super) pid: i32,
    pub(super) latch: *mut pg_sys::Latch,
    pub(super) registered_at: i64,
}

#[repr(C)]
pub(super) struct Queue {
    /// Sequence number of the next event; slots `tail..head` are in the queue.
    pub(super) head: u64,
    pub(super) tail: u64,
    pub(super) recorded: u64,
    pub(super) written: u64,
    pub(super) overflowed: u64,
    /// Events of a database where pg_tenancy is not installed (nowhere to write them).
    pub(super) discarded: u64,
    pub(super) worker_starts: u64,
    pub(super) worker_start_failures: u64,
    pub(super) drainers: [Drainer; MAX_DRAINERS],
    pub(super) slots: [Slot; QUEUE_CAPACITY],
}

pub(super) const NO_DRAINER: Drainer = Drainer { db: 0, pid: 0, latch: std::ptr::null_mut(), registered_at: 0 };

impl Queue {
    pub(super) fn slot(&self, seq: u64) -> &Slot {
        &self.slots[(seq % QUEUE_CAPACITY as u64) as usize]
    }
    pub(super) fn slot_mut(&mut self, seq: u64) -> &mut Slot {
        &mut self.slots[(seq % QUEUE_CAPACITY as u64) as usize]
    }
    /// Drop written (or discarded) events from the front of the queue.
    pub(super) fn advance_tail(&mut self) {
        while self.tail < self.head && self.slot(self.tail).state == FREE {
            self.tail += 1;
        }
    }
    /// Whether events of `db` are still queued or being written.
    pub(super) fn pending(&self, db: u32) -> bool {
        (self.tail..self.head).any(|seq| {
            let s = self.slot(seq);
            s.state != FREE && s.db == db
        })
    }
    /// Whether `db` has a writer, or one registered recently enough to be still starting.
    pub(super) fn served(&self, db: u32, now: i64) -> bool {
        self.drainers.iter().any(|d| d.db == db && (d.pid != 0 || now - d.registered_at <= START_TIMEOUT_US))
    }
    /// Reserve the place of a new writer for `db`; false when one serves it already (or no
    /// place is free). The caller then registers the worker (register_writer).
    pub(super) fn claim_writer(&mut self, db: u32, now: i64) -> bool {
        if self.served(db, now) {
            return false;
        }
        let place = match self.drainers.iter().position(|d| d.db == db) {
            Some(i) => Some(i),
            None => self.drainers.iter().position(|d| d.db == 0),
        };
        match place {
            Some(i) => {
                self.drainers[i] = Drainer { db, pid: 0, latch: std::ptr::null_mut(), registered_at: now };
                true
            }
            None => false,
        }
    }
}

const TRANCHE: &CStr = c"pg_tenancy_audit";
pub(super) const FREE: u8 = 0;
pub(super) const READY: u8 = 1;
pub(super) const TAKEN: u8 = 2;

/// The queue in shared memory and the LWLock (a named tranche) that guards every access to it:
/// the shape of pgrx's `PgLwLock`, except that the segment is zero-filled in place (the zeroed
/// queue is the empty one) instead of being built as a value first, which for 5.7 MB would be
/// built on the postmaster's stack. Each process finds both in its copy of these pointers.
struct Segment {
    queue: AtomicPtr<Queue>,
    lock: AtomicPtr<pg_sys::LWLock>,
    preloaded: AtomicBool,
}

static SEGMENT: Segment =
    Segment { queue: AtomicPtr::new(std::ptr::null_mut()), lock: AtomicPtr::new(std::ptr::null_mut()), preloaded: AtomicBool::new(false) };

/// The hooks that were installed before ours (called first).
struct PrevHooks {
    request: pg_sys::shmem_request_hook_type,
    startup: pg_sys::shmem_startup_hook_type,
}

static PREV: OnceLock<PrevHooks> = OnceLock::new();

/// Called from _PG_init. Without shared_preload_libraries there is no queue: events are still
/// written to the server log, and the audit functions say that preload is required.
pub fn init() {
    // SAFETY: _PG_init runs once per process, before any query; hooks are chained.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        SEGMENT.preloaded.store(true, Ordering::Relaxed);
        let _ = PREV.set(PrevHooks { request: pg_sys::shmem_request_hook, startup: pg_sys::shmem_startup_hook });
        pg_sys::shmem_request_hook = Some(shmem_request);
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while it sizes shared memory.
    unsafe {
        if let Some(prev) = PREV.get().and_then(|p| p.request) {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        crate::util::shmem::request(std::mem::size_of::<Queue>(), TRANCHE);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: ShmemInitStruct under AddinShmemInitLock, as PostgreSQL's own modules do; a new
    // segment is zeroed, which is the empty queue (head = tail = 0, no drainers).
    unsafe {
        if let Some(prev) = PREV.get().and_then(|p| p.startup) {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        let (q, lock) = crate::util::shmem::attach(c"pg_tenancy audit queue", std::mem::size_of::<Queue>(), TRANCHE, |_| ());
        SEGMENT.queue.store(q.cast::<Queue>(), Ordering::Relaxed);
        SEGMENT.lock.store(lock, Ordering::Relaxed);
    }
}

pub(super) fn available() -> bool {
    // SAFETY: reads a backend-global. (A process without a PGPROC, such as the postmaster,
    // cannot take an LWLock.)
    SEGMENT.preloaded.load(Ordering::Relaxed)
        && !SEGMENT.queue.load(Ordering::Relaxed).is_null()
        && !SEGMENT.lock.load(Ordering::Relaxed).is_null()
        && unsafe { !pg_sys::MyProc.is_null() }
}

/// Exclusive access to the queue for the life of the guard.
pub(super) struct Locked(pub(super) &'static mut Queue);
impl Locked {
    pub(super) fn acquire() -> Option<Locked> {
        if !available() {
            return None;
        }
        // SAFETY: the lock and queue live in shared memory for the life of the server; the
        // LWLock serialises every access to the queue. LWLocks are released by PostgreSQL on
        // error too, and nothing between acquire and release here raises.
        unsafe {
            pg_sys::LWLockAcquire(SEGMENT.lock.load(Ordering::Relaxed), pg_sys::LWLockMode::LW_EXCLUSIVE);
            Some(Locked(&mut *SEGMENT.queue.load(Ordering::Relaxed)))
        }
    }
}
impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: acquired in Locked::acquire.
        unsafe { pg_sys::LWLockRelease(SEGMENT.lock.load(Ordering::Relaxed)) };
    }
}


pub(super) fn put(dst: &mut [u8], s: &str) {
    crate::util::put_str(dst, s)
}

pub(super) fn get(src: &[u8]) -> String {
    let n = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..n]).into_owned()
}


/// What an event says, as it is queued.
pub(super) struct Entry<'a> {
    pub event: u8,
    pub at: i64,
    pub query_id: i64,
    pub db: pg_sys::Oid,
    pub pid: i32,
    pub sqlstate: &'a str,
    pub command: &'a str,
    pub role: &'a str,
    pub tenant: &'a str,
    pub attempted: &'a str,
    pub relation: &'a str,
    pub detail: &'a str,
}

/// What queueing an event did.
pub(super) struct Queued {
    /// The queue was full: the event is counted, not kept.
    pub overflow: bool,
    /// The database's writer, to wake.
    pub wake: Option<*mut pg_sys::Latch>,
    /// No writer serves the database: one is to be started (its place is reserved).
    pub start_writer: bool,
}

/// Put an event in the queue (never waits but for the lock).
pub(super) fn enqueue(e: &Entry) -> Queued {
    let (event, at, query_id, db, pid) = (e.event, e.at, e.query_id, e.db, e.pid);
    let (sqlstate, command, role, tenant, attempted, relation, detail) =
        (e.sqlstate, e.command, e.role, e.tenant, e.attempted, e.relation, e.detail);
    let mut overflow = false;
    let mut wake: Option<*mut pg_sys::Latch> = None;
    let mut start_writer = false;
    if let Some(q) = Locked::acquire() {
        let q = &mut *q.0;
        if q.head - q.tail >= QUEUE_CAPACITY as u64 {
            q.overflowed += 1;
            overflow = true;
        } else {
            let seq = q.head;
            let s = q.slot_mut(seq);
            s.seq = seq;
            s.at = at;
            s.query_id = query_id;
            s.db = db.into();
            s.pid = pid;
            s.event = event;
            put(&mut s.sqlstate, sqlstate);
            put(&mut s.command, &command);
            put(&mut s.role, &role);
            put(&mut s.tenant, &tenant);
            put(&mut s.attempted, &attempted);
            put(&mut s.relation, &relation);
            put(&mut s.detail, detail);
            s.state = READY;
            s.taker = 0;
            q.head += 1;
            q.recorded += 1;
        }
        // Wake the database's writer, or reserve the place of a new one.
        let dbu: u32 = db.into();
        match q.drainers.iter().find(|d| d.db == dbu && d.pid != 0) {
            Some(d) => wake = Some(d.latch),
            None => start_writer = q.claim_writer(dbu, at),
        }
    }
    Queued { overflow, wake, start_writer }
}

/// no other writer of the same database can write them too.
pub(super) fn take(db: u32) -> Vec<Slot> {
    // SAFETY: reads this process's pid.
    let me = unsafe { pg_sys::MyProcPid };
    let Some(q) = Locked::acquire() else { return Vec::new() };
    let q = &mut *q.0;
    let mut out = Vec::new();
    let mut seq = q.tail;
    while seq < q.head && out.len() < BATCH {
        let s = q.slot_mut(seq);
        if s.state == READY && s.db == db && s.seq == seq {
            s.state = TAKEN;
            s.taker = me;
            out.push(*s);
        }
        seq += 1;
    }
    out
}

/// Give back what this writer took and did not write (it is exiting on an error).
pub(super) fn untake(q: &mut Queue, pid: i32) {
    for seq in q.tail..q.head {
        let s = q.slot_mut(seq);
        if s.state == TAKEN && s.taker == pid {
            s.state = READY;
            s.taker = 0;
        }
    }
}

/// Remove written (or discarded) events from the queue.
pub(super) fn release(batch: &[Slot], written: bool) {
    let Some(q) = Locked::acquire() else { return };
    let q = &mut *q.0;
    for e in batch {
        let s = q.slot_mut(e.seq);
        if s.seq == e.seq {
            s.state = FREE;
        }
    }
    q.advance_tail();
    if written {
        q.written += batch.len() as u64;
    } else {
        q.discarded += batch.len() as u64;
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn fixed_fields_keep_whole_characters() {
        let mut buf = [0u8; 5];
        put(&mut buf, "héllo wörld");
        // 'h' + 2-byte 'é' + 'l' + 'l' = 5 bytes; nothing cut in the middle of a character
        assert_eq!(get(&buf), "héll");
        put(&mut buf, "ab");
        assert_eq!(get(&buf), "ab");
    }

    #[pg_test]
    fn the_test_server_is_preloaded_and_queues() {
        assert!(available());
        let before = Locked::acquire().map(|q| q.0.recorded).unwrap();
        crate::audit::record(crate::audit::Event::ForbiddenTenant, pg_sys::InvalidOid, Some("nobody"), "42501", "unit test");
        let after = Locked::acquire().map(|q| q.0.recorded).unwrap();
        assert_eq!(after, before + 1);
    }
}
