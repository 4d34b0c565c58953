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
use std::ffi::CStr;

use crate::catalog;
use crate::error::{OrRaise, TenancyError};
use crate::hooks::{attname, protected_rangevar};
use crate::probe::list_ptrs;

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

// ---------------------------------------------------------------------------------------------
// What runs before DDL (from the ProcessUtility hook)
// ---------------------------------------------------------------------------------------------

/// Before a utility statement that is not a cursor, EXPLAIN or role statement runs, in a
/// database where something is protected:
/// - DDL that would weaken a protected table, from a role that does not own it, is recorded as
///   `policy_tamper` (PostgreSQL then refuses it for want of ownership, before the guard's event
///   triggers could see it; owners and superusers reach the guard, which refuses and records);
/// - a rule on a protected table is refused (for everyone): a `DO ALSO` rule copies every
///   tenant's rows to wherever it says, a `DO INSTEAD` rule redirects them, and a rule has no use
///   on a protected table that a trigger does not serve;
/// - `ALTER COLUMN ... TYPE ... USING` on a protected table is recorded as `protected_ddl`: its
///   expression runs over every tenant's rows with the owner's rights, once.
///
/// # Safety
/// `node` is the utility statement PostgreSQL is about to run.
pub unsafe fn before_ddl(node: *mut pg_sys::Node) {
    // SAFETY: see above; the casts follow the node tag.
    unsafe {
        if let Some((rel, what)) = weakening_target(node) {
            if !pg_sys::pg_class_ownercheck(rel, pg_sys::GetUserId()) {
                crate::audit::record(crate::audit::Event::PolicyTamper, rel, None, "42501", what);
            }
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_RuleStmt => {
                if let Some((rel, _)) = protected_rangevar((*(node as *mut pg_sys::RuleStmt)).relation) {
                    crate::audit::deny(
                        crate::audit::Event::PolicyTamper,
                        rel,
                        None,
                        "attempt to add a rule to a protected table",
                        TenancyError::Rule,
                    );
                }
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node as *mut pg_sys::AlterTableStmt;
                refuse_loaded_children(stmt);
                let Some((rel, _)) = protected_rangevar((*stmt).relation) else { return };
                let rewrites = list_ptrs((*stmt).cmds).into_iter().any(|c| {
                    let cmd = c as *mut pg_sys::AlterTableCmd;
                    (*cmd).subtype == pg_sys::AlterTableType::AT_AlterColumnType
                        && !(*cmd).def.is_null()
                        && (*(*cmd).def).type_ == pg_sys::NodeTag::T_ColumnDef
                        && !(*((*cmd).def as *mut pg_sys::ColumnDef)).raw_default.is_null()
                });
                if rewrites {
                    crate::audit::record(
                        crate::audit::Event::ProtectedDdl,
                        rel,
                        None,
                        "00000",
                        "ALTER COLUMN ... TYPE ... USING runs its expression over every tenant's rows",
                    );
                }
            }
            _ => {}
        }
    }
}

const HAS_ROWS: catalog::Stmt = catalog::Stmt {
    sql: "SELECT tenancy._has_rows($1::pg_catalog.regclass)",
    args: &[pg_sys::OIDOID],
    who: catalog::Who::Owner,
    fresh: true,
};

