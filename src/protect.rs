//! Generated row-level-security policies, and the guard that keeps them in place.
//!
//! `protect()` turns a shared table into a tenant-isolated one: ENABLE and FORCE row level
//! security, one permissive policy for every command (reads filtered by the current tenant,
//! writes checked against the writable tenant), one restrictive DELETE policy (so a read-only
//! tenant or a read-scoped role cannot delete), a DEFAULT of the current tenant, a TRUNCATE
//! guard, and a row in `tenancy.protected_tables`. The policies read the context in initPlan
//! form, `col = (SELECT tenancy.current_tenant()::type)`: once per statement, and usable as an
//! index condition.
//!
//! The event triggers in sql/finalize.sql refuse any later change that weakens this, unless it
//! comes from `protect()`/`unprotect()` themselves, which mark the relation as exempt for the
//! duration of their own DDL.
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_qualified_identifier};
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;

use crate::catalog;
use crate::error::OrRaise;

pub const ISOLATION_POLICY: &str = "tenancy_isolation";
pub const WRITE_GUARD_POLICY: &str = "tenancy_write_guard";
pub const TRUNCATE_TRIGGER: &str = "tenancy_truncate_guard";

thread_local! {
    /// Relations whose protection this backend is changing right now, through protect/unprotect.
    static EXEMPT: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Marks a relation exempt from the guard while alive (also while unwinding from an error).
struct Exempt(pg_sys::Oid);

impl Exempt {
    fn new(rel: pg_sys::Oid) -> Self {
        EXEMPT.with(|e| e.borrow_mut().push(rel));
        Exempt(rel)
    }
}

impl Drop for Exempt {
    fn drop(&mut self) {
        EXEMPT.with(|e| {
            let mut e = e.borrow_mut();
            if let Some(pos) = e.iter().rposition(|r| *r == self.0) {
                e.remove(pos);
            }
        });
    }
}

/// Whether `rel` is being changed by protect()/unprotect() in this backend (read by the guard).
#[pg_extern(stable, parallel_safe, strict)]
fn _guard_exempt(rel: pg_sys::Oid) -> bool {
    EXEMPT.with(|e| e.borrow().contains(&rel))
}

/// Called by the guard event triggers: records `policy_tamper` and refuses the change.
#[pg_extern(volatile, parallel_unsafe)]
fn _refuse_weakening(rel: pg_sys::Oid, problem: &str) {
    crate::audit::record(crate::audit::Event::PolicyTamper, rel, None, "42501", problem);
    let name = crate::audit::relation_name(rel);
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("the tenant isolation of table {name} cannot be weakened"),
        "pg_tenancy",
    )
    .set_detail(problem.to_string())
    .set_hint(
        "Remove the protection on purpose with tenancy.unprotect(), or repair it with tenancy.protect(). \
Restoring a dump? Run it with PGOPTIONS='-c pg_tenancy.guard=off' as a superuser.",
    )
    .report(PgLogLevel::ERROR);
}

/// BEFORE TRUNCATE trigger of protected tables: TRUNCATE ignores row level security and would
/// remove every tenant's rows. Recorded as `cross_tenant_write`.
#[pg_trigger]
fn truncate_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let rel = trigger.relation()?;
    crate::audit::record(
        crate::audit::Event::CrossTenantWrite,
        rel.oid(),
        None,
        "42501",
        "TRUNCATE of a protected table (it would remove every tenant's rows)",
    );
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("TRUNCATE is refused on protected table {}", rel.name()),
        "pg_tenancy",
    )
    .set_detail("TRUNCATE ignores row level security and would remove every tenant's rows.")
    .set_hint("Delete the current tenant's rows with DELETE, or remove the protection with tenancy.unprotect().")
    .report(PgLogLevel::ERROR);
    Ok(None)
}

fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "pg_tenancy").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// The table, its tenant column and the DDL that protects it.
struct Plan {
    table: String,
    column: String,
    type_oid: pg_sys::Oid,
    cast: &'static str,
    attnum: i16,
}

