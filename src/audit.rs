//! The denial log: every cross-tenant attempt is recorded, and the record survives the
//! rollback of the statement that made the attempt.
//!
//! A backend that sees an event copies it into a bounded queue in shared memory (never
//! blocking: when the queue is full the event is counted as overflowed) and writes one
//! structured line to the server log. A background worker per database drains the queue into
//! `tenancy.audit_log` in its own transactions, so the row exists whatever becomes of the
//! transaction that caused it. Workers are started on demand by the first event of a database
//! and leave after a few idle seconds (a worker connected to a database would otherwise block
//! `DROP DATABASE`). A clean shutdown drains the queue before the workers exit.
//!
//! What an event carries: names and ids only (event, role, tenants, relation, command,
//! SQLSTATE, query id, pid) and a fixed detail chosen here. Never row values, query text,
//! parameters, plaintext, tokens or keys.
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::time::Duration;

use crate::error::TenancyError;

/// Event names, as stored in `tenancy.audit_log.event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Event {
    NoContext = 1,
    CrossTenantWrite = 2,
    CrossTenantProbe = 3,
    ForbiddenTenant = 4,
    BypassRead = 5,
    PolicyTamper = 6,
    ReadOnlyWrite = 7,
    WrongTenantKey = 8,
    ProtectedDdl = 9,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::NoContext => "no_context",
            Event::CrossTenantWrite => "cross_tenant_write",
            Event::CrossTenantProbe => "cross_tenant_probe",
            Event::ForbiddenTenant => "forbidden_tenant",
            Event::BypassRead => "bypass_read",
            Event::PolicyTamper => "policy_tamper",
            Event::ReadOnlyWrite => "read_only_write",
            Event::WrongTenantKey => "wrong_tenant_key",
            Event::ProtectedDdl => "protected_ddl",
        }
    }
    fn from_u8(v: u8) -> Option<Event> {
        Some(match v {
            1 => Event::NoContext,
            2 => Event::CrossTenantWrite,
            3 => Event::CrossTenantProbe,
            4 => Event::ForbiddenTenant,
            5 => Event::BypassRead,
            6 => Event::PolicyTamper,
            7 => Event::ReadOnlyWrite,
            8 => Event::WrongTenantKey,
            9 => Event::ProtectedDdl,
            _ => return None,
        })
    }
}

/// Events the queue holds before it overflows (about 700 bytes each).
pub const QUEUE_CAPACITY: usize = 8192;
/// Databases with a drain worker at the same time.
const MAX_DRAINERS: usize = 64;
/// Rows written per transaction of a drain worker.
const BATCH: usize = 1000;
/// A drain worker leaves after this long without events for its database.
const IDLE_EXIT: Duration = Duration::from_secs(2);
/// A worker registered this long ago that never reported in is assumed lost and replaced.
const START_TIMEOUT_US: i64 = 10_000_000;

#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    seq: u64,
    at: i64,
    query_id: i64,
    db: u32,
    pid: i32,
    /// FREE, READY (queued) or TAKEN (being written by the writer whose pid is `taker`).
    state: u8,
    taker: i32,
    event: u8,
    sqlstate: [u8; 5],
    command: [u8; 32],
    role: [u8; 64],
    tenant: [u8; 64],
    attempted: [u8; 64],
    relation: [u8; 160],
    detail: [u8; 200],
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Drainer {
    db: u32,
    /// 0 while starting.
    pid: i32,
    latch: *mut pg_sys::Latch,
    registered_at: i64,
}

#[repr(C)]
struct Queue {
    /// Sequence number of the next event; slots `tail..head` are in the queue.
    head: u64,
    tail: u64,
    recorded: u64,
    written: u64,
    overflowed: u64,
    /// Events of a database where pg_tenancy is not installed (nowhere to write them).
    discarded: u64,
    worker_starts: u64,
    worker_start_failures: u64,
    drainers: [Drainer; MAX_DRAINERS],
    slots: [Slot; QUEUE_CAPACITY],
}

const NO_DRAINER: Drainer = Drainer { db: 0, pid: 0, latch: std::ptr::null_mut(), registered_at: 0 };