/// `ALTER TABLE parent ATTACH PARTITION child` and `ALTER TABLE child INHERIT parent` with a
/// protected parent: a child that already holds rows is refused, protected or not (its rows were
/// written outside the parent's policies, for any tenant the owner chose), unless a superuser
/// attaches it (a bulk load it answers for). Checked before the command runs; the guard checks
/// an unprotected child again after it ran.
unsafe fn refuse_loaded_children(stmt: *mut pg_sys::AlterTableStmt) {
    // SAFETY: the AlterTableStmt about to run; the casts follow the node tags.
    unsafe {
        if pg_sys::superuser() {
            return;
        }
        for c in list_ptrs((*stmt).cmds) {
            let cmd = c as *mut pg_sys::AlterTableCmd;
            let (parent, child) = match (*cmd).subtype {
                pg_sys::AlterTableType::AT_AttachPartition
                    if !(*cmd).def.is_null() && (*(*cmd).def).type_ == pg_sys::NodeTag::T_PartitionCmd =>
                {
                    ((*stmt).relation, (*((*cmd).def as *mut pg_sys::PartitionCmd)).name)
                }
                pg_sys::AlterTableType::AT_AddInherit
                    if !(*cmd).def.is_null() && (*(*cmd).def).type_ == pg_sys::NodeTag::T_RangeVar =>
                {
                    ((*cmd).def as *mut pg_sys::RangeVar, (*stmt).relation)
                }
                _ => continue,
            };
            let Some((parent_rel, _)) = protected_rangevar(parent) else { continue };
            if child.is_null() || !(*child).catalogname.is_null() {
                continue;
            }
            let child_rel = pg_sys::RangeVarGetRelidExtended(
                child,
                pg_sys::NoLock as _,
                pg_sys::RVROption::RVR_MISSING_OK as _,
                None,
                std::ptr::null_mut(),
            );
            if child_rel == pg_sys::InvalidOid {
                continue;
            }
            let loaded = catalog::one(&HAS_ROWS, &[catalog::arg(child_rel)], |r| r.get::<bool>(1))
                .or_raise()
                .flatten()
                .unwrap_or(true);
            if loaded {
                crate::audit::deny(crate::audit::Event::PolicyTamper, parent_rel, None, "attempt to attach a table that already holds rows to a protected table", TenancyError::LoadedChild);
            }
        }
    }
}

/// The protected table a utility statement would weaken, and how.
#[allow(non_upper_case_globals)]
unsafe fn weakening_target(node: *mut pg_sys::Node) -> Option<(pg_sys::Oid, &'static str)> {
    use pg_sys::AlterTableType::*;
    use pg_sys::NodeTag::*;
    if node.is_null() {
        return None;
    }
    // SAFETY (whole function): casts follow the node tag.
    unsafe {
        match (*node).type_ {
            T_AlterTableStmt => {
                let stmt = node as *mut pg_sys::AlterTableStmt;
                let (rel, attno) = protected_rangevar((*stmt).relation)?;
                let tenant_col = attname(rel, attno);
                for c in list_ptrs((*stmt).cmds) {
                    let cmd = c as *mut pg_sys::AlterTableCmd;
                    let on_tenant_col = !(*cmd).name.is_null()
                        && tenant_col.as_deref() == Some(CStr::from_ptr((*cmd).name).to_bytes());
                    let what = match (*cmd).subtype {
                        AT_DisableRowSecurity => Some("attempt to disable row level security"),
                        AT_NoForceRowSecurity => Some("attempt to stop forcing row level security"),
                        AT_DisableTrig | AT_DisableTrigAll | AT_DisableTrigUser | AT_EnableReplicaTrig => {
                            Some("attempt to disable a trigger of a protected table")
                        }
                        AT_DropColumn | AT_AlterColumnType | AT_ColumnDefault | AT_DropNotNull if on_tenant_col => {
                            Some("attempt to drop or alter the tenant column")
                        }
                        _ => None,
                    };
                    if let Some(what) = what {
                        return Some((rel, what));
                    }
                }
                None
            }
            T_AlterPolicyStmt => {
                let stmt = node as *mut pg_sys::AlterPolicyStmt;
                protected_rangevar((*stmt).table).map(|(rel, _)| (rel, "attempt to alter a policy of a protected table"))
            }
            T_CreatePolicyStmt => {
                let stmt = node as *mut pg_sys::CreatePolicyStmt;
                if !(*stmt).permissive {
                    return None;
                }
                protected_rangevar((*stmt).table)
                    .map(|(rel, _)| (rel, "attempt to add a permissive policy to a protected table"))
            }
            T_DropStmt => {
                let stmt = node as *mut pg_sys::DropStmt;
                if (*stmt).removeType != pg_sys::ObjectType::OBJECT_POLICY
                    && (*stmt).removeType != pg_sys::ObjectType::OBJECT_TRIGGER
                {
                    return None;
                }
                for o in list_ptrs((*stmt).objects) {
                    let names = o as *mut pg_sys::List;
                    if names.is_null() || (*names).length < 2 {
                        continue;
                    }
                    let table = pg_sys::list_copy_head(names, (*names).length - 1);
                    if let Some((rel, _)) = protected_rangevar(pg_sys::makeRangeVarFromNameList(table)) {
                        return Some((rel, "attempt to drop a policy or trigger of a protected table"));
                    }
                }
                None
            }
            _ => None,
        }
    }
}


