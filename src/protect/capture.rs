//! Change capture for incremental backups: while it is on (`tenancy.enable_change_capture()`),
//! every protected table (a partitioned one through its parent, whose row trigger PostgreSQL
//! clones onto each partition) has the AFTER ROW trigger `tenancy_capture`, which records each
//! insert, update and delete in `tenancy.changes` with its tenant, the row before and after (in
//! record text form) and its transaction (whose commit time `track_commit_timestamp` keeps).
//! The trigger is part of the protection while capture is on: the guard refuses dropping or
//! disabling it, as it refuses dropping a policy.
use pgrx::prelude::*;
use std::ffi::CStr;

use crate::catalog::{self, protected};
use crate::error::{OrRaise, Result, TenancyError};

pub const TRIGGER: &str = "tenancy_capture";

fn create_sql(table: &str) -> String {
    format!("CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION tenancy._capture()")
}

/// ENABLE ALWAYS: `session_replication_role = replica` (logical replication's apply workers,
/// restores of dumps) must not write unseen.
fn always_sql(table: &str) -> String {
    format!("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {TRIGGER}")
}

/// Output functions of one table's columns, and the column types they are for.
struct Outputs {
    types: Vec<(pg_sys::Oid, i32)>,
    functions: Vec<Option<pg_sys::FmgrInfo>>,
}

thread_local! {
    /// The root of each partitioned table a captured row came from (rows are recorded in the
    /// root's column order). Dropped at every relcache invalidation.
    static ROOTS: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, pg_sys::Oid>> = std::cell::RefCell::new(std::collections::HashMap::new());
    /// Output functions of the columns of each table whose rows were captured (looked up once,
    /// in a context of their own). An entry is taken out of the map while it is used (output
    /// functions may process invalidations), put back only if no invalidation came meanwhile,
    /// and checked against the columns' types before use.
    static OUTPUTS: std::cell::RefCell<std::collections::HashMap<pg_sys::Oid, Outputs>> = std::cell::RefCell::new(std::collections::HashMap::new());
    static OUTPUTS_CONTEXT: std::cell::Cell<pg_sys::MemoryContext> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    /// Counts relcache invalidations: an entry in use when one comes is not put back.
    static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Forget the partition roots and the output functions (a table changed, a partition may have
/// been detached or attached elsewhere).
pub fn forget_roots() {
    GENERATION.with(|g| g.set(g.get().wrapping_add(1)));
    ROOTS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            r.clear();
        }
    });
    OUTPUTS.with(|o| {
        if let Ok(mut o) = o.try_borrow_mut() {
            // (their FmgrInfos live in OUTPUTS_CONTEXT, which only grows by one set per table
            // and invalidation; it is reset when nothing refers to it any more)
            let had = !o.is_empty();
            o.clear();
            if had {
                OUTPUTS_CONTEXT.with(|c| {
                    if !c.get().is_null() && IN_USE.with(|u| u.get()) == 0 {
                        // SAFETY: the context made below; no FmgrInfo of it is referenced.
                        unsafe { pg_sys::MemoryContextReset(c.get()) };
                    }
                });
            }
        }
    });
}

thread_local! {
    /// Entries taken out of OUTPUTS and being used (their functions live in OUTPUTS_CONTEXT).
    static IN_USE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The column types of `desc`.
///
/// # Safety
/// `desc` is a valid tuple descriptor.
unsafe fn column_types(desc: pg_sys::TupleDesc) -> Vec<(pg_sys::Oid, i32)> {
    // SAFETY: as the caller promises.
    unsafe { (*desc).attrs.as_slice((*desc).natts as usize).iter().map(|a| (if a.attisdropped { pg_sys::InvalidOid } else { a.atttypid }, a.atttypmod)).collect() }
}

/// The record text of `tuple` (a row of `relid`, described by `desc`) appended to `out`.
///
/// # Safety
/// `tuple` is a valid tuple described by `desc`, the descriptor of `relid` now.
unsafe fn append_row(relid: pg_sys::Oid, desc: pg_sys::TupleDesc, tuple: pg_sys::HeapTuple, out: &mut Vec<u8>) {
    // SAFETY: as the caller promises; functions looked up here live in a context of this
    // backend's own that is not reset while an entry is in use.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let types = column_types(desc);
        let generation = GENERATION.with(|g| g.get());
        let cached = OUTPUTS.with(|o| o.borrow_mut().remove(&relid)).filter(|e| e.types == types);
        let context = OUTPUTS_CONTEXT.with(|c| {
            if c.get().is_null() {
                c.set(pg_sys::AllocSetContextCreateExtended(
                    pg_sys::TopMemoryContext,
                    c"pg_tenancy capture".as_ptr(),
                    pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
                    pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
                    pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
                ));
            }
            c.get()
        });
        IN_USE.with(|u| u.set(u.get() + 1));
        let _done = crate::util::OnDrop(|| IN_USE.with(|u| u.set(u.get() - 1)));
        let mut entry = match cached {
            Some(e) => e,
            None => Outputs { functions: catalog::backups::output_functions(desc, context), types },
        };
        catalog::backups::append_record(out, &values, &nulls, &mut entry.functions);
        // back in the map only if nothing was invalidated while it was in use
        if GENERATION.with(|g| g.get()) == generation {
            OUTPUTS.with(|o| o.borrow_mut().insert(relid, entry));
        }
    }
}

