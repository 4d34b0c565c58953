//! Generated row-level-security policies, and the guard that keeps them in place.
//!
//! `protect()` turns a shared table into a tenant-isolated one: ENABLE and FORCE row level
//! security, one permissive policy for every command (reads filtered by the current tenant,
//! writes checked against the writable tenant), one restrictive DELETE policy (so a read-only
//! tenant or a read-scoped role cannot delete), a DEFAULT of the current tenant, a TRUNCATE
//! guard, and a row in `tenancy.protected_tables`. The statements are rendered from
//! `sql/protect_table.sql` (`pg_tenancy_core::policy`).
//!
//! It fails closed: a table it cannot protect as it is (rules, another permissive policy, a
//! leaky restrictive one, cascading foreign keys to unprotected tables, a nondeterministic
//! collation on the tenant column, an unprotected parent, re-keying onto another column) is
//! refused rather than protected in name only.
//!
//! [`guard`] refuses later changes that would weaken it; [`probe`] and [`explain`] keep the
//! executor from being used as an oracle on it.
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_qualified_identifier};
use pgrx::PgSqlErrorCode;

use pg_tenancy_core::policy::{self, Step, Table};

use crate::audit::{self, Event};
use crate::catalog::{self, protected as registry};
use crate::error::{OrRaise, TenancyError};

pub mod capture;
pub mod explain;
pub mod guard;
pub mod param;
pub mod probe;

use guard::Exempt;

fn fail(code: PgSqlErrorCode, message: String, hint: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(code, message, "pg_tenancy").set_hint(hint).report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// The table, its tenant column, quoted, and the cast the policies use.
struct Plan {
    table: String,
    column: String,
    type_oid: pg_sys::Oid,
    cast: &'static str,
    attnum: i16,
}

impl Plan {
    fn as_table(&self) -> Table<'_> {
        Table { table: &self.table, column: &self.column, cast: self.cast }
    }
}

fn plan(rel: pg_sys::Oid, column: &str) -> Plan {
    let Some(def) = catalog::pg::table_definition(rel, column).or_raise() else {
        fail(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "relation does not exist".into(), "Pass an existing table.");
    };
    let table = quote_qualified_identifier(&def.schema, &def.name);
    if def.relkind != "r" && def.relkind != "p" {
        fail(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{table} is not a table"),
            "Only ordinary and partitioned tables can be protected.",
        );
    }
    if def.persistence == "t" {
        TenancyError::TemporaryTable.raise();
    }
    let Some((attnum, type_oid, deterministic)) = def.column else {
        fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("table {table} has no column {}", quote_identifier(column)),
            "Pass the tenant column as the second argument: tenancy.protect('t', 'tenant_col').",
        );
    };
    let type_name = match type_oid {
        pg_sys::TEXTOID => "text",
        pg_sys::VARCHAROID => "varchar",
        pg_sys::UUIDOID => "uuid",
        pg_sys::INT4OID => "int4",
        pg_sys::INT8OID => "int8",
        _ => "",
    };
    let Some(cast) = policy::cast_for(type_name) else {
        fail(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("tenant column {} of {table} has an unsupported type", quote_identifier(column)),
            "The tenant column must be text, varchar, uuid, integer or bigint.",
        );
    };
    if !deterministic {
        // Under a nondeterministic collation 'T.b' can equal 't.b': two tenant ids, one set of rows.
        TenancyError::Unprotectable(
            "the tenant column has a nondeterministic collation: two different tenant ids could compare equal",
        )
        .raise();
    }
    Plan { table, column: quote_identifier(column), type_oid, cast, attnum }
}

/// Run DDL as the caller, with a pinned search_path (the statements name everything in full).
fn run(sql: &str) {
    let _path = catalog::PinnedSearchPath::new();
    Spi::run(sql).unwrap_or_else(|e| pgrx::error!("pg_tenancy: {e}"));
}

/// Run a protection's steps (a step for a policy runs only when the policy exists).
fn run_steps(rel: pg_sys::Oid, steps: Vec<Step>, out: &mut Vec<String>) {
    for Step { if_policy_exists, sql, .. } in steps {
        if let Some(name) = if_policy_exists {
            if !catalog::pg::policy_exists(rel, name).or_raise() {
                continue;
            }
        }
        run(&sql);
        out.push(sql);
    }
}

/// Refuse a table that already carries something a protection could not stand beside. Judged
/// for the role that issued the statement (the guard protects new partitions with its owner's
/// rights, which must not waive anything).
fn refuse_defenseless(rel: pg_sys::Oid, column: &str) {
    let d = catalog::pg::defenses(rel).or_raise();
    let superuser = guard::invoker_is_superuser();
    let why = if d.rules > 0 {
        Some("the table has rules: a rule could copy or redirect every tenant's rows")
    } else if d.permissive > 0 {
        Some("the table has another permissive policy: it would widen what each tenant sees")
    } else if !superuser && d.restrictive_quals.iter().any(|q| guard::expr_leaks(q)) {
        Some("a restrictive policy calls a function that is not leakproof on the row: it would run before the tenant filter")
    } else if !superuser && catalog::protected::cascading_foreign_keys(rel, column).or_raise() {
        Some("a foreign key of the table references a table that is not protected on a paired tenant column: its actions would change every tenant's rows, and its checks tell which keys other tenants hold")
    } else {
        None
    };
    if let Some(why) = why {
        audit::deny(Event::PolicyTamper, rel, None, why, TenancyError::Unprotectable(why));
    }
}

