//! `tenancy.audit_log`: what the writer inserts, what pruning deletes.
use pgrx::prelude::*;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

const INSTALLED: Stmt = Stmt {
    sql: "SELECT pg_catalog.to_regclass('tenancy.audit_log')::pg_catalog.oid",
    args: &[],
    who: Who::Caller,
    fresh: true,
};

/// The audit log's OID, if pg_tenancy is installed here.
pub fn relation() -> Option<pg_sys::Oid> {
    one(&INSTALLED, &[], |r| r.get::<pg_sys::Oid>(1)).ok().flatten().flatten()
}

/// Whether pg_tenancy (its audit log) is installed in this database.
pub fn installed() -> bool {
    relation().is_some()
}

const INSERT: Stmt = Stmt {
    sql: "INSERT INTO tenancy.audit_log \
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
   ORDER BY e.seq",
    args: &[
        pg_sys::FLOAT8ARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::INT8ARRAYOID,
        pg_sys::INT4ARRAYOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::INT8ARRAYOID,
    ],
    who: Who::Caller,
    fresh: false,
};


/// A batch of events, column by column.
pub struct Rows {
    pub at: Vec<f64>,
    pub event: Vec<String>,
    pub role: Vec<String>,
    pub tenant: Vec<String>,
    pub attempted: Vec<String>,
    pub relation: Vec<String>,
    pub command: Vec<String>,
    pub sqlstate: Vec<String>,
    pub query_id: Vec<i64>,
    pub pid: Vec<i32>,
    pub detail: Vec<String>,
    pub seq: Vec<i64>,
}

/// Insert a batch (the writer, running as the bootstrap superuser).
pub fn insert(r: Rows) -> Result<()> {
    run(
        &INSERT,
        &[
            arg(r.at),
            arg(r.event),
            arg(r.role),
            arg(r.tenant),
            arg(r.attempted),
            arg(r.relation),
            arg(r.command),
            arg(r.sqlstate),
            arg(r.query_id),
            arg(r.pid),
            arg(r.detail),
            arg(r.seq),
        ],
        |_| (),
    )?;
    Ok(())
}

const PRUNE: Stmt = Stmt {
    sql: "WITH d AS (DELETE FROM tenancy.audit_log WHERE at OPERATOR(pg_catalog.<) \
                     (pg_catalog.now() OPERATOR(pg_catalog.-) $1) RETURNING 1) \
          SELECT pg_catalog.count(*) FROM d",
    args: &[pg_sys::INTERVALOID],
    who: Who::Caller,
    fresh: false,
};

/// Delete the rows older than `older_than`; how many.
pub fn prune(older_than: pgrx::datum::Interval) -> Result<i64> {
    Ok(one(&PRUNE, &[arg(older_than)], |r| r.get::<i64>(1))?.flatten().unwrap_or(0))
}

const DATABASE_EXISTS: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_database WHERE oid OPERATOR(pg_catalog.=) $1)",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: true,
};

/// Whether a database still exists (true when it cannot be told: its events are kept).
pub fn database_exists(db: pg_sys::Oid) -> bool {
    one(&DATABASE_EXISTS, &[arg(db)], |r| r.get::<bool>(1)).ok().flatten().flatten().unwrap_or(true)
}
