//! `tenancy.protected_tables`: which tables are protected, on which column; and the per-backend
//! set of them that the hooks consult on every statement.
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::{arg, one, run, Stmt, Who};
use crate::error::Result;

/// Protected tables of this database and the attribute number of their tenant column;
/// `None` until loaded or after an invalidation. Empty where pg_tenancy is not installed.
static PROTECTED: crate::util::Backend<RefCell<Option<HashMap<pg_sys::Oid, i16, crate::util::Fnv>>>> = crate::util::Backend::new(RefCell::new(None));
/// Set while the set is being loaded (the loading query itself passes through the hooks).
static LOADING: crate::util::Backend<Cell<bool>> = crate::util::Backend::new(Cell::new(false));

/// Forget the set (`tenancy.protected_tables` changed, or the extension came or went).
pub fn forget() {
    PROTECTED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = None;
        }
    });
}

/// Whether the set is being loaded right now (its own query is not to be examined).
pub fn loading() -> bool {
    LOADING.with(|l| l.get())
}

fn load() -> HashMap<pg_sys::Oid, i16, crate::util::Fnv> {
    LOADING.with(|l| l.set(true));
    let _reset = crate::util::OnDrop(|| LOADING.with(|l| l.set(false)));
    let map: HashMap<pg_sys::Oid, i16, crate::util::Fnv> = match super::ids() {
        Ok(_) => protected_set().map(|v| v.into_iter().collect()).unwrap_or_default(),
        Err(_) => HashMap::default(),
    };
    PROTECTED.with(|p| *p.borrow_mut() = Some(map.clone()));
    map
}

/// The tenant column's attribute number when `rel` is protected.
pub fn protected(rel: pg_sys::Oid) -> Option<i16> {
    let cached = PROTECTED.with(|p| p.borrow().as_ref().map(|s| s.get(&rel).copied()));
    match cached {
        Some(hit) => hit,
        None => load().get(&rel).copied(),
    }
}

/// Whether a protected table lives in the schema `nsp`.
pub fn any_in_schema(nsp: pg_sys::Oid) -> bool {
    if PROTECTED.with(|p| p.borrow().is_none()) {
        load();
    }
    PROTECTED.with(|p| {
        p.borrow().as_ref().is_some_and(|m| {
            // SAFETY: a syscache lookup of each protected table's schema.
            m.keys().any(|&rel| unsafe { pg_sys::get_rel_namespace(rel) } == nsp)
        })
    })
}

/// Whether a range table names a protected table, when the set is loaded (None: it is not;
/// ask `protected`, which loads it). No lookup, no error: for the hooks' fast paths.
///
/// # Safety
/// `range_table` is a valid range table (List of RangeTblEntry) or NULL.
#[inline(always)]
pub unsafe fn cached_any(range_table: *mut pg_sys::List) -> Option<bool> {
    PROTECTED.with(|p| {
        let p = p.try_borrow().ok()?;
        let set = p.as_ref()?;
        // SAFETY: see above.
        Some(unsafe { relations(range_table) }.any(|rte| set.contains_key(&rte.relid)))
    })
}

/// Whether nothing is protected in this database (known without a lookup).
pub fn nothing_protected() -> bool {
    PROTECTED.with(|p| p.borrow().as_ref().is_some_and(|m| m.is_empty()))
}

/// Every RTE_RELATION entry of a range table.
///
/// # Safety
/// `range_table` is a valid range table (List of RangeTblEntry) or NULL.
pub unsafe fn relations(range_table: *mut pg_sys::List) -> impl Iterator<Item = &'static pg_sys::RangeTblEntry> {
    // SAFETY: a pointer List of RangeTblEntry (or NIL): `length` cells (read in place, no copy).
    let cells: &'static [pg_sys::ListCell] = unsafe {
        if range_table.is_null() {
            &[]
        } else {
            std::slice::from_raw_parts((*range_table).elements, (*range_table).length as usize)
        }
    };
    // SAFETY: reading the pointer member of a cell of a pointer List.
    cells.iter().map(|c| unsafe { c.ptr_value }).filter_map(|p| {
        // SAFETY: every element of a range table is a RangeTblEntry.
        let rte = unsafe { &*(p as *const pg_sys::RangeTblEntry) };
        (rte.rtekind == pg_sys::RTEKind::RTE_RELATION).then_some(rte)
    })
}

