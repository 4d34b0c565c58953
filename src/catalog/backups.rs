//! `tenancy.backups`, `tenancy.backup_archives`, and the statements a backup or a restore runs on
//! the tenant's tables (built here from quoted names; every one search_path-proof).
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::IntoDatum;
use std::ffi::{c_char, CString};

use super::{arg, one, run, run_in_statement_snapshot, PinnedSearchPath, Stmt, Who};
use crate::error::{Result, TenancyError};

/// A protected table a backup covers: every protected table that is not a partition (a
/// partitioned table is read through its parent, with its partitions).
pub struct Source {
    pub rel: pg_sys::Oid,
    /// Schema-qualified and quoted.
    pub name: String,
    pub partitioned: bool,
    pub tenant_column: String,
    /// The tenant column's type as `format_type` writes it.
    pub tenant_type: String,
    /// `[{"Name", "Type", "Generated"}]` in column order.
    pub columns_json: String,
    /// The primary key's column names, as a JSON array (empty without one).
    pub key_json: String,
}

const SOURCES: Stmt = Stmt {
    sql: "SELECT c.oid, pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname), \
                 c.relkind OPERATOR(pg_catalog.=) 'p', p.tenant_column::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                 (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object('Name', x.attname, 'Type', pg_catalog.format_type(x.atttypid, x.atttypmod), \
                                                                            'Generated', x.attgenerated OPERATOR(pg_catalog.<>) '') ORDER BY x.attnum) \
                    FROM pg_catalog.pg_attribute x \
                   WHERE x.attrelid OPERATOR(pg_catalog.=) c.oid AND x.attnum OPERATOR(pg_catalog.>) 0 AND NOT x.attisdropped)::pg_catalog.text, \
                 (SELECT pg_catalog.jsonb_agg(k.attname ORDER BY u.ord) \
                    FROM pg_catalog.pg_index i CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS u(attnum, ord) \
                    JOIN pg_catalog.pg_attribute k ON k.attrelid OPERATOR(pg_catalog.=) i.indrelid AND k.attnum OPERATOR(pg_catalog.=) u.attnum \
                   WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisprimary)::pg_catalog.text \
            FROM tenancy.protected_tables p \
            JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.rel \
            JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
            JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) p.tenant_column \
           WHERE NOT c.relispartition \
           ORDER BY 2",
    args: &[],
    who: Who::Caller,
    fresh: false,
};

/// The tables a backup of any tenant covers, by name.
pub fn sources() -> Result<Vec<Source>> {
    run(&SOURCES, &[], |r| Source {
        rel: r.get(1).unwrap_or(pg_sys::InvalidOid),
        name: r.get(2).unwrap_or_default(),
        partitioned: r.get(3).unwrap_or(false),
        tenant_column: r.get(4).unwrap_or_default(),
        tenant_type: r.get(5).unwrap_or_default(),
        columns_json: r.get(6).unwrap_or_default(),
        key_json: r.get(7).unwrap_or_else(|| "[]".to_string()),
    })
}

const FOREIGN_KEYS: Stmt = Stmt {
    sql: "SELECT conrelid, confrelid FROM pg_catalog.pg_constraint \
           WHERE contype OPERATOR(pg_catalog.=) 'f' AND conparentid OPERATOR(pg_catalog.=) 0 \
             AND conrelid OPERATOR(pg_catalog.=) ANY ($1) AND confrelid OPERATOR(pg_catalog.=) ANY ($1) \
             AND conrelid OPERATOR(pg_catalog.<>) confrelid",
    args: &[pg_sys::OIDARRAYOID],
    who: Who::Caller,
    fresh: false,
};

/// Foreign keys among `rels`: (referencing, referenced), self-references left out.
pub fn foreign_keys(rels: &[pg_sys::Oid]) -> Result<Vec<(pg_sys::Oid, pg_sys::Oid)>> {
    run(&FOREIGN_KEYS, &[arg(rels.to_vec())], |r| {
        (r.get(1).unwrap_or(pg_sys::InvalidOid), r.get(2).unwrap_or(pg_sys::InvalidOid))
    })
}

/// What a backup records about the moment it was taken.
pub struct Moment {
    pub snapshot: String,
    pub lsn: String,
    pub created: String,
    pub server_version: String,
    pub extension_version: String,
}

const MOMENT: Stmt = Stmt {
    sql: "SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text, pg_catalog.pg_current_wal_lsn()::pg_catalog.text, \
                 pg_catalog.to_char(pg_catalog.now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                 pg_catalog.current_setting('server_version'), \
                 (SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'pg_tenancy')",
    args: &[],
    who: Who::Caller,
    fresh: false,
};

/// Read with the calling statement's snapshot, as the backup's reads are.
pub fn moment() -> Result<Moment> {
    let m = run_in_statement_snapshot(&MOMENT, &[], |r| Moment {
        snapshot: r.get(1).unwrap_or_default(),
        lsn: r.get(2).unwrap_or_default(),
        created: r.get(3).unwrap_or_default(),
        server_version: r.get(4).unwrap_or_default(),
        extension_version: r.get(5).unwrap_or_default(),
    })?;
    m.into_iter().next().ok_or(TenancyError::NotInstalled)
}