impl Queue {
    fn slot(&self, seq: u64) -> &Slot {
        &self.slots[(seq % QUEUE_CAPACITY as u64) as usize]
    }
    fn slot_mut(&mut self, seq: u64) -> &mut Slot {
        &mut self.slots[(seq % QUEUE_CAPACITY as u64) as usize]
    }
    /// Drop written (or discarded) events from the front of the queue.
    fn advance_tail(&mut self) {
        while self.tail < self.head && self.slot(self.tail).state == FREE {
            self.tail += 1;
        }
    }
    /// Whether events of `db` are still queued or being written.
    fn pending(&self, db: u32) -> bool {
        (self.tail..self.head).any(|seq| {
            let s = self.slot(seq);
            s.state != FREE && s.db == db
        })
    }
    /// Whether `db` has a writer, or one registered recently enough to be still starting.
    fn served(&self, db: u32, now: i64) -> bool {
        self.drainers.iter().any(|d| d.db == db && (d.pid != 0 || now - d.registered_at <= START_TIMEOUT_US))
    }
    /// Reserve the place of a new writer for `db`; false when one serves it already (or no
    /// place is free). The caller then registers the worker (register_writer).
    fn claim_writer(&mut self, db: u32, now: i64) -> bool {
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
const FREE: u8 = 0;
const READY: u8 = 1;
const TAKEN: u8 = 2;

static mut QUEUE: *mut Queue = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
static mut PRELOADED: bool = false;

/// Called from _PG_init. Without shared_preload_libraries there is no queue: events are still
/// written to the server log, and the audit functions say that preload is required.
pub fn init() {
    // SAFETY: _PG_init runs once per process, before any query; hooks are chained.
    unsafe {
        if !pg_sys::process_shared_preload_libraries_in_progress {
            return;
        }
        PRELOADED = true;
        PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(shmem_request);
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    // SAFETY: called by the postmaster while it sizes shared memory.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Queue>());
        pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    // SAFETY: ShmemInitStruct under AddinShmemInitLock, as PostgreSQL's own modules do; a new
    // segment is zeroed, which is the empty queue (head = tail = 0, no drainers).
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock; // AddinShmemInitLock
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let q = pg_sys::ShmemInitStruct(c"pg_tenancy audit queue".as_ptr(), std::mem::size_of::<Queue>(), &mut found)
            .cast::<Queue>();
        if !found {
            std::ptr::write_bytes(q.cast::<u8>(), 0, std::mem::size_of::<Queue>());
        }
        QUEUE = q;
        LOCK = &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
        pg_sys::LWLockRelease(init_lock);
    }
}

fn available() -> bool {
    // SAFETY: plain reads of process-local statics set at start-up. (A process without a
    // PGPROC, such as the postmaster, cannot take an LWLock.)
    unsafe { PRELOADED && !QUEUE.is_null() && !LOCK.is_null() && !pg_sys::MyProc.is_null() }
}

/// Exclusive access to the queue for the life of the guard.
struct Locked(&'static mut Queue);
impl Locked {
    fn acquire() -> Option<Locked> {
        if !available() {
            return None;
        }
        // SAFETY: the lock and queue live in shared memory for the life of the server; the
        // LWLock serialises every access to the queue. LWLocks are released by PostgreSQL on
        // error too, and nothing between acquire and release here raises.
        unsafe {
            pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE);
            Some(Locked(&mut *QUEUE))
        }
    }
}
impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: acquired in Locked::acquire.
        unsafe { pg_sys::LWLockRelease(LOCK) };
    }
}