/// A protected table in a range table, if any.
///
/// # Safety
/// `range_table` is a valid range table (List of RangeTblEntry) or NULL.
pub unsafe fn first_protected(range_table: *mut pg_sys::List) -> Option<pg_sys::Oid> {
    // SAFETY: see above.
    unsafe { relations(range_table) }.map(|rte| rte.relid).find(|&rel| protected(rel).is_some())
}

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

const UNPROTECTED_PARENT: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i \
                          WHERE i.inhrelid OPERATOR(pg_catalog.=) $1 \
                            AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p \
                                             WHERE p.rel::pg_catalog.oid OPERATOR(pg_catalog.=) i.inhparent))",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

/// Whether `rel` has a parent that is not protected.
pub fn has_unprotected_parent(rel: pg_sys::Oid) -> Result<bool> {
    Ok(one(&UNPROTECTED_PARENT, &[arg(rel)], |r| r.get::<bool>(1))?.flatten() == Some(true))
}

const PROTECTION_PROBLEM: Stmt = Stmt {
    sql: "SELECT tenancy._protection_problem($1::pg_catalog.regclass)",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

/// What, if anything, weakens the protection of `rel` (the guard's definition, sql/guard.sql).
pub fn protection_problem(rel: pg_sys::Oid) -> Result<Option<String>> {
    Ok(one(&PROTECTION_PROBLEM, &[arg(rel)], |r| r.get::<String>(1))?.flatten())
}

const UNAPPROVED_ROW_FUNCTIONS: Stmt = Stmt {
    sql: "SELECT pg_catalog.string_agg(DISTINCT f.fn::pg_catalog.text, ', ') \
            FROM tenancy._row_functions($1::pg_catalog.regclass) f WHERE NOT f.approved",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

/// The functions that run over `rel`'s rows and that no superuser approved, listed.
pub fn unapproved_row_functions(rel: pg_sys::Oid) -> Result<Option<String>> {
    Ok(one(&UNAPPROVED_ROW_FUNCTIONS, &[arg(rel)], |r| r.get::<String>(1))?.flatten())
}

const KEYS_INTO_PROTECTED: Stmt = Stmt {
    sql: "SELECT pg_catalog.string_agg(k.constraint_name::pg_catalog.text, ', ') \
            FROM tenancy._keys_into_protected($1::pg_catalog.regclass) k",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: false,
};

/// Foreign keys of `rel` into protected tables that do not pair its tenant column with theirs
/// (sql/guard.sql, `_keys_into_protected`), listed.
pub fn keys_into_protected(rel: pg_sys::Oid) -> Result<Option<String>> {
    Ok(one(&KEYS_INTO_PROTECTED, &[arg(rel)], |r| r.get::<String>(1))?.flatten())
}

const CASCADING_FOREIGN_KEYS: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM tenancy._cascading_keys($1::pg_catalog.regclass, $2::pg_catalog.name))",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Whether `rel` has a foreign key whose actions would change its rows from a table that is not
/// protected (sql/guard.sql, `_cascading_keys`).
pub fn cascading_foreign_keys(rel: pg_sys::Oid, column: &str) -> Result<bool> {
    Ok(one(&CASCADING_FOREIGN_KEYS, &[arg(rel), arg(column)], |r| r.get::<bool>(1))?.flatten() == Some(true))
}

const PARENT_COLUMNS: Stmt = Stmt {
    sql: "SELECT p.tenant_column::pg_catalog.text FROM pg_catalog.pg_inherits i \
            JOIN tenancy.protected_tables p ON p.rel::pg_catalog.oid OPERATOR(pg_catalog.=) i.inhparent \
           WHERE i.inhrelid OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant columns of `rel`'s protected parents.
pub fn parent_columns(rel: pg_sys::Oid) -> Result<Vec<String>> {
    Ok(run(&PARENT_COLUMNS, &[arg(rel)], |r| r.get::<String>(1))?.into_iter().flatten().collect())
}