fn protect_oid(rel: pg_sys::Oid, column: &str, create_index: bool, out: &mut Vec<String>) {
    let p = plan(rel, column);
    // Re-keying a protected table onto another column (one the owner filled with one tenant's
    // id, say) would hand that tenant every row: only through unprotect(), a superuser's act.
    if let Some(existing) = registry::protected_column(rel).or_raise() {
        if existing != column {
            audit::deny(
                Event::PolicyTamper,
                rel,
                None,
                "attempt to protect a protected table on another tenant column",
                TenancyError::Rekey,
            );
        }
    }
    // Row security applies the policies of the table a query names, not its children's: a parent
    // that is not protected would return this table's rows without them.
    if registry::has_unprotected_parent(rel).or_raise() {
        audit::deny(
            Event::PolicyTamper,
            rel,
            None,
            "attempt to protect a table under a parent that is not protected",
            TenancyError::UnprotectedParent,
        );
    }
    // A protected parent on another column would re-key this table (its rows would answer to
    // that column's tenants through the parent).
    if catalog::protected::parent_columns(rel).or_raise().iter().any(|c| c != column) {
        audit::deny(
            Event::PolicyTamper,
            rel,
            None,
            "attempt to protect a table on another tenant column than its protected parent",
            TenancyError::Rekey,
        );
    }
    refuse_defenseless(rel, column);
    let _exempt = Exempt::new(rel);
    // The DDL runs as the caller: PostgreSQL itself requires that the caller owns the table.
    run_steps(rel, policy::protect(&p.as_table()), out);
    out.extend(capture::on_protect(rel));
    // SAFETY: GetUserId reads a backend-local variable.
    let invoker = unsafe { pg_sys::GetUserId() };
    registry::register(rel, column, p.type_oid, invoker).or_raise();
    // What it now is must be what the guard keeps (fail closed, whatever was there before).
    if registry::protection_problem(rel).or_raise().is_some() {
        let why = "the protection is not complete after protect() (tenancy.check() says what weakens it)";
        audit::deny(Event::PolicyTamper, rel, None, why, TenancyError::Unprotectable(why));
    }
    // Code already there that would run over every tenant's rows: refused unless a superuser
    // approved it (or is the one protecting the table: then recorded, and listed by check()).
    if let Some(functions) = registry::unapproved_row_functions(rel).or_raise() {
        if !guard::invoker_is_superuser() {
            guard::refuse_unapproved(rel, &functions);
        }
        let detail = format!("protect() of a table whose rows run unapproved functions: {functions}");
        audit::record(Event::ProtectedDdl, rel, None, "00000", crate::util::truncate(&detail, 200));
    }
    // Its foreign keys into other protected tables must pair the tenant columns.
    if !guard::invoker_is_superuser() && registry::keys_into_protected(rel).or_raise().is_some() {
        let why = "a foreign key of the table references a protected table without pairing the tenant columns: its check would tell whether another tenant's row exists";
        audit::deny(Event::PolicyTamper, rel, None, why, TenancyError::Unprotectable(why));
    }

    if !catalog::pg::has_leading_index(rel, p.attnum).or_raise() {
        let index = policy::index(&p.as_table());
        if create_index {
            run(&index);
            out.push(index);
        } else {
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_WARNING,
                format!("no index of {} leads with the tenant column", p.table),
                "pg_tenancy",
            )
            .set_hint(format!("Every query filters on it: {index} (or CONCURRENTLY), or protect(..., create_index => true)."))
            .report(PgLogLevel::WARNING);
        }
    }
    for child in catalog::pg::children(rel).or_raise() {
        protect_oid(child, column, create_index, out);
    }
}

// The SQL-facing functions take their arguments as regclass/name through the wrappers in
// sql/protect.sql. They take OIDs rather than an opened relation on purpose: ALTER TABLE refuses
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
    let p = plan(rel, tenant_column);
    let mut sql = policy::protect(&p.as_table()).into_iter().map(|s| s.sql).collect::<Vec<_>>().join(";\n");
    sql.push_str(";\n");
    sql
}

/// Protect every table of a schema that has the tenant column (partitions through their parent).
#[pg_extern(volatile, parallel_unsafe)]
fn _protect_schema(schema: &str, tenant_column: &str, create_index: bool) -> SetOfIterator<'static, String> {
    let tables = catalog::pg::schema_tables(schema, tenant_column).or_raise();
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
    for child in catalog::pg::children(rel).or_raise() {
        unprotect_oid(child, out);
    }
    let Some(column) = registry::protected_column(rel).or_raise() else { return };
    let p = plan_unchecked(rel, &column);
    let _exempt = Exempt::new(rel);
    out.extend(capture::on_unprotect(rel));
    run_steps(rel, policy::unprotect(&p.as_table()), out);
    registry::unregister(rel).or_raise();
}

/// The identifiers of a protected table, for unprotect() (which must work whatever the table
/// became: a collation or type that protect() would refuse does not matter to removing it).
fn plan_unchecked(rel: pg_sys::Oid, column: &str) -> Plan {
    let Some(def) = catalog::pg::table_definition(rel, column).or_raise() else {
        fail(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "relation does not exist".into(), "Pass an existing table.");
    };
    Plan {
        table: quote_qualified_identifier(&def.schema, &def.name),
        column: quote_identifier(column),
        type_oid: def.column.map(|c| c.1).unwrap_or(pg_sys::InvalidOid),
        cast: "pg_catalog.text",
        attnum: def.column.map(|c| c.0).unwrap_or(0),
    }
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
        let sql = policy::protect(&plan(oid, "t\"id").as_table()).into_iter().map(|s| s.sql).collect::<Vec<_>>().join("\n");
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