fn put(dst: &mut [u8], s: &str) {
    dst.fill(0);
    // Keep whole UTF-8 characters only.
    let mut n = s.len().min(dst.len());
    while n > 0 && !s.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get(src: &[u8]) -> String {
    let n = src.iter().position(|&b| b == 0).unwrap_or(src.len());
    String::from_utf8_lossy(&src[..n]).into_owned()
}

thread_local! {
    /// Set in the drain worker and in prune_audit: the audit log's guard trigger lets their
    /// writes through and nothing else.
    static WRITER: Cell<bool> = const { Cell::new(false) };
    static PRUNING: Cell<bool> = const { Cell::new(false) };
    /// Depth of recording: an event raised while one is being recorded is not recorded again.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// A tenant id as it may appear in the log: ids that do not have the shape of a tenant id
/// (anything a caller typed) are not copied.
pub fn loggable_tenant(s: &str) -> String {
    if crate::context::valid_tenant_id(s) {
        s.to_string()
    } else if s.is_empty() {
        String::new()
    } else {
        "(not a tenant id)".to_string()
    }
}

pub fn relation_name(rel: pg_sys::Oid) -> String {
    if rel == pg_sys::InvalidOid {
        return String::new();
    }
    // SAFETY: syscache lookups by OID; NULL when the relation is gone.
    unsafe {
        let name = pg_sys::get_rel_name(rel);
        if name.is_null() {
            return String::new();
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(rel));
        let q = pg_sys::quote_qualified_identifier(nsp, name);
        CStr::from_ptr(q).to_string_lossy().into_owned()
    }
}

fn current_command() -> String {
    // SAFETY: ActivePortal is NULL or a valid portal of this backend.
    unsafe {
        let portal = pg_sys::ActivePortal;
        if portal.is_null() {
            return String::new();
        }
        let tag = pg_sys::GetCommandTagName((*portal).commandTag);
        if tag.is_null() {
            String::new()
        } else {
            CStr::from_ptr(tag).to_string_lossy().into_owned()
        }
    }
}

fn current_role() -> String {
    // SAFETY: syscache lookup of the current user id; noerr = true.
    unsafe {
        // The role the session acts as (after SET ROLE), not the owner of a SECURITY DEFINER
        // function that happens to be running (the guard's event triggers are such functions).
        let n = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), true);
        if n.is_null() {
            String::new()
        } else {
            CStr::from_ptr(n).to_string_lossy().into_owned()
        }
    }
}

unsafe extern "C-unwind" {
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
}

/// One line in the server log only (never sent to the client), without the statement text
/// (which may carry values) or the error context.
pub fn log_line(msg: &str) {
    let msg = CString::new(msg.replace('\0', "")).unwrap_or_default();
    // SAFETY: the standard errstart/errmsg_internal/errfinish sequence at LOG_SERVER_ONLY, which
    // returns; "%s" keeps the message from being read as a format.
    unsafe {
        if errstart(pg_sys::LOG_SERVER_ONLY as c_int, std::ptr::null()) {
            pg_sys::errmsg_internal(c"%s".as_ptr(), msg.as_ptr());
            pg_sys::errhidestmt(true);
            pg_sys::errhidecontext(true);
            errfinish(c"audit.rs".as_ptr(), line!() as c_int, c"pg_tenancy_audit".as_ptr());
        }
    }
}

/// Record a refusal and raise it: one path, so that the event's SQLSTATE is the error's.
pub fn deny(event: Event, rel: pg_sys::Oid, attempted: Option<&str>, detail: &str, error: TenancyError) -> ! {
    record(event, rel, attempted, &error.sqlstate_text(), detail);
    error.raise()
}

