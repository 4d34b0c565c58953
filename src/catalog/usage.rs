//! `tenancy.meter_usage` and the allowances of `tenancy.plans` / `tenancy.limits`: what
//! `tenancy.meter()` counts against, and what the metrics report of it.
use pgrx::prelude::*;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

const ALLOWANCE: Stmt = Stmt {
    // (tenancy._allowance: the tenant's own, else its plan's; NULL = no limit)
    sql: "SELECT tenancy._allowance(p, l, $2) FROM tenancy.tenants t \
           JOIN tenancy.plans p ON p.name OPERATOR(pg_catalog.=) t.plan \
           LEFT JOIN tenancy.limits l ON l.tenant OPERATOR(pg_catalog.=) t.id \
          WHERE t.id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant's allowance per day for `meter`: `Some(None)` for no limit, `None` when the tenant
/// does not exist.
pub fn allowance(tenant: &str, meter: &str) -> Result<Option<Option<i64>>> {
    one(&ALLOWANCE, &[arg(tenant), arg(meter)], |r| r.get::<i64>(1))
}

/// At most 64 meters per tenant and day (a new name past them counts nothing: one statement could
/// otherwise make a series per name in every scrape).
/// Add `$3` to today's (UTC, by the clock: a long transaction crossing midnight counts on the new
/// day) use of meter `$2` by tenant `$1` when it stays within `$4` (NULL: no
/// limit). The row lock taken by ON CONFLICT ... DO UPDATE serialises concurrent meters of one
/// tenant and the condition is evaluated on the latest row: two sessions can never both take
/// the last of an allowance.
const ADD: Stmt = Stmt {
    sql: "INSERT INTO tenancy.meter_usage AS u (tenant, meter, day, used) \
          SELECT $1, $2, (pg_catalog.clock_timestamp() AT TIME ZONE 'UTC')::pg_catalog.date, $3 \
           WHERE ($4::pg_catalog.int8 IS NULL OR $3 OPERATOR(pg_catalog.<=) $4::pg_catalog.int8) \
             AND (EXISTS (SELECT 1 FROM tenancy.meter_usage x \
                           WHERE x.tenant OPERATOR(pg_catalog.=) $1 AND x.meter OPERATOR(pg_catalog.=) $2 \
                             AND x.day OPERATOR(pg_catalog.=) (pg_catalog.clock_timestamp() AT TIME ZONE 'UTC')::pg_catalog.date) \
                  OR (SELECT pg_catalog.count(*) FROM tenancy.meter_usage x \
                       WHERE x.tenant OPERATOR(pg_catalog.=) $1 \
                         AND x.day OPERATOR(pg_catalog.=) (pg_catalog.clock_timestamp() AT TIME ZONE 'UTC')::pg_catalog.date) \
                     OPERATOR(pg_catalog.<) 64) \
          ON CONFLICT (tenant, meter, day) DO UPDATE \
             SET used = u.used OPERATOR(pg_catalog.+) EXCLUDED.used, updated_at = pg_catalog.now() \
           WHERE $4::pg_catalog.int8 IS NULL \
              OR EXCLUDED.used OPERATOR(pg_catalog.<=) ($4::pg_catalog.int8 OPERATOR(pg_catalog.-) u.used) \
       RETURNING u.used",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID],
    who: Who::Owner,
    fresh: false,
};

/// Count `amount` of `meter` for `tenant` today if it fits `allowance`; the day's total when it
/// did, None when it would have gone over (nothing counted).
pub fn add(tenant: &str, meter: &str, amount: i64, allowance: Option<i64>) -> Result<Option<i64>> {
    Ok(one(&ADD, &[arg(tenant), arg(meter), arg(amount), arg(allowance)], |r| r.get::<i64>(1))?.flatten())
}

const TODAY: Stmt = Stmt {
    sql: "SELECT m.tenant, m.meter, m.used, tenancy._allowance(p, l, m.meter) FROM tenancy.meter_usage m \
           JOIN tenancy.tenants t ON t.id OPERATOR(pg_catalog.=) m.tenant \
           JOIN tenancy.plans p ON p.name OPERATOR(pg_catalog.=) t.plan \
           LEFT JOIN tenancy.limits l ON l.tenant OPERATOR(pg_catalog.=) t.id \
          WHERE m.day OPERATOR(pg_catalog.=) (pg_catalog.now() AT TIME ZONE 'UTC')::pg_catalog.date \
          ORDER BY m.tenant, m.meter",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// Today's (UTC) metered use: tenant, meter, used, allowance (None: no limit).
pub fn today() -> Result<Vec<(String, String, i64, Option<i64>)>> {
    run(&TODAY, &[], |r| {
        (r.get::<String>(1).unwrap_or_default(), r.get::<String>(2).unwrap_or_default(), r.get::<i64>(3).unwrap_or(0), r.get::<i64>(4))
    })
}

const PLANS: Stmt = Stmt {
    sql: "SELECT t.id, t.plan FROM tenancy.tenants t",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// Every tenant's plan.
pub fn plans() -> Result<Vec<(String, String)>> {
    run(&PLANS, &[], |r| (r.get::<String>(1).unwrap_or_default(), r.get::<String>(2).unwrap_or_default()))
}

const ALERTS: Stmt = Stmt {
    sql: "SELECT tenant, rule FROM tenancy.alerts ORDER BY tenant, rule",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// What fires now: tenant and rule. (Without JIT: the view's estimated cost starts a
/// compilation that takes ten times as long as the query, on every scrape of the metrics.)
pub fn alerts() -> Result<Vec<(String, String)>> {
    let _no_jit = super::GucScope::new(&[(c"jit", c"off")]);
    run(&ALERTS, &[], |r| (r.get::<String>(1).unwrap_or_default(), r.get::<String>(2).unwrap_or_default()))
}

const MEASURE: Stmt = Stmt {
    sql: "SELECT tenant, bytes, rows FROM tenancy._measure_storage()",
    args: &[],
    who: Who::Caller,
    fresh: false,
};

/// Measure every tenant's storage now (as the calling superuser: it reads every tenant's rows).
pub fn measure_storage() -> Result<Vec<(String, i64, i64)>> {
    run(&MEASURE, &[], |r| (r.get::<String>(1).unwrap_or_default(), r.get::<i64>(2).unwrap_or(0), r.get::<i64>(3).unwrap_or(0)))
}

/// Seconds until the usage worker's next snapshot is due (`$1`: the interval in seconds), from
/// the newest snapshot taken (by the worker or by hand).
pub const SNAPSHOT_DUE_IN: &str = "SELECT COALESCE(pg_catalog.date_part('epoch', \
       pg_catalog.max(h.at) OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $1) OPERATOR(pg_catalog.-) pg_catalog.now()), 0) \
       FROM tenancy.usage_history h";

/// Seconds until the usage worker's next storage measurement is due (`$1`: the interval in
/// seconds), from the last measurement (each measures every tenant; a tenant created since is
/// estimated from the rows it inserts until the next).
pub const STORAGE_DUE_IN: &str = "SELECT COALESCE(pg_catalog.date_part('epoch', \
       pg_catalog.max(s.measured_at) OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => $1) OPERATOR(pg_catalog.-) pg_catalog.now()), 0) \
       FROM tenancy.tenant_storage s";
