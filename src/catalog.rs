//! Every read and write of the extension's own tables (`tenancy.tenants`, `tenancy.grants`,
//! `tenancy.protected_tables`, `tenancy.keys`, ...), and the one way SQL runs from Rust.
//!
//! Three rules hold for every statement here, whoever calls it:
//! - **search_path-proof.** `search_path` is pinned to `pg_catalog, pg_temp` for the duration of
//!   each statement (pg_temp last, explicitly), and the text itself schema-qualifies its objects
//!   and operators: nothing resolves through a schema the caller controls, so nothing the caller
//!   planted runs, least of all with the owner's rights.
//! - **As the owner when it must be.** The catalogs are not readable by application roles (that
//!   would list every tenant to every tenant); statements marked [`Who::Owner`] run as the owner
//!   of the extension's schema, as a security-restricted operation, for that statement only.
//! - **Fresh.** Reads that decide access see the catalogs as of now, never the transaction's
//!   snapshot: a REPEATABLE READ or SERIALIZABLE transaction opened before a grant was revoked
//!   must not keep honouring it (the verification caches are dropped by invalidation; what is
//!   read again must be current).
//!
//! Statements are prepared once per backend and kept (PostgreSQL's plan cache replans them when
//! the tables change); SPI errors reach the caller as PostgreSQL errors.
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CString;

use crate::error::{Result, TenancyError};

/// Who a statement runs as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Who {
    /// The calling role (statements on PostgreSQL's own catalogs, DDL the caller must own).
    Caller,
    /// The owner of the extension's schema (statements on the extension's tables).
    Owner,
}

/// A statement: its text, the types of its parameters, who runs it, and whether it reads with a
/// fresh snapshot.
pub struct Stmt {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    pub who: Who,
    /// Read as of now (a fresh snapshot) instead of the transaction's snapshot. For reads that
    /// decide access; writes always take a new snapshot (and lock what they change).
    pub fresh: bool,
}

/// OIDs of the extension's schema owner and catalog tables in this database.
#[derive(Clone, Copy, Debug)]
pub struct CatalogIds {
    pub owner: pg_sys::Oid,
    pub tenants: pg_sys::Oid,
    pub grants: pg_sys::Oid,
    pub protected: pg_sys::Oid,
    pub keys: pg_sys::Oid,
}

thread_local! {
    static IDS: Cell<Option<CatalogIds>> = const { Cell::new(None) };
    /// Prepared, kept plans by statement (the address of its text).
    static PLANS: RefCell<HashMap<usize, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

/// Forget the cached OIDs (called on invalidation).
pub fn forget() {
    IDS.with(|c| c.set(None));
}

pub fn cached_ids() -> Option<CatalogIds> {
    IDS.with(|c| c.get())
}

const EXTENSION: Stmt = Stmt {
    sql: "SELECT n.nspowner, \
                 pg_catalog.to_regclass('tenancy.tenants')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.grants')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.protected_tables')::pg_catalog.oid, \
                 pg_catalog.to_regclass('tenancy.keys')::pg_catalog.oid \
            FROM pg_catalog.pg_extension e \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
           WHERE e.extname OPERATOR(pg_catalog.=) 'pg_tenancy'",
    args: &[],
    who: Who::Caller,
    fresh: true,
};

/// The catalog OIDs, looked up once per backend and again after an invalidation.
pub fn ids() -> Result<CatalogIds> {
    if let Some(ids) = cached_ids() {
        return Ok(ids);
    }
    // SAFETY: syscache lookup by name; no schema means the extension is not installed here, and
    // the statement below would not even parse-analyze.
    if unsafe { pg_sys::get_namespace_oid(c"tenancy".as_ptr(), true) } == pg_sys::InvalidOid {
        return Err(TenancyError::NotInstalled);
    }
    let row = run_as(&EXTENSION, &[], pg_sys::InvalidOid, |r| {
        (r.get::<pg_sys::Oid>(1), r.get::<pg_sys::Oid>(2), r.get::<pg_sys::Oid>(3), r.get::<pg_sys::Oid>(4), r.get::<pg_sys::Oid>(5))
    })
    .into_iter()
    .next();
    match row {
        Some((Some(owner), Some(tenants), Some(grants), Some(protected), Some(keys))) => {
            let ids = CatalogIds { owner, tenants, grants, protected, keys };
            IDS.with(|c| c.set(Some(ids)));
            Ok(ids)
        }
        _ => Err(TenancyError::NotInstalled),
    }
}

/// One row of a result, read while the statement's memory is alive.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    /// Column `col` (1-based), `None` for NULL.
    pub fn get<T: FromDatum>(&self, col: i32) -> Option<T> {
        let mut isnull = false;
        // SAFETY: tuple and descriptor come from SPI_tuptable of the statement just run, still
        // alive (the SPI connection is open); out-of-range columns give NULL with SPI_result set.
        unsafe {
            if col < 1 || col > (*self.desc).natts {
                return None;
            }
            let d = pg_sys::SPI_getbinval(self.tuple, self.desc, col, &mut isnull);
            T::from_datum(d, isnull)
        }
    }
}