/// Record one event. `sqlstate` is the refusal the statement gets ("00000" when it is not
/// refused), `detail` a fixed description written here, never a value from the statement.
pub fn record(event: Event, rel: pg_sys::Oid, attempted: Option<&str>, sqlstate: &str, detail: &str) {
    if RECORDING.with(|r| r.replace(true)) {
        return;
    }
    let _reset = crate::OnDrop(|| RECORDING.with(|r| r.set(false)));
    let tenant = crate::context::session_tenant_for_log();
    let attempted = attempted.map(loggable_tenant).unwrap_or_default();
    let relation = relation_name(rel);
    let command = current_command();
    let role = current_role();
    // SAFETY: plain reads of backend globals.
    let (at, db, pid, query_id) = unsafe {
        (pg_sys::GetCurrentTimestamp(), pg_sys::MyDatabaseId, pg_sys::MyProcPid, pg_sys::pgstat_get_my_query_id() as i64)
    };

    let mut overflow = false;
    let mut wake: Option<*mut pg_sys::Latch> = None;
    let mut start_worker = false;
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
            s.event = event as u8;
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
            None => start_worker = q.claim_writer(dbu, at),
        }
    }
    let line = serde_json::json!({
        "event": event.name(),
        "role": role,
        "tenant": tenant,
        "attempted_tenant": attempted,
        "relation": relation,
        "command": command,
        "sqlstate": sqlstate,
        "query_id": query_id,
        "pid": pid,
        "detail": detail,
        "queued": !overflow && available(),
    });
    log_line(&format!(
        "pg_tenancy audit{}: {line}",
        if overflow { " (queue full, not written to tenancy.audit_log)" } else { "" }
    ));
    if let Some(latch) = wake {
        if !latch.is_null() {
            // SAFETY: the latch is a PGPROC latch in shared memory, valid while the server runs.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
    if start_worker {
        register_writer(db);
    }
}

/// Start the writer whose place was reserved with Queue::claim_writer.
fn register_writer(db: pg_sys::Oid) {
    let ok = BackgroundWorkerBuilder::new("pg_tenancy audit writer")
        .set_type("pg_tenancy audit writer")
        .set_library("pg_tenancy")
        .set_function("pg_tenancy_audit_writer_main")
        .set_argument(Some(pg_sys::Datum::from(u32::from(db) as usize)))
        .enable_spi_access()
        // Not restarted by the postmaster: a worker that fails (its database was dropped, the
        // insert failed) gives its place back on exit, and the next event starts a new one.
        .set_restart_time(None)
        .load_dynamic()
        .is_ok();
    if let Some(q) = Locked::acquire() {
        let q = &mut *q.0;
        if ok {
            q.worker_starts += 1;
        } else {
            q.worker_start_failures += 1;
            let dbu: u32 = db.into();
            if let Some(d) = q.drainers.iter_mut().find(|d| d.db == dbu && d.pid == 0) {
                d.db = 0;
            }
        }
    }
    if !ok {
        log_line("pg_tenancy audit: could not start the audit writer (max_worker_processes reached?); events stay queued until one starts");
    }
}

/// Take up to BATCH queued events of `db`, oldest first: they are marked as this writer's, so
/// no other writer of the same database can write them too.
fn take(db: u32) -> Vec<Slot> {
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
fn untake(q: &mut Queue, pid: i32) {
    for seq in q.tail..q.head {
        let s = q.slot_mut(seq);
        if s.state == TAKEN && s.taker == pid {
            s.state = READY;
            s.taker = 0;
        }
    }
}

/// Remove written (or discarded) events from the queue.
fn release(batch: &[Slot], written: bool) {
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

const INSERT_SQL: &str = "INSERT INTO tenancy.audit_log \
    (at, event, database, role, session_tenant, attempted_tenant, relation, command, sqlstate, \
     query_id, backend_pid, detail) \
  SELECT pg_catalog.to_timestamp(e.at), e.event, pg_catalog.current_database(), e.role, \
         NULLIF(e.tenant, ''), NULLIF(e.attempted, ''), NULLIF(e.relation, ''), \
         NULLIF(e.command, ''), e.sqlstate, NULLIF(e.query_id, 0), e.pid, NULLIF(e.detail, '') \
    FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.float8[]), pg_catalog.unnest($2::pg_catalog.text[]), \
                    pg_catalog.unnest($3::pg_catalog.text[]), pg_catalog.unnest($4::pg_catalog.text[]), \
                    pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.text[]), \
                    pg_catalog.unnest($7::pg_catalog.text[]), pg_catalog.unnest($8::pg_catalog.text[]), \
                    pg_catalog.unnest($9::pg_catalog.int8[]), pg_catalog.unnest($10::pg_catalog.int4[]), \
                    pg_catalog.unnest($11::pg_catalog.text[]), pg_catalog.unnest($12::pg_catalog.int8[])) \
         AS e(at, event, role, tenant, attempted, relation, command, sqlstate, query_id, pid, detail, seq) \
   ORDER BY e.seq";

/// Write a batch in one transaction of the drain worker. Returns false when pg_tenancy is not
/// installed in this database.
fn write(batch: &[Slot]) -> bool {
    // PostgreSQL timestamps count microseconds from 2000-01-01; to_timestamp() wants seconds
    // from 1970-01-01.
    const EPOCH_DIFF_S: f64 = 946_684_800.0;
    let at: Vec<f64> = batch.iter().map(|e| e.at as f64 / 1e6 + EPOCH_DIFF_S).collect();
    let event: Vec<String> =
        batch.iter().map(|e| Event::from_u8(e.event).map(Event::name).unwrap_or("unknown").to_string()).collect();
    let col = |f: fn(&Slot) -> &[u8]| -> Vec<String> { batch.iter().map(|e| get(f(e))).collect() };
    let role = col(|e| &e.role);
    let tenant = col(|e| &e.tenant);
    let attempted = col(|e| &e.attempted);
    let relation = col(|e| &e.relation);
    let command = col(|e| &e.command);
    let sqlstate = col(|e| &e.sqlstate);
    let detail = col(|e| &e.detail);
    let query_id: Vec<i64> = batch.iter().map(|e| e.query_id).collect();
    let pid: Vec<i32> = batch.iter().map(|e| e.pid).collect();
    let seq: Vec<i64> = batch.iter().map(|e| e.seq as i64).collect();
    BackgroundWorker::transaction(move || {
        // The worker runs as the bootstrap superuser: nothing it runs may resolve through a
        // search_path that a database's owner could set (ALTER DATABASE ... SET search_path).
        let _path = crate::catalog::PinnedSearchPath::new();
        let installed = Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('tenancy.audit_log') IS NOT NULL")
            .ok()
            .flatten()
            .unwrap_or(false);
        if !installed {
            return false;
        }
        WRITER.with(|w| w.set(true));
        let _reset = crate::OnDrop(|| WRITER.with(|w| w.set(false)));
        let r = Spi::run_with_args(
            INSERT_SQL,
            &[
                at.into(),
                event.into(),
                role.into(),
                tenant.into(),
                attempted.into(),
                relation.into(),
                command.into(),
                sqlstate.into(),
                query_id.into(),
                pid.into(),
                detail.into(),
                seq.into(),
            ],
        );
        r.unwrap_or_else(|e| pgrx::error!("pg_tenancy audit writer could not insert: {e}"));
        true
    })
}

/// Main function of the per-database drain worker (argument: the database OID).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_audit_writer_main(arg: pg_sys::Datum) {
    let db = arg.value() as u32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Give the place back however this process ends (FATAL when the database is gone, ERROR
    // when an insert fails), so that the next event of the database starts a new writer.
    // SAFETY: registers a callback with PostgreSQL's signature before anything can fail.
    unsafe { pg_sys::before_shmem_exit(Some(on_writer_exit), pg_sys::Datum::from(db as usize)) };
    BackgroundWorker::connect_worker_to_spi_by_oid(
        Some(pg_sys::Oid::from(db)),
        Some(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID)),
    );
    // SAFETY: plain reads of this process's identity; the latch is our PGPROC's.
    let (pid, latch) = unsafe { (pg_sys::MyProcPid, pg_sys::MyLatch) };
    {
        let Some(q) = Locked::acquire() else { return };
        let q = &mut *q.0;
        match q.drainers.iter_mut().find(|d| d.db == db) {
            // Another writer already serves this database (two were started at once).
            Some(d) if d.pid != 0 && d.pid != pid => return,
            Some(d) => {
                d.pid = pid;
                d.latch = latch;
            }
            None => match q.drainers.iter_mut().find(|d| d.db == 0) {
                Some(d) => *d = Drainer { db, pid, latch, registered_at: 0 },
                None => return,
            },
        }
    }
    let mut idle_since = std::time::Instant::now();
    let mut last_sweep = std::time::Instant::now();
    loop {
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            sweep_orphans(db);
            last_sweep = std::time::Instant::now();
        }
        let batch = take(db);
        if !batch.is_empty() {
            let written = write(&batch);
            release(&batch, written);
            if !written {
                log_line("pg_tenancy audit: events of a database without pg_tenancy were discarded (they are in the server log)");
            }
            idle_since = std::time::Instant::now();
            continue;
        }
        let stop = BackgroundWorker::sigterm_received();
        if stop || idle_since.elapsed() >= IDLE_EXIT {
            // Leave only if nothing arrived meanwhile: decided under the lock a recording backend
            // takes, so an event queued after this point starts a new worker.
            let Some(q) = Locked::acquire() else { return };
            let q = &mut *q.0;
            if !q.pending(db) {
                if let Some(d) = q.drainers.iter_mut().find(|d| d.db == db && d.pid == pid) {
                    *d = NO_DRAINER;
                }
                return;
            }
            continue;
        }
        BackgroundWorker::wait_latch(Some(Duration::from_millis(200)));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_writer_exit(_code: c_int, arg: pg_sys::Datum) {
    let db = arg.value() as u32;
    // SAFETY: reads this process's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    if let Some(q) = Locked::acquire() {
        let q = &mut *q.0;
        untake(q, pid);
        for d in q.drainers.iter_mut().filter(|d| d.db == db && (d.pid == pid || d.pid == 0)) {
            *d = NO_DRAINER;
        }
    }
}

/// Events of other databases that have no writer: discard those of databases that no longer
/// exist (they would hold the queue forever; they are in the server log), and start a writer
/// for the others (its start may have failed earlier).
fn sweep_orphans(own: u32) {
    // SAFETY: reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let orphans: Vec<u32> = {
        let Some(q) = Locked::acquire() else { return };
        let q = &*q.0;
        let mut dbs: Vec<u32> = Vec::new();
        for seq in q.tail..q.head {
            let s = q.slot(seq);
            if s.state == READY && s.db != own && !dbs.contains(&s.db) && !q.served(s.db, now) {
                dbs.push(s.db);
            }
        }
        dbs
    };
    for db in orphans {
        let exists = BackgroundWorker::transaction(move || {
            let _path = crate::catalog::PinnedSearchPath::new();
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE oid OPERATOR(pg_catalog.=) $1)",
                &[pg_sys::Oid::from(db).into()],
            )
            .ok()
            .flatten()
            .unwrap_or(true)
        });
        if exists {
            let claimed = Locked::acquire().is_some_and(|q| q.0.claim_writer(db, now));
            if claimed {
                register_writer(pg_sys::Oid::from(db));
            }
            continue;
        }
        let n = {
            let Some(q) = Locked::acquire() else { return };
            let q = &mut *q.0;
            let mut n = 0;
            for seq in q.tail..q.head {
                let s = q.slot_mut(seq);
                if s.state == READY && s.db == db {
                    s.state = FREE;
                    n += 1;
                }
            }
            q.advance_tail();
            q.discarded += n;
            n
        };
        log_line(&format!(
            "pg_tenancy audit: {n} events of a dropped database were discarded (they are in the server log)"
        ));
    }
}