// ---------------------------------------------------------------------------------------------
// protect() / unprotect()
// ---------------------------------------------------------------------------------------------

/// The table, its tenant column and the DDL that protects it.
struct Plan {
    table: String,
    column: String,
    type_oid: pg_sys::Oid,
    cast: &'static str,
    attnum: i16,
}

const TABLE_DEFINITION: catalog::Stmt = catalog::Stmt {
    sql: "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, \
                 c.relkind::pg_catalog.text, a.attnum, a.atttypid, c.relpersistence::pg_catalog.text \
            FROM pg_catalog.pg_class c \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
            LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
                 AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name \
                 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
           WHERE c.oid OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: catalog::Who::Caller,
    fresh: false,
};

fn plan(rel: pg_sys::Oid, column: &str) -> Plan {
    let row = catalog::one(&TABLE_DEFINITION, &[catalog::arg(rel), catalog::arg(column)], |t| {
        (
            t.get::<String>(1).unwrap_or_default(),
            t.get::<String>(2).unwrap_or_default(),
            t.get::<String>(3).unwrap_or_default(),
            t.get::<i16>(4),
            t.get::<pg_sys::Oid>(5),
            t.get::<String>(6).unwrap_or_default(),
        )
    })
    .or_raise();
    let Some((schema, name, kind, attnum, type_oid, persistence)) = row else {
        fail(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, "relation does not exist".into(), "Pass an existing table.");
    };
    let table = quote_qualified_identifier(&schema, &name);
    if kind != "r" && kind != "p" {
        fail(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{table} is not a table"),
            "Only ordinary and partitioned tables can be protected.",
        );
    }
    if persistence == "t" {
        TenancyError::TemporaryTable.raise();
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

/// One statement protect() runs; a `DropPolicyIfExists` step runs only when the policy exists
/// (so that protect() is re-runnable, as a repair).
enum Step {
    Run(String),
    DropPolicyIfExists(&'static str, String),
}

impl Step {
    fn sql(&self) -> &str {
        match self {
            Step::Run(s) | Step::DropPolicyIfExists(_, s) => s,
        }
    }
}

impl Plan {
    /// The statements `protect()` runs, in order.
    fn steps(&self) -> Vec<Step> {
        let (t, c, cast) = (&self.table, &self.column, self.cast);
        // A row of another tenant fails the first test of WITH CHECK and reaches _write_denied,
        // which records the attempt and returns false; rows of the current tenant never call it.
        vec![
            Step::Run(format!("ALTER TABLE {t} ENABLE ROW LEVEL SECURITY")),
            Step::Run(format!("ALTER TABLE {t} FORCE ROW LEVEL SECURITY")),
            Step::DropPolicyIfExists(ISOLATION_POLICY, format!("DROP POLICY IF EXISTS {ISOLATION_POLICY} ON {t}")),
            Step::Run(format!(
                "CREATE POLICY {ISOLATION_POLICY} ON {t} AS PERMISSIVE FOR ALL TO PUBLIC \
                 USING ({c} OPERATOR(pg_catalog.=) (SELECT tenancy.current_tenant()::{cast})) \
                 WITH CHECK ({c} OPERATOR(pg_catalog.=) (SELECT tenancy.writable_tenant()::{cast}) \
                 OR tenancy._write_denied({c}::pg_catalog.text))"
            )),
            Step::DropPolicyIfExists(WRITE_GUARD_POLICY, format!("DROP POLICY IF EXISTS {WRITE_GUARD_POLICY} ON {t}")),
            Step::Run(format!(
                "CREATE POLICY {WRITE_GUARD_POLICY} ON {t} AS RESTRICTIVE FOR DELETE TO PUBLIC \
                 USING ((SELECT tenancy.writable_tenant()) IS NOT NULL)"
            )),
            Step::Run(format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT tenancy.current_tenant()::{cast}")),
            Step::Run(format!(
                "CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION tenancy.truncate_guard()"
            )),
        ]
    }

    fn index_statement(&self) -> String {
        format!("CREATE INDEX ON {} ({})", self.table, self.column)
    }
}

const POLICY_EXISTS: catalog::Stmt = catalog::Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid OPERATOR(pg_catalog.=) $1 \
                           AND polname OPERATOR(pg_catalog.=) $2::pg_catalog.name)",
    args: &[pg_sys::OIDOID, pg_sys::TEXTOID],
    who: catalog::Who::Caller,
    fresh: false,
};

fn policy_exists(rel: pg_sys::Oid, name: &str) -> bool {
    catalog::one(&POLICY_EXISTS, &[catalog::arg(rel), catalog::arg(name)], |r| r.get::<bool>(1))
        .or_raise()
        .flatten()
        .unwrap_or(false)
}

const CHILDREN: catalog::Stmt = catalog::Stmt {
    sql: "SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) $1 ORDER BY 1",
    args: &[pg_sys::OIDOID],
    who: catalog::Who::Caller,
    fresh: false,
};

fn children(rel: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    catalog::run(&CHILDREN, &[catalog::arg(rel)], |r| r.get::<pg_sys::Oid>(1)).or_raise().into_iter().flatten().collect()
}

const LEADING_INDEX: catalog::Stmt = catalog::Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index WHERE indrelid OPERATOR(pg_catalog.=) $1 \
                           AND indkey[0] OPERATOR(pg_catalog.=) $2)",
    args: &[pg_sys::OIDOID, pg_sys::INT2OID],
    who: catalog::Who::Caller,
    fresh: false,
};

