//! The tenant backup archive: a manifest in the spirit of PostgreSQL's `backup_manifest`, then
//! the data.
//!
//! An archive is a sequence of text lines (so that `tenancy.export()` can return it as rows a
//! client saves with `\copy`, and a file holds the same lines):
//!
//! ```text
//! {
//!   "PgTenancy-Backup-Version": 1,
//!   "Backup-Id": "…", "Tenant": "acme", "Kind": "full", "Parent": null, "Chain": ["…"],
//!   …,
//!   "Tables": [ { "Name": "app.orders", "Columns": [...], "Rows": 3, "Size": 120,
//!                 "SHA256": "…", "Chunks": 1 }, … ],
//! "Manifest-Checksum": "<SHA-256 of every line above, each ending in a newline>"}
//! D <table index> <chunk index> <base64 of the chunk>
//! …
//! ```
//!
//! A table's data is its rows in PostgreSQL's record text form (`t::text`), each preceded by its
//! length (4 bytes, little-endian): `Size` bytes whose SHA-256 is `SHA256`. It is cut into chunks
//! of at most [`CHUNK`] bytes (every table has at least one, so that an empty table is still
//! present); each chunk is sealed with the tenant's data key (the ciphertext envelope of
//! [`crate::envelope`]) under a context naming the backup, the table, the chunk and the number of
//! chunks, so a chunk moved, dropped, reordered or taken from another backup or tenant does not
//! open. Unencrypted archives (on request) carry the plaintext chunks and rely on the SHA-256.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The archive format this code writes; archives of a newer version are refused.
pub const FORMAT_VERSION: u32 = 1;
/// Largest plaintext chunk.
pub const CHUNK: usize = 1 << 20;
const CHECKSUM_KEY: &str = "\"Manifest-Checksum\": \"";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Column {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Type")]
    pub type_name: String,
    /// A generated column: backed up, never written back (PostgreSQL computes it).
    #[serde(rename = "Generated", default)]
    pub generated: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// Schema-qualified, quoted as PostgreSQL quotes it.
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Tenant-Column")]
    pub tenant_column: String,
    #[serde(rename = "Columns")]
    pub columns: Vec<Column>,
    #[serde(rename = "Rows")]
    pub rows: u64,
    #[serde(rename = "Size")]
    pub size: u64,
    #[serde(rename = "SHA256")]
    pub sha256: String,
    #[serde(rename = "Chunks")]
    pub chunks: u32,
    /// The primary key's columns when the backup was taken (how an incremental's changes find
    /// their row; without one, by the whole old row).
    #[serde(rename = "Key", default)]
    pub key: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    #[serde(rename = "Algorithm")]
    pub algorithm: String,
    #[serde(rename = "Key-Version")]
    pub key_version: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    #[serde(rename = "PgTenancy-Backup-Version")]
    pub version: u32,
    #[serde(rename = "Backup-Id")]
    pub id: String,
    #[serde(rename = "Tenant")]
    pub tenant: String,
    #[serde(rename = "Kind")]
    pub kind: String,
    #[serde(rename = "Parent")]
    pub parent: Option<String>,
    /// The backups this one needs, from the full backup to this one (itself last).
    #[serde(rename = "Chain")]
    pub chain: Vec<String>,
    #[serde(rename = "Created")]
    pub created: String,
    #[serde(rename = "Snapshot")]
    pub snapshot: String,
    #[serde(rename = "LSN")]
    pub lsn: String,
    #[serde(rename = "Extension-Version")]
    pub extension_version: String,
    #[serde(rename = "Server-Version")]
    pub server_version: String,
    #[serde(rename = "Encryption")]
    pub encryption: Option<Encryption>,
    #[serde(rename = "Tables")]
    pub tables: Vec<TableEntry>,
    /// Present when parsed (checked against the lines above it); ignored when rendering.
    #[serde(rename = "Manifest-Checksum", default, skip_serializing)]
    pub checksum: String,
}