fn require_preload() {
    if !available() {
        TenancyError::PreloadRequired.raise();
    }
}

/// Queue counters: queued now, recorded since start, written, overflowed, discarded, workers.
#[pg_extern(volatile, parallel_safe)]
fn audit_status() -> TableIterator<
    'static,
    (
        name!(queued, i64),
        name!(queued_here, i64),
        name!(capacity, i64),
        name!(recorded, i64),
        name!(written, i64),
        name!(overflowed, i64),
        name!(discarded, i64),
        name!(writers, i32),
        name!(writer_starts, i64),
        name!(writer_start_failures, i64),
    ),
> {
    require_preload();
    let row = {
        let q = Locked::acquire().expect("checked by require_preload");
        let q = &*q.0;
        // SAFETY: reads this backend's database id.
        let here: u32 = unsafe { pg_sys::MyDatabaseId }.into();
        (
            (q.head - q.tail) as i64,
            (q.tail..q.head).filter(|&seq| q.slot(seq).state != FREE && q.slot(seq).db == here).count() as i64,
            QUEUE_CAPACITY as i64,
            q.recorded as i64,
            q.written as i64,
            q.overflowed as i64,
            q.discarded as i64,
            q.drainers.iter().filter(|d| d.db != 0 && d.pid != 0).count() as i32,
            q.worker_starts as i64,
            q.worker_start_failures as i64,
        )
    };
    TableIterator::once(row)
}

