//! Every error pg_tenancy raises: a SQLSTATE a client can catch, a message, a detail and a hint.
//!
//! Messages never carry row values, tokens, secrets or the tenant id a caller tried: a refused
//! attempt must not teach the caller anything about other tenants (not even whether they exist).
use pgrx::pg_sys;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::ffi::CString;

use pg_tenancy_core::archive::ArchiveError;
use pg_tenancy_core::token::TokenError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenancyError {
    #[error("no tenant context is set")]
    NoContext,
    #[error("permission denied to enter tenant")]
    NotPermitted,
    #[error("tenant does not exist")]
    UnknownTenant,
    #[error("tenant is {0}")]
    Unavailable(&'static str),
    /// Data residency: the tenant's region (`tenancy.tenants.region`) is not the cluster's
    /// (`pg_tenancy.region`).
    #[error("tenant is not served in this cluster's region")]
    WrongRegion { tenant: String, here: String },
    #[error("tenant is read-only")]
    ReadOnly,
    #[error("role has read-only access to the current tenant")]
    ReadScope,
    #[error("invalid tenant id")]
    InvalidTenantId,
    #[error("tenant token rejected")]
    Token(TokenError),
    #[error("the tenant context can only be set with a signed token")]
    SignedModeRequired,
    #[error("no tenant token secret is configured")]
    NoSecret,
    #[error("tenant token secret is unusable")]
    BadSecret(&'static str),
    #[error("pg_tenancy is not installed in this database")]
    NotInstalled,
    #[error("invalid value for {0}")]
    InvalidArgument(&'static str),
    #[error("permission denied: {0}")]
    Denied(&'static str),
    #[error("no master key is configured")]
    NoMasterKey,
    #[error("the master key is unusable")]
    MasterKeyUnusable(&'static str),
    #[error("the master key does not unwrap the tenant's keys")]
    MasterKeyMismatch,
    #[error("ciphertext is malformed")]
    CiphertextMalformed,
    #[error("ciphertext does not decrypt for this tenant and context")]
    CiphertextInvalid,
    #[error("the tenant's keys were destroyed")]
    KeysDestroyed,
    #[error("pg_tenancy requires shared_preload_libraries")]
    PreloadRequired,
    #[error("the audit log is append-only")]
    AuditAppendOnly,
    #[error("value too large to encrypt")]
    ValueTooLarge,
    #[error("cursor was declared in another tenant context")]
    ForeignCursor,
    #[error("EXPLAIN ANALYZE is not available on protected tables")]
    ExplainAnalyze,
    #[error("table is already protected on another tenant column")]
    Rekey,
    #[error("a temporary table cannot be protected")]
    TemporaryTable,
    #[error("rules cannot be added to a protected table")]
    Rule,
    #[error("a protected table cannot have a parent that is not protected")]
    UnprotectedParent,
    #[error("a table that already holds rows cannot become a partition or child of a protected table")]
    LoadedChild,
    #[error("the table cannot be protected as it is")]
    Unprotectable(&'static str),
    #[error("not allowed on a protected table")]
    Guarded(&'static str),
    #[error("{0}")]
    Archive(ArchiveError),
    #[error("backup does not exist")]
    UnknownBackup,
    #[error("the backup belongs to another tenant")]
    OtherTenantsBackup,
    #[error("the backup chain is broken or out of order")]
    BrokenChain,
    #[error("the backup archive cannot be read")]
    ArchiveUnreadable(&'static str),
    #[error("pg_tenancy.backup_dir is not set")]
    NoBackupDir,
    #[error("not supported yet")]
    NotYet(&'static str),
    #[error("the restore cannot go on")]
    RestoreBlocked(&'static str),
    /// purge_tenant of a tenant that is not offboarded.
    #[error("only an offboarded tenant's rows can be purged")]
    NotOffboarded,
    #[error("the tenant's rows cannot be purged here")]
    PurgeBlocked(&'static str),
    #[error("the tenant's own key cannot be read from the key store")]
    TenantKeyUnavailable(&'static str),
    /// A plan limit: what is limited, the tenant's plan, and what the limit is.
    #[error("tenant {0} limit exceeded")]
    LimitExceeded(&'static str, String, String),
    #[error("invalid meter name")]
    InvalidMeter,
    #[error("the tenant context cannot change during a migration step")]
    StepContext,
}

impl TenancyError {
    pub fn sqlstate(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            TenancyError::NoContext => ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION, // 28000
            TenancyError::NotPermitted
            | TenancyError::StepContext
            | TenancyError::ReadScope
            | TenancyError::SignedModeRequired
            | TenancyError::Denied(_) => ERRCODE_INSUFFICIENT_PRIVILEGE, // 42501
            TenancyError::UnknownTenant => ERRCODE_UNDEFINED_OBJECT,    // 42704
            TenancyError::Unavailable(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::WrongRegion { .. } => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::ReadOnly => ERRCODE_READ_ONLY_SQL_TRANSACTION, // 25006
            TenancyError::InvalidTenantId | TenancyError::InvalidArgument(_) => {
                ERRCODE_INVALID_PARAMETER_VALUE // 22023
            }
            TenancyError::Token(_) => ERRCODE_INVALID_PASSWORD, // 28P01
            TenancyError::NoSecret | TenancyError::BadSecret(_) => ERRCODE_CONFIG_FILE_ERROR, // F0000
            TenancyError::NotInstalled => ERRCODE_INVALID_SCHEMA_NAME, // 3F000
            TenancyError::NoMasterKey
            | TenancyError::MasterKeyUnusable(_)
            | TenancyError::MasterKeyMismatch => ERRCODE_CONFIG_FILE_ERROR, // F0000
            TenancyError::CiphertextMalformed => ERRCODE_INVALID_BINARY_REPRESENTATION, // 22P03
            TenancyError::CiphertextInvalid => ERRCODE_DATA_EXCEPTION, // 22000
            TenancyError::KeysDestroyed => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::PreloadRequired => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::AuditAppendOnly => ERRCODE_INSUFFICIENT_PRIVILEGE,           // 42501
            TenancyError::ValueTooLarge => ERRCODE_PROGRAM_LIMIT_EXCEEDED,             // 54000
            TenancyError::ForeignCursor => ERRCODE_INSUFFICIENT_PRIVILEGE,             // 42501
            TenancyError::ExplainAnalyze | TenancyError::Rekey | TenancyError::Rule | TenancyError::UnprotectedParent
            | TenancyError::LoadedChild => {
                ERRCODE_INSUFFICIENT_PRIVILEGE // 42501
            }
            TenancyError::TemporaryTable => ERRCODE_WRONG_OBJECT_TYPE, // 42809
            TenancyError::Unprotectable(_) | TenancyError::Guarded(_) => ERRCODE_INSUFFICIENT_PRIVILEGE, // 42501
            TenancyError::Archive(e) => match e {
                ArchiveError::Unparsable => ERRCODE_INVALID_JSON_TEXT,                  // 22032
                ArchiveError::ManifestAltered => ERRCODE_DATA_CORRUPTED,                // XX001
                ArchiveError::NewerVersion(_) => ERRCODE_FEATURE_NOT_SUPPORTED,        // 0A000
                ArchiveError::TableMissing(_) => ERRCODE_UNDEFINED_FILE,               // 58P01
                ArchiveError::TableUnexpected(_) => ERRCODE_DUPLICATE_FILE,            // 58P02
                ArchiveError::SizeMismatch(_) => ERRCODE_STRING_DATA_LENGTH_MISMATCH,  // 22026
                ArchiveError::CountMismatch(_) => ERRCODE_CARDINALITY_VIOLATION,       // 21000
                ArchiveError::ChecksumMismatch(_) => ERRCODE_DATA_EXCEPTION,           // 22000
            },
            TenancyError::UnknownBackup => ERRCODE_UNDEFINED_OBJECT,                   // 42704
            TenancyError::OtherTenantsBackup => ERRCODE_INSUFFICIENT_PRIVILEGE,        // 42501
            TenancyError::BrokenChain => ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION,       // 23000
            TenancyError::ArchiveUnreadable(_) => ERRCODE_IO_ERROR,                    // 58030
            TenancyError::NoBackupDir => ERRCODE_CONFIG_FILE_ERROR,                    // F0000
            TenancyError::NotYet(_) => ERRCODE_FEATURE_NOT_SUPPORTED,                  // 0A000
            TenancyError::RestoreBlocked(_) => ERRCODE_LOCK_NOT_AVAILABLE,             // 55P03
            TenancyError::NotOffboarded => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,   // 55000
            TenancyError::PurgeBlocked(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::TenantKeyUnavailable(_) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, // 55000
            TenancyError::LimitExceeded(..) => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,    // 53400
            TenancyError::InvalidMeter => ERRCODE_INVALID_PARAMETER_VALUE,              // 22023
        }
    }

    /// The five-character SQLSTATE, for the audit log.
    pub fn sqlstate_text(&self) -> String {
        let code = self.sqlstate() as i32;
        // PostgreSQL packs each of the five characters into 6 bits (MAKE_SQLSTATE).
        (0..5).map(|i| (((code >> (6 * i)) & 0x3F) as u8 + b'0') as char).collect()
    }

    pub fn detail(&self) -> Option<String> {
        match self {
            TenancyError::Token(e) => Some(e.to_string()),
            TenancyError::InvalidTenantId => Some(
                "A tenant id is 1 to 63 characters: letters, digits, '_', '-' and '.'; one that reads as an \
integer or a UUID is written in that type's canonical form (no leading zeros; a lowercase UUID with hyphens)."
                    .into(),
            ),
            TenancyError::BadSecret(why) | TenancyError::MasterKeyUnusable(why) | TenancyError::Unprotectable(why) | TenancyError::Guarded(why) => {
                Some((*why).to_string())
            }
            TenancyError::CiphertextInvalid => Some(
                "It was altered, or made for another tenant, column or row (another context).".into(),
            ),
            TenancyError::NotPermitted => Some(
                "The role has no grant for that tenant, or the tenant does not exist.".into(),
            ),
            TenancyError::Archive(ArchiveError::TableMissing(t) | ArchiveError::SizeMismatch(t)
            | ArchiveError::CountMismatch(t) | ArchiveError::ChecksumMismatch(t)) => Some(format!("table {t}")),
            TenancyError::Archive(ArchiveError::TableUnexpected(i)) => Some(format!("data for table number {i}")),
            TenancyError::Archive(ArchiveError::NewerVersion(v)) => Some(format!("format version {v}")),
            TenancyError::ArchiveUnreadable(why)
            | TenancyError::NotYet(why)
            | TenancyError::RestoreBlocked(why)
            | TenancyError::PurgeBlocked(why)
            | TenancyError::TenantKeyUnavailable(why) => Some((*why).to_string()),
            TenancyError::LimitExceeded(_, _, limit) => Some(limit.clone()),
            TenancyError::WrongRegion { tenant, here } => {
                Some(format!("The tenant's region is \"{tenant}\"; this cluster serves region \"{here}\" (pg_tenancy.region)."))
            }
            TenancyError::InvalidMeter => {
                Some("A meter name is 1 to 63 characters: lowercase letters, digits and '_', starting with a letter.".into())
            }
            _ => None,
        }
    }

    pub fn hint(&self) -> std::borrow::Cow<'static, str> {
        match self {
            TenancyError::LimitExceeded(_, plan, _) => format!(
                "The tenant's plan is \"{plan}\". Retry later; a superuser raises the tenant's own limit with \
tenancy.set_limit(tenant, ...) or moves it to another plan with tenancy.alter_tenant(tenant, plan => ...)."
            )
            .into(),
            other => other.static_hint().into(),
        }
    }

    fn static_hint(&self) -> &'static str {
        match self {
            TenancyError::LimitExceeded(..) => "",
            TenancyError::InvalidMeter => "For example tenancy.meter('webhook_events', 1).",
            TenancyError::StepContext => {
                "A migration's per-tenant step runs in its tenant's context only, and its up, cleanup and contract steps in none."
            }
            TenancyError::NoContext => {
                "Call tenancy.set_tenant(...) or tenancy.set_tenant_token(...) in this transaction."
            }
            TenancyError::NotPermitted => {
                "A superuser grants access with tenancy.grant_tenant(role, tenant, scope)."
            }
            TenancyError::UnknownTenant => "Create it with tenancy.create_tenant(...).",
            TenancyError::WrongRegion { .. } => {
                "Connect to the cluster of the tenant's region. Moving a tenant between regions: docs/RUNBOOK.md, \"Move a tenant to another region\"."
            }
            TenancyError::Unavailable(_) => {
                "A superuser can reactivate it with tenancy.set_status(tenant, 'active')."
            }
            TenancyError::ReadOnly => {
                "The tenant's status is read_only; reads still work. tenancy.set_status() changes it."
            }
            TenancyError::ReadScope => {
                "The role's grant for this tenant has scope 'read'; writes need 'read_write'."
            }
            TenancyError::InvalidTenantId => "Use the id given to tenancy.create_tenant().",
            TenancyError::Token(TokenError::Expired) => "Obtain a fresh token from the gateway.",
            TenancyError::Token(_) => {
                "Tokens are HS256 JWTs signed with pg_tenancy.jwt_secret, with an exp claim and the tenant claim."
            }
            TenancyError::SignedModeRequired => {
                "pg_tenancy.context_mode is 'signed': use tenancy.set_tenant_token(token)."
            }
            TenancyError::NoSecret | TenancyError::BadSecret(_) => {
                "A superuser sets pg_tenancy.jwt_secret_file (or pg_tenancy.jwt_secret) to a secret of at least 32 bytes."
            }
            TenancyError::NotInstalled => "Run CREATE EXTENSION pg_tenancy in this database.",
            TenancyError::InvalidArgument(_) => "See the SQL API in the pg_tenancy README.",
            TenancyError::Denied(_) => "Ask a superuser, or a role with admin scope in that tenant.",
            TenancyError::NoMasterKey | TenancyError::MasterKeyUnusable(_) => {
                "A superuser sets pg_tenancy.master_key_file or pg_tenancy.master_key_command (32 bytes written as 64 hex digits or as base64)."
            }
            TenancyError::MasterKeyMismatch => {
                "Configure the master key that wrapped them (or the old one as pg_tenancy.previous_master_key_file and run tenancy.rotate_master_key())."
            }
            TenancyError::CiphertextMalformed => "Pass a value produced by tenancy.encrypt().",
            TenancyError::CiphertextInvalid => "Decrypt with the tenant and the context it was encrypted with.",
            TenancyError::KeysDestroyed => "The tenant was crypto-shredded with tenancy.shred(); its ciphertexts are gone for good.",
            TenancyError::PreloadRequired => {
                "Add pg_tenancy to shared_preload_libraries in postgresql.conf and restart the server."
            }
            TenancyError::ForeignCursor => {
                "A WITH HOLD cursor is readable only in the tenant context that declared it. Set that context again, or CLOSE the cursor (DISCARD ALL closes them all) before the connection serves another tenant."
            }
            TenancyError::ExplainAnalyze => {
                "Its counters (rows removed by the tenant filter, buffers) would describe other tenants' rows. \
Use EXPLAIN without ANALYZE, run it as a role that bypasses row security, or have a superuser set \
pg_tenancy.explain_analyze = 'hide'."
            }
            TenancyError::Rekey => {
                "protect() repairs a protection on the same column; moving it to another column needs a superuser to run tenancy.unprotect() first."
            }
            TenancyError::TemporaryTable => {
                "A temporary table is visible only to its own session; protect the permanent table it is copied from."
            }
            TenancyError::Unprotectable(_) => {
                "Remove what the detail names (a superuser may approve functions with tenancy.approve_function()), then protect the table."
            }
            TenancyError::Guarded(_) => {
                "A superuser may do it (pg_tenancy records it); see the README, \"Table owners\"."
            }
            TenancyError::LoadedChild => {
                "Its rows were written outside the tenant policies, for any tenant. Attach it empty and load it through the parent, or have a superuser attach it."
            }
            TenancyError::UnprotectedParent => {
                "Row security applies the policies of the table a query names: protect the parent, which protects its partitions and children with it."
            }
            TenancyError::Rule => {
                "A rule on a protected table could copy or redirect every tenant's rows; use a trigger (listed by tenancy.check() until a superuser approves its function)."
            }
            TenancyError::ValueTooLarge => {
                "A ciphertext is 42 bytes longer than its plaintext and must fit in a bytea (1 GB); store larger objects in parts."
            }
            TenancyError::Archive(ArchiveError::NewerVersion(_)) => "Restore it with the pg_tenancy version that wrote it, or a later one.",
            TenancyError::Archive(_) => "The archive was altered, truncated or damaged: restore from another backup of the tenant (SELECT * FROM tenancy.backups WHERE tenant = ...).",
            TenancyError::UnknownBackup => "List them with SELECT * FROM tenancy.backups, or register an archive with tenancy.import().",
            TenancyError::OtherTenantsBackup => "Restore a backup of the same tenant; moving data between tenants is not a restore.",
            TenancyError::BrokenChain => "An incremental backup needs every backup before it back to a full one; take a new full backup.",
            TenancyError::ArchiveUnreadable(_) => "Check pg_tenancy.backup_dir and the file, or import the archive again with tenancy.import().",
            TenancyError::NoBackupDir => "A superuser sets pg_tenancy.backup_dir, or use tenancy.export() to stream the archive to the client.",
            TenancyError::NotYet(_) => "See the README, \"Backups\", for what this version supports.",
            TenancyError::RestoreBlocked(_) => "The tenant's status was put back; retry when its long transactions are done (or raise pg_tenancy.restore_wait).",
            TenancyError::NotOffboarded => "Keep its archive elsewhere first (tenancy.export), then tenancy.set_status(tenant, 'offboarded').",
            TenancyError::PurgeBlocked(_) => "Nothing was deleted. See the detail: protect the referencing table (tenancy.protect), or review and approve the code, then purge again.",
            TenancyError::TenantKeyUnavailable(_) => {
                "A shred deleted it there (then its ciphertexts and backups are gone for good), or pg_tenancy.tenant_key_command cannot reach the store."
            }
            TenancyError::AuditAppendOnly => {
                "Rows are only added by pg_tenancy and only removed by tenancy.prune_audit(older_than). \
Restoring a dump? Run it with PGOPTIONS='-c pg_tenancy.guard=off' as a superuser."
            }
        }
    }

    /// Raise this error as a PostgreSQL ERROR. Never returns.
    pub fn raise(self) -> ! {
        let mut report =
            pgrx::pg_sys::panic::ErrorReport::new(self.sqlstate(), self.to_string(), "pg_tenancy").set_hint(self.hint());
        if let Some(detail) = self.detail() {
            report = report.set_detail(detail);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }

    /// Hand this error to PostgreSQL's GUC machinery from inside a check hook.
    pub fn to_guc_check(&self) {
        // SAFETY: the GUC_check_* variables are read by PostgreSQL right after the check hook
        // returns false; the strings are palloc'd in the current memory context, which lives
        // at least that long.
        unsafe {
            pg_sys::GUC_check_errcode(self.sqlstate() as i32);
            pg_sys::GUC_check_errmsg_string = pstrdup(&self.to_string());
            if let Some(detail) = self.detail() {
                pg_sys::GUC_check_errdetail_string = pstrdup(&detail);
            }
            pg_sys::GUC_check_errhint_string = pstrdup(&self.hint());
        }
    }
}

fn pstrdup(s: &str) -> *mut std::ffi::c_char {
    let c = CString::new(s.replace('\0', "")).unwrap_or_default();
    // SAFETY: c is a valid NUL-terminated string; pstrdup copies it into the current context.
    unsafe { pg_sys::pstrdup(c.as_ptr()) }
}

/// `Result` with pg_tenancy's error.
pub type Result<T> = std::result::Result<T, TenancyError>;

/// Unwrap or raise as a PostgreSQL ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}