fn plan(rel: pg_sys::Oid, column: &str) -> Plan {
    let row = Spi::connect(|c| -> std::result::Result<_, pgrx::spi::Error> {
        let t = c
            .select(
                "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, \
                        c.relkind::pg_catalog.text, a.attnum, a.atttypid \
                   FROM pg_catalog.pg_class c \
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
                   LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
                        AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name \
                        AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
                  WHERE c.oid OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[rel.into(), column.into()],
            )?
            .first();
        Ok((
            t.get::<String>(1)?.unwrap_or_default(),
            t.get::<String>(2)?.unwrap_or_default(),
            t.get::<String>(3)?.unwrap_or_default(),
            t.get::<i16>(4)?,
            t.get::<pg_sys::Oid>(5)?,
        ))
    })
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not read the table definition: {e}"));
    let (schema, name, kind, attnum, type_oid) = row;
    let table = quote_qualified_identifier(&schema, &name);
    if kind != "r" && kind != "p" {
        fail(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{table} is not a table"),
            "Only ordinary and partitioned tables can be protected.",
        );
    }
    let (Some(attnum), Some(type_oid)) = (attnum, type_oid) else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {table} has no column {}", quote_identifier(column)),
            "Pass the tenant column as the second argument: tenancy.protect('t', 'tenant_col').",
        );
    };
    let cast = match type_oid {
        pg_sys::TEXTOID => "pg_catalog.text",
        pg_sys::VARCHAROID => "pg_catalog.varchar",
        pg_sys::UUIDOID => "pg_catalog.uuid",
        pg_sys::INT4OID => "pg_catalog.int4",
        pg_sys::INT8OID => "pg_catalog.int8",
        _ => fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("tenant column {} of {table} has an unsupported type", quote_identifier(column)),
            "The tenant column must be text, varchar, uuid, integer or bigint.",
        ),
    };
    Plan { table, column: quote_identifier(column), type_oid, cast, attnum }
}

impl Plan {
    /// The statements `protect()` runs, in order. `DROP POLICY IF EXISTS` keeps it re-runnable.
    fn statements(&self) -> Vec<String> {
        let (t, c, cast) = (&self.table, &self.column, self.cast);
        // A row of another tenant fails the first test of WITH CHECK and reaches _write_denied,
        // which records the attempt and returns false; rows of the current tenant never call it.
        vec![
            format!("ALTER TABLE {t} ENABLE ROW LEVEL SECURITY"),
            format!("ALTER TABLE {t} FORCE ROW LEVEL SECURITY"),
            format!("DROP POLICY IF EXISTS {ISOLATION_POLICY} ON {t}"),
            format!(
                "CREATE POLICY {ISOLATION_POLICY} ON {t} AS PERMISSIVE FOR ALL TO PUBLIC \
                 USING ({c} OPERATOR(pg_catalog.=) (SELECT tenancy.current_tenant()::{cast})) \
                 WITH CHECK ({c} OPERATOR(pg_catalog.=) (SELECT tenancy.writable_tenant()::{cast}) \
                 OR tenancy._write_denied({c}::pg_catalog.text))"
            ),
            format!("DROP POLICY IF EXISTS {WRITE_GUARD_POLICY} ON {t}"),
            format!(
                "CREATE POLICY {WRITE_GUARD_POLICY} ON {t} AS RESTRICTIVE FOR DELETE TO PUBLIC \
                 USING ((SELECT tenancy.writable_tenant()) IS NOT NULL)"
            ),
            format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT tenancy.current_tenant()::{cast}"),
            format!(
                "CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION tenancy.truncate_guard()"
            ),
        ]
    }

    fn index_statement(&self) -> String {
        format!("CREATE INDEX ON {} ({})", self.table, self.column)
    }
}

fn policy_exists(rel: pg_sys::Oid, name: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) $1 \
                          AND polname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
        &[rel.into(), name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

fn children(rel: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    Spi::connect(|c| -> std::result::Result<_, pgrx::spi::Error> {
        let mut out = Vec::new();
        for row in c.select(
            "SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) $1 ORDER BY 1",
            None,
            &[rel.into()],
        )? {
            if let Some(oid) = row.get::<pg_sys::Oid>(1)? {
                out.push(oid);
            }
        }
        Ok(out)
    })
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not list partitions: {e}"))
}

fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| pgrx::error!("pg_tenancy: {e}"));
}