/// A backup's registry row.
pub struct Registered {
    /// When it was taken, microseconds since 1970.
    pub created_us: i64,
    pub tenant: String,
    pub kind: String,
    pub parent: Option<pgrx::Uuid>,
    pub location: String,
    pub manifest_sha256: String,
}

const REGISTER: Stmt = Stmt {
    sql: "INSERT INTO tenancy.backups (id, tenant, kind, parent, location, snapshot, lsn, tables, row_count, data_bytes, \
                                       archive_bytes, key_version, manifest_sha256, created_at, first_change, last_change, expires_at) \
          SELECT $1, t.id, $3, $4, $5, $6, $7::pg_catalog.pg_lsn, $8, $9, $10, $11, $12, $13, $14::pg_catalog.timestamptz, \
                 pg_catalog.to_timestamp($15 OPERATOR(pg_catalog./) 1000000.0), pg_catalog.to_timestamp($16 OPERATOR(pg_catalog./) 1000000.0), \
                 $14::pg_catalog.timestamptz OPERATOR(pg_catalog.+) pg_catalog.make_interval(days => GREATEST(30, \
                     CASE WHEN t.config OPERATOR(pg_catalog.->>) 'backup_retention_days' OPERATOR(pg_catalog.~) '^[0-9]{1,5}$' \
                          THEN (t.config OPERATOR(pg_catalog.->>) 'backup_retention_days')::pg_catalog.int4 ELSE 30 END)) \
            FROM tenancy.tenants t WHERE t.id OPERATOR(pg_catalog.=) $2",
    args: &[
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::INT8OID,
    ],
    who: Who::Owner,
    fresh: false,
};

/// What `register` writes.
pub struct NewBackup<'a> {
    pub id: pgrx::Uuid,
    pub tenant: &'a str,
    pub kind: &'a str,
    pub parent: Option<pgrx::Uuid>,
    pub location: &'a str,
    pub snapshot: &'a str,
    pub lsn: &'a str,
    pub tables: i32,
    pub rows: i64,
    pub data_bytes: i64,
    pub archive_bytes: i64,
    pub key_version: Option<i32>,
    pub manifest_sha256: &'a str,
    pub created: &'a str,
    /// Commit times (microseconds since 1970) of an incremental's first and last change.
    pub first_change: Option<i64>,
    pub last_change: Option<i64>,
}

pub fn register(b: &NewBackup) -> Result<()> {
    run(
        &REGISTER,
        &[
            arg(b.id),
            arg(b.tenant),
            arg(b.kind),
            b.parent.and_then(|p| p.into_datum()),
            arg(b.location),
            arg(b.snapshot),
            arg(b.lsn),
            arg(b.tables),
            arg(b.rows),
            arg(b.data_bytes),
            arg(b.archive_bytes),
            b.key_version.and_then(|v| v.into_datum()),
            arg(b.manifest_sha256),
            arg(b.created),
            b.first_change.and_then(|v| v.into_datum()),
            b.last_change.and_then(|v| v.into_datum()),
        ],
        |_| (),
    )?;
    Ok(())
}

const REGISTERED: Stmt = Stmt {
    sql: "SELECT tenant, kind, parent, location, manifest_sha256, \
                 (pg_catalog.date_part('epoch', created_at) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8 \
            FROM tenancy.backups WHERE id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::UUIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn registered(id: pgrx::Uuid) -> Result<Option<Registered>> {
    one(&REGISTERED, &[arg(id)], |r| Registered {
        tenant: r.get(1).unwrap_or_default(),
        kind: r.get(2).unwrap_or_default(),
        parent: r.get(3),
        location: r.get(4).unwrap_or_default(),
        manifest_sha256: r.get(5).unwrap_or_default(),
        created_us: r.get(6).unwrap_or(0),
    })
}

const SET_LOCATION: Stmt = Stmt {
    sql: "UPDATE tenancy.backups SET location = $2 WHERE id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::UUIDOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

pub fn set_location(id: pgrx::Uuid, location: &str) -> Result<()> {
    run(&SET_LOCATION, &[arg(id), arg(location)], |_| ())?;
    Ok(())
}

const STORE_LINES: Stmt = Stmt {
    sql: "INSERT INTO tenancy.backup_archives (backup, n, line) \
          SELECT $1, l.n, l.line FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS l(line, n)",
    args: &[pg_sys::UUIDOID, pg_sys::TEXTARRAYOID],
    who: Who::Owner,
    fresh: false,
};

pub fn store_lines(id: pgrx::Uuid, lines: &[String]) -> Result<()> {
    run(&STORE_LINES, &[arg(id), arg(lines.to_vec())], |_| ())?;
    Ok(())
}

const STORED_LINES: Stmt = Stmt {
    sql: "SELECT line FROM tenancy.backup_archives WHERE backup OPERATOR(pg_catalog.=) $1 ORDER BY n",
    args: &[pg_sys::UUIDOID],
    who: Who::Owner,
    fresh: false,
};

pub fn stored_lines(id: pgrx::Uuid) -> Result<Vec<String>> {
    run(&STORED_LINES, &[arg(id)], |r| r.get::<String>(1).unwrap_or_default())
}

const CLEAR_ACTIVITY_SNAPSHOT: Stmt = Stmt {
    sql: "SELECT pg_catalog.pg_stat_clear_snapshot()",
    args: &[],
    who: Who::Caller,
    fresh: true,
};

const WRITERS_IN_FLIGHT: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_stat_activity a \
           WHERE a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database() AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid() \
             AND a.backend_xid IS NOT NULL AND a.xact_start OPERATOR(pg_catalog.<) pg_catalog.transaction_timestamp() \
             AND EXISTS (SELECT FROM pg_catalog.pg_locks l JOIN tenancy.protected_tables p ON p.rel::pg_catalog.oid OPERATOR(pg_catalog.=) l.relation \
                          WHERE l.pid OPERATOR(pg_catalog.=) a.pid AND l.mode OPERATOR(pg_catalog.=) 'RowExclusiveLock'))",
    args: &[],
    who: Who::Caller,
    fresh: true,
};