/// What is wrong with an archive, one kind each (the extension gives each its SQLSTATE).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    #[error("the backup manifest is truncated or unparsable")]
    Unparsable,
    #[error("the backup manifest was altered (its checksum does not match)")]
    ManifestAltered,
    #[error("the backup was written by a newer format version ({0})")]
    NewerVersion(u32),
    #[error("a table in the backup manifest is missing from the archive")]
    TableMissing(String),
    #[error("the archive holds data for a table that is not in its manifest")]
    TableUnexpected(usize),
    #[error("a table's size does not match the backup manifest")]
    SizeMismatch(String),
    #[error("a table's row count does not match the backup manifest")]
    CountMismatch(String),
    #[error("a table's checksum does not match the backup manifest")]
    ChecksumMismatch(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The manifest's lines, the last holding the SHA-256 of all lines before it.
pub fn render_manifest(m: &Manifest) -> Vec<String> {
    let pretty = serde_json::to_string_pretty(m).expect("a manifest serializes");
    let mut lines: Vec<String> = pretty.lines().map(str::to_owned).collect();
    // drop the closing brace; the checksum line closes the object
    lines.pop();
    if let Some(last) = lines.last_mut() {
        last.push(',');
    }
    let mut hasher = Sha256::new();
    for l in &lines {
        hasher.update(l.as_bytes());
        hasher.update(b"\n");
    }
    lines.push(format!("{CHECKSUM_KEY}{}\"}}", hex(&hasher.finalize())));
    lines
}

/// The manifest at the head of `lines`, checked against its checksum line; returns it and the
/// number of lines it spans.
pub fn parse_manifest<S: AsRef<str>>(lines: &[S]) -> Result<(Manifest, usize), ArchiveError> {
    let end = lines.iter().position(|l| l.as_ref().starts_with(CHECKSUM_KEY)).ok_or(ArchiveError::Unparsable)?;
    let mut hasher = Sha256::new();
    let mut text = String::new();
    for l in &lines[..end] {
        hasher.update(l.as_ref().as_bytes());
        hasher.update(b"\n");
        text.push_str(l.as_ref());
        text.push('\n');
    }
    text.push_str(lines[end].as_ref());
    let stored = lines[end].as_ref()[CHECKSUM_KEY.len()..].trim_end_matches("\"}");
    // The version first: a newer archive may change anything, the checksum rule included.
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|_| ArchiveError::Unparsable)?;
    let version = value.get("PgTenancy-Backup-Version").and_then(|v| v.as_u64()).ok_or(ArchiveError::Unparsable)?;
    if version > FORMAT_VERSION as u64 {
        return Err(ArchiveError::NewerVersion(version as u32));
    }
    if stored != hex(&hasher.finalize()) {
        return Err(ArchiveError::ManifestAltered);
    }
    let m: Manifest = serde_json::from_value(value).map_err(|_| ArchiveError::Unparsable)?;
    Ok((m, end + 1))
}

/// The context a chunk is sealed under (associated data, with the tenant).
pub fn chunk_context(backup: &str, table: usize, chunk: usize, chunks: usize) -> String {
    format!("pg_tenancy backup v1|{backup}|{table}|{chunk}/{chunks}")
}

/// The context the manifest's seal is made under: in an encrypted archive, the line after the
/// manifest (`S <base64>`) is the manifest checksum sealed with the tenant's key, so that the
/// manifest cannot be rewritten (and re-checksummed) without the key.
pub fn seal_context(backup: &str) -> String {
    format!("pg_tenancy backup v1|{backup}|manifest")
}

/// The seal line.
pub fn seal_line(payload: &[u8]) -> String {
    use base64::Engine;
    format!("S {}", base64::engine::general_purpose::STANDARD.encode(payload))
}

/// The sealed manifest checksum of the lines after the manifest, if there is one.
pub fn find_seal<S: AsRef<str>>(data: &[S]) -> Option<Vec<u8>> {
    use base64::Engine;
    let line = data.iter().map(AsRef::as_ref).find(|l| l.starts_with("S "))?;
    base64::engine::general_purpose::STANDARD.decode(&line[2..]).ok()
}