fn protect_oid(rel: pg_sys::Oid, column: &str, create_index: bool, out: &mut Vec<String>) {
    let p = plan(rel, column);
    let _exempt = Exempt::new(rel);
    // The DDL runs as the caller: PostgreSQL itself requires that the caller owns the table.
    for sql in p.statements() {
        if sql.starts_with("DROP POLICY IF EXISTS") {
            let name = if sql.contains(ISOLATION_POLICY) { ISOLATION_POLICY } else { WRITE_GUARD_POLICY };
            if !policy_exists(rel, name) {
                continue;
            }
        }
        run(&sql);
        out.push(sql);
    }
    // SAFETY: GetUserId reads a backend-local variable.
    let invoker = unsafe { pg_sys::GetUserId() };
    catalog::as_owner(|| {
        Spi::run_with_args(
            "INSERT INTO tenancy.protected_tables AS p (rel, tenant_column, column_type, protected_by) \
             VALUES ($1::pg_catalog.oid::pg_catalog.regclass, $2, $3::pg_catalog.oid::pg_catalog.regtype, \
                     $4::pg_catalog.oid::pg_catalog.regrole) \
             ON CONFLICT (rel) DO UPDATE SET tenant_column = EXCLUDED.tenant_column, \
                column_type = EXCLUDED.column_type, protected_by = EXCLUDED.protected_by, \
                protected_at = pg_catalog.now()",
            &[rel.into(), column.into(), p.type_oid.into(), invoker.into()],
        )?;
        Spi::run_with_args(
            "UPDATE tenancy.protected_tables SET fingerprint = tenancy._policy_fingerprint(rel) \
              WHERE rel OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[rel.into()],
        )
    })
    .or_raise()
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not register the table: {e}"));

    let indexed = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index WHERE indrelid OPERATOR(pg_catalog.=) $1 \
                          AND indkey[0] OPERATOR(pg_catalog.=) $2)",
        &[rel.into(), p.attnum.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !indexed {
        if create_index {
            let sql = p.index_statement();
            run(&sql);
            out.push(sql);
        } else {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_WARNING,
                format!("no index of {} leads with the tenant column", p.table),
                "pg_tenancy",
            )
            .set_hint(format!(
                "Every query filters on it: {} (or CONCURRENTLY), or protect(..., create_index => true).",
                p.index_statement()
            ))
            .report(PgLogLevel::WARNING);
        }
    }
    for child in children(rel) {
        protect_oid(child, column, create_index, out);
    }
}

// The SQL-facing functions take their arguments as regclass/name through the wrappers in
// sql/finalize.sql. They take OIDs rather than an opened relation on purpose: ALTER TABLE refuses
// to run on a relation that the calling function holds open.

/// Protect a shared table: see the module documentation. Returns the statements it ran.
#[pg_extern(volatile, parallel_unsafe)]
fn _protect(rel: pg_sys::Oid, tenant_column: &str, create_index: bool) -> SetOfIterator<'static, String> {
    let mut out = Vec::new();
    protect_oid(rel, tenant_column, create_index, &mut out);
    SetOfIterator::new(out)
}

/// The DDL `protect()` would run for this table, without running it.
#[pg_extern(stable, parallel_safe)]
fn _policy_sql(rel: pg_sys::Oid, tenant_column: &str) -> String {
    let mut sql = plan(rel, tenant_column).statements().join(";\n");
    sql.push_str(";\n");
    sql
}

/// Protect every table of a schema that has the tenant column (partitions through their parent).
#[pg_extern(volatile, parallel_unsafe)]
fn _protect_schema(schema: &str, tenant_column: &str, create_index: bool) -> SetOfIterator<'static, String> {
    let tables = Spi::connect(|c| -> std::result::Result<_, pgrx::spi::Error> {
        let mut out = Vec::new();
        for row in c.select(
            "SELECT c.oid FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
               JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
              WHERE n.nspname OPERATOR(pg_catalog.=) $1::pg_catalog.name \
                AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name AND NOT a.attisdropped \
                AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.char[]) AND NOT c.relispartition \
              ORDER BY c.relname",
            None,
            &[schema.into(), tenant_column.into()],
        )? {
            if let Some(oid) = row.get::<pg_sys::Oid>(1)? {
                out.push(oid);
            }
        }
        Ok(out)
    })
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not list the schema's tables: {e}"));
    if tables.is_empty() {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("schema {} has no table with column {}", quote_identifier(schema), quote_identifier(tenant_column)),
            "Check the schema and column names.",
        );
    }
    let mut out = Vec::new();
    for rel in tables {
        protect_oid(rel, tenant_column, create_index, &mut out);
    }
    SetOfIterator::new(out)
}

