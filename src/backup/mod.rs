//! Tenant-tagged backups: one tenant's rows from every protected table, from one snapshot, in an
//! archive with a verifiable manifest (`pg_tenancy_core::archive`), encrypted with the tenant's
//! data key; written under `pg_tenancy.backup_dir` (`backup`) or streamed to the client as rows
//! (`export`), registered in `tenancy.backups`, verified (`verify_backup`), and restored for that
//! tenant only (`tenancy.restore`, in `sql/backup.sql`, calls the `_restore_*` steps here).
//!
//! Every function here is a superuser's: it reads and writes every tenant's tables regardless of
//! row security. Archives and errors carry no row values in messages; the archive itself holds
//! the rows, sealed with the tenant's key unless `encrypted => false` was asked.
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};
use std::cell::RefCell;
use std::io::Write;

use pg_tenancy_core::archive::{self, ArchiveError, Column, Encryption, Manifest, TableEntry};
use pg_tenancy_core::envelope::{self, OVERHEAD};
use pg_tenancy_core::model::KeyKind;

use crate::audit::{self, Event};
use crate::catalog::{self, backups as store};
use crate::crypto::keystore::{self, Create};
use crate::error::{OrRaise, Result, TenancyError};
use crate::gucs;

fn require_superuser(what: &'static str) -> Result<()> {
    // SAFETY: reads the current user's superuser flag (syscache).
    if unsafe { pg_sys::superuser() } {
        Ok(())
    } else {
        Err(TenancyError::Denied(what))
    }
}

fn check_tenant(tenant: &str) -> Result<()> {
    if !pg_tenancy_core::tenant_id::valid(tenant) {
        return Err(TenancyError::InvalidTenantId);
    }
    if !catalog::tenants::tenant_exists(tenant)? {
        return Err(TenancyError::UnknownTenant);
    }
    Ok(())
}

/// Data residency: a tenant of another region than this cluster's (`pg_tenancy.region`) is
/// neither imported nor restored here.
fn check_region(tenant: &str) -> Result<()> {
    match catalog::tenants::tenant_region(tenant)? {
        Some(region) => crate::context::served_here(region),
        None => Ok(()),
    }
}

fn new_id() -> Uuid {
    let mut b = [0u8; 16];
    // SAFETY: fills the buffer from the OS random source; false only if none is available.
    if !unsafe { pg_sys::pg_strong_random(b.as_mut_ptr().cast(), b.len()) } {
        pgrx::error!("pg_tenancy: no random source for a backup id");
    }
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    Uuid::from_bytes(b)
}

/// An archive just made: its lines and what the registry records.
struct Made {
    id: Uuid,
    lines: Vec<String>,
    manifest: Manifest,
    parent: Option<Uuid>,
    rows: i64,
    data_bytes: i64,
    first_change: Option<i64>,
    last_change: Option<i64>,
}

impl Made {
    fn archive_bytes(&self) -> i64 {
        self.lines.iter().map(|l| l.len() as i64 + 1).sum()
    }
}

/// What an incremental backup starts from: its parent and the chain up to it.
struct Base {
    parent: Uuid,
    snapshot: String,
    chain: Vec<String>,
}

/// The tenant's latest backup, if change capture has run without a break since it was taken.
fn incremental_base(tenant: &str) -> Result<Base> {
    let Some((parent, snapshot, taken)) = store::latest(tenant)? else {
        return Err(TenancyError::BrokenChain);
    };
    match store::captured_since()? {
        Some(since) if since <= taken => {}
        _ => return Err(TenancyError::BrokenChain),
    }
    let chain = store::chain(parent)?.iter().map(Uuid::to_string).collect();
    Ok(Base { parent, snapshot, chain })
}

