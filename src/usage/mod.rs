//! Usage's SQL surface: `tenancy.meter()` (what the application counts, against the plan),
//! `tenancy.stats` (through `_stats()`), `tenancy.reset_stats()`, `tenancy.metrics()` (Prometheus
//! text) and `tenancy.stats_status()`. The counting itself is in [`crate::stats`], driven by the
//! hooks.
use pgrx::prelude::*;

pub mod http;
pub mod worker;

use pg_tenancy_core::metrics::{self, Exposition, BUCKETS, ERROR_CLASSES};
use pg_tenancy_core::model::Scope;

use crate::catalog;
use crate::context;
use crate::error::{OrRaise, TenancyError};
use crate::stats::{self, Refusal, Snapshot, REFUSAL_NAMES};

fn valid_meter(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// Count `amount` of meter `name` (webhook events, egress bytes, API calls: whatever the
/// application meters) for the tenant of the current context, today (UTC), against its allowance
/// per day (the tenant's own, else its plan's). True when counted; false, counting nothing, when
/// it would go over (or the tenant already has 64 other meters today). Exact under concurrency.
/// Needs a context with scope read_write or admin.
#[pg_extern(volatile, parallel_unsafe)]
fn meter(name: Option<&str>, amount: Option<i64>) -> bool {
    let name = name.filter(|n| valid_meter(n)).unwrap_or_else(|| TenancyError::InvalidMeter.raise());
    let amount = amount.filter(|a| *a >= 0).unwrap_or_else(|| TenancyError::InvalidArgument("amount (a count of 0 or more)").raise());
    let v = context::verified().or_raise();
    if v.scope < Scope::ReadWrite {
        TenancyError::ReadScope.raise();
    }
    let allowance = catalog::usage::allowance(&v.tenant, name).or_raise().unwrap_or_else(|| TenancyError::UnknownTenant.raise());
    // (nothing to count: whether it is within the allowance, with no row written)
    if amount == 0 {
        return true;
    }
    match catalog::usage::add(&v.tenant, name, amount, allowance).or_raise() {
        Some(_) => true,
        None => {
            stats::count_refusal(&v.tenant, Refusal::Meter);
            false
        }
    }
}

fn require_stats() {
    if stats::occupancy().is_none() {
        TenancyError::PreloadRequired.raise();
    }
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

fn errors_json(s: &Snapshot) -> pgrx::JsonB {
    let map: serde_json::Map<String, serde_json::Value> = ERROR_CLASSES
        .iter()
        .zip(s.errors.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| (c.to_string(), serde_json::Value::from(*n)))
        .collect();
    pgrx::JsonB(serde_json::Value::Object(map))
}

type StatsRow = (
    String,
    i64,
    i64,
    i64,
    pgrx::JsonB,
    f64,
    Option<f64>,
    f64,
    Option<f64>,
    Option<f64>,
    i64,
    i64,
    i64,
    i64,
    i32,
    Option<pgrx::datum::TimestampWithTimeZone>,
    Vec<i64>,
);

/// Per tenant of this database (and `(other)`): what `tenancy.stats` shows.
#[pg_extern(volatile, parallel_safe)]
fn _stats() -> TableIterator<
    'static,
    (
        name!(tenant, String),
        name!(statements, i64),
        name!(rows, i64),
        name!(errors, i64),
        name!(errors_by_class, pgrx::JsonB),
        name!(total_time_ms, f64),
        name!(mean_time_ms, Option<f64>),
        name!(max_time_ms, f64),
        name!(p95_ms, Option<f64>),
        name!(p99_ms, Option<f64>),
        name!(denials, i64),
        name!(refused_rate, i64),
        name!(refused_concurrency, i64),
        name!(refused_meter, i64),
        name!(running, i32),
        name!(last_active, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(histogram, Vec<i64>),
    ),
> {
    require_stats();
    let (snap, _) = stats::snapshot();
    let rows: Vec<StatsRow> = snap
        .into_iter()
        .map(|s| {
            let errors: u64 = s.errors.iter().sum();
            (
                s.tenant.clone(),
                s.statements as i64,
                s.rows as i64,
                errors as i64,
                errors_json(&s),
                ms(s.time_us as f64),
                (s.statements > 0).then(|| ms(s.time_us as f64 / s.statements as f64)),
                ms(s.max_us as f64),
                metrics::quantile_us(&s.hist, 0.95).map(ms),
                metrics::quantile_us(&s.hist, 0.99).map(ms),
                s.denials as i64,
                s.refusals[Refusal::Rate as usize] as i64,
                s.refusals[Refusal::Concurrency as usize] as i64,
                s.refusals[Refusal::Meter as usize] as i64,
                s.running,
                (s.last_active != 0).then(|| timestamp(s.last_active)),
                s.hist.iter().map(|&c| c as i64).collect(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

fn timestamp(us: i64) -> pgrx::datum::TimestampWithTimeZone {
    // SAFETY: a TimestampTz is microseconds since the PostgreSQL epoch, as stored.
    unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(us), false) }.expect("not null")
}

/// Zero the usage counters of `tenant`, or of every tenant of this database (and `(other)`)
/// when NULL. Superuser only. Tenants keep their places and their limits' state (a reset does not
/// refill a rate limit). Returns how many were reset.
#[pg_extern(volatile, parallel_unsafe)]
fn reset_stats(tenant: default!(Option<&str>, "NULL")) -> i64 {
    require_stats();
    // SAFETY: reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::Denied("only a superuser resets usage statistics").raise();
    }
    stats::reset(tenant) as i64
}

/// How full the usage memory is: places in use (tenants and `(other)`), the bound, and the bytes
/// of shared memory reserved.
#[pg_extern(volatile, parallel_safe)]
fn stats_status() -> TableIterator<'static, (name!(tracked, i64), name!(capacity, i64), name!(shared_bytes, i64))> {
    require_stats();
    let (used, cap) = stats::occupancy().expect("checked");
    TableIterator::once((used as i64, cap as i64, stats::memory().unwrap_or(0) as i64))
}

/// Every metric, in Prometheus' text exposition format (version 0.0.4).
#[pg_extern(volatile, parallel_safe)]
fn metrics() -> String {
    require_stats();
    let (snap, reset_at) = stats::snapshot();
    let plans: std::collections::HashMap<String, String> = catalog::usage::plans().or_raise().into_iter().collect();
    let meters = catalog::usage::today().or_raise();
    let alerts = catalog::usage::alerts().or_raise();
    render(&snap, reset_at, &plans, &meters, &alerts)
}

fn render(
    snap: &[Snapshot],
    reset_at: Option<i64>,
    plans: &std::collections::HashMap<String, String>,
    meters: &[(String, String, i64, Option<i64>)],
    alerts: &[(String, String)],
) -> String {
    let mut e = Exposition::default();
    e.family("pg_tenancy_statements_total", "counter", "Top-level statements run under the tenant's context.");
    e.family("pg_tenancy_rows_total", "counter", "Rows processed by the tenant's top-level statements.");
    e.family("pg_tenancy_errors_total", "counter", "Top-level statements of the tenant that failed, by SQLSTATE class.");
    e.family("pg_tenancy_denials_total", "counter", "Denials recorded in the tenant's context (audit events).");
    e.family("pg_tenancy_limit_refusals_total", "counter", "Statements or meters refused by the tenant's limits, by limit.");
    e.family("pg_tenancy_statement_duration_seconds", "histogram", "Executor time of the tenant's top-level statements.");
    e.family("pg_tenancy_statement_duration_max_seconds", "gauge", "Longest top-level statement of the tenant since the last reset.");
    e.family("pg_tenancy_running_statements", "gauge", "Top-level statements of the tenant running now (counted where a concurrency cap applies).");
    e.family("pg_tenancy_tenant_info", "gauge", "The tenant's plan (value 1).");
    e.family("pg_tenancy_meter_used", "gauge", "Today's (UTC) use of a meter by the tenant.");
    e.family("pg_tenancy_meter_allowance", "gauge", "The tenant's allowance per day of a meter (absent: no limit).");
    e.family("pg_tenancy_alert_active", "gauge", "An alert of tenancy.alerts that fires now (value 1), by tenant and rule.");
    e.family("pg_tenancy_tracked_tenants", "gauge", "Places in use in the usage memory (tenants and (other)).");
    e.family("pg_tenancy_tracked_tenants_capacity", "gauge", "Places in the usage memory (pg_tenancy.stats_max_tenants + 1).");
    e.family("pg_tenancy_stats_reset_timestamp_seconds", "gauge", "When the usage counters were last reset (Unix time).");
    for s in snap {
        let active = s.statements > 0
            || s.denials > 0
            || s.refusals.iter().any(|&r| r > 0)
            || s.errors.iter().any(|&r| r > 0)
            || s.running > 0;
        if !active {
            continue;
        }
        let t = [("tenant", s.tenant.as_str())];
        e.sample("pg_tenancy_statements_total", "", &t, s.statements as f64);
        e.sample("pg_tenancy_rows_total", "", &t, s.rows as f64);
        for (class, n) in ERROR_CLASSES.iter().zip(s.errors.iter()) {
            if *n > 0 {
                e.sample("pg_tenancy_errors_total", "", &[("tenant", &s.tenant), ("class", class)], *n as f64);
            }
        }
        e.sample("pg_tenancy_denials_total", "", &t, s.denials as f64);
        for (name, n) in REFUSAL_NAMES.iter().zip(s.refusals.iter()) {
            e.sample("pg_tenancy_limit_refusals_total", "", &[("tenant", &s.tenant), ("limit", name)], *n as f64);
        }
        let hist: [u64; BUCKETS] = s.hist;
        e.histogram("pg_tenancy_statement_duration_seconds", &t, &hist, s.time_us as f64 / 1e6);
        e.sample("pg_tenancy_statement_duration_max_seconds", "", &t, s.max_us as f64 / 1e6);
        e.sample("pg_tenancy_running_statements", "", &t, s.running as f64);
        if let Some(plan) = plans.get(&s.tenant) {
            e.sample("pg_tenancy_tenant_info", "", &[("tenant", &s.tenant), ("plan", plan)], 1.0);
        }
    }
    for (tenant, meter, used, allowance) in meters {
        let l = [("tenant", tenant.as_str()), ("meter", meter.as_str())];
        e.sample("pg_tenancy_meter_used", "", &l, *used as f64);
        if let Some(a) = allowance {
            e.sample("pg_tenancy_meter_allowance", "", &l, *a as f64);
        }
    }
    for (tenant, rule) in alerts {
        e.sample("pg_tenancy_alert_active", "", &[("tenant", tenant), ("rule", rule)], 1.0);
    }
    if let Some((used, cap)) = stats::occupancy() {
        e.sample("pg_tenancy_tracked_tenants", "", &[], used as f64);
        e.sample("pg_tenancy_tracked_tenants_capacity", "", &[], cap as f64);
    }
    if let Some(at) = reset_at {
        // PostgreSQL's epoch is 2000-01-01, 946,684,800 s after Unix's.
        e.sample("pg_tenancy_stats_reset_timestamp_seconds", "", &[], at as f64 / 1e6 + 946_684_800.0);
    }
    e.render()
}

/// The `q` quantile (0 < q <= 1), in milliseconds, of a latency histogram as `tenancy.stats`
/// shows it (`histogram`, counts per bucket of `tenancy.stats_buckets`). NULL when empty.
#[pg_extern(immutable, parallel_safe)]
fn _quantile_ms(histogram: Vec<Option<i64>>, q: f64) -> Option<f64> {
    let mut h = [0u64; BUCKETS];
    for (slot, v) in h.iter_mut().zip(histogram.iter()) {
        *slot = v.unwrap_or(0).max(0) as u64;
    }
    metrics::quantile_us(&h, q).map(ms)
}

/// Record a lockdown or an unlock in the audit log (from tenancy.lockdown / tenancy.unlock).
#[pg_extern(volatile, parallel_unsafe)]
fn _record_incident(event: &str, tenant: &str, incident: i64) {
    // SAFETY: reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::Denied("incident actions are a superuser's").raise();
    }
    let (e, what) = match event {
        "lockdown" => (crate::audit::Event::TenantLockdown, "tenant locked down"),
        "unlock" => (crate::audit::Event::TenantUnlock, "tenant unlocked"),
        _ => TenancyError::InvalidArgument("event").raise(),
    };
    crate::audit::record(e, pg_sys::InvalidOid, Some(tenant), "00000", &format!("{what} (incident {incident})"));
}

/// Measure every tenant's storage now (superuser; the usage worker runs it every
/// `pg_tenancy.storage_interval`): the bytes of the tenant's own live rows in every protected
/// table, as stored (see `tenancy._measure_storage`). Inserts are refused (53400) once a
/// tenant's measured storage, plus the rows it inserted since at its bytes per row, reaches its
/// quota.
#[pg_extern(volatile, parallel_unsafe)]
fn measure_storage() -> TableIterator<'static, (name!(tenant, String), name!(bytes, i64), name!(rows, i64))> {
    // SAFETY: reads the current user's catalog entry.
    if !unsafe { pg_sys::superuser() } {
        TenancyError::Denied("measuring every tenant's storage is a superuser's").raise();
    }
    // (pg_tenancy's own reads of every tenant's rows: not bypass_read events)
    let _quiet = crate::audit::QuietBypassReads::new();
    let rows = catalog::usage::measure_storage().or_raise();
    for (tenant, _, _) in &rows {
        stats::storage_measured(tenant);
    }
    TableIterator::new(rows)
}