fn unprotect_oid(rel: pg_sys::Oid, out: &mut Vec<String>) {
    for child in children(rel) {
        unprotect_oid(child, out);
    }
    let registered = catalog::as_owner(|| {
        Spi::get_one_with_args::<String>(
            "SELECT tenant_column::pg_catalog.text FROM tenancy.protected_tables \
              WHERE rel OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[rel.into()],
        )
    })
    .or_raise()
    .ok()
    .flatten();
    let Some(column) = registered else { return };
    let p = plan(rel, &column);
    let _exempt = Exempt::new(rel);
    let t = &p.table;
    let mut statements = vec![];
    for name in [ISOLATION_POLICY, WRITE_GUARD_POLICY] {
        if policy_exists(rel, name) {
            statements.push(format!("DROP POLICY {name} ON {t}"));
        }
    }
    statements.push(format!("DROP TRIGGER IF EXISTS {TRUNCATE_TRIGGER} ON {t}"));
    statements.push(format!("ALTER TABLE {t} ALTER COLUMN {} DROP DEFAULT", p.column));
    statements.push(format!("ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY"));
    statements.push(format!("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY"));
    for sql in statements {
        run(&sql);
        out.push(sql);
    }
    catalog::as_owner(|| {
        Spi::run_with_args(
            "DELETE FROM tenancy.protected_tables WHERE rel OPERATOR(pg_catalog.=) $1::pg_catalog.oid::pg_catalog.regclass",
            &[rel.into()],
        )
    })
    .or_raise()
    .unwrap_or_else(|e| pgrx::error!("pg_tenancy could not unregister the table: {e}"));
}

/// Remove the protection (and its partitions'). The only sanctioned way to weaken it;
/// not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn _unprotect(rel: pg_sys::Oid) -> SetOfIterator<'static, String> {
    let mut out = Vec::new();
    unprotect_oid(rel, &mut out);
    SetOfIterator::new(out)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn generated_sql_quotes_hostile_identifiers() {
        Spi::run("CREATE TABLE x (v int)").unwrap();
        Spi::run(r#"CREATE TABLE "we ird""; DROP TABLE x; --" ("t""id" text, v int)"#).unwrap();
        let oid = Spi::get_one::<pg_sys::Oid>(r#"SELECT '"we ird""; DROP TABLE x; --"'::regclass::oid"#)
            .unwrap()
            .unwrap();
        let sql = plan(oid, "t\"id").statements().join("\n");
        assert!(sql.contains(r#"ON public."we ird""; DROP TABLE x; --" AS PERMISSIVE"#), "{sql}");
        assert!(sql.contains(r#"USING ("t""id" OPERATOR(pg_catalog.=)"#), "{sql}");
        // running them protects the hostile table and does nothing else
        let n = Spi::get_one::<i64>(r#"SELECT count(*) FROM tenancy.protect('"we ird""; DROP TABLE x; --"', 't"id')"#)
            .unwrap();
        assert_eq!(n, Some(6));
        assert_eq!(Spi::get_one::<bool>("SELECT to_regclass('x') IS NOT NULL").unwrap(), Some(true));
        assert_eq!(
            Spi::get_one::<i64>(&format!("SELECT count(*) FROM pg_policy WHERE polrelid = {}", u32::from(oid))).unwrap(),
            Some(2)
        );
    }

    #[pg_test]
    fn exemption_lasts_exactly_as_long_as_protect() {
        let rel = pg_sys::Oid::from(4242u32);
        assert!(!_guard_exempt(rel));
        {
            let _e = Exempt::new(rel);
            assert!(_guard_exempt(rel));
        }
        assert!(!_guard_exempt(rel));
    }

    #[pg_test]
    fn protect_round_trip() {
        Spi::run("CREATE TABLE rt (tenant_id int8 NOT NULL, v int)").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM tenancy.protect('rt', create_index => true)").unwrap();
        assert_eq!(n, Some(7));
        assert_eq!(Spi::get_one::<bool>("SELECT relforcerowsecurity FROM pg_class WHERE relname = 'rt'").unwrap(), Some(true));
        assert_eq!(Spi::get_one::<String>("SELECT tenancy._protection_problem('rt')").unwrap(), None);
        Spi::run("SELECT count(*) FROM tenancy.unprotect('rt')").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT relrowsecurity FROM pg_class WHERE relname = 'rt'").unwrap(), Some(false));
    }
}