/// Read the tenant's rows of every protected table (a full backup) or its changes since its
/// latest backup (an incremental one), with one snapshot (the calling statement's), and build
/// the archive.
fn make(tenant: &str, kind: &str, encrypted: bool) -> Result<Made> {
    require_superuser("backups are a superuser's")?;
    check_tenant(tenant)?;
    let base = match kind {
        "full" => None,
        "incremental" => Some(incremental_base(tenant)?),
        _ => return Err(TenancyError::InvalidArgument("kind ('full' or 'incremental')")),
    };
    let id = new_id();
    let id_text = id.to_string();
    let moment = store::moment()?;
    let key = if encrypted {
        if keystore::fetch_key(tenant, KeyKind::Data, None)?.is_none() {
            keystore::create_key(tenant, KeyKind::Data, Create::First)?;
        }
        Some(keystore::cipher_for(tenant, None, None)?)
    } else {
        None
    };
    let sources = store::sources()?;
    let _quiet = audit::QuietBypassReads::new();
    // text forms that read back the same in any session
    let _settings = crate::protect::capture::canonical_output();
    // per table: its data (rows, or changes) and how many
    let mut datas: Vec<(Vec<u8>, u64)> = (0..sources.len()).map(|_| (Vec::new(), 0)).collect();
    let (mut first_change, mut last_change) = (None, None);
    match &base {
        None => {
            for (src, (data, n)) in sources.iter().zip(datas.iter_mut()) {
                *n = store::tenant_rows(src, tenant, |row| archive::frame_row(data, row))?;
            }
        }
        Some(b) => {
            for c in store::captured(tenant, &b.snapshot)? {
                // a change of a table no longer protected is not the tenant's to restore
                let Some(i) = sources.iter().position(|s| s.rel == c.rel) else { continue };
                // without its commit time a change cannot be put in order
                let Some(committed) = c.committed else { return Err(TenancyError::BrokenChain) };
                let change = archive::Change {
                    op: c.op.as_bytes().first().copied().unwrap_or(b'?'),
                    committed,
                    old: c.old.as_deref().map(str::as_bytes),
                    new: c.new.as_deref().map(str::as_bytes),
                };
                archive::frame_change(&mut datas[i].0, &change);
                datas[i].1 += 1;
                first_change = Some(first_change.map_or(committed, |f: i64| f.min(committed)));
                last_change = Some(last_change.map_or(committed, |l: i64| l.max(committed)));
            }
        }
    }
    let mut tables = Vec::with_capacity(sources.len());
    let mut data_lines = Vec::new();
    let (mut rows_total, mut bytes_total) = (0i64, 0i64);
    for (index, (src, (mut data, rows))) in sources.iter().zip(datas).enumerate() {
        let chunks = archive::chunks(&data);
        let n = chunks.len();
        let mut sealed = Vec::new();
        for (c, chunk) in chunks.into_iter().enumerate() {
            let payload: &[u8] = match &key {
                Some((version, k)) => {
                    sealed.resize(chunk.len() + OVERHEAD, 0);
                    let context = archive::chunk_context(&id_text, index, c, n);
                    envelope::seal(k, *version, keystore::random_nonce(), tenant, &context, chunk, &mut sealed);
                    &sealed
                }
                None => chunk,
            };
            data_lines.push(archive::data_line(index, c, payload));
        }
        tables.push(TableEntry {
            name: src.name.clone(),
            tenant_column: src.tenant_column.clone(),
            columns: serde_json::from_str::<Vec<Column>>(&src.columns_json).unwrap_or_default(),
            rows,
            size: data.len() as u64,
            sha256: archive::sha256_hex(&data),
            chunks: n as u32,
            key: serde_json::from_str::<Option<Vec<String>>>(&src.key_json).ok().flatten().unwrap_or_default(),
        });
        rows_total += rows as i64;
        bytes_total += data.len() as i64;
        // the plaintext goes as soon as it is sealed
        zeroize::Zeroize::zeroize(&mut data);
    }
    let chain = match &base {
        None => vec![id_text.clone()],
        Some(b) => b.chain.iter().cloned().chain(std::iter::once(id_text.clone())).collect(),
    };
    let manifest = Manifest {
        version: archive::FORMAT_VERSION,
        id: id_text,
        tenant: tenant.to_string(),
        kind: kind.to_string(),
        parent: base.as_ref().map(|b| b.parent.to_string()),
        chain,
        created: moment.created,
        snapshot: moment.snapshot,
        lsn: moment.lsn,
        extension_version: moment.extension_version,
        server_version: moment.server_version,
        encryption: key.as_ref().map(|(v, _)| Encryption { algorithm: "AES-256-GCM".into(), key_version: *v }),
        tables,
        checksum: String::new(),
    };
    let mut manifest = manifest;
    let mut lines = archive::render_manifest(&manifest);
    // the checksum the rendering wrote (registered, and sealed with the tenant's key)
    manifest.checksum = archive::parse_manifest(&lines).map_err(TenancyError::Archive)?.0.checksum;
    if let Some((version, k)) = &key {
        lines.push(archive::seal_line(&seal(k, *version, tenant, &manifest.id, &manifest.checksum)));
    }
    lines.extend(data_lines);
    Ok(Made { id, lines, manifest, parent: base.map(|b| b.parent), rows: rows_total, data_bytes: bytes_total, first_change, last_change })
}

/// The manifest checksum sealed with the tenant's key.
fn seal(k: &envelope::DataKey, version: i32, tenant: &str, backup: &str, checksum: &str) -> Vec<u8> {
    let mut out = vec![0u8; checksum.len() + OVERHEAD];
    envelope::seal(k, version, keystore::random_nonce(), tenant, &archive::seal_context(backup), checksum.as_bytes(), &mut out);
    out
}

fn register(made: &Made, location: &str) -> Result<()> {
    let m = &made.manifest;
    store::register(&store::NewBackup {
        id: made.id,
        tenant: &m.tenant,
        kind: &m.kind,
        parent: made.parent,
        location,
        snapshot: &m.snapshot,
        lsn: &m.lsn,
        tables: m.tables.len() as i32,
        rows: made.rows,
        data_bytes: made.data_bytes,
        archive_bytes: made.archive_bytes(),
        key_version: m.encryption.as_ref().map(|e| e.key_version),
        manifest_sha256: &made.manifest.checksum,
        created: &m.created,
        first_change: made.first_change,
        last_change: made.last_change,
    })?;
    // the tenant's captured changes this backup covers are no longer needed here (not after an
    // export: it is not kept here, so it cannot be the parent of the next incremental)
    if location == "exported" {
        return Ok(());
    }
    store::forget_covered(&m.tenant, &m.snapshot)
}

