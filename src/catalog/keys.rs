//! `tenancy.keys`: tenant keys, stored only wrapped by the master key.
use pgrx::prelude::*;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

/// One row of `tenancy.keys`.
pub struct KeyRow {
    pub version: i32,
    pub state: String,
    pub wrapped: Option<Vec<u8>>,
    pub kek_id: String,
}

const KEY: Stmt = Stmt {
    sql: "SELECT version, state, wrapped, kek_id FROM tenancy.keys \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) $2 \
             AND CASE WHEN $3 IS NULL THEN state OPERATOR(pg_catalog.=) 'active' \
                      ELSE version OPERATOR(pg_catalog.=) $3 END \
           ORDER BY version DESC LIMIT 1",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT4OID],
    who: Who::Owner,
    fresh: true,
};

/// Key `version` of a tenant (or its active one).
pub fn key(tenant: &str, kind: &str, version: Option<i32>) -> Result<Option<KeyRow>> {
    one(&KEY, &[arg(tenant), arg(kind), version.and_then(arg)], |r| KeyRow {
        version: r.get::<i32>(1).unwrap_or(0),
        state: r.get::<String>(2).unwrap_or_default(),
        wrapped: r.get::<Vec<u8>>(3),
        kek_id: r.get::<String>(4).unwrap_or_default(),
    })
}

const KEYS_DESTROYED: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM tenancy.keys WHERE tenant OPERATOR(pg_catalog.=) $1 \
                           AND state OPERATOR(pg_catalog.=) 'destroyed')",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// Whether the tenant was crypto-shredded. Fails closed: an error is raised, never `false`.
pub fn keys_destroyed(tenant: &str) -> Result<bool> {
    Ok(one(&KEYS_DESTROYED, &[arg(tenant)], |r| r.get::<bool>(1))?.flatten().unwrap_or(false))
}

const LOCK_TENANT: Stmt = Stmt {
    sql: "SELECT 1 FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1 FOR NO KEY UPDATE",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Lock the tenant's row (serializes key creation per tenant); whether it exists.
pub fn lock_tenant(tenant: &str) -> Result<bool> {
    Ok(!run(&LOCK_TENANT, &[arg(tenant)], |_| ())?.is_empty())
}

const NEXT_KEY_VERSION: Stmt = Stmt {
    sql: "SELECT COALESCE(pg_catalog.max(version), 0) OPERATOR(pg_catalog.+) 1 \
            FROM tenancy.keys \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) $2",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

pub fn next_key_version(tenant: &str, kind: &str) -> Result<i32> {
    Ok(one(&NEXT_KEY_VERSION, &[arg(tenant), arg(kind)], |r| r.get::<i32>(1))?.flatten().unwrap_or(1))
}

const RETIRE_ACTIVE_KEY: Stmt = Stmt {
    sql: "UPDATE tenancy.keys SET state = 'decrypt_only', retired_at = pg_catalog.now() \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) $2 \
             AND state OPERATOR(pg_catalog.=) 'active'",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

const INSERT_KEY: Stmt = Stmt {
    sql: "INSERT INTO tenancy.keys (tenant, kind, version, state, wrapped, kek_id) \
          VALUES ($1, $2, $3, 'active', $4, $5)",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::BYTEAOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Retire the active key of (tenant, kind) and store `wrapped` as the new active `version`.
pub fn insert_active_key(tenant: &str, kind: &str, version: i32, wrapped: &[u8], kek_id: &str) -> Result<()> {
    run(&RETIRE_ACTIVE_KEY, &[arg(tenant), arg(kind)], |_| ())?;
    run(&INSERT_KEY, &[arg(tenant), arg(kind), arg(version), arg(wrapped), arg(kek_id)], |_| ())?;
    Ok(())
}

const COUNT_ENCRYPTIONS: Stmt = Stmt {
    sql: "UPDATE tenancy.keys SET encryptions = encryptions OPERATOR(pg_catalog.+) $3 \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) 'data' \
             AND version OPERATOR(pg_catalog.=) $2 \
       RETURNING encryptions",
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::INT8OID],
    who: Who::Owner,
    fresh: false,
};

/// Add `n` to the encryption count of a data key version; the new total.
pub fn count_encryptions(tenant: &str, version: i32, n: i64) -> Result<i64> {
    Ok(one(&COUNT_ENCRYPTIONS, &[arg(tenant), arg(version), arg(n)], |r| r.get::<i64>(1))?.flatten().unwrap_or(0))
}

const SHRED: Stmt = Stmt {
    sql: "UPDATE tenancy.keys SET state = 'destroyed', wrapped = NULL, destroyed_at = pg_catalog.now() \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.<>) 'destroyed' \
       RETURNING 1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

const SHRED_MARKER: Stmt = Stmt {
    sql: "INSERT INTO tenancy.keys (tenant, kind, version, state, wrapped, kek_id, destroyed_at) \
          VALUES ($1, 'data', 0, 'destroyed', NULL, '', pg_catalog.now())",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Destroy every key of `tenant`; a tenant without keys gets a destroyed marker, so that no key
/// is ever created for it. Returns how many keys were destroyed.
pub fn shred(tenant: &str) -> Result<i64> {
    let n = run(&SHRED, &[arg(tenant)], |_| ())?.len() as i64;
    if n == 0 && !keys_destroyed(tenant)? {
        run(&SHRED_MARKER, &[arg(tenant)], |_| ())?;
    }
    Ok(n)
}

const LIVE_KEYS: Stmt = Stmt {
    sql: "SELECT tenant, kind, version, kek_id FROM tenancy.keys WHERE wrapped IS NOT NULL ORDER BY 1, 2, 3",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// (tenant, kind, version, kek_id) of every live key.
pub fn live_keys() -> Result<Vec<(String, String, i32, String)>> {
    run(&LIVE_KEYS, &[], |r| {
        (
            r.get::<String>(1).unwrap_or_default(),
            r.get::<String>(2).unwrap_or_default(),
            r.get::<i32>(3).unwrap_or(0),
            r.get::<String>(4).unwrap_or_default(),
        )
    })
}

const REWRAP_KEY: Stmt = Stmt {
    sql: "UPDATE tenancy.keys SET wrapped = $4, kek_id = $5 \
           WHERE tenant OPERATOR(pg_catalog.=) $1 AND kind OPERATOR(pg_catalog.=) $2 \
             AND version OPERATOR(pg_catalog.=) $3",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::INT4OID, pg_sys::BYTEAOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

pub fn rewrap_key(tenant: &str, kind: &str, version: i32, wrapped: &[u8], kek_id: &str) -> Result<()> {
    run(&REWRAP_KEY, &[arg(tenant), arg(kind), arg(version), arg(wrapped), arg(kek_id)], |_| ())?;
    Ok(())
}
