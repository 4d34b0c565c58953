//! The guard: what "weakening a protected table" means, in one place, and what is refused or
//! recorded before DDL runs. The event triggers of `sql/guard.sql` do the rest after it ran
//! (they call the functions here), so that a change is judged on the catalogs as it leaves them.
//!
//! - DDL that would weaken a protected table (disable or un-force row security, disable its
//!   triggers, drop or alter its policies, add a permissive one, drop or retype its tenant
//!   column), from a role that does not own the table, is recorded as `policy_tamper` before
//!   PostgreSQL refuses it for want of ownership (owners and superusers reach the event
//!   triggers, which refuse and record it themselves);
//! - rules on a protected table are refused, for everyone: a `DO ALSO` rule copies every
//!   tenant's rows wherever it says, a `DO INSTEAD` rule redirects them;
//! - attaching a table that holds rows (or is not a plain table) as a partition or child of a
//!   protected one is refused, unless a superuser does it;
//! - DDL that evaluates expressions over every tenant's rows of a protected table with the
//!   owner's rights (`ALTER TABLE`, `CREATE INDEX`, `REINDEX` of a table or of a whole schema,
//!   system or database, `CLUSTER` with or without a table, `VACUUM FULL`, `ANALYZE`,
//!   `ALTER DOMAIN`), run by a role subject to row security, is *shielded*: no message below
//!   ERROR leaves the backend while it runs, and an error it raises reaches the client without
//!   its message, detail or context (which can carry a row's values) unless it is pg_tenancy's
//!   own or of a kind that never quotes a value (`shown_as_is`); the failure is recorded as
//!   `protected_ddl`. `ALTER COLUMN ... TYPE ... USING` is recorded as well.
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;
use std::ffi::CStr;

use crate::audit::{self, Event};
use crate::catalog::protected::protected;
use crate::catalog::{self, list_ptrs};
use crate::error::TenancyError;

/// Relations whose protection this backend is changing right now, through protect/unprotect.
static EXEMPT: crate::util::Backend<RefCell<Vec<pg_sys::Oid>>> = crate::util::Backend::new(RefCell::new(Vec::new()));

/// Marks a relation exempt from the guard while alive (also while unwinding from an error).
pub(super) struct Exempt(pg_sys::Oid);