/// One data line.
pub fn data_line(table: usize, chunk: usize, payload: &[u8]) -> String {
    use base64::Engine;
    let mut line = String::with_capacity(24 + payload.len().div_ceil(3) * 4);
    line.push_str(&format!("D {table} {chunk} "));
    base64::engine::general_purpose::STANDARD.encode_string(payload, &mut line);
    line
}

/// A data line's table index, chunk index and payload.
pub fn parse_data_line(line: &str) -> Result<(usize, usize, Vec<u8>), ArchiveError> {
    use base64::Engine;
    let mut parts = line.splitn(4, ' ');
    let (Some("D"), Some(t), Some(c), Some(p)) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(ArchiveError::Unparsable);
    };
    let t = t.parse().map_err(|_| ArchiveError::Unparsable)?;
    let c = c.parse().map_err(|_| ArchiveError::Unparsable)?;
    let p = base64::engine::general_purpose::STANDARD.decode(p).map_err(|_| ArchiveError::Unparsable)?;
    Ok((t, c, p))
}

/// Appends one row (its record text) to a table's data.
pub fn frame_row(data: &mut Vec<u8>, row: &[u8]) {
    data.extend_from_slice(&(row.len() as u32).to_le_bytes());
    data.extend_from_slice(row);
}

/// One captured change of an incremental backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    /// b'I', b'U' or b'D'.
    pub op: u8,
    /// Commit time, microseconds since 1970-01-01 UTC.
    pub committed: i64,
    pub old: Option<&'a [u8]>,
    pub new: Option<&'a [u8]>,
}

fn frame_opt(data: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        Some(v) => frame_row(data, v),
        None => data.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

/// Appends one change to a table's data in an incremental backup.
pub fn frame_change(data: &mut Vec<u8>, c: &Change) {
    data.push(c.op);
    data.extend_from_slice(&c.committed.to_le_bytes());
    frame_opt(data, c.old);
    frame_opt(data, c.new);
}

fn take_opt<'a>(rest: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    *rest = &rest[4..];
    if n == u32::MAX {
        return Some(None);
    }
    let v = rest.get(..n as usize)?;
    *rest = &rest[n as usize..];
    Some(Some(v))
}

/// The changes of a table's data in an incremental backup; `None` when the framing is broken.
pub fn changes(data: &[u8]) -> Option<Vec<Change<'_>>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let op = rest[0];
        let committed = i64::from_le_bytes(rest.get(1..9)?.try_into().ok()?);
        rest = &rest[9..];
        let old = take_opt(&mut rest)?;
        let new = take_opt(&mut rest)?;
        let well_formed = match op {
            b'I' => old.is_none() && new.is_some(),
            b'U' => old.is_some() && new.is_some(),
            b'D' => old.is_some() && new.is_none(),
            _ => false,
        };
        if !well_formed {
            return None;
        }
        out.push(Change { op, committed, old, new });
    }
    Some(out)
}

/// The rows of a table's data; `None` when the framing is broken.
pub fn rows(data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return None;
        }
        let n = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        if rest.len() < 4 + n {
            return None;
        }
        out.push(&rest[4..4 + n]);
        rest = &rest[4 + n..];
    }
    Some(out)
}

/// The chunks of a table's data (at least one, possibly empty).
pub fn chunks(data: &[u8]) -> Vec<&[u8]> {
    if data.is_empty() {
        return vec![data];
    }
    data.chunks(CHUNK).collect()
}