/// Whether a transaction of this database that started before ours holds a transaction id and
/// has written to a protected table (it may be the paused tenant's). Reads the sessions' state
/// afresh at every call.
pub fn writers_in_flight() -> Result<bool> {
    run(&CLEAR_ACTIVITY_SNAPSHOT, &[], |_| ())?;
    Ok(one(&WRITERS_IN_FLIGHT, &[], |r| r.get::<bool>(1).unwrap_or(false))?.unwrap_or(false))
}

/// `SELECT * FROM [ONLY] table t WHERE tenant_column = tenant`: the tenant's rows in record
/// text form (the bytes `t::text` gives), handed to `f` one by one, read with the calling
/// statement's snapshot (one snapshot for every table of a backup). Runs the executor with a
/// receiver of its own (as COPY does): no row is copied into an SPI result, no composite datum is
/// built per row, each column goes through its type's output function once. Returns the number of
/// rows.
pub fn tenant_rows(src: &Source, tenant: &str, f: impl FnMut(&[u8])) -> Result<u64> {
    let sql = format!(
        "SELECT * FROM {}{} t WHERE t.{} OPERATOR(pg_catalog.=) $1::pg_catalog.text::{}",
        if src.partitioned { "" } else { "ONLY " },
        src.name,
        quote_identifier(&src.tenant_column),
        src.tenant_type
    );
    let csql = CString::new(sql).map_err(|_| TenancyError::InvalidArgument("table name"))?;
    let _path = PinnedSearchPath::new();
    let mut sink = RowSink {
        receiver: pg_sys::DestReceiver {
            receiveSlot: Some(sink_receive),
            rStartup: Some(sink_startup),
            rShutdown: Some(sink_noop),
            rDestroy: Some(sink_noop),
            mydest: pg_sys::CommandDest::DestNone,
        },
        outputs: Vec::new(),
        row: Vec::with_capacity(256),
        rows: 0,
        context: std::ptr::null_mut(),
        callback: Box::new(f),
    };
    // SAFETY: parse, analyze and plan one SELECT (the text built above from quoted names), run it
    // with the active snapshot (the calling statement's) and our receiver, then shut the executor
    // down; on an error PostgreSQL's abort releases what the executor holds. `sink` outlives the
    // run; its receiver is the first field of a #[repr(C)] struct, so the executor's pointer to it
    // is a pointer to the sink.
    unsafe {
        let raw = pg_sys::pg_parse_query(csql.as_ptr());
        let raw = (*(*raw).elements).ptr_value as *mut pg_sys::RawStmt;
        let types = [pg_sys::TEXTOID];
        let queries = pg_sys::pg_analyze_and_rewrite_fixedparams(raw, csql.as_ptr(), types.as_ptr(), 1, std::ptr::null_mut());
        let query = (*(*queries).elements).ptr_value as *mut pg_sys::Query;
        let params = pg_sys::makeParamList(1);
        let p = (*params).params.as_mut_slice(1);
        p[0].value = tenant.into_datum().expect("text datum");
        p[0].isnull = false;
        p[0].pflags = pg_sys::PARAM_FLAG_CONST as u16;
        p[0].ptype = pg_sys::TEXTOID;
        let plan = pg_sys::pg_plan_query(query, csql.as_ptr(), 0, params);
        sink.context = pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"pg_tenancy backup row".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        let desc = pg_sys::CreateQueryDesc(
            plan,
            csql.as_ptr(),
            pg_sys::GetActiveSnapshot(),
            std::ptr::null_mut(),
            &mut sink.receiver,
            params,
            std::ptr::null_mut(),
            0,
        );
        pg_sys::ExecutorStart(desc, 0);
        pg_sys::ExecutorRun(desc, pg_sys::ScanDirection::ForwardScanDirection, 0, true);
        pg_sys::ExecutorFinish(desc);
        pg_sys::ExecutorEnd(desc);
        pg_sys::FreeQueryDesc(desc);
        pg_sys::MemoryContextDelete(sink.context);
    }
    Ok(sink.rows)
}

/// The bytes that make `record_out` quote a column: `"`, `\`, parentheses, comma, whitespace.
const RECORD_SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let special = [b'"', b'\\', b'(', b')', b',', b' ', b'\t', b'\n', 0x0b, 0x0c, b'\r'];
    let mut i = 0;
    while i < special.len() {
        t[special[i] as usize] = true;
        i += 1;
    }
    t
};