/// The only way rows leave tenancy.audit_log: delete those older than `older_than`.
#[pg_extern(volatile, parallel_unsafe)]
fn prune_audit(older_than: Option<pgrx::datum::Interval>) -> i64 {
    require_preload();
    let older_than = older_than.unwrap_or_else(|| TenancyError::InvalidArgument("older_than").raise());
    // SAFETY: superuser() reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::Denied("only a superuser prunes the audit log").raise();
    }
    PRUNING.with(|p| p.set(true));
    let _reset = crate::OnDrop(|| PRUNING.with(|p| p.set(false)));
    let _path = crate::catalog::PinnedSearchPath::new();
    let n = Spi::get_one_with_args::<i64>(
        "WITH d AS (DELETE FROM tenancy.audit_log WHERE at OPERATOR(pg_catalog.<) \
                    (pg_catalog.now() OPERATOR(pg_catalog.-) $1) RETURNING 1) \
         SELECT pg_catalog.count(*) FROM d",
        &[older_than.into()],
    )
    .or_else(|e| Err(e.to_string()))
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not prune the audit log: {e}"));
    n.unwrap_or(0)
}

/// Trigger of tenancy.audit_log: append-only. Only the drain worker inserts (or a superuser
/// restoring a dump with pg_tenancy.guard = off); only prune_audit deletes; nobody updates.
#[pg_trigger]
fn _audit_log_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    use pgrx::PgTriggerOperation as Op;
    let op = trigger.op()?;
    let allowed = match op {
        Op::Insert => WRITER.with(|w| w.get()) || (!crate::gucs::guard() && unsafe { pg_sys::superuser() }),
        Op::Delete => PRUNING.with(|p| p.get()),
        _ => false,
    };
    if !allowed {
        record(Event::PolicyTamper, trigger.relation()?.oid(), None, "42501", "attempt to modify the audit log");
        TenancyError::AuditAppendOnly.raise();
    }
    Ok(match op {
        Op::Delete => trigger.old(),
        _ => trigger.new(),
    })
}