/// Group the data lines after the manifest by table, in chunk order, checking that every table
/// of the manifest is present with all its chunks and no other table is.
pub fn table_chunks<S: AsRef<str>>(m: &Manifest, data: &[S]) -> Result<Vec<Vec<Vec<u8>>>, ArchiveError> {
    // (the counts come from the archive: bounded by the sizes and by the data lines actually
    // there before anything is allocated)
    let mut present = vec![0u64; m.tables.len()];
    for line in data {
        let line = line.as_ref();
        if let Some(t) = line.strip_prefix("D ").and_then(|r| r.split(' ').next()).and_then(|t| t.parse::<usize>().ok()) {
            if let Some(n) = present.get_mut(t) {
                *n += 1;
            }
        }
    }
    for (t, n) in m.tables.iter().zip(present) {
        if n == 0 {
            return Err(ArchiveError::TableMissing(t.name.clone()));
        }
        if t.chunks as u64 != n || t.chunks as u64 > t.size / CHUNK as u64 + 1 {
            return Err(ArchiveError::SizeMismatch(t.name.clone()));
        }
    }
    let mut out: Vec<Vec<Option<Vec<u8>>>> = m.tables.iter().map(|t| vec![None; t.chunks as usize]).collect();
    for line in data {
        let line = line.as_ref();
        if line.is_empty() || line.starts_with("S ") {
            continue;
        }
        let (t, c, payload) = parse_data_line(line)?;
        let Some(slots) = out.get_mut(t) else {
            return Err(ArchiveError::TableUnexpected(t));
        };
        match slots.get_mut(c) {
            Some(slot @ None) => *slot = Some(payload),
            // a chunk twice, or beyond the count the manifest gives: the data was altered
            _ => return Err(ArchiveError::SizeMismatch(m.tables[t].name.clone())),
        }
    }
    out.into_iter()
        .zip(&m.tables)
        .map(|(slots, t)| {
            if slots.iter().all(Option::is_none) {
                return Err(ArchiveError::TableMissing(t.name.clone()));
            }
            slots.into_iter().map(|s| s.ok_or_else(|| ArchiveError::SizeMismatch(t.name.clone()))).collect()
        })
        .collect()
}