/// The receiver of `tenant_rows`: formats each row as `record_out` does.
#[repr(C)]
struct RowSink<'a> {
    receiver: pg_sys::DestReceiver,
    /// Output function of each column (None for dropped ones, which record text leaves out).
    outputs: Vec<Option<pg_sys::FmgrInfo>>,
    row: Vec<u8>,
    rows: u64,
    /// Reset after each row: what output functions allocate goes with it.
    context: pg_sys::MemoryContext,
    callback: Box<dyn FnMut(&[u8]) + 'a>,
}

#[pg_guard]
unsafe extern "C-unwind" fn sink_startup(receiver: *mut pg_sys::DestReceiver, _operation: i32, desc: pg_sys::TupleDesc) {
    // SAFETY: `receiver` is the first field of a RowSink (see tenant_rows); `desc` describes the
    // rows; the functions are looked up in the current (query) context, which outlives the run.
    unsafe {
        let sink = &mut *(receiver as *mut RowSink);
        sink.outputs = output_functions(desc, pg_sys::CurrentMemoryContext);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn sink_noop(_receiver: *mut pg_sys::DestReceiver) {}

/// The output functions of a row type's columns (None for dropped ones, which record text
/// leaves out), looked up in `context`.
///
/// # Safety
/// `desc` is a valid tuple descriptor; `context` lives as long as the result is used.
pub unsafe fn output_functions(desc: pg_sys::TupleDesc, context: pg_sys::MemoryContext) -> Vec<Option<pg_sys::FmgrInfo>> {
    // SAFETY: as the caller promises.
    unsafe {
        (*desc)
            .attrs
            .as_slice((*desc).natts as usize)
            .iter()
            .map(|a| {
                if a.attisdropped {
                    return None;
                }
                let (mut func, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(a.atttypid, &mut func, &mut varlena);
                let mut info = pg_sys::FmgrInfo::default();
                pg_sys::fmgr_info_cxt(func, &mut info, context);
                Some(info)
            })
            .collect()
    }
}

/// Append a row in record text form (what `record_out` writes for it) to `row`.
///
/// # Safety
/// `values` and `nulls` are a row of the type whose columns `outputs` describes.
pub unsafe fn append_record(row: &mut Vec<u8>, values: &[pg_sys::Datum], nulls: &[bool], outputs: &mut [Option<pg_sys::FmgrInfo>]) {
    row.push(b'(');
    let mut first = true;
    for (i, out) in outputs.iter_mut().enumerate() {
        let Some(out) = out else { continue };
        if !first {
            row.push(b',');
        }
        first = false;
        if nulls[i] {
            continue;
        }
        // SAFETY: the column's output function on a non-null value of its type.
        let text = unsafe { std::ffi::CStr::from_ptr(pg_sys::OutputFunctionCall(out, values[i])) }.to_bytes();
        // record_out's quoting (src/backend/utils/adt/rowtypes.c)
        let quote = text.is_empty() || text.iter().any(|&c| RECORD_SPECIAL[c as usize]);
        if !quote {
            row.extend_from_slice(text);
            continue;
        }
        row.push(b'"');
        for &c in text {
            if c == b'"' || c == b'\\' {
                row.push(c);
            }
            row.push(c);
        }
        row.push(b'"');
    }
    row.push(b')');
}

#[pg_guard]
unsafe extern "C-unwind" fn sink_receive(slot: *mut pg_sys::TupleTableSlot, receiver: *mut pg_sys::DestReceiver) -> bool {
    // SAFETY: `receiver` is the first field of a RowSink; the slot holds one row of the query,
    // whose columns the startup callback described; values are read after slot_getallattrs.
    unsafe {
        let sink = &mut *(receiver as *mut RowSink);
        pg_sys::slot_getallattrs(slot);
        let values = std::slice::from_raw_parts((*slot).tts_values, sink.outputs.len());
        let nulls = std::slice::from_raw_parts((*slot).tts_isnull, sink.outputs.len());
        let old = pg_sys::MemoryContextSwitchTo(sink.context);
        sink.row.clear();
        append_record(&mut sink.row, values, nulls, &mut sink.outputs);
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset(sink.context);
        (sink.callback)(&sink.row);
        sink.rows += 1;
        true
    }
}

/// Run a statement built here (DDL or DML on staging and live tables) with arguments; returns the
/// number of rows it processed.
fn execute(sql: &str, args: &[(pg_sys::Oid, Option<pg_sys::Datum>)]) -> Result<u64> {
    let csql = CString::new(sql).map_err(|_| TenancyError::InvalidArgument("identifier"))?;
    let _path = PinnedSearchPath::new();
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.0).collect();
    let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.1.unwrap_or(pg_sys::Datum::from(0))).collect();
    let nulls: Vec<c_char> = args.iter().map(|a| if a.1.is_some() { b' ' } else { b'n' } as c_char).collect();
    Ok(Spi::connect(|_| {
        // SAFETY: an open SPI connection; arrays of args.len() elements.
        unsafe {
            let rc = pg_sys::SPI_execute_with_args(
                csql.as_ptr(),
                args.len() as i32,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                false,
                0,
            );
            if rc < 0 {
                pgrx::error!("pg_tenancy: a restore statement failed (SPI code {rc})");
            }
            pg_sys::SPI_processed
        }
    }))
}

/// A type name from a manifest, parsed as a type name only (never spliced into SQL as given) and
/// written back fully qualified; the archive is unparsable when it names no existing type.
pub fn resolve_type(name: &str) -> Result<String> {
    let c = CString::new(name).map_err(|_| TenancyError::Archive(pg_tenancy_core::archive::ArchiveError::Unparsable))?;
    let _path = PinnedSearchPath::new();
    let parsed = PgTryBuilder::new(|| {
        let (mut oid, mut typmod) = (pg_sys::InvalidOid, -1);
        // SAFETY: parses a type name (the parser's type-name mode: nothing else is accepted) and
        // looks it up; missing_ok, so an unknown type gives InvalidOid; a syntax error raises,
        // caught here.
        unsafe { pg_sys::parseTypeString(c.as_ptr(), &mut oid, &mut typmod, true) };
        Some((oid, typmod))
    })
    .catch_others(|_| None)
    .execute();
    match parsed {
        Some((oid, typmod)) if oid != pg_sys::InvalidOid => {
            // SAFETY: formats an existing type; the result is palloc'd.
            let text = unsafe {
                std::ffi::CStr::from_ptr(pg_sys::format_type_extended(
                    oid,
                    typmod,
                    (pg_sys::FORMAT_TYPE_TYPEMOD_GIVEN | pg_sys::FORMAT_TYPE_FORCE_QUALIFY) as u16,
                ))
            };
            Ok(text.to_string_lossy().into_owned())
        }
        _ => Err(TenancyError::Archive(pg_tenancy_core::archive::ArchiveError::Unparsable)),
    }
}

/// `CREATE SCHEMA schema` (the caller owns it; nobody else has any privilege on it).
pub fn create_schema(schema: &str) -> Result<()> {
    execute(&format!("CREATE SCHEMA {}", quote_identifier(schema)), &[])?;
    Ok(())
}

/// `CREATE TABLE schema.name (columns)` with the manifest's column names and types.
pub fn create_table(schema: &str, name: &str, columns: &[(String, String)]) -> Result<()> {
    let cols: Vec<String> = columns.iter().map(|(n, t)| format!("{} {}", quote_identifier(n), t)).collect();
    execute(&format!("CREATE TABLE {}.{} ({})", quote_identifier(schema), quote_identifier(name), cols.join(", ")), &[])?;
    Ok(())
}

/// Insert rows given in record text form into `schema.name`.
pub fn insert_rows(schema: &str, name: &str, rows: Vec<&str>) -> Result<u64> {
    let table = format!("{}.{}", quote_identifier(schema), quote_identifier(name));
    execute(
        &format!("INSERT INTO {table} SELECT * FROM pg_catalog.unnest($1::pg_catalog.text[]::{table}[])"),
        &[(pg_sys::TEXTARRAYOID, rows.into_datum())],
    )
}

/// Remove from `schema.name` the one row an incremental's change names (by its key, or by the
/// whole row when the table had no primary key); how many went (0 or 1).
pub fn delete_staged_row(schema: &str, name: &str, key: &[String], old: &str) -> Result<u64> {
    let table = format!("{}.{}", quote_identifier(schema), quote_identifier(name));
    // the old row as this session renders it (its text may come from another session's settings)
    let sql = if key.is_empty() {
        format!("DELETE FROM {table} s WHERE s.ctid OPERATOR(pg_catalog.=) (SELECT x.ctid FROM {table} x WHERE x::pg_catalog.text OPERATOR(pg_catalog.=) ($1::pg_catalog.text::{table})::pg_catalog.text LIMIT 1)")
    } else {
        let cols: Vec<String> = key.iter().map(String::as_str).map(quote_identifier).collect();
        let lhs: Vec<String> = cols.iter().map(|c| format!("x.{c}")).collect();
        let rhs: Vec<String> = cols.iter().map(|c| format!("o.{c}")).collect();
        format!(
            "DELETE FROM {table} s WHERE s.ctid OPERATOR(pg_catalog.=) (SELECT x.ctid FROM {table} x, pg_catalog.unnest(ARRAY[$1::pg_catalog.text::{table}]) o WHERE ({}) = ({}) AND x::pg_catalog.text OPERATOR(pg_catalog.=) o::pg_catalog.text LIMIT 1)",
            lhs.join(", "),
            rhs.join(", ")
        )
    };
    execute(&sql, &[(pg_sys::TEXTOID, old.into_datum())])
}

/// An index on a staged table's key (the changes an incremental replays find their rows by it).
pub fn index_staged(schema: &str, name: &str, key: &[String]) -> Result<()> {
    if key.is_empty() {
        return Ok(());
    }
    let cols: Vec<String> = key.iter().map(String::as_str).map(quote_identifier).collect();
    execute(&format!("CREATE INDEX ON {}.{} ({})", quote_identifier(schema), quote_identifier(name), cols.join(", ")), &[])?;
    Ok(())
}

/// Rows of `schema.name`.
pub fn count_rows(schema: &str, name: &str) -> Result<u64> {
    execute(&format!("SELECT FROM {}.{}", quote_identifier(schema), quote_identifier(name)), &[])
}

/// Rows of `schema.name` whose tenant column is not `tenant` (tenant ids are in their type's
/// canonical text form, so comparing texts compares values).
pub fn foreign_rows(schema: &str, name: &str, column: &str, tenant: &str) -> Result<u64> {
    execute(
        &format!(
            "SELECT FROM {}.{} s WHERE s.{}::pg_catalog.text IS DISTINCT FROM $1",
            quote_identifier(schema),
            quote_identifier(name),
            quote_identifier(column)
        ),
        &[(pg_sys::TEXTOID, tenant.into_datum())],
    )
}

/// `DELETE FROM [ONLY] live WHERE tenant_column = tenant`.
pub fn delete_tenant_rows(src: &Source, tenant: &str) -> Result<u64> {
    execute(
        &format!(
            "DELETE FROM {}{} t WHERE t.{} OPERATOR(pg_catalog.=) $1::pg_catalog.text::{}",
            if src.partitioned { "" } else { "ONLY " },
            src.name,
            quote_identifier(&src.tenant_column),
            src.tenant_type
        ),
        &[(pg_sys::TEXTOID, tenant.into_datum())],
    )
}

/// `INSERT INTO live (columns) OVERRIDING SYSTEM VALUE SELECT columns FROM schema.name`.
pub fn copy_into_live(src: &Source, schema: &str, name: &str, columns: &[String]) -> Result<u64> {
    let cols: Vec<String> = columns.iter().map(String::as_str).map(quote_identifier).collect();
    let cols = cols.join(", ");
    execute(
        &format!(
            "INSERT INTO {} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM {}.{}",
            src.name,
            quote_identifier(schema),
            quote_identifier(name)
        ),
        &[],
    )
}

const CAPTURE_ON: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM tenancy.change_capture WHERE disabled_at IS NULL)",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// Whether change capture is on.
pub fn capture_on() -> Result<bool> {
    Ok(one(&CAPTURE_ON, &[], |r| r.get::<bool>(1).unwrap_or(false))?.unwrap_or(false))
}