/// Write the archive under the backup directory: `<dir>/<tenant>/<id>.pgtb`, written to a
/// temporary name, synced, then renamed (a crash leaves no half archive under the final name).
fn write_file(made: &Made) -> Result<String> {
    let dir = gucs::backup_dir().filter(|d| !d.is_empty()).ok_or(TenancyError::NoBackupDir)?;
    // "tenant-<id>": an id may be "." or ".." (valid tenant ids), never a path of its own
    let dir = std::path::Path::new(&dir).join(format!("tenant-{}", made.manifest.tenant));
    let unwritable = |_| TenancyError::ArchiveUnreadable("the backup directory is not writable by the server");
    std::fs::create_dir_all(&dir).map_err(unwritable)?;
    let path = dir.join(format!("{}.pgtb", made.id));
    let tmp = dir.join(format!("{}.pgtb.tmp", made.id));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(unwritable)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        for l in &made.lines {
            w.write_all(l.as_bytes()).map_err(unwritable)?;
            w.write_all(b"\n").map_err(unwritable)?;
        }
        let f = w.into_inner().map_err(|_| TenancyError::ArchiveUnreadable("the archive could not be written"))?;
        f.sync_all().map_err(unwritable)?;
    }
    std::fs::rename(&tmp, &path).map_err(unwritable)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(path.to_string_lossy().into_owned())
}

/// A backup of one tenant into `pg_tenancy.backup_dir`; its id.
#[pg_extern(volatile, parallel_unsafe)]
fn backup(tenant: &str, kind: default!(&str, "'full'"), encrypted: default!(bool, true)) -> Uuid {
    let made = make(tenant, kind, encrypted).or_raise();
    let path = write_file(&made).or_raise();
    register(&made, &path).or_raise();
    made.id
}

/// The same archive as `backup`, as rows for the client (`\copy (SELECT * FROM
/// tenancy.export('acme')) TO 'acme.pgtb'`); registered as exported (not kept here).
#[pg_extern(volatile, parallel_unsafe)]
fn export(tenant: &str, kind: default!(&str, "'full'"), encrypted: default!(bool, true)) -> SetOfIterator<'static, String> {
    let made = make(tenant, kind, encrypted).or_raise();
    register(&made, "exported").or_raise();
    SetOfIterator::new(made.lines)
}

/// Register an archive a client saved (its lines, in order); its backup id. Importing the same
/// archive again returns the same id. An incremental archive needs its parent registered first.
#[pg_extern(volatile, parallel_unsafe)]
fn import(archive: Vec<String>, allow_unencrypted: default!(bool, false)) -> Uuid {
    require_superuser("backups are a superuser's").or_raise();
    let (m, _) = archive::parse_manifest(&archive).map_err(TenancyError::Archive).or_raise();
    if m.encryption.is_none() && !allow_unencrypted {
        // anyone can write an unencrypted archive (its checksums prove nothing about its origin)
        TenancyError::Denied("an unencrypted archive is imported only with allow_unencrypted => true").raise();
    }
    check_tenant(&m.tenant).or_raise();
    check_region(&m.tenant).or_raise();
    let id = uuid_of(&m.id).or_raise();
    let parent = m.parent.as_deref().map(uuid_of).transpose().or_raise();
    let known = store::registered(id).or_raise();
    if let Some(r) = &known {
        if r.manifest_sha256 != m.checksum || r.tenant != m.tenant {
            // the same id with another manifest: one of the two was altered
            TenancyError::Archive(ArchiveError::ManifestAltered).raise();
        }
        if r.location == "imported" {
            return id;
        }
    }
    if let Some(p) = parent {
        // the chain must continue a backup of the same tenant registered here
        let chain: Vec<String> = store::chain(p).or_raise().iter().map(Uuid::to_string).collect();
        let reg = store::registered(p).or_raise();
        if reg.map(|r| r.tenant) != Some(m.tenant.clone()) || chain.iter().chain(std::iter::once(&m.id)).ne(m.chain.iter()) {
            TenancyError::BrokenChain.raise();
        }
    }
    // the data must check out before it is registered
    let report = check_archive(&m, &archive, &m.tenant).or_raise();
    match known {
        // exported earlier from this database: now it is kept here
        Some(_) => store::set_location(id, "imported").or_raise(),
        None => store::register(&store::NewBackup {
            id,
            tenant: &m.tenant,
            kind: &m.kind,
            parent,
            location: "imported",
            snapshot: &m.snapshot,
            lsn: &m.lsn,
            tables: m.tables.len() as i32,
            rows: report.rows,
            data_bytes: report.bytes,
            archive_bytes: archive.iter().map(|l| l.len() as i64 + 1).sum(),
            key_version: m.encryption.as_ref().map(|e| e.key_version),
            manifest_sha256: &m.checksum,
            created: &m.created,
            first_change: report.first_change,
            last_change: report.last_change,
        })
        .or_raise(),
    }
    store::store_lines(id, &archive).or_raise();
    id
}