impl Exempt {
    pub(super) fn new(rel: pg_sys::Oid) -> Self {
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
    audit::record(Event::PolicyTamper, rel, None, "42501", problem);
    let name = catalog::relation_name(rel);
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

/// Refuse DDL that would leave functions no superuser approved running over a protected table's
/// rows, or over the rows a view of one reads (see `_row_functions` and `_view_functions` in
/// sql/guard.sql). Recorded as `policy_tamper`.
#[pg_extern]
fn _refuse_unapproved(rel: pg_sys::Oid, functions: &str) {
    refuse_unapproved(rel, functions)
}

/// See `_refuse_unapproved`.
pub(super) fn refuse_unapproved(rel: pg_sys::Oid, functions: &str) -> ! {
    let detail = format!("functions no superuser approved over protected rows: {functions}");
    audit::record(Event::PolicyTamper, rel, None, "42501", crate::util::truncate(&detail, 200));
    let name = catalog::relation_name(rel);
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("{name} would run functions no superuser approved over protected tenants' rows"),
        "pg_tenancy",
    )
    .set_detail(format!("Functions: {functions}."))
    .set_hint(
        "A superuser reviews each function and approves its definition with \
tenancy.approve_function('name(argument types)', 'reason'); then run the statement again.",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// BEFORE TRUNCATE trigger of protected tables: TRUNCATE ignores row level security and would
/// remove every tenant's rows. Recorded as `cross_tenant_write`.
#[pg_trigger]
fn truncate_guard<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let rel = trigger.relation()?;
    audit::record(
        Event::CrossTenantWrite,
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


/// A protected table `rv` names (without locking it; NULL or unknown names give None; a name
/// with a database is looked up as PostgreSQL does, which refuses another database's).
///
/// # Safety
/// `rv` is NULL or a valid RangeVar.
pub(crate) unsafe fn protected_rangevar(rv: *mut pg_sys::RangeVar) -> Option<(pg_sys::Oid, i16)> {
    // SAFETY: see above.
    let rel = unsafe { rangevar_oid(rv) }?;
    protected(rel).map(|attno| (rel, attno))
}

/// The relation `rv` names, without locking it.
///
/// # Safety
/// `rv` is NULL or a valid RangeVar.
unsafe fn rangevar_oid(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    // SAFETY: see above; a name lookup only, missing_ok.
    unsafe {
        if rv.is_null() {
            return None;
        }
        let rel = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as _,
            pg_sys::RVROption::RVR_MISSING_OK as _,
            None,
            std::ptr::null_mut(),
        );
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

/// The name of attribute `attno` of `rel`.
fn attname(rel: pg_sys::Oid, attno: i16) -> Option<Vec<u8>> {
    // SAFETY: syscache lookup; NULL when missing (missing_ok).
    unsafe {
        let n = pg_sys::get_attname(rel, attno, true);
        (!n.is_null()).then(|| CStr::from_ptr(n).to_bytes().to_vec())
    }
}

/// Whether the role running now is subject to row security (neither superuser nor BYPASSRLS).
fn subject_to_row_security() -> bool {
    // SAFETY: catalog reads of the current role (syscache).
    unsafe {
        let user = pg_sys::GetUserId();
        !pg_sys::superuser_arg(user) && !pg_sys::has_bypassrls_privilege(user)
    }
}

/// Before a utility statement that is not a cursor, EXPLAIN or role statement runs, in a
/// database where something is protected (see the module documentation).
///
/// # Safety
/// `node` is the utility statement PostgreSQL is about to run.
pub unsafe fn before_ddl(node: *mut pg_sys::Node) {
    // SAFETY: see above; the casts follow the node tag.
    unsafe {
        if let Some((rel, what)) = weakening_target(node) {
            if !pg_sys::pg_class_ownercheck(rel, pg_sys::GetUserId()) {
                audit::record(Event::PolicyTamper, rel, None, "42501", what);
            }
        }
        let superuser = pg_sys::superuser();
        match (*node).type_ {
            // A protected table keeps its name and schema (another relation put in its place,
            // say a view that calls the owner's code, would serve its applications); renaming
            // the schema that holds one is the same move.
            pg_sys::NodeTag::T_RenameStmt | pg_sys::NodeTag::T_AlterObjectSchemaStmt if !superuser => {
                if let Some(rel) = moved_protected(node) {
                    audit::deny(
                        Event::PolicyTamper,
                        rel,
                        None,
                        "attempt to rename or move a protected table, or rename its schema",
                        TenancyError::Guarded("a protected table keeps its name and schema: another relation could take its place in the applications' statements"),
                    );
                }
            }
            // Triggers run on every tenant's writes: only the owner (whose code needs a
            // superuser's approval) may add them, not a role that was granted TRIGGER.
            pg_sys::NodeTag::T_CreateTrigStmt if !superuser => {
                let stmt = node as *mut pg_sys::CreateTrigStmt;
                if let Some((rel, _)) = protected_rangevar((*stmt).relation) {
                    if !pg_sys::pg_class_ownercheck(rel, pg_sys::GetUserId()) {
                        audit::deny(
                            Event::PolicyTamper,
                            rel,
                            None,
                            "attempt to create a trigger on a protected table by a role that does not own it",
                            TenancyError::Guarded("only the owner of a protected table may add triggers to it: a trigger runs on every tenant's writes"),
                        );
                    }
                }
            }
            pg_sys::NodeTag::T_RuleStmt => {
                if let Some((rel, _)) = protected_rangevar((*(node as *mut pg_sys::RuleStmt)).relation) {
                    audit::deny(Event::PolicyTamper, rel, None, "attempt to add a rule to a protected table", TenancyError::Rule);
                }
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node as *mut pg_sys::AlterTableStmt;
                refuse_loaded_children(stmt);
                let Some((rel, _)) = protected_rangevar((*stmt).relation) else { return };
                if !superuser {
                    refuse_unsafe_retype(rel, stmt);
                }
                let rewrites = list_ptrs((*stmt).cmds).into_iter().any(|c| {
                    let cmd = c as *mut pg_sys::AlterTableCmd;
                    (*cmd).subtype == pg_sys::AlterTableType::AT_AlterColumnType
                        && !(*cmd).def.is_null()
                        && (*(*cmd).def).type_ == pg_sys::NodeTag::T_ColumnDef
                        && !(*((*cmd).def as *mut pg_sys::ColumnDef)).raw_default.is_null()
                });
                if rewrites {
                    audit::record(
                        Event::ProtectedDdl,
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

/// The protected table a RENAME or SET SCHEMA would move (InvalidOid for a schema holding one).
///
/// # Safety
/// `node` is a RenameStmt or AlterObjectSchemaStmt PostgreSQL is about to run.
unsafe fn moved_protected(node: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    use pg_sys::ObjectType::*;
    // SAFETY: see above; the casts follow the node tag.
    unsafe {
        if (*node).type_ == pg_sys::NodeTag::T_AlterObjectSchemaStmt {
            return protected_rangevar((*(node as *mut pg_sys::AlterObjectSchemaStmt)).relation).map(|r| r.0);
        }
        let stmt = node as *mut pg_sys::RenameStmt;
        match (*stmt).renameType {
            OBJECT_TABLE | OBJECT_FOREIGN_TABLE => protected_rangevar((*stmt).relation).map(|r| r.0),
            OBJECT_SCHEMA if !(*stmt).subname.is_null() => {
                let nsp = pg_sys::get_namespace_oid((*stmt).subname, true);
                (nsp != pg_sys::InvalidOid && crate::catalog::protected::any_in_schema(nsp)).then_some(pg_sys::InvalidOid)
            }
            _ => None,
        }
    }
}

/// `ALTER COLUMN ... TYPE` of a protected table rewrites every tenant's rows with the owner's
/// rights, and the code it runs is gone once it ran (no catalog keeps a `USING` expression or
/// the cast it took): from a role other than a superuser, only to a built-in type, and with a
/// `USING` expression that reads nothing but the column itself (constants and casts to built-in
/// types). Anything else is refused before it runs.
///
/// # Safety
/// `stmt` is the AlterTableStmt PostgreSQL is about to run, on protected table `rel`.
unsafe fn refuse_unsafe_retype(rel: pg_sys::Oid, stmt: *mut pg_sys::AlterTableStmt) {
    // SAFETY: the AlterTableStmt about to run; the casts follow the node tags.
    unsafe {
        for c in list_ptrs((*stmt).cmds) {
            let cmd = c as *mut pg_sys::AlterTableCmd;
            if (*cmd).subtype != pg_sys::AlterTableType::AT_AlterColumnType
                || (*cmd).def.is_null()
                || (*(*cmd).def).type_ != pg_sys::NodeTag::T_ColumnDef
                || (*cmd).name.is_null()
            {
                continue;
            }
            let def = (*cmd).def as *mut pg_sys::ColumnDef;
            let target = if (*def).typeName.is_null() {
                pg_sys::InvalidOid
            } else {
                pg_sys::LookupTypeNameOid(std::ptr::null_mut(), (*def).typeName, true)
            };
            let mut walk = RetypeWalk { column: CStr::from_ptr((*cmd).name), ok: true };
            if !(*def).raw_default.is_null() {
                retype_walker((*def).raw_default, (&mut walk as *mut RetypeWalk).cast());
            }
            if u32::from(target) >= pg_sys::FirstNormalObjectId || !walk.ok {
                audit::deny(
                    Event::PolicyTamper,
                    rel,
                    None,
                    "attempt to retype a column of a protected table with code over every tenant's rows",
                    TenancyError::Guarded(
                        "ALTER COLUMN ... TYPE rewrites every tenant's rows: from a role other than a superuser, only to a \
built-in type, with a USING expression of the column itself, constants and casts to built-in types",
                    ),
                );
            }
        }
    }
}

struct RetypeWalk<'a> {
    column: &'a CStr,
    ok: bool,
}

/// raw_expression_tree_walker callback for `refuse_unsafe_retype`.
#[pg_guard]
unsafe extern "C-unwind" fn retype_walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    use pg_sys::NodeTag::*;
    if node.is_null() {
        return false;
    }
    // SAFETY: a node of the raw expression being walked; the context is the RetypeWalk.
    unsafe {
        let walk = &mut *context.cast::<RetypeWalk>();
        match (*node).type_ {
            T_A_Const | T_TypeName | T_List => {}
            T_TypeCast => {
                let cast = node as *mut pg_sys::TypeCast;
                let ty = pg_sys::LookupTypeNameOid(std::ptr::null_mut(), (*cast).typeName, true);
                if ty == pg_sys::InvalidOid || u32::from(ty) >= pg_sys::FirstNormalObjectId {
                    walk.ok = false;
                }
            }
            T_ColumnRef => {
                let fields = list_ptrs((*(node as *mut pg_sys::ColumnRef)).fields);
                let last = fields.last().copied().unwrap_or(std::ptr::null_mut()) as *mut pg_sys::Node;
                let same = !last.is_null()
                    && (*last).type_ == T_String
                    && CStr::from_ptr((*(last as *mut pg_sys::String)).sval) == walk.column;
                if !same || fields.len() > 1 {
                    walk.ok = false;
                }
            }
            _ => walk.ok = false,
        }
        if !walk.ok {
            return true;
        }
        pg_sys::raw_expression_tree_walker(node, Some(retype_walker), context)
    }
}

/// `ALTER TABLE parent ATTACH PARTITION child` and `ALTER TABLE child INHERIT parent` with a
/// protected parent: a child that already holds rows is refused, protected or not (its rows were
/// written outside the parent's policies, for any tenant the owner chose), and so is one that is
/// not a plain table (a foreign table's rows live outside any policy), unless a superuser
/// attaches it. Only after the role is known to own both tables (otherwise PostgreSQL refuses
/// the command itself), and without running any SQL over the child: it is scanned with the heap
/// access method, so nothing its owner wrote runs with anyone's rights.
///
/// # Safety
/// `stmt` is the AlterTableStmt PostgreSQL is about to run.
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
            let Some(child_rel) = rangevar_oid(child) else { continue };
            let user = pg_sys::GetUserId();
            if !pg_sys::pg_class_ownercheck(parent_rel, user) || !pg_sys::pg_class_ownercheck(child_rel, user) {
                continue;
            }
            let refusal = match catalog::pg::holds_rows(child_rel) {
                Ok(false) => continue,
                Ok(true) => TenancyError::LoadedChild,
                Err(why) => TenancyError::Unprotectable(why),
            };
            audit::deny(
                Event::PolicyTamper,
                parent_rel,
                None,
                "attempt to attach a table that holds rows, or is not a plain table, to a protected table",
                refusal,
            );
        }
    }
}

/// Whether a utility statement runs expressions over the rows of a protected table as its owner
/// and must be shielded for the role running it (see the module documentation).
///
/// # Safety
/// `node` is the utility statement PostgreSQL is about to run.
pub unsafe fn needs_shield(node: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    use pg_sys::NodeTag::*;
    // SAFETY: the casts follow the node tag.
    let rel = unsafe {
        match (*node).type_ {
            T_AlterTableStmt => protected_rangevar((*(node as *mut pg_sys::AlterTableStmt)).relation).map(|r| r.0),
            T_IndexStmt => protected_rangevar((*(node as *mut pg_sys::IndexStmt)).relation).map(|r| r.0),
            T_ClusterStmt => {
                let stmt = node as *mut pg_sys::ClusterStmt;
                if (*stmt).relation.is_null() {
                    // every table clustered before, protected ones included
                    Some(pg_sys::InvalidOid)
                } else {
                    protected_rangevar((*stmt).relation).map(|r| r.0)
                }
            }
            // a domain's new constraint is checked on every column of that type, anywhere
            T_AlterDomainStmt => Some(pg_sys::InvalidOid),
            T_ReindexStmt if (*(node as *mut pg_sys::ReindexStmt)).relation.is_null() => {
                // REINDEX SCHEMA, SYSTEM or DATABASE: protected tables may be among them
                Some(pg_sys::InvalidOid)
            }
            T_ReindexStmt => {
                let stmt = node as *mut pg_sys::ReindexStmt;
                let rel = rangevar_oid((*stmt).relation);
                rel.and_then(|r| {
                    // (REINDEX INDEX names the index: its table decides)
                    let table = pg_sys::IndexGetRelation(r, true);
                    let table = if table == pg_sys::InvalidOid { r } else { table };
                    protected(table).map(|_| table)
                })
            }
            T_VacuumStmt => {
                let stmt = node as *mut pg_sys::VacuumStmt;
                let rels = list_ptrs((*stmt).rels);
                if rels.is_empty() {
                    // the whole database, protected tables included
                    Some(pg_sys::InvalidOid)
                } else {
                    rels.into_iter()
                        .filter_map(|v| protected_rangevar((*(v as *mut pg_sys::VacuumRelation)).relation).map(|r| r.0))
                        .next()
                }
            }
            _ => None,
        }
    }?;
    subject_to_row_security().then_some(rel)
}

/// How many shielded statements are running (they nest: a function may run one).
static SHIELD_DEPTH: crate::util::Backend<std::cell::Cell<u32>> = crate::util::Backend::new(std::cell::Cell::new(0));

/// Whether a shielded statement is running: the emit_log hook then keeps every message below ERROR
/// from the client and the server log (a function the statement runs may have changed
/// `client_min_messages` itself).
pub fn shield_up() -> bool {
    SHIELD_DEPTH.with(|d| d.get() > 0)
}

/// Whether an error raised in a shielded statement may reach the client as it is: it was not
/// raised by a procedural language (which raises what a function says, values included), and it
/// is pg_tenancy's own or of a kind that never quotes a value (privileges, concurrency,
/// resources, transaction state, duplicate or dependent objects, definitions). The others (data
/// and integrity errors, and lookups such as `'...'::regclass`, which quote what they did not
/// find) lose their message, detail and context.
fn shown_as_is(sqlstate: &str, file: &str) -> bool {
    if file.starts_with("pl") {
        return false;
    }
    file.ends_with(".rs")
        || matches!(&sqlstate[..2], "25" | "40" | "53" | "57")
        || matches!(sqlstate, "42501" | "42P07" | "42710" | "42701" | "2BP01" | "42P16" | "42P17" | "0A000" | "55P03" | "55006")
}

/// Run a shielded utility statement (see the module documentation): `run` is the call of the
/// previous hook or the standard function.
pub fn shielded(rel: pg_sys::Oid, run: impl FnOnce()) {
    // Every message is emitted towards the server log (PostgreSQL calls emit_log_hook only for
    // those), where the emit_log hook drops it, and towards the client only at ERROR (a function
    // may lower client_min_messages again: the hook drops that one too).
    let _quiet = catalog::GucScope::new(&[(c"client_min_messages", c"error"), (c"log_min_messages", c"debug5")]);
    SHIELD_DEPTH.with(|d| d.set(d.get() + 1));
    let _down = crate::util::OnDrop(|| SHIELD_DEPTH.with(|d| d.set(d.get().saturating_sub(1))));
    let run = std::panic::AssertUnwindSafe(run);
    PgTryBuilder::new(move || {
        let run = run;
        // SAFETY: a call into PostgreSQL through pgrx's boundary, which turns its ERROR into a
        // Rust panic that the handler below catches.
        unsafe { pg_sys::ffi::pg_guard_ffi_boundary(run.0) }
    })
    .catch_others(|e| {
        let CaughtError::PostgresError(report) = &e else { e.rethrow() };
        let code = report.sql_error_code();
        let sqlstate = sqlstate_text(code);
        if shown_as_is(&sqlstate, report.file()) {
            e.rethrow()
        }
        audit::record(
            Event::ProtectedDdl,
            rel,
            None,
            &sqlstate,
            "DDL on a protected table failed while it evaluated rows; its error is not shown (it could carry other tenants' values)",
        );
        pgrx::pg_sys::panic::ErrorReport::new(
            code,
            "a statement on a protected table failed while it evaluated its rows",
            "pg_tenancy",
        )
        .set_detail("The error's message, detail and context are not shown: they could carry other tenants' values.")
        .set_hint("Run it as a superuser to see the error, or check the rows with a query in each tenant's context.")
        .report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    })
    .execute();
}

fn sqlstate_text(code: PgSqlErrorCode) -> String {
    let code = code as i32;
    (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
}


/// The protected table a utility statement would weaken, and how.
///
/// # Safety
/// `node` is NULL or the utility statement PostgreSQL is about to run.
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



/// no superuser approved: records `protected_ddl`. (The functions are listed by check().)
#[pg_extern(volatile, parallel_unsafe)]
fn _record_protected_ddl(rel: pg_sys::Oid, detail: &str) {
    audit::record(Event::ProtectedDdl, rel, None, "00000", detail);
}

/// Whether an expression (a policy's stored `polqual`) calls a function that is not leakproof on
/// a column of the row (PostgreSQL's own test, `contain_leaked_vars`; anything it does not know,
/// a subquery included, counts as leaking). Not executable by PUBLIC: it parses the stored form.
#[pg_extern(immutable, parallel_safe)]
fn _expr_leaks(expr: Option<&str>) -> bool {
    expr.is_some_and(expr_leaks)
}

/// See `_expr_leaks`.
pub(super) fn expr_leaks(expr: &str) -> bool {
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
    invoker_is_superuser()
}

/// See `_invoker_is_superuser` (during a migration step: the step's role, never a superuser).
pub(super) fn invoker_is_superuser() -> bool {
    // SAFETY: reads the role's catalog entry.
    unsafe { pg_sys::superuser_arg(crate::util::acting_role()) }
}

/// Whether the guard is on (`pg_tenancy.guard`). The guard's event triggers ask this first: the
/// call loads the library, so that a value someone set before it was loaded (a placeholder) is
/// judged by the real setting, which only a superuser may change.
#[pg_extern(stable, parallel_safe)]
fn _guard_on() -> bool {
    crate::gucs::guard()
}


/// Called by the generated WITH CHECK policy only when a written row carries a tenant other
/// than the current one: records `cross_tenant_write` against the protected table the
/// statement writes, and returns false, so PostgreSQL refuses the row (42501) as it would
/// without pg_tenancy. Calling it directly records nothing an attempted write would not: it
/// needs a statement that writes a protected table, and a row of the current tenant records
/// nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn _write_denied(attempted: Option<&str>) -> bool {
    let current = crate::context::with_context(|v| v.tenant.clone()).ok();
    let rel = audit::write_target();
    if rel != pg_sys::InvalidOid && (attempted.is_none() || attempted != current.as_deref()) {
        audit::record(Event::CrossTenantWrite, rel, attempted, "42501", "row carries another tenant's id");
    }
    false
}

/// Whether a table holds a row (for the guard, after DDL attached it): scanned without SQL. A
/// table that is not a plain heap table counts as holding rows. Not executable by PUBLIC.
#[pg_extern(volatile, parallel_unsafe)]
fn _holds_rows(rel: pg_sys::Oid) -> bool {
    catalog::pg::holds_rows(rel).unwrap_or(true)
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

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
}