const START_CAPTURE: Stmt = Stmt {
    sql: "INSERT INTO tenancy.change_capture DEFAULT VALUES ON CONFLICT DO NOTHING",
    args: &[],
    who: Who::Owner,
    fresh: false,
};

pub fn start_capture() -> Result<()> {
    run(&START_CAPTURE, &[], |_| ())?;
    Ok(())
}

const STOP_CAPTURE: Stmt = Stmt {
    sql: "UPDATE tenancy.change_capture SET disabled_at = pg_catalog.clock_timestamp() WHERE disabled_at IS NULL",
    args: &[],
    who: Who::Owner,
    fresh: false,
};

pub fn stop_capture() -> Result<()> {
    run(&STOP_CAPTURE, &[], |_| ())?;
    Ok(())
}

const CAPTURED_SINCE: Stmt = Stmt {
    sql: "SELECT enabled_at FROM tenancy.change_capture WHERE disabled_at IS NULL",
    args: &[],
    who: Who::Owner,
    fresh: true,
};

/// Since when capture has been on without a break (None when it is off).
pub fn captured_since() -> Result<Option<pgrx::datum::TimestampWithTimeZone>> {
    Ok(one(&CAPTURED_SINCE, &[], |r| r.get(1))?.flatten())
}

const CAPTURE_TABLES: Stmt = Stmt {
    sql: "SELECT p.rel::pg_catalog.oid FROM tenancy.protected_tables p JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.rel \
           WHERE NOT c.relispartition ORDER BY 1",
    args: &[],
    who: Who::Owner,
    fresh: false,
};