fn uuid_of(s: &str) -> Result<Uuid> {
    parse_uuid(s).map(Uuid::from_bytes).ok_or(TenancyError::Archive(ArchiveError::Unparsable))
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// What an archive holds, once checked.
struct Checked {
    rows: i64,
    bytes: i64,
    first_change: Option<i64>,
    last_change: Option<i64>,
    /// Per table of the manifest: its data (framed rows, or framed changes).
    data: Vec<Vec<u8>>,
}

/// Every check of an archive (manifest, its seal, chain fields, tenant tag, key, each table's
/// chunks, size, checksum and count); the tables' data when all pass.
fn check_archive<S: AsRef<str>>(m: &Manifest, lines: &[S], tenant: &str) -> Result<Checked> {
    if m.tenant != tenant {
        return Err(TenancyError::OtherTenantsBackup);
    }
    let incremental = match m.kind.as_str() {
        "full" => false,
        "incremental" => true,
        _ => return Err(TenancyError::Archive(ArchiveError::Unparsable)),
    };
    let chain_ok = m.chain.last() == Some(&m.id)
        && if incremental {
            m.chain.len() >= 2 && m.parent.as_ref() == m.chain.get(m.chain.len() - 2)
        } else {
            m.parent.is_none() && m.chain.len() == 1
        };
    if !chain_ok {
        return Err(TenancyError::BrokenChain);
    }
    let start = lines.iter().position(|l| l.as_ref().starts_with("\"Manifest-Checksum\"")).map(|i| i + 1).unwrap_or(lines.len());
    let key = match &m.encryption {
        Some(e) => Some(keystore::cipher_for(tenant, Some(e.key_version), None).map_err(|err| match err {
            TenancyError::CiphertextInvalid => TenancyError::KeysDestroyed,
            other => other,
        })?),
        None => None,
    };
    if let Some((_, k)) = &key {
        // the manifest is the tenant's: its checksum sealed with the tenant's key
        let sealed = archive::find_seal(&lines[start..]).ok_or(TenancyError::Archive(ArchiveError::ManifestAltered))?;
        let mut opened = vec![0u8; sealed.len().saturating_sub(OVERHEAD)];
        if sealed.len() < OVERHEAD
            || envelope::open(k, tenant, &archive::seal_context(&m.id), &sealed, &mut opened).is_err()
            || opened != m.checksum.as_bytes()
        {
            return Err(TenancyError::Archive(ArchiveError::ManifestAltered));
        }
    }
    let groups = archive::table_chunks(m, &lines[start..]).map_err(TenancyError::Archive)?;
    let mut out = Checked { rows: 0, bytes: 0, first_change: None, last_change: None, data: Vec::with_capacity(m.tables.len()) };
    for (index, (t, chunks)) in m.tables.iter().zip(groups).enumerate() {
        let n = chunks.len();
        let mut data = Vec::new();
        for (c, payload) in chunks.into_iter().enumerate() {
            match &key {
                Some((_, k)) => {
                    if payload.len() < OVERHEAD {
                        return Err(TenancyError::Archive(ArchiveError::ChecksumMismatch(t.name.clone())));
                    }
                    let mut plain = vec![0u8; payload.len() - OVERHEAD];
                    let context = archive::chunk_context(&m.id, index, c, n);
                    envelope::open(k, tenant, &context, &payload, &mut plain)
                        .map_err(|_| TenancyError::Archive(ArchiveError::ChecksumMismatch(t.name.clone())))?;
                    data.extend_from_slice(&plain);
                }
                None => data.extend_from_slice(&payload),
            }
        }
        archive::check_table(t, &data, incremental).map_err(TenancyError::Archive)?;
        // record texts are text: valid UTF-8 (the server encoding checks the rest on input)
        let texts: Vec<&[u8]> = if incremental {
            let changes = archive::changes(&data).unwrap_or_default();
            for c in &changes {
                out.first_change = Some(out.first_change.map_or(c.committed, |f: i64| f.min(c.committed)));
                out.last_change = Some(out.last_change.map_or(c.committed, |l: i64| l.max(c.committed)));
            }
            changes.iter().flat_map(|c| c.old.into_iter().chain(c.new)).collect()
        } else {
            archive::rows(&data).unwrap_or_default()
        };
        if texts.iter().any(|t| std::str::from_utf8(t).is_err()) {
            return Err(TenancyError::Archive(ArchiveError::ChecksumMismatch(t.name.clone())));
        }
        out.rows += t.rows as i64;
        out.bytes += data.len() as i64;
        out.data.push(data);
    }
    Ok(out)
}

/// The archive of a registered backup: its registry row, manifest and lines.
fn load(id: Uuid) -> Result<(store::Registered, Manifest, Vec<String>)> {
    let reg = store::registered(id)?.ok_or(TenancyError::UnknownBackup)?;
    let lines = match reg.location.as_str() {
        "imported" => store::stored_lines(id)?,
        "exported" => return Err(TenancyError::ArchiveUnreadable("the archive was streamed to a client and is not kept here: import it with tenancy.import()")),
        path => {
            let text = std::fs::read_to_string(path).map_err(|_| TenancyError::ArchiveUnreadable("the archive file is missing or unreadable"))?;
            text.lines().map(str::to_owned).collect()
        }
    };
    let (m, _) = archive::parse_manifest(&lines).map_err(TenancyError::Archive)?;
    if m.checksum != reg.manifest_sha256 || m.id != id.to_string() {
        return Err(TenancyError::Archive(ArchiveError::ManifestAltered));
    }
    if m.tenant != reg.tenant {
        return Err(TenancyError::OtherTenantsBackup);
    }
    Ok((reg, m, lines))
}

fn table_report(m: &Manifest) -> serde_json::Value {
    serde_json::Value::Array(
        m.tables.iter().map(|t| serde_json::json!({"table": t.name, "rows": t.rows, "bytes": t.size})).collect(),
    )
}

/// Check a backup end to end: every archive of its chain (from its full backup to it) for its
/// manifest checksum and seal, chain continuity, tenant, key, and every table's size, count and
/// SHA-256; its summary, or an ERROR naming the first problem.
#[pg_extern(volatile, parallel_unsafe)]
fn verify_backup(id: Uuid) -> JsonB {
    require_superuser("backups are a superuser's").or_raise();
    let reg = store::registered(id).or_raise().ok_or(TenancyError::UnknownBackup).or_raise();
    let chain = load_chain(&reg.tenant, id).or_raise();
    let (_, m, checked) = chain.last().expect("a chain ends with the backup");
    JsonB(serde_json::json!({
        "backup": id.to_string(),
        "tenant": reg.tenant,
        "kind": reg.kind,
        "chain": chain.iter().map(|(_, m, _)| m.id.clone()).collect::<Vec<_>>(),
        "format_version": m.version,
        "encrypted": m.encryption.is_some(),
        "rows": checked.rows,
        "bytes": checked.bytes,
        "tables": table_report(m),
    }))
}

/// A table as staged for a restore.
struct Staged {
    /// The live table's name (schema-qualified, quoted).
    name: String,
    tenant_column: String,
    columns: Vec<Column>,
    key: Vec<String>,
    /// Its name in the staging schema.
    staged_as: String,
}

thread_local! {
    /// The tables of the backup staged last in this backend, for the swap that follows.
    static STAGED: RefCell<Option<(Uuid, Vec<Staged>)>> = const { RefCell::new(None) };
}

/// Checks made before a restore starts.
#[pg_extern(volatile, parallel_unsafe)]
fn _restore_check(tenant: &str, backup: Uuid, mode: &str, into_schema: Option<&str>) {
    require_superuser("restores are a superuser's").or_raise();
    check_tenant(tenant).or_raise();
    check_region(tenant).or_raise();
    if store::tenant_status(tenant).or_raise().as_deref() == Some("offboarded") {
        TenancyError::Unavailable("offboarded").raise();
    }
    let reg = store::registered(backup).or_raise().ok_or(TenancyError::UnknownBackup).or_raise();
    if reg.tenant != tenant {
        audit::record(Event::CrossTenantWrite, pg_sys::InvalidOid, Some(&reg.tenant), "42501", "restore of another tenant's backup refused");
        TenancyError::OtherTenantsBackup.raise();
    }
    match (mode, into_schema) {
        ("replace", None) => {
            // SAFETY: reads backend transaction state.
            if unsafe { pg_sys::IsTransactionBlock() } {
                TenancyError::RestoreBlocked("tenancy.restore() commits between its steps: CALL it outside BEGIN ... COMMIT").raise();
            }
        }
        ("sandbox", Some(s)) if !s.is_empty() => {}
        ("sandbox", _) => TenancyError::InvalidArgument("into_schema (a sandbox restore names a new schema)").raise(),
        _ => TenancyError::InvalidArgument("mode ('replace', or 'sandbox' with into_schema)").raise(),
    }
}

/// The chain that ends with `backup`, each archive loaded and checked: from the full backup to
/// it, each continuing the one before.
fn load_chain(tenant: &str, backup: Uuid) -> Result<Vec<(store::Registered, Manifest, Checked)>> {
    let ids = store::chain(backup)?;
    if ids.last() != Some(&backup) {
        return Err(TenancyError::UnknownBackup);
    }
    let mut out: Vec<(store::Registered, Manifest, Checked)> = Vec::with_capacity(ids.len());
    for id in ids {
        let (reg, m, lines) = load(id)?;
        if reg.tenant != tenant {
            return Err(TenancyError::OtherTenantsBackup);
        }
        let checked = check_archive(&m, &lines, tenant)?;
        let continues = match out.last() {
            None => m.kind == "full",
            Some((_, prev, _)) => {
                m.kind == "incremental" && m.parent.as_ref() == Some(&prev.id) && prev.chain.iter().chain(std::iter::once(&m.id)).eq(m.chain.iter())
            }
        };
        if !continues {
            return Err(TenancyError::BrokenChain);
        }
        out.push((reg, m, checked));
    }
    Ok(out)
}

/// Verify the backup's chain and load it into tables of a new schema (`t0, t1, ...` for a
/// staging schema, the tables' own names for a sandbox): the full backup's rows, then each
/// incremental's changes in commit order, up to `at_us` (microseconds since 1970) when given.
/// Returns rows per table.
#[pg_extern(volatile, parallel_unsafe)]
fn _restore_stage(tenant: &str, backup: Uuid, schema: &str, staging: bool, at_us: Option<i64>) -> JsonB {
    require_superuser("restores are a superuser's").or_raise();
    let chain = load_chain(tenant, backup).or_raise();
    if let Some(at) = at_us {
        if at < chain[0].0.created_us {
            TenancyError::InvalidArgument("at (it is earlier than the full backup the chain starts with)").raise();
        }
    }
    // (a staging table has the tenant column: auto_protect must not register it; text forms
    // are read as they were written, ISO dates whatever this session's style)
    let _settings = catalog::GucScope::new(&[
        (c"pg_tenancy.auto_protect", c"off"),
        (c"DateStyle", c"ISO"),
        (c"IntervalStyle", c"postgres"),
        (c"extra_float_digits", c"3"),
    ]);
    store::create_schema(schema).or_raise();
    let live_sources = store::sources().or_raise();
    let mut tables: Vec<Staged> = Vec::new();
    let mut used = std::collections::HashSet::new();
    let mut applied = Vec::new();
    for (_, m, checked) in &chain {
        let incremental = m.kind == "incremental";
        for (t, data) in m.tables.iter().zip(&checked.data) {
            let k = match tables.iter().position(|s| s.name == t.name) {
                // its columns must be those of the full backup: changes are rows in that order
                Some(k) if incremental && !same_columns(&tables[k].columns, &t.columns) => {
                    TenancyError::BrokenChain.raise();
                }
                Some(k) => k,
                // a table the full backup does not have: its rows from before are in no archive
                None if incremental => TenancyError::BrokenChain.raise(),
                None => {
                    let staged_as = if staging { format!("t{}", tables.len()) } else { sandbox_name(&t.name, &mut used) };
                    let columns = staging_columns(t, staging, &live_sources).or_raise();
                    store::create_table(schema, &staged_as, &columns).or_raise();
                    tables.push(Staged {
                        name: t.name.clone(),
                        tenant_column: t.tenant_column.clone(),
                        columns: t.columns.clone(),
                        key: t.key.clone(),
                        staged_as,
                    });
                    applied.push(0u64);
                    tables.len() - 1
                }
            };
            let s = &tables[k];
            if !incremental {
                let rows = archive::rows(data).unwrap_or_default();
                let mut loaded = 0u64;
                for batch in rows.chunks(10_000) {
                    let texts: Vec<&str> = batch.iter().map(|r| std::str::from_utf8(r).unwrap_or_default()).collect();
                    loaded += store::insert_rows(schema, &s.staged_as, texts).or_raise();
                }
                if loaded != t.rows {
                    TenancyError::Archive(ArchiveError::CountMismatch(t.name.clone())).raise();
                }
                store::index_staged(schema, &s.staged_as, &s.key).or_raise();
                continue;
            }
            let mut pending: Vec<&str> = Vec::new();
            for c in archive::changes(data).unwrap_or_default() {
                if at_us.is_some_and(|at| c.committed > at) {
                    continue;
                }
                if let Some(old) = c.old {
                    if !pending.is_empty() {
                        store::insert_rows(schema, &s.staged_as, std::mem::take(&mut pending)).or_raise();
                    }
                    let old = std::str::from_utf8(old).unwrap_or_default();
                    if store::delete_staged_row(schema, &s.staged_as, &s.key, old).or_raise() != 1 {
                        // a change that does not find its row: the chain does not continue
                        TenancyError::BrokenChain.raise();
                    }
                }
                if let Some(new) = c.new {
                    pending.push(std::str::from_utf8(new).unwrap_or_default());
                }
                applied[k] += 1;
            }
            if !pending.is_empty() {
                store::insert_rows(schema, &s.staged_as, pending).or_raise();
            }
        }
    }
    let mut report = Vec::new();
    for (s, n) in tables.iter().zip(&applied) {
        if store::foreign_rows(schema, &s.staged_as, &s.tenant_column, tenant).or_raise() > 0 {
            TenancyError::OtherTenantsBackup.raise();
        }
        let rows = store::count_rows(schema, &s.staged_as).or_raise();
        report.push(serde_json::json!({"table": s.name, "rows": rows, "changes_applied": n, "staged_as": format!("{schema}.{}", s.staged_as)}));
    }
    STAGED.with(|st| *st.borrow_mut() = Some((backup, tables)));
    JsonB(serde_json::json!({"chain": chain.len(), "tables": report}))
}

fn same_columns(a: &[Column], b: &[Column]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name)
}