fn root_of(partition: pg_sys::Oid) -> Result<pg_sys::Oid> {
    if let Some(root) = ROOTS.with(|r| r.borrow().get(&partition).copied()) {
        return Ok(root);
    }
    let root = catalog::backups::partition_root(partition)?;
    ROOTS.with(|r| r.borrow_mut().insert(partition, root));
    Ok(root)
}

fn qualified(rel: pg_sys::Oid) -> Option<String> {
    Some(catalog::relation_name(rel)).filter(|n| !n.is_empty())
}

/// After protect(): the capture trigger too, when capture is on (not on partitions: they have
/// their parent's). Returns the statement run, if any.
pub fn on_protect(rel: pg_sys::Oid) -> Option<String> {
    if !catalog::backups::capture_on().or_raise() || catalog::backups::is_partition(rel).or_raise() {
        return None;
    }
    let table = qualified(rel)?;
    let sql = create_sql(&table);
    super::run(&sql);
    super::run(&always_sql(&table));
    Some(sql)
}

/// Before unprotect(): the capture trigger goes with the protection.
pub fn on_unprotect(rel: pg_sys::Oid) -> Option<String> {
    if !catalog::backups::has_capture_trigger(rel).or_raise() {
        return None;
    }
    let sql = format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {}", qualified(rel)?);
    super::run(&sql);
    Some(sql)
}

fn require_superuser() -> Result<()> {
    // SAFETY: reads the current user's superuser flag.
    if unsafe { pg_sys::superuser() } {
        Ok(())
    } else {
        Err(TenancyError::Denied("change capture is a superuser's to turn on or off"))
    }
}

/// Turn change capture on: the trigger on every protected table, and the time it started (an
/// incremental backup needs capture on, without a break, since its parent). Needs
/// `track_commit_timestamp = on` (each change's commit time). Returns the tables it now covers.
#[pg_extern(volatile, parallel_unsafe)]
fn enable_change_capture() -> i64 {
    require_superuser().or_raise();
    // SAFETY: reads a server setting.
    if !unsafe { pg_sys::track_commit_timestamp } {
        TenancyError::NotYet("change capture needs track_commit_timestamp = on (a server restart)").raise();
    }
    catalog::backups::start_capture().or_raise();
    let mut n = 0;
    for rel in catalog::backups::capture_tables().or_raise() {
        let _exempt = super::guard::Exempt::new(rel);
        if let Some(table) = qualified(rel) {
            super::run(&create_sql(&table));
            super::run(&always_sql(&table));
            n += 1;
        }
    }
    n
}

/// Turn change capture off (the triggers go; incremental backups then need a new full backup
/// first). Returns the tables it covered.
#[pg_extern(volatile, parallel_unsafe)]
fn disable_change_capture() -> i64 {
    require_superuser().or_raise();
    catalog::backups::stop_capture().or_raise();
    let mut n = 0;
    for rel in catalog::backups::capture_tables().or_raise() {
        let _exempt = super::guard::Exempt::new(rel);
        if let Some(table) = qualified(rel) {
            super::run(&format!("DROP TRIGGER IF EXISTS {TRIGGER} ON {table}"));
            n += 1;
        }
    }
    n
}

#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_tenancy_capture() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The text output of a datum of type `typ`.
///
/// # Safety
/// `value` is a valid datum of type `typ`.
unsafe fn output(value: pg_sys::Datum, typ: pg_sys::Oid) -> String {
    // SAFETY: as the caller promises; the output function returns a palloc'd C string.
    unsafe {
        let mut func = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(typ, &mut func, &mut varlena);
        CStr::from_ptr(pg_sys::OidOutputFunctionCall(func, value)).to_string_lossy().into_owned()
    }
}

/// Output settings that make text forms read back as the same values in any session (ISO
/// dates, PostgreSQL interval style, shortest exact floats), set only when the session has
/// others (a GUC nest level costs more than the check).
pub fn canonical_output() -> Option<catalog::GucScope> {
    // SAFETY: plain reads of the settings' variables.
    let canonical = unsafe {
        pg_sys::DateStyle == pg_sys::USE_ISO_DATES as i32
            && pg_sys::IntervalStyle == pg_sys::INTSTYLE_POSTGRES as i32
            && pg_sys::extra_float_digits >= 1
    };
    (!canonical).then(|| {
        catalog::GucScope::new(&[(c"DateStyle", c"ISO"), (c"IntervalStyle", c"postgres"), (c"extra_float_digits", c"3")])
    })
}