const UNPROTECTED_PARENT: catalog::Stmt = catalog::Stmt {
    sql: "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i \
                          WHERE i.inhrelid OPERATOR(pg_catalog.=) $1 \
                            AND NOT EXISTS (SELECT 1 FROM tenancy.protected_tables p \
                                             WHERE p.rel::pg_catalog.oid OPERATOR(pg_catalog.=) i.inhparent))",
    args: &[pg_sys::OIDOID],
    who: catalog::Who::Owner,
    fresh: true,
};

/// Run DDL as the caller, with a pinned search_path (the statements name everything in full).
fn run(sql: &str) {
    let _path = catalog::PinnedSearchPath::new();
    Spi::run(sql).unwrap_or_else(|e| pgrx::error!("pg_tenancy: {e}"));
}

fn protect_oid(rel: pg_sys::Oid, column: &str, create_index: bool, out: &mut Vec<String>) {
    let p = plan(rel, column);
    // Re-keying a protected table onto another column (one the owner filled with one tenant's
    // id, say) would hand that tenant every row: only through unprotect(), a superuser's act.
    if let Some(existing) = catalog::protected_column(rel).or_raise() {
        if existing != column {
            crate::audit::deny(crate::audit::Event::PolicyTamper, rel, None, "attempt to protect a protected table on another tenant column", TenancyError::Rekey);
        }
    }
    // Row security applies the policies of the table a query names, not its children's: a parent
    // that is not protected would return this table's rows without them.
    if catalog::one(&UNPROTECTED_PARENT, &[catalog::arg(rel)], |r| r.get::<bool>(1)).or_raise().flatten() == Some(true) {
        crate::audit::deny(crate::audit::Event::PolicyTamper, rel, None, "attempt to protect a table under a parent that is not protected", TenancyError::UnprotectedParent);
    }
    let _exempt = Exempt::new(rel);
    // The DDL runs as the caller: PostgreSQL itself requires that the caller owns the table.
    for step in p.steps() {
        if let Step::DropPolicyIfExists(name, _) = &step {
            if !policy_exists(rel, name) {
                continue;
            }
        }
        run(step.sql());
        out.push(step.sql().to_string());
    }
    // SAFETY: GetUserId reads a backend-local variable.
    let invoker = unsafe { pg_sys::GetUserId() };
    catalog::register(rel, column, p.type_oid, invoker).or_raise();

    let indexed = catalog::one(&LEADING_INDEX, &[catalog::arg(rel), catalog::arg(p.attnum)], |r| r.get::<bool>(1))
        .or_raise()
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
    let mut sql = plan(rel, tenant_column).steps().iter().map(|s| s.sql().to_string()).collect::<Vec<_>>().join(";\n");
    sql.push_str(";\n");
    sql
}