/// Restores the caller's user id and security context when dropped, also while unwinding.
struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores exactly what GetUserIdAndSecContext returned before the switch.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

/// Becomes `owner` for as long as the guard lives (a security-restricted operation).
fn become_user(owner: pg_sys::Oid) -> RestoreUser {
    let mut user = pg_sys::InvalidOid;
    let mut sec_context = 0;
    // SAFETY: plain reads and writes of the backend's current user id; the guard restores it,
    // and PostgreSQL itself restores it if the transaction aborts.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    RestoreUser { user, sec_context }
}

/// `search_path = pg_catalog, pg_temp` while alive: a GUC nest level, as a function's
/// `SET search_path` clause makes. On success it is popped here; on an error the transaction's
/// (or subtransaction's) abort pops it, as it does for functions.
pub struct PinnedSearchPath(i32);

impl PinnedSearchPath {
    pub fn new() -> Self {
        // SAFETY: a new GUC nest level and a SAVE-action setting in it, exactly what
        // fmgr_security_definer does for proconfig; allowed in parallel mode (SAVE action).
        unsafe {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                c"pg_catalog, pg_temp".as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            PinnedSearchPath(level)
        }
    }
}

impl Default for PinnedSearchPath {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinnedSearchPath {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // An error is unwinding: the abort that follows pops this nest level (and any a
            // subtransaction abort already popped must not be popped twice).
            return;
        }
        // SAFETY: pops the nest level made in new(), restoring the caller's search_path.
        unsafe { pg_sys::AtEOXact_GUC(true, self.0) };
    }
}

/// Run `f` as the owner of the extension's schema with a pinned search_path: for code that runs
/// SQL of its own (SPI) with the owner's rights.
pub fn as_owner<R>(f: impl FnOnce() -> R) -> Result<R> {
    let ids = ids()?;
    let _path = PinnedSearchPath::new();
    let _user = become_user(ids.owner);
    Ok(f())
}

fn plan_for(stmt: &Stmt) -> pg_sys::SPIPlanPtr {
    let key = stmt.sql.as_ptr() as usize;
    if let Some(p) = PLANS.with(|p| p.borrow().get(&key).copied()) {
        return p;
    }
    let sql = CString::new(stmt.sql).expect("statement text has no NUL");
    let mut types = stmt.args.to_vec();
    // SAFETY: called inside an SPI connection with a pinned search_path; SPI_keepplan moves the
    // plan out of the SPI procedure's memory so that it outlives this connection.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            let code = pg_sys::SPI_result;
            pgrx::error!("pg_tenancy: could not prepare a catalog statement (SPI code {code})");
        }
        pg_sys::SPI_keepplan(plan);
        PLANS.with(|p| p.borrow_mut().insert(key, plan));
        plan
    }
}

/// Forget the prepared plans (after DROP EXTENSION they would no longer parse).
pub fn forget_plans() {
    PLANS.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            for (_, plan) in p.drain() {
                // SAFETY: a plan kept by plan_for and used by nobody else.
                unsafe { pg_sys::SPI_freeplan(plan) };
            }
        }
    });
}

/// Run `stmt` with `args` (one per parameter, None for NULL) and map each result row.
pub fn run<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], f: impl FnMut(&Row) -> T) -> Result<Vec<T>> {
    let owner = match stmt.who {
        Who::Owner => ids()?.owner,
        Who::Caller => pg_sys::InvalidOid,
    };
    Ok(run_as(stmt, args, owner, f))
}