/// Whether events reach tenancy.audit_log (pg_tenancy is preloaded); read by tenancy.check().
#[pg_extern(stable, parallel_safe)]
fn _audit_available() -> bool {
    available()
}

/// Events that overflowed the queue since the server started (NULL without preload).
#[pg_extern(volatile, parallel_safe)]
fn _audit_overflowed() -> Option<i64> {
    Locked::acquire().map(|q| q.0.overflowed as i64)
}

/// Called by the guard event trigger for DDL on tenancy.audit_log outside extension scripts.
#[pg_extern(volatile, parallel_unsafe)]
fn _refuse_audit_change() {
    let _path = crate::catalog::PinnedSearchPath::new();
    let rel = Spi::get_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass('tenancy.audit_log')::pg_catalog.oid")
        .ok()
        .flatten()
        .unwrap_or(pg_sys::InvalidOid);
    record(Event::PolicyTamper, rel, None, "42501", "attempt to alter the audit log");
    TenancyError::AuditAppendOnly.raise();
}

/// Whether the current command runs inside CREATE/ALTER EXTENSION's script.
#[pg_extern(stable, parallel_safe)]
fn _in_extension_script() -> bool {
    // SAFETY: reads a backend-global flag.
    unsafe { pg_sys::creating_extension }
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
    fn only_tenant_shaped_ids_are_logged() {
        assert_eq!(loggable_tenant("acme-1"), "acme-1");
        assert_eq!(loggable_tenant(""), "");
        assert_eq!(loggable_tenant("x'; DROP TABLE t;--"), "(not a tenant id)");
        assert_eq!(loggable_tenant("line\nbreak"), "(not a tenant id)");
    }

    #[pg_test]
    fn sqlstates_are_spelled_out() {
        use crate::error::TenancyError;
        assert_eq!(TenancyError::NoContext.sqlstate_text(), "28000");
        assert_eq!(TenancyError::NotPermitted.sqlstate_text(), "42501");
        assert_eq!(TenancyError::ReadOnly.sqlstate_text(), "25006");
        assert_eq!(TenancyError::CiphertextInvalid.sqlstate_text(), "22000");
    }

    #[pg_test]
    fn event_names_round_trip() {
        for e in [
            Event::NoContext,
            Event::CrossTenantWrite,
            Event::CrossTenantProbe,
            Event::ForbiddenTenant,
            Event::BypassRead,
            Event::PolicyTamper,
            Event::ReadOnlyWrite,
            Event::WrongTenantKey,
            Event::ProtectedDdl,
        ] {
            assert_eq!(Event::from_u8(e as u8), Some(e));
        }
        assert_eq!(Event::from_u8(0), None);
    }

    #[pg_test]
    fn the_test_server_is_preloaded_and_queues() {
        assert!(available());
        let before = Locked::acquire().map(|q| q.0.recorded).unwrap();
        record(Event::ForbiddenTenant, pg_sys::InvalidOid, Some("nobody"), "42501", "unit test");
        let after = Locked::acquire().map(|q| q.0.recorded).unwrap();
        assert_eq!(after, before + 1);
    }
}