const SCHEMA_TABLES: catalog::Stmt = catalog::Stmt {
    sql: "SELECT c.oid FROM pg_catalog.pg_class c \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
            JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid \
           WHERE n.nspname OPERATOR(pg_catalog.=) $1::pg_catalog.name \
             AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name AND NOT a.attisdropped \
             AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.char[]) AND NOT c.relispartition \
             AND c.relpersistence OPERATOR(pg_catalog.<>) 't' \
           ORDER BY c.relname",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: catalog::Who::Caller,
    fresh: false,
};

/// Protect every table of a schema that has the tenant column (partitions through their parent).
#[pg_extern(volatile, parallel_unsafe)]
fn _protect_schema(schema: &str, tenant_column: &str, create_index: bool) -> SetOfIterator<'static, String> {
    let tables: Vec<pg_sys::Oid> = catalog::run(&SCHEMA_TABLES, &[catalog::arg(schema), catalog::arg(tenant_column)], |r| {
        r.get::<pg_sys::Oid>(1)
    })
    .or_raise()
    .into_iter()
    .flatten()
    .collect();
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
    let Some(column) = catalog::protected_column(rel).or_raise() else { return };
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
    catalog::unregister(rel).or_raise();
}

/// Remove the protection (and its partitions'). The only sanctioned way to weaken it;
/// not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn _unprotect(rel: pg_sys::Oid) -> SetOfIterator<'static, String> {
    let mut out = Vec::new();
    unprotect_oid(rel, &mut out);
    SetOfIterator::new(out)
}

/// Called by the guard for DDL that puts code over a protected table's rows (an index
/// expression, a CHECK constraint, a trigger, statistics, a generated column) calling functions
/// no superuser approved: records `protected_ddl`. (The functions are listed by check().)
#[pg_extern(volatile, parallel_unsafe)]
fn _record_protected_ddl(rel: pg_sys::Oid, detail: &str) {
    crate::audit::record(crate::audit::Event::ProtectedDdl, rel, None, "00000", detail);
}

/// Whether an expression (a policy's stored `polqual`) calls a function that is not leakproof on
/// a column of the row (PostgreSQL's own test, `contain_leaked_vars`; anything it does not know,
/// a subquery included, counts as leaking). Not executable by PUBLIC: it parses the stored form.
#[pg_extern(immutable, parallel_safe)]
fn _expr_leaks(expr: Option<&str>) -> bool {
    let Some(expr) = expr else { return false };
    let Ok(text) = std::ffi::CString::new(expr) else { return true };
    // SAFETY: `text` is a node tree PostgreSQL printed (pg_policy.polqual); the planner's walker
    // only reads it.
    unsafe {
        let node = pg_sys::stringToNode(text.as_ptr()) as *mut pg_sys::Node;
        pg_sys::contain_leaked_vars(node)
    }
}

/// Whether the role the session acts as (not the owner of the SECURITY DEFINER guard asking) is
/// a superuser.
#[pg_extern(stable, parallel_safe)]
fn _invoker_is_superuser() -> bool {
    // SAFETY: reads the role's catalog entry.
    unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) }
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
        let sql = plan(oid, "t\"id").steps().iter().map(|s| s.sql().to_string()).collect::<Vec<_>>().join("\n");
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
