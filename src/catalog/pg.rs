//! Reads of PostgreSQL's own catalogs that protect() needs, made as the caller (they need no
//! rights the caller lacks), and the one look at a table's contents pg_tenancy ever takes.
use pgrx::prelude::*;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

const TABLE_DEFINITION: Stmt = Stmt {
    sql: "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, \
                 c.relkind::pg_catalog.text, a.attnum, a.atttypid, c.relpersistence::pg_catalog.text, \
                 (SELECT co.collisdeterministic FROM pg_catalog.pg_collation co \
                   WHERE co.oid OPERATOR(pg_catalog.=) a.attcollation) \
            FROM pg_catalog.pg_class c \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
            LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
                 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name \
                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
           WHERE c.oid OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: Who::Caller,
    fresh: false,
};

const POLICY_EXISTS: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) $1 \
                           AND polname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: Who::Caller,
    fresh: false,
};

const CHILDREN: Stmt = Stmt {
    sql: "SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) $1 ORDER BY 1",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: false,
};

const LEADING_INDEX: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index WHERE indrelid OPERATOR(pg_catalog.=) $1 \
                           AND indkey[0] OPERATOR(pg_catalog.=) $2)",
    args: &[pg_sys::OIDOID, pg_sys::INT2OID],
    who: Who::Caller,
    fresh: false,
};

const SCHEMA_TABLES: Stmt = Stmt {
    sql: "SELECT c.oid FROM pg_catalog.pg_class c \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
            JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
           WHERE n.nspname OPERATOR(pg_catalog.=) $1::pg_catalog.name \
             AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name AND NOT a.attisdropped \
             AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.char[]) AND NOT c.relispartition \
             AND c.relpersistence OPERATOR(pg_catalog.<>) 't' \
           ORDER BY c.relname",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Caller,
    fresh: false,
};

/// What protect() needs to know of a table and its tenant column.
pub struct TableDefinition {
    pub schema: String,
    pub name: String,
    pub relkind: String,
    pub persistence: String,
    /// The tenant column's number, type and whether its collation is deterministic (None: no
    /// such column).
    pub column: Option<(i16, pg_sys::Oid, bool)>,
}

pub fn table_definition(rel: pg_sys::Oid, column: &str) -> Result<Option<TableDefinition>> {
    one(&TABLE_DEFINITION, &[arg(rel), arg(column)], |t| TableDefinition {
        schema: t.get::<String>(1).unwrap_or_default(),
        name: t.get::<String>(2).unwrap_or_default(),
        relkind: t.get::<String>(3).unwrap_or_default(),
        persistence: t.get::<String>(6).unwrap_or_default(),
        column: match (t.get::<i16>(4), t.get::<pg_sys::Oid>(5)) {
            (Some(n), Some(ty)) => Some((n, ty, t.get::<bool>(7).unwrap_or(true))),
            _ => None,
        },
    })
}

pub fn policy_exists(rel: pg_sys::Oid, name: &str) -> Result<bool> {
    Ok(one(&POLICY_EXISTS, &[arg(rel), arg(name)], |r| r.get::<bool>(1))?.flatten().unwrap_or(false))
}

/// The partitions and inheritance children of `rel`.
pub fn children(rel: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>> {
    Ok(run(&CHILDREN, &[arg(rel)], |r| r.get::<pg_sys::Oid>(1))?.into_iter().flatten().collect())
}

/// Whether an index of `rel` leads with column `attnum`.
pub fn has_leading_index(rel: pg_sys::Oid, attnum: i16) -> Result<bool> {
    Ok(one(&LEADING_INDEX, &[arg(rel), arg(attnum)], |r| r.get::<bool>(1))?.flatten().unwrap_or(false))
}

/// The tables of a schema that have the column (not partitions: their parents protect them).
pub fn schema_tables(schema: &str, column: &str) -> Result<Vec<pg_sys::Oid>> {
    Ok(run(&SCHEMA_TABLES, &[arg(schema), arg(column)], |r| r.get::<pg_sys::Oid>(1))?.into_iter().flatten().collect())
}

const DEFENSES: Stmt = Stmt {
    sql: "SELECT (SELECT pg_catalog.count(*) FROM pg_catalog.pg_rewrite w \
                   WHERE w.ev_class OPERATOR(pg_catalog.=) $1 AND w.rulename OPERATOR(pg_catalog.<>) '_RETURN'), \
                 (SELECT pg_catalog.count(*) FROM pg_catalog.pg_policy p \
                   WHERE p.polrelid OPERATOR(pg_catalog.=) $1 AND p.polpermissive \
                     AND p.polname OPERATOR(pg_catalog.<>) 'tenancy_isolation'), \
                 (SELECT pg_catalog.array_agg(p.polqual::pg_catalog.text) FROM pg_catalog.pg_policy p \
                   WHERE p.polrelid OPERATOR(pg_catalog.=) $1 AND NOT p.polpermissive \
                     AND p.polname OPERATOR(pg_catalog.<>) 'tenancy_write_guard')",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: false,
};

/// What a table already carries that a protection could not stand beside: rules, permissive
/// policies other than pg_tenancy's, and the expressions of restrictive ones.
pub struct Defenses {
    pub rules: i64,
    pub permissive: i64,
    pub restrictive_quals: Vec<String>,
}

pub fn defenses(rel: pg_sys::Oid) -> Result<Defenses> {
    Ok(one(&DEFENSES, &[arg(rel)], |r| Defenses {
        rules: r.get::<i64>(1).unwrap_or(0),
        permissive: r.get::<i64>(2).unwrap_or(0),
        restrictive_quals: r.get::<Vec<Option<String>>>(3).unwrap_or_default().into_iter().flatten().collect(),
    })?
    .unwrap_or(Defenses { rules: 0, permissive: 0, restrictive_quals: vec![] }))
}

/// Whether a table holds a row: a plain table is scanned with the heap access method, a
/// partitioned one through every partition under it. No SQL runs, so nothing of the table's owner
/// (a view's function, a foreign data wrapper, a policy) runs with anyone's rights. `Err` for
/// what is not a plain heap table (a foreign table, a view, another access method): its rows
/// cannot be looked at this way.
pub fn holds_rows(rel: pg_sys::Oid) -> std::result::Result<bool, &'static str> {
    let mut todo = vec![rel];
    while let Some(p) = todo.pop() {
        // SAFETY: a syscache lookup.
        match unsafe { pg_sys::get_rel_relkind(p) } as u8 {
            b'p' => {}
            b'r' => {
                if heap_has_a_row(p)? {
                    return Ok(true);
                }
            }
            _ => return Err("it is not a plain table (a foreign table, a view, or another kind)"),
        }
        todo.extend(children(p).map_err(|_| "its partitions could not be listed")?);
    }
    Ok(false)
}

fn heap_has_a_row(rel: pg_sys::Oid) -> std::result::Result<bool, &'static str> {
    // SAFETY: the table is opened (and locked for reading), scanned with a registered fresh
    // snapshot and closed; the tuple found is only tested for presence.
    unsafe {
        let r = pg_sys::table_open(rel, pg_sys::AccessShareLock as _);
        if (*(*r).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
            pg_sys::table_close(r, pg_sys::AccessShareLock as _);
            return Err("it uses a table access method other than heap");
        }
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::heap_beginscan(
            r,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE,
        );
        let found = !pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection).is_null();
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(r, pg_sys::AccessShareLock as _);
        Ok(found)
    }
}