/// The protected tables that carry the capture trigger themselves (partitions have their
/// parent's clone).
pub fn capture_tables() -> Result<Vec<pg_sys::Oid>> {
    run(&CAPTURE_TABLES, &[], |r| r.get::<pg_sys::Oid>(1).unwrap_or(pg_sys::InvalidOid))
}

const IS_PARTITION: Stmt = Stmt {
    sql: "SELECT relispartition FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: false,
};

pub fn is_partition(rel: pg_sys::Oid) -> Result<bool> {
    Ok(one(&IS_PARTITION, &[arg(rel)], |r| r.get::<bool>(1).unwrap_or(false))?.unwrap_or(false))
}

const HAS_CAPTURE_TRIGGER: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) $1 \
                          AND tgname OPERATOR(pg_catalog.=) 'tenancy_capture' AND tgparentid OPERATOR(pg_catalog.=) 0)",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: false,
};

pub fn has_capture_trigger(rel: pg_sys::Oid) -> Result<bool> {
    Ok(one(&HAS_CAPTURE_TRIGGER, &[arg(rel)], |r| r.get::<bool>(1).unwrap_or(false))?.unwrap_or(false))
}

/// The order of changes within a transaction (this backend's writes, counted).
static SEQ: crate::util::Backend<std::cell::Cell<i64>> = crate::util::Backend::new(std::cell::Cell::new(0));

