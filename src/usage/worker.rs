//! The usage workers: with `pg_tenancy.usage_databases` set, a launcher (connected to no
//! database) starts a short-lived worker in each listed database every
//! `pg_tenancy.snapshot_interval` (at most a minute apart); it runs `tenancy.snapshot_usage()`
//! when a snapshot is due (the alerts' windows, `tenancy.usage_daily`) and
//! `tenancy.measure_storage()` when `pg_tenancy.storage_interval` has passed (storage quotas, the
//! storage history of the cost report), then leaves, so neither needs pg_cron and no worker holds
//! a database. When each is due is read from what it wrote last (the newest snapshot, the last
//! measurement), so a restart neither repeats nor skips one. A database without pg_tenancy is
//! left alone.
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// At most this many usage workers (the first databases listed).
const MAX_WORKERS: usize = 8;

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

/// The databases listed (each once, the first MAX_WORKERS).
fn databases() -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for db in crate::gucs::usage_databases() {
        if !seen.contains(&db) && seen.len() < MAX_WORKERS {
            seen.push(db);
        }
    }
    seen
}

/// Main function of the launcher: connected to no database, it starts a short-lived worker in
/// each listed database every `pg_tenancy.snapshot_interval` (at most a minute apart), which runs
/// what is due there and leaves, so no worker holds a database (`DROP DATABASE` is not held up).
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_usage_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let mut warned = false;
    loop {
        let mut running = Vec::new();
        for db in databases() {
            let started = BackgroundWorkerBuilder::new(&format!("pg_tenancy usage {db}"))
                .set_type("pg_tenancy usage")
                .set_library("pg_tenancy")
                .set_function("pg_tenancy_usage_main")
                .set_extra(&db)
                .enable_spi_access()
                .set_restart_time(None)
                .load_dynamic();
            match started {
                Ok(w) => running.push(w),
                Err(_) if !warned => {
                    warned = true;
                    pgrx::log!("pg_tenancy usage: could not start a worker (max_worker_processes reached?); trying again each interval");
                }
                Err(_) => {}
            }
        }
        // One round at a time: a long storage measurement delays the next round, never doubles
        // it. (Polled: PostgreSQL's notice that a worker stopped does not wake a process
        // connected to no database.)
        while running.iter().any(|w| matches!(w.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted))) {
            if !BackgroundWorker::wait_latch(Some(Duration::from_millis(100))) || BackgroundWorker::sigterm_received() {
                return;
            }
        }
        let every = match crate::gucs::snapshot_interval() {
            0 => 60,
            n => n.min(60),
        };
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(every as u64))) || BackgroundWorker::sigterm_received() {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: rereads the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

/// Run what is due in this database.
fn tick() {
    BackgroundWorker::transaction(|| {
        let installed = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_tenancy')")
            .ok()
            .flatten()
            .unwrap_or(false);
        if !installed {
            return;
        }
        for (interval, due, run) in [
            (crate::gucs::snapshot_interval(), crate::catalog::usage::SNAPSHOT_DUE_IN, "SELECT tenancy.snapshot_usage()"),
            (crate::gucs::storage_interval(), crate::catalog::usage::STORAGE_DUE_IN, "SELECT count(*) FROM tenancy.measure_storage()"),
        ] {
            if interval <= 0 {
                continue;
            }
            let left = Spi::get_one_with_args::<f64>(due, &[interval.into()]).ok().flatten().unwrap_or(0.0);
            // (half a second early is on time: the launcher's rounds are not to the millisecond)
            if left <= 0.5 {
                Spi::run(run).unwrap_or_else(|e| pgrx::error!("pg_tenancy usage worker: {e}"));
            }
        }
    })
}

/// Main function of a usage worker (its database in bgw_extra): run what is due, then leave.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_tenancy_usage_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let db = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&db), None);
    // (nothing it runs is resolved through a search_path; a measurement of a large database is
    // not cut short by a database's statement_timeout)
    BackgroundWorker::transaction(|| {
        Spi::run("SET search_path = pg_catalog, pg_temp").ok();
        Spi::run("SET statement_timeout = 0").ok();
    });
    tick();
}