fn run_as<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], owner: pg_sys::Oid, mut f: impl FnMut(&Row) -> T) -> Vec<T> {
    assert_eq!(args.len(), stmt.args.len(), "statement arguments");
    let _path = PinnedSearchPath::new();
    let _user = (owner != pg_sys::InvalidOid).then(|| become_user(owner));
    let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.unwrap_or(pg_sys::Datum::from(0))).collect();
    let nulls: Vec<std::ffi::c_char> = args.iter().map(|a| if a.is_some() { b' ' } else { b'n' } as std::ffi::c_char).collect();
    Spi::connect(|_client| {
        let plan = plan_for(stmt);
        // SAFETY: an open SPI connection, a kept plan with stmt.args parameters, and arrays of
        // that length. A parallel operation can neither take a new snapshot nor advance the
        // command counter: it reads with the statement's snapshot (its leader already verified
        // what it decides, with a fresh one).
        unsafe {
            let parallel = pg_sys::IsInParallelMode();
            let fresh = stmt.fresh && !parallel;
            let snapshot = if fresh { pg_sys::GetLatestSnapshot() } else { std::ptr::null_mut() };
            let rc = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                snapshot,
                std::ptr::null_mut(),
                parallel,
                true,
                0,
            );
            if rc < 0 {
                pgrx::error!("pg_tenancy: a catalog statement failed (SPI code {rc})");
            }
            let table = pg_sys::SPI_tuptable;
            let n = if table.is_null() { 0 } else { pg_sys::SPI_processed as usize };
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let row = Row { tuple: *(*table).vals.add(i), desc: (*table).tupdesc };
                out.push(f(&row));
            }
            out
        }
    })
}

/// The first row of `stmt`, if any.
pub fn one<T>(stmt: &Stmt, args: &[Option<pg_sys::Datum>], f: impl FnMut(&Row) -> T) -> Result<Option<T>> {
    Ok(run(stmt, args, f)?.into_iter().next())
}

/// `Some(datum)` of a value for a statement argument.
pub fn arg<T: IntoDatum>(v: T) -> Option<pg_sys::Datum> {
    v.into_datum()
}

// ---------------------------------------------------------------------------------------------
// Tenants and grants
// ---------------------------------------------------------------------------------------------

/// What the catalog says about one tenant, as seen by one role.
#[derive(Debug, Clone)]
pub struct TenantAccess {
    /// `None` when the tenant does not exist.
    pub status: Option<String>,
    pub config: Option<String>,
    /// The strongest scope of every grant that lets the role in (exact tenant or '*'), through
    /// membership (1 read, 2 read_write, 3 admin); `None` without one. Grants of roles that no
    /// longer exist do not count, nor do any for a role that no longer exists.
    pub best_scope: Option<i32>,
}

const TENANT_ACCESS: Stmt = Stmt {
    sql: "SELECT t.status, t.config::pg_catalog.text, \
            (SELECT pg_catalog.max(CASE g.scope WHEN 'read' THEN 1 WHEN 'read_write' THEN 2 \
                                                 WHEN 'admin' THEN 3 END) \
               FROM tenancy.grants g \
              WHERE (g.tenant OPERATOR(pg_catalog.=) $1 OR g.tenant OPERATOR(pg_catalog.=) '*') \
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid a \
                             WHERE a.oid OPERATOR(pg_catalog.=) g.role::pg_catalog.oid) \
                AND EXISTS (SELECT 1 FROM pg_catalog.pg_authid a \
                             WHERE a.oid OPERATOR(pg_catalog.=) $2) \
                AND pg_catalog.pg_has_role($2, g.role::pg_catalog.oid, 'USAGE')) \
       FROM (SELECT 1) AS one \
       LEFT JOIN tenancy.tenants t ON t.id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID, pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

pub fn tenant_access(tenant: &str, role: pg_sys::Oid) -> Result<TenantAccess> {
    let row = one(&TENANT_ACCESS, &[arg(tenant), arg(role)], |r| TenantAccess {
        status: r.get::<String>(1),
        config: r.get::<String>(2),
        best_scope: r.get::<i32>(3),
    })?;
    Ok(row.unwrap_or(TenantAccess { status: None, config: None, best_scope: None }))
}

const TENANT_EXISTS: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1)",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// Whether `tenant` exists. Fails closed: an error is raised, never taken for `false`.
pub fn tenant_exists(tenant: &str) -> Result<bool> {
    Ok(one(&TENANT_EXISTS, &[arg(tenant)], |r| r.get::<bool>(1))?.flatten().unwrap_or(false))
}