/// The columns of a staging table: the backup's names, with the live table's types (never a
/// type looked up by a name the archive gives, which its owner could have replaced by one whose
/// checks run their code: F1 of the backup review). A column the live table no longer has fails a
/// restore in place; in a sandbox it keeps its type if that is PostgreSQL's own, else text.
/// Refused as well: a backup whose tenant column is missing or computed, and a live table over
/// whose rows runs code no superuser approved (now: an approval lapses when its function is
/// redefined).
fn staging_columns(t: &TableEntry, in_place: bool, sources: &[store::Source]) -> Result<Vec<(String, String)>> {
    if !t.columns.iter().any(|c| c.name == t.tenant_column && !c.generated) {
        return Err(TenancyError::Archive(ArchiveError::Unparsable));
    }
    let live = sources.iter().find(|s| s.name == t.name);
    if in_place {
        match &live {
            None => {
                return Err(TenancyError::RestoreBlocked(
                    "a table of the backup is no longer a protected table: restore into a sandbox (mode => 'sandbox')",
                ))
            }
            Some(src) if src.tenant_column != t.tenant_column => {
                return Err(TenancyError::RestoreBlocked(
                    "a table of the backup is now protected on another column: restore into a sandbox",
                ))
            }
            _ => {}
        }
    }
    if let Some(src) = &live {
        if let Some(functions) = store::unapproved_code(src.rel)? {
            let _ = functions;
            return Err(TenancyError::RestoreBlocked(
                "code no superuser approved runs over the table's rows (tenancy.check() lists it): approve it with tenancy.approve_function() first",
            ));
        }
    }
    let now: Vec<Column> = live.map(|s| serde_json::from_str(&s.columns_json).unwrap_or_default()).unwrap_or_default();
    t.columns
        .iter()
        .map(|c| {
            let type_name = match now.iter().find(|n| n.name == c.name) {
                Some(n) => store::resolve_type(&n.type_name)?,
                None if in_place && !c.generated => {
                    return Err(TenancyError::RestoreBlocked(
                        "a column of the backup is not in the live table (renamed or dropped): restore into a sandbox",
                    ))
                }
                None => match store::resolve_type(&c.type_name) {
                    Ok(ty) if ty.starts_with("pg_catalog.") || !ty.contains('.') => ty,
                    _ => "pg_catalog.text".to_string(),
                },
            };
            Ok((c.name.clone(), type_name))
        })
        .collect()
}