/// One captured change (the capture trigger), inserted into `tenancy.changes` directly, without
/// SQL: it is on the path of every write to a protected table while capture is on.
pub fn record_change(tenant: &str, rel: pg_sys::Oid, op: u8, old: Option<&[u8]>, new: Option<&[u8]>) -> Result<()> {
    let ids = super::ids()?;
    if ids.changes == pg_sys::InvalidOid {
        return Err(TenancyError::NotInstalled);
    }
    let seq = SEQ.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    let too_long = [old, new].iter().flatten().any(|v| v.len() >= 0x3fff_ffff);
    if too_long {
        return Err(TenancyError::ValueTooLarge);
    }
    let text = |v: &[u8]| -> pg_sys::Datum {
        // SAFETY: a palloc'd text copied from `v` (shorter than 1 GB: checked above).
        pg_sys::Datum::from(unsafe { pg_sys::cstring_to_text_with_len(v.as_ptr().cast(), v.len() as i32) })
    };
    // SAFETY: the extension's own table (its OID from the catalog cache), opened and closed here
    // with the lock writers take; the tuple matches its descriptor (7 columns, in order); the
    // insert maintains its index. No permission check applies at this level: the caller is the
    // extension's trigger on a protected table.
    unsafe {
        let relation = pg_sys::table_open(ids.changes, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*relation).rd_att;
        let xid = pg_sys::GetTopFullTransactionId();
        let mut values = [
            text(tenant.as_bytes()),
            pg_sys::Datum::from(rel),
            pg_sys::Datum::from(op as i8),
            old.map(text).unwrap_or(pg_sys::Datum::from(0)),
            new.map(text).unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(xid.value),
            pg_sys::Datum::from(seq),
        ];
        let mut nulls = [false, false, false, old.is_none(), new.is_none(), false, false];
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::CatalogTupleInsert(relation, tuple);
        pg_sys::heap_freetuple(tuple);
        pg_sys::table_close(relation, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    }
    Ok(())
}

const FORGET_CHANGES: Stmt = Stmt {
    sql: "DELETE FROM tenancy.changes WHERE tenant OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// Every captured change of `tenant` (shredding: they are plaintext copies of its rows).
pub fn forget_changes(tenant: &str) -> Result<()> {
    run(&FORGET_CHANGES, &[arg(tenant)], |_| ())?;
    Ok(())
}

const LATEST: Stmt = Stmt {
    sql: "SELECT id, snapshot, created_at FROM tenancy.backups WHERE tenant OPERATOR(pg_catalog.=) $1 \
             AND location OPERATOR(pg_catalog.<>) ALL (ARRAY['exported', 'imported']) \
           ORDER BY created_at DESC, id LIMIT 1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// The tenant's latest backup written here (an exported one is not kept, an imported one's
/// snapshot is another server's word): (id, snapshot, created_at).
pub fn latest(tenant: &str) -> Result<Option<(pgrx::Uuid, String, pgrx::datum::TimestampWithTimeZone)>> {
    Ok(one(&LATEST, &[arg(tenant)], |r| Some((r.get(1)?, r.get(2)?, r.get(3)?)))?.flatten())
}

const CHAIN: Stmt = Stmt {
    sql: "WITH RECURSIVE c(id, parent, depth) AS ( \
              SELECT id, parent, 0 FROM tenancy.backups WHERE id OPERATOR(pg_catalog.=) $1 \
              UNION ALL \
              SELECT b.id, b.parent, c.depth OPERATOR(pg_catalog.+) 1 FROM tenancy.backups b JOIN c ON b.id OPERATOR(pg_catalog.=) c.parent \
               WHERE c.depth OPERATOR(pg_catalog.<) 10000) \
          SELECT id FROM c ORDER BY depth DESC",
    args: &[pg_sys::UUIDOID],
    who: Who::Owner,
    fresh: false,
};

/// The registered chain that ends with `id`: from its full backup to it.
pub fn chain(id: pgrx::Uuid) -> Result<Vec<pgrx::Uuid>> {
    Ok(run(&CHAIN, &[arg(id)], |r| r.get::<pgrx::Uuid>(1))?.into_iter().flatten().collect())
}

/// One captured change, as an incremental backup reads it.
pub struct Captured {
    /// The table a backup covers (a partition's root).
    pub rel: pg_sys::Oid,
    pub op: String,
    pub old: Option<String>,
    pub new: Option<String>,
    /// Commit time, microseconds since 1970 (None when track_commit_timestamp did not keep it).
    pub committed: Option<i64>,
}

const CAPTURED: Stmt = Stmt {
    sql: "SELECT COALESCE(pg_catalog.pg_partition_root(c.rel::pg_catalog.regclass)::pg_catalog.oid, c.rel), c.op::pg_catalog.text, c.old_row, c.new_row, \
                 (pg_catalog.date_part('epoch', pg_catalog.pg_xact_commit_timestamp(c.xid::pg_catalog.xid)) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8 \
            FROM tenancy.changes c \
           WHERE c.tenant OPERATOR(pg_catalog.=) $1 AND NOT pg_catalog.pg_visible_in_snapshot(c.xid, $2::pg_catalog.pg_snapshot) \
           ORDER BY 5, c.xid, c.seq",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// The tenant's changes committed after the snapshot `since` (and visible now), in commit order.
pub fn captured(tenant: &str, since: &str) -> Result<Vec<Captured>> {
    run_in_statement_snapshot(&CAPTURED, &[arg(tenant), arg(since)], |r| Captured {
        rel: r.get(1).unwrap_or(pg_sys::InvalidOid),
        op: r.get(2).unwrap_or_default(),
        old: r.get(3),
        new: r.get(4),
        committed: r.get(5),
    })
}

const FORGET_COVERED: Stmt = Stmt {
    sql: "DELETE FROM tenancy.changes WHERE tenant OPERATOR(pg_catalog.=) $1 AND pg_catalog.pg_visible_in_snapshot(xid, $2::pg_catalog.pg_snapshot)",
    args: &[pg_sys::TEXTOID, pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: false,
};

/// The tenant's changes a backup taken with `snapshot` covers (it holds them, or the rows they
/// made): the next incremental starts after it.
pub fn forget_covered(tenant: &str, snapshot: &str) -> Result<()> {
    run(&FORGET_COVERED, &[arg(tenant), arg(snapshot)], |_| ())?;
    Ok(())
}

const UNAPPROVED_CODE: Stmt = Stmt {
    sql: "SELECT pg_catalog.string_agg(DISTINCT f.fn::pg_catalog.text, ', ') \
            FROM (SELECT $1::pg_catalog.regclass AS relid UNION SELECT t.relid FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass) t) r \
           CROSS JOIN LATERAL tenancy._row_functions(r.relid) f WHERE NOT f.approved",
    args: &[pg_sys::OIDOID],
    who: Who::Owner,
    fresh: true,
};

/// The functions that run over the rows of `rel` or its partitions and that no superuser
/// approved (as they are defined now), listed; None when there are none.
pub fn unapproved_code(rel: pg_sys::Oid) -> Result<Option<String>> {
    Ok(one(&UNAPPROVED_CODE, &[arg(rel)], |r| r.get::<String>(1))?.flatten())
}

const REFERENCING_OUTSIDE: Stmt = Stmt {
    sql: "SELECT EXISTS (SELECT FROM pg_catalog.pg_constraint WHERE contype OPERATOR(pg_catalog.=) 'f' \
             AND conparentid OPERATOR(pg_catalog.=) 0 AND confrelid OPERATOR(pg_catalog.=) ANY ($1) \
             AND NOT conrelid OPERATOR(pg_catalog.=) ANY ($1))",
    args: &[pg_sys::OIDARRAYOID],
    who: Who::Caller,
    fresh: false,
};

/// Whether a table not among `rels` has a foreign key into one of them.
pub fn referencing_outside(rels: &[pg_sys::Oid]) -> Result<bool> {
    Ok(one(&REFERENCING_OUTSIDE, &[arg(rels.to_vec())], |r| r.get::<bool>(1).unwrap_or(false))?.unwrap_or(false))
}

const TENANT_STATUS: Stmt = Stmt {
    sql: "SELECT status FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

pub fn tenant_status(tenant: &str) -> Result<Option<String>> {
    Ok(one(&TENANT_STATUS, &[arg(tenant)], |r| r.get::<String>(1))?.flatten())
}

const TENANT_STATUS_LOCKED: Stmt = Stmt {
    sql: "SELECT status FROM tenancy.tenants WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
    args: &[pg_sys::TEXTOID],
    who: Who::Owner,
    fresh: true,
};

/// The tenant's status, its row locked until the transaction ends (no status change meanwhile).
pub fn tenant_status_locked(tenant: &str) -> Result<Option<String>> {
    Ok(one(&TENANT_STATUS_LOCKED, &[arg(tenant)], |r| r.get::<String>(1))?.flatten())
}

const EXPIRED: Stmt = Stmt {
    sql: "WITH RECURSIVE needed(id) AS ( \
              SELECT id FROM tenancy.backups WHERE expires_at OPERATOR(pg_catalog.>=) pg_catalog.now() \
              UNION \
              SELECT b.parent FROM tenancy.backups b JOIN needed n ON b.id OPERATOR(pg_catalog.=) n.id WHERE b.parent IS NOT NULL) \
          DELETE FROM tenancy.backups b WHERE NOT EXISTS (SELECT FROM needed n WHERE n.id OPERATOR(pg_catalog.=) b.id) \
          RETURNING b.id, b.tenant, b.kind, b.location",
    args: &[],
    who: Who::Owner,
    fresh: false,
};

/// Unregister every backup past its expiry that no unexpired backup depends on (an incremental
/// needs every backup before it); returns (id, tenant, kind, location) of each.
pub fn unregister_expired() -> Result<Vec<(pgrx::Uuid, String, String, String)>> {
    Ok(run(&EXPIRED, &[], |r| Some((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?.into_iter().flatten().collect())
}

const PARTITION_ROOT: Stmt = Stmt {
    sql: "SELECT pg_catalog.pg_partition_root($1::pg_catalog.regclass)::pg_catalog.oid",
    args: &[pg_sys::OIDOID],
    who: Who::Caller,
    fresh: false,
};

/// The root of the partition tree `rel` belongs to (`rel` itself when it is not a partition).
pub fn partition_root(rel: pg_sys::Oid) -> Result<pg_sys::Oid> {
    Ok(one(&PARTITION_ROOT, &[arg(rel)], |r| r.get::<pg_sys::Oid>(1))?.flatten().unwrap_or(rel))
}