/// Check a table's reassembled data against its manifest entry (rows of a full backup, changes
/// of an incremental one).
pub fn check_table(t: &TableEntry, data: &[u8], incremental: bool) -> Result<(), ArchiveError> {
    if data.len() as u64 != t.size {
        return Err(ArchiveError::SizeMismatch(t.name.clone()));
    }
    if sha256_hex(data) != t.sha256 {
        return Err(ArchiveError::ChecksumMismatch(t.name.clone()));
    }
    let n = if incremental { changes(data).map(|c| c.len()) } else { rows(data).map(|r| r.len()) };
    match n {
        Some(n) if n as u64 == t.rows => Ok(()),
        _ => Err(ArchiveError::CountMismatch(t.name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: FORMAT_VERSION,
            id: "8d3c".into(),
            tenant: "acme".into(),
            kind: "full".into(),
            parent: None,
            chain: vec!["8d3c".into()],
            created: "2026-11-29T00:00:00Z".into(),
            snapshot: "1:1:".into(),
            lsn: "0/1".into(),
            extension_version: "0.1.0".into(),
            server_version: "15".into(),
            encryption: None,
            tables: vec![TableEntry {
                name: "app.\"we\"\"ird\"".into(),
                tenant_column: "tenant_id".into(),
                columns: vec![Column { name: "tenant_id".into(), type_name: "text".into(), generated: false }],
                rows: 2,
                size: 18,
                sha256: String::new(),
                chunks: 1,
                key: vec!["tenant_id".into()],
            }],
            checksum: String::new(),
        }
    }

    #[test]
    fn manifest_round_trip_and_checksum() {
        let m = manifest();
        let mut lines = render_manifest(&m);
        assert!(lines.last().unwrap().starts_with(CHECKSUM_KEY));
        lines.push(data_line(0, 0, b"x"));
        let (parsed, n) = parse_manifest(&lines).unwrap();
        assert_eq!(n, lines.len() - 1);
        assert_eq!(Manifest { checksum: String::new(), ..parsed.clone() }, m);
        // any change above the checksum line is caught
        for i in 0..n - 1 {
            let mut altered = lines.clone();
            altered[i] = altered[i].replacen("acme", "acmf", 1).replacen('1', "2", 1);
            if altered[i] != lines[i] {
                assert!(matches!(parse_manifest(&altered), Err(ArchiveError::ManifestAltered | ArchiveError::Unparsable | ArchiveError::NewerVersion(_))), "line {i}");
            }
        }
        // truncated: no checksum line
        assert_eq!(parse_manifest(&lines[..n - 1]), Err(ArchiveError::Unparsable));
        assert_eq!(parse_manifest::<&str>(&[]), Err(ArchiveError::Unparsable));
    }

    #[test]
    fn newer_version_is_named() {
        let mut m = manifest();
        m.version = FORMAT_VERSION + 1;
        assert_eq!(parse_manifest(&render_manifest(&m)), Err(ArchiveError::NewerVersion(FORMAT_VERSION + 1)));
    }

    #[test]
    fn rows_frame_and_check() {
        let mut data = Vec::new();
        frame_row(&mut data, b"(acme,1)");
        frame_row(&mut data, b"(acme,\"a\nb\")");
        assert_eq!(rows(&data).unwrap(), vec![&b"(acme,1)"[..], &b"(acme,\"a\nb\")"[..]]);
        let mut t = manifest().tables.remove(0);
        t.size = data.len() as u64;
        t.sha256 = sha256_hex(&data);
        assert_eq!(check_table(&t, &data, false), Ok(()));
        t.rows = 3;
        assert_eq!(check_table(&t, &data, false), Err(ArchiveError::CountMismatch(t.name.clone())));
        t.rows = 2;
        let mut other = data.clone();
        *other.last_mut().unwrap() ^= 1;
        assert_eq!(check_table(&t, &other, false), Err(ArchiveError::ChecksumMismatch(t.name.clone())));
        assert_eq!(check_table(&t, &data[1..], false), Err(ArchiveError::SizeMismatch(t.name.clone())));
        assert!(rows(&data[..5]).is_none());
    }

    #[test]
    fn changes_frame_and_check() {
        let mut data = Vec::new();
        let all = vec![
            Change { op: b'I', committed: 1, old: None, new: Some(b"(a,1)") },
            Change { op: b'U', committed: 2, old: Some(b"(a,1)"), new: Some(b"(a,\"\")") },
            Change { op: b'D', committed: -3, old: Some(b""), new: None },
        ];
        for c in &all {
            frame_change(&mut data, c);
        }
        assert_eq!(changes(&data).unwrap(), all);
        assert!(changes(&data[..data.len() - 1]).is_none());
        let mut bad = Vec::new();
        frame_change(&mut bad, &Change { op: b'D', committed: 0, old: None, new: None });
        assert!(changes(&bad).is_none());
        let mut t = manifest().tables.remove(0);
        t.rows = 3;
        t.size = data.len() as u64;
        t.sha256 = sha256_hex(&data);
        assert_eq!(check_table(&t, &data, true), Ok(()));
    }

    #[test]
    fn chunks_are_grouped_and_checked() {
        let m = manifest();
        let lines = vec![data_line(0, 0, b"abc")];
        assert_eq!(table_chunks(&m, &lines).unwrap(), vec![vec![b"abc".to_vec()]]);
        assert_eq!(table_chunks::<&str>(&m, &[]), Err(ArchiveError::TableMissing(m.tables[0].name.clone())));
        let extra = vec![data_line(0, 0, b"abc"), data_line(1, 0, b"x")];
        assert_eq!(table_chunks(&m, &extra), Err(ArchiveError::TableUnexpected(1)));
        let mut huge = m.clone();
        huge.tables[0].chunks = u32::MAX;
        assert!(matches!(table_chunks(&huge, &lines), Err(ArchiveError::SizeMismatch(_))));
        let twice = vec![data_line(0, 0, b"abc"), data_line(0, 0, b"abc")];
        assert!(matches!(table_chunks(&m, &twice), Err(ArchiveError::SizeMismatch(_))));
        assert_eq!(parse_data_line("D 0 x !!"), Err(ArchiveError::Unparsable));
        assert_eq!(chunks(&[]).len(), 1);
        assert_eq!(chunks(&vec![0u8; CHUNK + 1]).len(), 2);
        assert_ne!(chunk_context("b", 0, 0, 2), chunk_context("b", 0, 1, 2));
    }
}