/// A sandbox table's name: the live table's own (without its schema), made unique.
fn sandbox_name(qualified: &str, used: &mut std::collections::HashSet<String>) -> String {
    let base = qualified.rsplit_once('.').map(|(_, n)| n).unwrap_or(qualified).trim_matches('"').replace("\"\"", "\"");
    let mut name = base.clone();
    let mut n = 1;
    while !used.insert(name.clone()) {
        n += 1;
        name = format!("{base}_{n}");
    }
    name
}

/// Replace the tenant's rows of every table in the backup by the staged ones, in foreign-key
/// order (children's rows out first, parents' in first). Other tenants' rows are not touched.
#[pg_extern(volatile, parallel_unsafe)]
fn _restore_swap(tenant: &str, backup: Uuid, schema: &str) -> JsonB {
    require_superuser("restores are a superuser's").or_raise();
    let Some((staged, tables)) = STAGED.with(|s| s.borrow_mut().take()) else {
        TenancyError::RestoreBlocked("nothing was staged").raise();
    };
    if staged != backup {
        TenancyError::RestoreBlocked("the staged backup is another one").raise();
    }
    let mut sources = store::sources().or_raise();
    let mut live = Vec::new();
    for t in &tables {
        let Some(src) = sources.iter().position(|s| s.name == t.name).map(|i| sources.swap_remove(i)) else {
            TenancyError::RestoreBlocked("a table of the backup is no longer a protected table: restore into a sandbox (mode => 'sandbox')").raise();
        };
        if src.tenant_column != t.tenant_column {
            TenancyError::RestoreBlocked("a table of the backup is now protected on another column: restore into a sandbox").raise();
        }
        let now: Vec<Column> = serde_json::from_str(&src.columns_json).unwrap_or_default();
        // the columns both have, that PostgreSQL does not compute
        let columns: Vec<String> = t
            .columns
            .iter()
            .filter(|c| now.iter().any(|n| n.name == c.name && !n.generated))
            .map(|c| c.name.clone())
            .collect();
        live.push((t, src, columns));
    }
    let rels: Vec<pg_sys::Oid> = live.iter().map(|(_, s, _)| s.rel).collect();
    if store::referencing_outside(&rels).or_raise() {
        // its rows would be removed by a cascade, or block the swap, without being restored
        TenancyError::RestoreBlocked("a table the backup does not cover has a foreign key into one it covers: restore into a sandbox").raise();
    }
    let order = parents_first(&rels, &store::foreign_keys(&rels).or_raise());
    let _quiet = audit::QuietBypassReads::new();
    let mut deleted = vec![0u64; live.len()];
    for &k in order.iter().rev() {
        deleted[k] = store::delete_tenant_rows(&live[k].1, tenant).or_raise();
    }
    let mut report = Vec::new();
    for &k in &order {
        let (t, src, columns) = &live[k];
        let inserted = store::copy_into_live(src, schema, &t.staged_as, columns).or_raise();
        report.push(serde_json::json!({"table": src.name, "rows_before": deleted[k], "rows_after": inserted}));
    }
    JsonB(serde_json::Value::Array(report))
}

