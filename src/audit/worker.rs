//! The per-database writer: a background worker that drains its database's events from the queue
//! into `tenancy.audit_log`, in transactions of its own, so that a row exists whatever becomes of
//! the transaction that caused the event. Started by the first event of a database; leaves after
//! a few idle seconds (a worker connected to a database would hold up `DROP DATABASE`); empties
//! its queue before a clean shutdown.
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::c_int;
use std::time::Duration;

use super::queue::{self, Drainer, Locked, Slot, FREE, IDLE_EXIT, NO_DRAINER, READY};
use super::{log_line, Event, WRITER};
use crate::catalog;


/// Start the writer whose place was reserved with Queue::claim_writer.
pub(super) fn register_writer(db: pg_sys::Oid) {
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


/// Write a batch in one transaction of the drain worker. Returns false when pg_tenancy is not
/// installed in this database.
fn write(batch: &[Slot]) -> bool {
    // PostgreSQL timestamps count microseconds from 2000-01-01; to_timestamp() wants seconds
    // from 1970-01-01.
    const EPOCH_DIFF_S: f64 = 946_684_800.0;
    let at: Vec<f64> = batch.iter().map(|e| e.at as f64 / 1e6 + EPOCH_DIFF_S).collect();
    let event: Vec<String> =
        batch.iter().map(|e| Event::from_u8(e.event).map(Event::name).unwrap_or("unknown").to_string()).collect();
    let col = |f: fn(&Slot) -> &[u8]| -> Vec<String> { batch.iter().map(|e| queue::get(f(e))).collect() };
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
        if !catalog::audit_log::installed() {
            return false;
        }
        WRITER.with(|w| w.set(true));
        let _reset = crate::util::OnDrop(|| WRITER.with(|w| w.set(false)));
        let rows = catalog::audit_log::Rows {
            at, event, role, tenant, attempted, relation, command, sqlstate, query_id, pid, detail, seq,
        };
        catalog::audit_log::insert(rows).unwrap_or_else(|e| e.raise());
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
        let batch = queue::take(db);
        if !batch.is_empty() {
            let written = write(&batch);
            queue::release(&batch, written);
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
        queue::untake(q, pid);
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
        let exists = BackgroundWorker::transaction(move || catalog::audit_log::database_exists(pg_sys::Oid::from(db)));
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
