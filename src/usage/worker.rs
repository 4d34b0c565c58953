//! The usage workers: with `pg_tenancy.usage_databases` set, a launcher (connected to no
//! database) starts short-lived workers in each listed database every
//! `pg_tenancy.snapshot_interval` (at most a minute apart), one per job: `tenancy.snapshot_usage()`
//! when a snapshot is due (the alerts' windows, `tenancy.usage_daily`), and
//! `tenancy.measure_storage()` when `pg_tenancy.storage_interval` has passed (storage quotas, the
//! storage history of the cost report); each leaves when done, so neither needs pg_cron and no
//! worker holds a database. When each is due is read from what it wrote last (the newest
//! snapshot, the last measurement), so a restart neither repeats nor skips one. A database
//! without pg_tenancy is left alone.
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// At most this many databases (the first listed).
const MAX_DATABASES: usize = 8;

/// Register the launcher (from _PG_init, while the postmaster loads the library).
pub fn init() {
    // SAFETY: reads a flag the postmaster sets while it loads shared_preload_libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } || databases().is_empty() {
        return;
    }
    BackgroundWorkerBuilder::new("pg_tenancy usage launcher")
        .set_type("pg_tenancy usage launcher")
        .set_library("pg_tenancy")
        .set_function("pg_tenancy_usage_launcher_main")
        .enable_shmem_access(None)
        .set_restart_time(Some(Duration::from_secs(60)))
        .load();
}

/// The databases listed (each once, the first MAX_DATABASES).
fn databases() -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for db in crate::gucs::usage_databases() {
        if !seen.contains(&db) && seen.len() < MAX_DATABASES {
            seen.push(db);
        }
    }
    seen
}