/// Delete every row of an offboarded tenant from every protected table (children's rows before
/// their parents'), and its captured changes: what is left here of a tenant moved to another
/// region (its archive restored there) or offboarded for good. Superuser only; a tenant that is
/// not `offboarded` is refused (55000). Returns the rows deleted per table; audit event
/// `tenant_purged`. One transaction: a failure deletes nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn purge_tenant(tenant: Option<&str>) -> JsonB {
    require_superuser("purging a tenant's rows is a superuser's").or_raise();
    let tenant = tenant.ok_or(TenancyError::InvalidArgument("tenant")).or_raise();
    // (locked: the tenant cannot be reactivated while its rows go)
    match store::tenant_status_locked(tenant).or_raise().as_deref() {
        None => TenancyError::UnknownTenant.raise(),
        Some("offboarded") => {}
        Some(_) => TenancyError::NotOffboarded.raise(),
    }
    let sources = store::sources().or_raise();
    let rels: Vec<pg_sys::Oid> = sources.iter().map(|s| s.rel).collect();
    if store::referencing_outside(&rels).or_raise() {
        // its deletes would cascade into (or be blocked by) rows nobody counts as the tenant's
        TenancyError::PurgeBlocked("a table that is not protected has a foreign key into a protected one").raise();
    }
    // the deletes run as the superuser: no trigger or other code nobody approved may run in them
    for src in &sources {
        if store::unapproved_code(src.rel).or_raise().is_some() {
            TenancyError::PurgeBlocked(
                "code no superuser approved runs over a protected table's rows (tenancy.check() lists it): approve it with tenancy.approve_function() first",
            )
            .raise();
        }
    }
    let order = parents_first(&rels, &store::foreign_keys(&rels).or_raise());
    let _quiet = audit::QuietBypassReads::new();
    let mut report = serde_json::Map::new();
    for &k in order.iter().rev() {
        let n = store::delete_tenant_rows(&sources[k], tenant).or_raise();
        report.insert(sources[k].name.clone(), n.into());
    }
    store::forget_changes(tenant).or_raise();
    let total: u64 = report.values().filter_map(serde_json::Value::as_u64).sum();
    let tables = report.values().filter(|n| n.as_u64().is_some_and(|n| n > 0)).count();
    audit::record(Event::TenantPurged, pg_sys::InvalidOid, Some(tenant), "00000", &format!("{total} rows of the tenant deleted from {tables} protected tables"));
    JsonB(serde_json::Value::Object(report))
}