const GRANT: Stmt = Stmt {
    sql: "INSERT INTO tenancy.grants (role, tenant, scope, granted_by) \
          VALUES ($1::pg_catalog.regrole, $2, $3, $4::pg_catalog.regrole) \
          ON CONFLICT (role, tenant) DO UPDATE \
             SET scope = EXCLUDED.scope, granted_by = EXCLUDED.granted_by, granted_at = pg_catalog.now()",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn grant(role: pg_sys::Oid, tenant: &str, scope: &str, grantor: pg_sys::Oid) -> Result<()> {
    run(&GRANT, &[arg(role), arg(tenant), arg(scope), arg(grantor)], |_| ())?;
    Ok(())
}

const REVOKE: Stmt = Stmt {
    sql: "DELETE FROM tenancy.grants \
           WHERE role::pg_catalog.oid OPERATOR(pg_catalog.=) $1 AND tenant OPERATOR(pg_catalog.=) $2 \
       RETURNING 1",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Remove a grant; whether there was one.
pub fn revoke(role: pg_sys::Oid, tenant: &str) -> Result<bool> {
    Ok(!run(&REVOKE, &[arg(role), arg(tenant)], |_| ())?.is_empty())
}

const FORGET_ROLE: Stmt = Stmt {
    sql: "DELETE FROM tenancy.grants WHERE role::pg_catalog.oid OPERATOR(pg_catalog.=) $1 RETURNING 1",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

/// Remove every grant of a dropped role (a later role must never inherit them by OID).
pub fn forget_role(role: pg_sys::Oid) -> Result<usize> {
    Ok(run(&FORGET_ROLE, &[arg(role)], |_| ())?.len())
}

const NONCANONICAL_TENANTS: Stmt = Stmt {
    sql: "SELECT pg_catalog.count(*) FROM tenancy.tenants t \
           WHERE NOT tenancy._canonical_tenant_id(t.id)",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// How many tenants have an id that is not in canonical form (created by an older version).
pub fn noncanonical_tenants() -> Result<i64> {
    Ok(one(&NONCANONICAL_TENANTS, &[], |r| r.get::<i64>(1))?.flatten().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Protected tables
// ---------------------------------------------------------------------------------------------

const PROTECTED_SET: Stmt = Stmt {
    sql: "SELECT p.rel::pg_catalog.oid, a.attnum \
            FROM tenancy.protected_tables p \
            JOIN pg_catalog.pg_attribute a \
              ON a.attrelid OPERATOR(pg_catalog.=) p.rel \
             AND a.attname OPERATOR(pg_catalog.=) p.tenant_column \
             AND NOT a.attisdropped",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// Every protected table of this database with the attribute number of its tenant column.
pub fn protected_set() -> Result<Vec<(pg_sys::Oid, i16)>> {
    Ok(run(&PROTECTED_SET, &[], |r| (r.get::<pg_sys::Oid>(1), r.get::<i16>(2)))?
        .into_iter()
        .filter_map(|(o, a)| Some((o?, a?)))
        .collect())
}

const PROTECTED_COLUMN: Stmt = Stmt {
    sql: "SELECT tenant_column::pg_catalog.text FROM tenancy.protected_tables \
           WHERE rel OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant column `rel` is registered with, if it is protected.
pub fn protected_column(rel: pg_sys::Oid) -> Result<Option<String>> {
    Ok(one(&PROTECTED_COLUMN, &[arg(rel)], |r| r.get::<String>(1))?.flatten())
}

const REGISTER: Stmt = Stmt {
    sql: "INSERT INTO tenancy.protected_tables AS p (rel, tenant_column, column_type, protected_by, fingerprint) \
          VALUES ($1::pg_catalog.regclass, $2, $3::pg_catalog.regtype, $4::pg_catalog.regrole, \
                  tenancy._policy_fingerprint($1::pg_catalog.regclass)) \
          ON CONFLICT (rel) DO UPDATE SET tenant_column = EXCLUDED.tenant_column, \
             column_type = EXCLUDED.column_type, protected_by = EXCLUDED.protected_by, \
             fingerprint = EXCLUDED.fingerprint, protected_at = pg_catalog.now()",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID, pg_sys::OIDOID, pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn register(rel: pg_sys::Oid, column: &str, column_type: pg_sys::Oid, by: pg_sys::Oid) -> Result<()> {
    run(&REGISTER, &[arg(rel), arg(column), arg(column_type), arg(by)], |_| ())?;
    Ok(())
}

const UNREGISTER: Stmt = Stmt {
    sql: "DELETE FROM tenancy.protected_tables WHERE rel OPERATOR(pg_catalog.=) $1::pg_catalog.regclass",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn unregister(rel: pg_sys::Oid) -> Result<()> {
    run(&UNREGISTER, &[arg(rel)], |_| ())?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

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

const KEYS_NOT_WRAPPED_BY: Stmt = Stmt {
    sql: "SELECT tenant, kind, version FROM tenancy.keys \
           WHERE wrapped IS NOT NULL AND kek_id OPERATOR(pg_catalog.<>) $1 ORDER BY 1, 2, 3",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// (tenant, kind, version) of every live key not wrapped by master key `kek_id`.
pub fn keys_not_wrapped_by(kek_id: &str) -> Result<Vec<(String, String, i32)>> {
    run(&KEYS_NOT_WRAPPED_BY, &[arg(kek_id)], |r| {
        (r.get::<String>(1).unwrap_or_default(), r.get::<String>(2).unwrap_or_default(), r.get::<i32>(3).unwrap_or(0))
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