/// Main function of the launcher: connected to no database, it starts a short-lived worker per
/// listed database and job every `pg_tenancy.snapshot_interval` (at most a minute apart), which
/// runs its job if it is due and leaves, so no worker holds a database for longer than its work.
/// A job whose previous worker is still running (a long measurement, or one waiting for a lock)
/// is skipped this round, never waited for: the others go on.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_usage_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // one worker per database and job (a snapshot never waits for a long measurement, and a
    // job that keeps failing never stops the other)
    let jobs: Vec<(String, &str)> = databases().into_iter().flat_map(|db| [(db.clone(), "snapshot"), (db, "storage")]).collect();
    let mut running: Vec<Option<pgrx::bgworkers::DynamicBackgroundWorker>> = jobs.iter().map(|_| None).collect();
    // (what was last said of each, so that a lasting condition is logged once)
    let mut said: Vec<u8> = vec![0; jobs.len()];
    loop {
        for (k, (db, job)) in jobs.iter().enumerate() {
            let interval = if *job == "snapshot" { crate::gucs::snapshot_interval() } else { crate::gucs::storage_interval() };
            if interval <= 0 {
                continue;
            }
            // (polled: PostgreSQL's notice that a worker stopped does not wake a process
            // connected to no database)
            let busy = running[k].as_ref().is_some_and(|w| matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)));
            if busy {
                if said[k] != 1 {
                    said[k] = 1;
                    pgrx::log!("pg_tenancy usage: database \"{db}\": the previous {job} is still running (a long measurement, or one waiting for a lock); rounds are skipped until it ends");
                }
                continue;
            }
            let started = BackgroundWorkerBuilder::new(&format!("pg_tenancy usage {job} {db}"))
                .set_type("pg_tenancy usage")
                .set_library("pg_tenancy")
                .set_function("pg_tenancy_usage_main")
                .set_extra(&format!("{job}:{db}"))
                .enable_spi_access()
                .set_restart_time(None)
                .load_dynamic();
            match started {
                Ok(w) => {
                    running[k] = Some(w);
                    said[k] = 0;
                }
                Err(_) => {
                    running[k] = None;
                    if said[k] != 2 {
                        said[k] = 2;
                        pgrx::log!("pg_tenancy usage: database \"{db}\": no background worker slot for the {job} (max_worker_processes); trying again each round");
                    }
                }
            }
        }
        let every = match crate::gucs::snapshot_interval() {
            0 => 60,
            n => n.min(60),
        };
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(every as u64))) || BackgroundWorker::sigterm_received() {
            // (exit code 1: a launcher stopped by a signal while the server runs is restarted)
            // SAFETY: leaves the process the way PostgreSQL's own workers do.
            unsafe { pg_sys::proc_exit(1) };
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

/// What a worker sets first: whatever the database's or a role's settings say, it acts as the
/// superuser it connected as, in no tenant's context, reads and writes, resolves nothing through
/// a search_path, waits for a lock at most 10 seconds (a measurement is not cut short by a
/// statement_timeout), and takes no parallel workers.
const SESSION: [&str; 12] = [
    "RESET SESSION AUTHORIZATION",
    "SET ROLE NONE",
    "SET search_path = pg_catalog, pg_temp",
    "SET statement_timeout = 0",
    "SET lock_timeout = '10s'",
    "SET idle_in_transaction_session_timeout = 0",
    "SET default_transaction_read_only = off",
    "SET default_transaction_isolation = 'read committed'",
    "SET max_parallel_workers_per_gather = 0",
    "SET transform_null_equals = off",
    "SET application_name = 'pg_tenancy usage'",
    "SET pg_tenancy.tenant = ''",
];

/// Run one job in its own transaction if it is due: a failure names the database and the job
/// (and ends this worker; the next round tries again), and never undoes the other job.
fn job(db: &str, what: &str, interval: i32, due: &str, run: &str) {
    if interval <= 0 {
        return;
    }
    BackgroundWorker::transaction(|| {
        let installed = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_tenancy')")
            .ok()
            .flatten()
            .unwrap_or(false);
        if !installed {
            return;
        }
        let left = Spi::get_one_with_args::<f64>(due, &[interval.into()]).ok().flatten().unwrap_or(0.0);
        // (half a second early is on time: the launcher's rounds are not to the millisecond)
        if left > 0.5 {
            return;
        }
        PgTryBuilder::new(|| {
            Spi::run(run).unwrap_or_else(|e| pgrx::error!("{e}"));
        })
        .catch_others(|e| {
            let (code, message) = match &e {
                pg_sys::panic::CaughtError::PostgresError(r)
                | pg_sys::panic::CaughtError::ErrorReport(r)
                | pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => (format!("{:?}", r.sql_error_code()), r.message().to_string()),
            };
            pgrx::error!("pg_tenancy usage: database \"{db}\": {what} failed ({code}): {message}; the next round tries again")
        })
        .execute();
    })
}

/// Main function of a usage worker (`job:database` in bgw_extra): run its job if it is due, then
/// leave. PostgreSQL's own SIGTERM handling stays (pg_terminate_backend and a fast shutdown end
/// a long measurement at once).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_usage_main(_arg: pg_sys::Datum) {
    // SAFETY: unblocks the signals PostgreSQL blocked while starting the worker, keeping its
    // handlers.
    unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
    let extra = BackgroundWorker::get_extra().to_string();
    let Some((job_name, db)) = extra.split_once(':') else { return };
    let db = db.to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    BackgroundWorker::transaction(|| {
        for set in SESSION {
            Spi::run(set).unwrap_or_else(|e| pgrx::error!("pg_tenancy usage: {e}"));
        }
    });
    use crate::catalog::usage::{SNAPSHOT_DUE_IN, STORAGE_DUE_IN};
    match job_name {
        "snapshot" => job(&db, "tenancy.snapshot_usage()", crate::gucs::snapshot_interval(), SNAPSHOT_DUE_IN, "SELECT tenancy.snapshot_usage()"),
        _ => job(&db, "tenancy.measure_storage()", crate::gucs::storage_interval(), STORAGE_DUE_IN, "SELECT count(*) FROM tenancy.measure_storage()"),
    }
}