/// Indices of `rels` ordered so that a table comes after every table it references.
fn parents_first(rels: &[pg_sys::Oid], fks: &[(pg_sys::Oid, pg_sys::Oid)]) -> Vec<usize> {
    let mut order = Vec::with_capacity(rels.len());
    let mut placed = vec![false; rels.len()];
    while order.len() < rels.len() {
        let before = order.len();
        for i in 0..rels.len() {
            if placed[i] {
                continue;
            }
            let waiting = fks.iter().any(|&(child, parent)| {
                child == rels[i] && rels.iter().position(|&r| r == parent).is_some_and(|p| !placed[p])
            });
            if !waiting {
                placed[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            // a cycle of foreign keys: the rest in any order (a restore inserts each table in one
            // statement, so a deferrable cycle works; a non-deferrable one fails with 23503, as it
            // does for a purge's deletes, one statement per table)
            order.extend((0..rels.len()).filter(|&i| !placed[i]));
            break;
        }
    }
    order
}

/// Wait until no transaction that began before this one still holds a transaction id (the
/// tenant's writes under way when it was paused), for at most `pg_tenancy.restore_wait`.
#[pg_extern(volatile, parallel_unsafe)]
fn _wait_for_writers() {
    require_superuser("restores are a superuser's").or_raise();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(gucs::restore_wait() as u64);
    while store::writers_in_flight().or_raise() {
        if std::time::Instant::now() >= deadline {
            TenancyError::RestoreBlocked("transactions that were writing when the tenant was paused did not end within pg_tenancy.restore_wait").raise();
        }
        // SAFETY: sleeps 20 ms; interrupts (cancel, terminate) are served right after.
        unsafe { pg_sys::pg_usleep(20_000) };
        pgrx::check_for_interrupts!();
    }
}

/// Record a finished restore in the audit log.
#[pg_extern(volatile, parallel_unsafe)]
fn _record_restore(tenant: &str, backup: Uuid) {
    require_superuser("restores are a superuser's").or_raise();
    audit::record(Event::TenantRestored, pg_sys::InvalidOid, Some(tenant), "00000", &format!("tenant restored from backup {backup}"));
}

/// Whether an error a restore met is one of pg_tenancy's own (its message names a kind of
/// problem, never a value); any other (a constraint, a type's input) may quote row values and is
/// reported without its message and detail.
#[pg_extern(immutable, parallel_safe)]
fn _restore_error_is_ours(message: &str) -> bool {
    let ours = [
        TenancyError::Archive(ArchiveError::Unparsable),
        TenancyError::Archive(ArchiveError::ManifestAltered),
        TenancyError::Archive(ArchiveError::NewerVersion(0)),
        TenancyError::Archive(ArchiveError::TableMissing(String::new())),
        TenancyError::Archive(ArchiveError::TableUnexpected(0)),
        TenancyError::Archive(ArchiveError::SizeMismatch(String::new())),
        TenancyError::Archive(ArchiveError::CountMismatch(String::new())),
        TenancyError::Archive(ArchiveError::ChecksumMismatch(String::new())),
        TenancyError::UnknownBackup,
        TenancyError::OtherTenantsBackup,
        TenancyError::BrokenChain,
        TenancyError::ArchiveUnreadable(""),
        TenancyError::RestoreBlocked(""),
        TenancyError::KeysDestroyed,
        TenancyError::NoMasterKey,
        TenancyError::MasterKeyUnusable(""),
        TenancyError::MasterKeyMismatch,
        TenancyError::InvalidArgument(""),
    ];
    ours.iter().any(|e| {
        let m = e.to_string();
        // messages with a value part compare up to it
        message == m || (m.ends_with(')') && message.starts_with(m.split('(').next().unwrap_or(&m)))
    })
}

/// Remove the backups past their retention (`expires_at`: at least 30 days, more when the
/// tenant's config says `backup_retention_days`) that no kept backup depends on, with their
/// archive files; returns what went.
#[pg_extern(volatile, parallel_unsafe)]
fn prune_backups() -> TableIterator<'static, (name!(backup, Uuid), name!(tenant, String), name!(kind, String))> {
    require_superuser("backups are a superuser's").or_raise();
    let gone = store::unregister_expired().or_raise();
    let dir = gucs::backup_dir().unwrap_or_default();
    let mut out = Vec::with_capacity(gone.len());
    for (id, tenant, kind, location) in gone {
        // only files this extension wrote: under the backup directory, named by the backup id
        let path = std::path::Path::new(&location);
        if !dir.is_empty()
            && path.starts_with(&dir)
            && path.file_name().and_then(|f| f.to_str()) == Some(&format!("{id}.pgtb"))
        {
            let _ = std::fs::remove_file(path);
        }
        out.push((id, tenant, kind));
    }
    TableIterator::new(out)
}