/// `tenancy._capture()`: the AFTER ROW trigger of change capture (declared in sql/backup.sql).
///
/// # Safety
/// Called by PostgreSQL's trigger manager with a valid `fcinfo` whose context is TriggerData.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn tenancy_capture(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY (whole body): fcinfo comes from the trigger manager; the context is checked to be
    // TriggerData before it is read; tuples and descriptor are the trigger's own.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            TenancyError::InvalidArgument("tenancy._capture() is a trigger").raise();
        }
        let td = context as *mut pg_sys::TriggerData;
        let event = (*td).tg_event;
        // Only as the trigger capture makes: AFTER, FOR EACH ROW, named tenancy_capture (as a
        // statement trigger there is no row; as a BEFORE trigger it would return no row and drop
        // every write). The guard refuses other triggers that call it on protected tables.
        let name = CStr::from_ptr((*(*td).tg_trigger).tgname);
        if event & pg_sys::TRIGGER_EVENT_ROW == 0
            || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
            || name.to_bytes() != TRIGGER.as_bytes()
        {
            TenancyError::Guarded("tenancy._capture() runs only as pg_tenancy's AFTER ROW trigger tenancy_capture").raise();
        }
        let rel = (*td).tg_relation;
        let relid = (*rel).rd_id;
        let mut desc = (*rel).rd_att;
        let (op, old, new) = match event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => (b'I', None, Some((*td).tg_trigtuple)),
            pg_sys::TRIGGER_EVENT_DELETE => (b'D', Some((*td).tg_trigtuple), None),
            pg_sys::TRIGGER_EVENT_UPDATE => (b'U', Some((*td).tg_trigtuple), Some((*td).tg_newtuple)),
            _ => return pg_sys::Datum::from(0),
        };
        let Some(mut attnum) = protected::protected(relid) else {
            return pg_sys::Datum::from(0);
        };
        // a partition's rows in its root's column order (a partition may order them otherwise)
        let (mut old, mut new) = (old, new);
        let mut root_rel: pg_sys::Relation = std::ptr::null_mut();
        if (*(*rel).rd_rel).relispartition {
            let root = root_of(relid).or_raise();
            if root != relid && root != pg_sys::InvalidOid {
                root_rel = pg_sys::RelationIdGetRelation(root);
                if !root_rel.is_null() {
                    let map = pg_sys::convert_tuples_by_name(desc, (*root_rel).rd_att);
                    if !map.is_null() {
                        old = old.map(|t| pg_sys::execute_attr_map_tuple(t, map));
                        new = new.map(|t| pg_sys::execute_attr_map_tuple(t, map));
                        pg_sys::free_conversion_map(map);
                    }
                    desc = (*root_rel).rd_att;
                    attnum = protected::protected(root).unwrap_or(attnum);
                }
            }
        }
        let _close = crate::util::OnDrop(|| {
            if !root_rel.is_null() {
                pg_sys::RelationClose(root_rel);
            }
        });
        // text forms that read back the same whatever the writer's session settings
        let _settings = canonical_output();
        // the tenant of the row as it is now (of the row removed, for a delete)
        let tagged = new.or(old).expect("a row");
        let mut isnull = false;
        let value = pg_sys::heap_getattr(tagged, attnum as i32, desc, &mut isnull);
        if isnull {
            return pg_sys::Datum::from(0);
        }
        let att = (*desc).attrs.as_slice((*desc).natts as usize)[attnum as usize - 1];
        let tenant = output(value, att.atttypid);
        let owner = if root_rel.is_null() { relid } else { (*root_rel).rd_id };
        let mut old_text = Vec::new();
        let mut new_text = Vec::new();
        if let Some(t) = old {
            append_row(owner, desc, t, &mut old_text);
        }
        if let Some(t) = new {
            append_row(owner, desc, t, &mut new_text);
        }
        let old_text = old.map(|_| old_text.as_slice());
        let new_text = new.map(|_| new_text.as_slice());
        // a row moved to another tenant (only a superuser can): the old tenant loses it
        if let (Some(o), Some(_)) = (old, new) {
            let mut onull = false;
            let ov = pg_sys::heap_getattr(o, attnum as i32, desc, &mut onull);
            if !onull {
                let old_tenant = output(ov, att.atttypid);
                if old_tenant != tenant {
                    catalog::backups::record_change(&old_tenant, relid, b'D', old_text, None).or_raise();
                    catalog::backups::record_change(&tenant, relid, b'I', None, new_text).or_raise();
                    return pg_sys::Datum::from(0);
                }
            }
        }
        catalog::backups::record_change(&tenant, relid, op, old_text, new_text).or_raise();
        pg_sys::Datum::from(0)
    }
}
