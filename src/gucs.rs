//! Every `pg_tenancy.*` setting, in one place, with typed getters for the rest of the crate.
//!
//! The prefix is reserved, so a typo such as `SET pg_tenancy.tennant = ...` is an error rather
//! than a silently created placeholder.
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::pg_guard;
use pgrx::PostgresGucEnum;
use std::ffi::{CStr, CString};

/// How the tenant context may be set by roles that are not superusers.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ContextMode {
    /// `set_tenant(id)`, `SET pg_tenancy.tenant = id` and tokens, always subject to the role's
    /// tenant grants.
    #[name = c"open"]
    Open,
    /// Only a valid signed token (HS256 JWT) sets the context; a plain tenant id is refused.
    #[name = c"signed"]
    Signed,
}

/// What `EXPLAIN ANALYZE` of a statement on a protected table does, for roles subject to its
/// policies (its counters describe rows of other tenants).
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExplainAnalyze {
    /// Refused with 42501 and recorded as `cross_tenant_probe`.
    #[name = c"refuse"]
    Refuse,
    /// Runs, with the counters that can describe other tenants' rows zeroed.
    #[name = c"hide"]
    Hide,
}

/// See [`ExplainAnalyze`].
pub static EXPLAIN_ANALYZE: GucSetting<ExplainAnalyze> = GucSetting::<ExplainAnalyze>::new(ExplainAnalyze::Refuse);

/// The tenant context itself. Its value is a tenant id or a signed token; every value is
/// verified against the role's grants (and the token's signature) when it is set and again
/// when it is used, so the setting is a transport, never a source of trust.
pub static TENANT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Open or signed context; superuser-only so an application role cannot relax it.
pub static CONTEXT_MODE: GucSetting<ContextMode> = GucSetting::<ContextMode>::new(ContextMode::Open);

/// The HS256 secret shared with the API gateway that mints tenant tokens.
pub static JWT_SECRET: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// A file holding the HS256 secret (read by the server, so it never travels in SQL).
pub static JWT_SECRET_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// The token claim that carries the tenant id.
pub static TENANT_CLAIM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"tenant_id"));

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub static JWT_LEEWAY: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Protect new tables that carry the tenant column as soon as they are created.
pub static AUTO_PROTECT: GucSetting<bool> = GucSetting::<bool>::new(false);

/// The event-trigger guard. Off only for a superuser's session that restores a dump: pg_dump
/// recreates a protected table's pieces one statement at a time, and the guard would refuse the
/// intermediate states.
pub static GUARD: GucSetting<bool> = GucSetting::<bool>::new(true);

/// Where the master key (KEK) comes from: a file, or a command that prints it (e.g. reading it
/// from Vault). Superuser-only; the key itself never enters the database.
pub static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// The master key being replaced, during tenancy.rotate_master_key().
pub static PREVIOUS_MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Command printing a tenant's own key from the outside store (%t: the tenant id).
pub static TENANT_KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Command tenancy.shred() runs to delete a tenant's own key in the outside store.
pub static TENANT_KEY_SHRED_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Where tenancy.backup() writes its archives.
pub static BACKUP_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// How long a restore waits for the tenant's writes already under way (seconds).
pub static RESTORE_WAIT: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Age after which a tenant's active data key is listed in tenancy.keys_due.
pub static KEY_ROTATION_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(180 * 24 * 3600);

/// Encryptions under one data key version after which it is rotated automatically.
/// Tenants whose usage shared memory tracks exactly (postmaster: sizes the segment).
pub static STATS_MAX_TENANTS: GucSetting<i32> = GucSetting::<i32>::new(16_000);
pub static TRACK_STATS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ENFORCE_LIMITS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static ALERT_P99: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static ALERT_P99_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(15 * 60);
pub static ALERT_ERROR_RATIO: GucSetting<f64> = GucSetting::<f64>::new(0.01);
pub static ALERT_ERROR_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(5 * 60);
pub static ALERT_QUOTA_RATIO: GucSetting<f64> = GucSetting::<f64>::new(0.9);
pub static ALERT_MIN_STATEMENTS: GucSetting<i32> = GucSetting::<i32>::new(20);
pub static METRICS_PORT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static METRICS_LISTEN: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"127.0.0.1"));
pub static METRICS_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static USAGE_DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static REGION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SNAPSHOT_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static STORAGE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static LOG_MASKING: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static LOG_TENANT: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Milliseconds a statement over its tenant's concurrency cap waits for a place.
pub static CONCURRENCY_WAIT: GucSetting<i32> = GucSetting::<i32>::new(200);
pub static MAX_ENCRYPTIONS_PER_KEY: GucSetting<i32> = GucSetting::<i32>::new(i32::MAX);

/// The column name `tenancy.check()` and auto-protection look for.
pub static TENANT_COLUMN: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"tenant_id"));

/// The hooks of the settings whose changes matter to features above this floor (passed in by
/// `_PG_init`, so that this module imports none of them).
pub struct Hooks {
    /// Check hook of `pg_tenancy.tenant`: verifies a value and keeps who set it.
    pub tenant_check: pg_sys::GucStringCheckHook,
    /// Assign hook of `pg_tenancy.tenant`.
    pub tenant_assign: pg_sys::GucStringAssignHook,
    /// Assign hooks of the settings that change how a context verifies.
    pub verification_string: pg_sys::GucStringAssignHook,
    pub verification_int: pg_sys::GucIntAssignHook,
    /// Assign hook of the master-key settings.
    pub master_key: pg_sys::GucStringAssignHook,
}

pub fn init(hooks: Hooks) {
    // SAFETY: the hooks are #[pg_guard] functions with the signatures PostgreSQL expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.tenant",
            c"The current tenant context: a tenant id or a signed tenant token.",
            c"Set it with tenancy.set_tenant() or tenancy.set_tenant_token(). Every value is checked \
against the role's tenant grants and, for tokens, the signature and expiry.",
            &TENANT,
            GucContext::Userset,
            GucFlags::NO_SHOW_ALL | GucFlags::DISALLOW_IN_FILE | GucFlags::DISALLOW_IN_AUTO_FILE,
            hooks.tenant_check,
            hooks.tenant_assign,
            None,
        );
    }
    // The settings below change how a context value verifies, so their assign hooks drop the
    // per-backend verification cache.
    // SAFETY (each *_with_hooks call): the hooks are #[pg_guard] functions with the right signature.
    // SAFETY: as above.
    unsafe { GucRegistry::define_enum_guc_with_hooks(
        c"pg_tenancy.context_mode",
        c"Who may set the tenant context: 'open' (any granted role) or 'signed' (tokens only).",
        c"In 'signed' mode a non-superuser can set the context only with a valid HS256 token, \
through tenancy.set_tenant_token() or SET LOCAL pg_tenancy.tenant = '<token>'.",
        &CONTEXT_MODE,
        GucContext::Suset,
        GucFlags::default(),
        None,
        hooks.verification_int,
        None,
    ) };
    // SAFETY: the hooks are #[pg_guard] functions with the signatures PostgreSQL expects.
    unsafe { GucRegistry::define_string_guc_with_hooks(
        c"pg_tenancy.jwt_secret",
        c"HS256 secret used to verify tenant tokens (superuser only, hidden).",
        c"At least 32 bytes. Prefer pg_tenancy.jwt_secret_file so the secret never appears in SQL.",
        &JWT_SECRET,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
        Some(check_secret_source),
        hooks.verification_string,
        None,
    ) };
    // SAFETY: the hooks are #[pg_guard] functions with the signatures PostgreSQL expects.
    unsafe { GucRegistry::define_string_guc_with_hooks(
        c"pg_tenancy.jwt_secret_file",
        c"Path of a file holding the HS256 secret used to verify tenant tokens.",
        c"Read by the server process; a trailing newline is ignored. Used when pg_tenancy.jwt_secret is empty.",
        &JWT_SECRET_FILE,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
        None,
        hooks.verification_string,
        None,
    ) };
    // SAFETY: the hooks are #[pg_guard] functions with the signatures PostgreSQL expects.
    unsafe { GucRegistry::define_string_guc_with_hooks(
        c"pg_tenancy.tenant_claim",
        c"Name of the token claim that carries the tenant id.",
        c"Defaults to tenant_id.",
        &TENANT_CLAIM,
        GucContext::Suset,
        GucFlags::default(),
        None,
        hooks.verification_string,
        None,
    ) };
    // SAFETY: the hooks are #[pg_guard] functions with the signatures PostgreSQL expects.
    unsafe { GucRegistry::define_string_guc_with_hooks(
        c"pg_tenancy.region",
        c"The region this cluster serves: a tenant whose region is another is refused (data residency).",
        c"Empty (no residency enforced) by default. Tenants of region 'default' are served in any region.",
        &REGION,
        GucContext::Sighup,
        GucFlags::default(),
        Some(check_region),
        hooks.verification_string,
        None,
    ) };
    // SAFETY: as above.
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"pg_tenancy.jwt_leeway",
        c"Seconds of clock skew tolerated when checking a token's exp and nbf claims.",
        c"Keep it small: an expired token is accepted for this long.",
        &JWT_LEEWAY,
        0,
        300,
        GucContext::Suset,
        GucFlags::UNIT_S,
        None,
        hooks.verification_int,
        None,
    ) };
    GucRegistry::define_bool_guc(
        c"pg_tenancy.auto_protect",
        c"Protect new tables that have the tenant column as soon as they are created.",
        c"Partitions of protected tables are always protected, whatever this says.",
        &AUTO_PROTECT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tenancy.guard",
        c"Refuse DDL that weakens a protected table (except through tenancy.unprotect).",
        c"Turn it off only in a superuser session that restores a dump (PGOPTIONS='-c pg_tenancy.guard=off' \
pg_restore ...), then run SELECT * FROM tenancy.check().",
        &GUARD,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY (each call): the assign hook is a #[pg_guard] function with the right signature.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.master_key_file",
            c"File holding the 32-byte master key that wraps every tenant key.",
            c"64 hex digits, base64, or 32 raw bytes. Readable by the server only. Ignored when pg_tenancy.master_key_command is set.",
            &MASTER_KEY_FILE,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            None,
            hooks.master_key,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.master_key_command",
            c"Shell command that prints the 32-byte master key (for example a Vault CLI call).",
            c"Run by the server once per session, on first use; its stdout is the key, as for master_key_file.",
            &MASTER_KEY_COMMAND,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            None,
            hooks.master_key,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.tenant_key_command",
            c"Shell command that prints a tenant's own 32-byte key from the outside key store; %t is the tenant id.",
            c"When set, tenant keys are wrapped by the master key bound to the tenant's key (tenancy.rotate_master_key() rewraps existing ones): deleting the tenant's key in the store (tenancy.shred) makes every copy of its keys useless.",
            &TENANT_KEY_COMMAND,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            None,
            hooks.master_key,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.tenant_key_shred_command",
            c"Shell command tenancy.shred() runs to delete a tenant's own key in the outside key store; %t is the tenant id.",
            c"If it fails, the shred fails and nothing is destroyed.",
            &TENANT_KEY_SHRED_COMMAND,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            None,
            hooks.master_key,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"pg_tenancy.previous_master_key_file",
            c"The master key being replaced, read while tenancy.rotate_master_key() rewraps the tenant keys.",
            c"Set it with the new key in master_key_file, run tenancy.rotate_master_key(), then clear it.",
            &PREVIOUS_MASTER_KEY_FILE,
            GucContext::Suset,
            GucFlags::SUPERUSER_ONLY,
            None,
            hooks.master_key,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"pg_tenancy.backup_dir",
        c"Directory where tenancy.backup() writes tenant archives (one subdirectory per tenant).",
        c"Written by the server's OS user; keep it off the data directory's volume. tenancy.export() needs no directory.",
        &BACKUP_DIR,
        GucContext::Suset,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.restore_wait",
        c"How long tenancy.restore() waits for the tenant's transactions already writing when it pauses the tenant.",
        c"Past it the restore gives up and the tenant's status is put back.",
        &RESTORE_WAIT,
        0,
        3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.key_rotation_interval",
        c"Age after which a tenant's active data key is due for rotation (tenancy.keys_due).",
        c"Six months by default, as the security policy asks.",
        &KEY_ROTATION_INTERVAL,
        3600,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.max_encryptions_per_key",
        c"Encryptions under one data key version after which pg_tenancy rotates it automatically.",
        c"Random 96-bit nonces stay safe for 2^32 encryptions under one key; the default, 2^31 - 1, rotates well before.",
        &MAX_ENCRYPTIONS_PER_KEY,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_tenancy.explain_analyze",
        c"What EXPLAIN ANALYZE of a statement on a protected table does for roles subject to its policies.",
        c"'refuse' (42501, recorded) or 'hide' (counters that could describe other tenants' rows are zeroed). \
Its counters, such as rows removed by the tenant filter, would otherwise describe other tenants' rows.",
        &EXPLAIN_ANALYZE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_tenancy.tenant_column",
        c"Name of the tenant column that tenancy.check() and auto-protection look for.",
        c"tenancy.protect() takes the column as an argument and does not read this.",
        &TENANT_COLUMN,
        GucContext::Suset,
        GucFlags::default(),
    );
    // (a server setting can only be defined while the postmaster loads the library: loaded
    // later, pg_tenancy keeps no usage statistics and its default stands)
    // SAFETY: reads a flag the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"pg_tenancy.stats_max_tenants",
            c"Tenants whose usage (statements, latency, errors, denials, limits) shared memory tracks one by one.",
            c"About 512 bytes each, reserved at server start. Past it, new tenants are counted together under tenant=\"(other)\"; \
    a tenth of the places is kept for tenants whose plan has pinned_stats.",
            &STATS_MAX_TENANTS,
            100,
            1_000_000,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"pg_tenancy.metrics_port",
            c"TCP port a background worker serves tenancy.metrics() on, over HTTP at /metrics, for Prometheus (0: off).",
            c"Off by default. The text names every tenant: keep it on a local or monitoring-only address.",
            &METRICS_PORT,
            0,
            65535,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"pg_tenancy.metrics_listen_address",
            c"Address the metrics endpoint listens on.",
            c"127.0.0.1 by default.",
            &METRICS_LISTEN,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"pg_tenancy.metrics_database",
            c"Database whose tenants the metrics endpoint reports (where pg_tenancy is installed).",
            c"postgres by default.",
            &METRICS_DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"pg_tenancy.usage_databases",
            c"Databases (comma-separated) where background workers run tenancy.snapshot_usage() and tenancy.measure_storage() on their intervals.",
            c"Empty (off) by default. At most 8 databases; short-lived workers, one per database and job; a database without pg_tenancy is left alone.",
            &USAGE_DATABASES,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"pg_tenancy.snapshot_interval",
        c"How often the usage worker runs tenancy.snapshot_usage() (the alerts' windows and usage_daily) (0: never).",
        c"A minute by default; see pg_tenancy.usage_databases.",
        &SNAPSHOT_INTERVAL,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.storage_interval",
        c"How often the usage worker runs tenancy.measure_storage() (storage quotas, tenancy.storage, usage_report) (0: never).",
        c"An hour by default: each run reads every protected table in full.",
        &STORAGE_INTERVAL,
        0,
        7 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.alert_p99",
        c"tenancy.alerts: a tenant's p99 above this (when its plan has no sla_p99_ms) over pg_tenancy.alert_p99_window fires p99_latency.",
        c"The runbook: 2 s over 15 minutes.",
        &ALERT_P99,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.alert_p99_window",
        c"The window of the p99_latency alert.",
        c"Needs tenancy.snapshot_usage() to run at least as often (the usage worker, every minute).",
        &ALERT_P99_WINDOW,
        60,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_float_guc(
        c"pg_tenancy.alert_error_ratio",
        c"tenancy.alerts: a tenant's failed statements above this share over pg_tenancy.alert_error_window fire error_ratio.",
        c"The runbook: 1% over 5 minutes.",
        &ALERT_ERROR_RATIO,
        0.0,
        1.0,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.alert_error_window",
        c"The window of the error_ratio and unexpected_denials alerts.",
        c"Needs tenancy.snapshot_usage() to run at least as often.",
        &ALERT_ERROR_WINDOW,
        60,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_float_guc(
        c"pg_tenancy.alert_quota_ratio",
        c"tenancy.alerts: a meter's use today above this share of the tenant's allowance fires quota_use.",
        c"The runbook: 90%.",
        &ALERT_QUOTA_RATIO,
        0.0,
        1.0,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.alert_min_statements",
        c"Statements a tenant must have run in a window for its p99_latency and error_ratio alerts to be judged.",
        c"A handful of statements says little about a percentile or a ratio.",
        &ALERT_MIN_STATEMENTS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tenancy.log_masking",
        c"Mask literal values in statement text, bound parameters and row values in error details written to the server log, for statements run under a tenant context or on protected tables.",
        c"Tenant tokens are masked in every log line whatever this says.",
        &LOG_MASKING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tenancy.log_tenant",
        c"Tag server log lines written under a tenant context with the tenant id.",
        c"A line only for the log starts with [tenant=<id>]; the log copy of a message the client also gets carries tenant=<id> in its DETAIL.",
        &LOG_TENANT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tenancy.track_stats",
        c"Count each top-level statement run under a tenant context in the tenant's usage statistics.",
        c"tenancy.stats and tenancy.metrics() read them.",
        &TRACK_STATS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_tenancy.enforce_limits",
        c"Enforce the tenants' plan limits (statement rate, concurrent statements).",
        c"Off only for maintenance by a superuser: the limits protect the other tenants.",
        &ENFORCE_LIMITS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_tenancy.concurrency_wait",
        c"How long a statement over its tenant's cap on concurrent statements waits for a place before it is refused.",
        c"The cap is the plan's max_concurrent (or the tenant's own, tenancy.set_limit).",
        &CONCURRENCY_WAIT,
        0,
        60_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    // SAFETY: called from _PG_init with a static NUL-terminated string.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pg_tenancy".as_ptr()) };
}

/// Check hook of `pg_tenancy.jwt_secret`: the secret may come from the configuration files
/// (ALTER SYSTEM) or a superuser's session, never from per-database or per-role settings or a
/// function's SET clause, which land in pg_db_role_setting / pg_proc, readable by every role.
#[pg_guard]
unsafe extern "C-unwind" fn check_secret_source(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    use pg_sys::GucSource::*;
    // SAFETY: PostgreSQL passes a valid pointer to a (possibly NULL) C string.
    let empty = unsafe { (*newval).is_null() || **newval == 0 };
    if empty || !matches!(source, PGC_S_DATABASE | PGC_S_USER | PGC_S_DATABASE_USER | PGC_S_TEST) {
        return true;
    }
    refuse_value(
        Some(c"pg_tenancy.jwt_secret cannot be stored in database, role or function settings"),
        c"Those settings are readable by every role.",
        Some(c"Use pg_tenancy.jwt_secret_file (a path is not a secret), or ALTER SYSTEM SET pg_tenancy.jwt_secret."),
    )
}

/// What a check hook returns to refuse a value (22023), with the message (else PostgreSQL's
/// own "invalid value for parameter"), detail and hint PostgreSQL reports.
fn refuse_value(message: Option<&CStr>, detail: &CStr, hint: Option<&CStr>) -> bool {
    // SAFETY: the GUC_check_* strings are palloc'd copies PostgreSQL reads right after the
    // check hook returns false.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        if let Some(m) = message {
            pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(m.as_ptr());
        }
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
        if let Some(h) = hint {
            pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(h.as_ptr());
        }
    }
    false
}

/// Check hook of `pg_tenancy.region`: empty, or spelt as a tenant's region must be (lowercase
/// letters, digits, '-' and '_', 1 to 63 characters; not `default`, which means "any region").
#[pg_guard]
unsafe extern "C-unwind" fn check_region(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to a (possibly NULL) C string.
    let value: &[u8] = unsafe { if (*newval).is_null() { b"" } else { CStr::from_ptr(*newval).to_bytes() } };
    value.is_empty()
        || (pg_tenancy_core::tenant_id::valid_region(value) && value != b"default")
        || refuse_value(
            None,
            c"A region is 1 to 63 characters: lowercase letters, digits, '-' and '_' (not 'default', which a tenant uses for any region).",
            None,
        )
}

fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Whether the context setting holds anything (not whether it verifies). No allocation.
pub fn has_tenant_value() -> bool {
    // SAFETY: the setting's storage is NULL or a NUL-terminated string owned by the GUC machinery.
    unsafe {
        let p = *TENANT.as_ptr();
        !p.is_null() && *p != 0
    }
}

/// The raw context value, `None` when unset or empty.
pub fn tenant_raw() -> Option<String> {
    string(&TENANT)
}

pub fn context_mode() -> ContextMode {
    CONTEXT_MODE.get()
}

pub fn jwt_secret() -> Option<String> {
    string(&JWT_SECRET)
}

pub fn jwt_secret_file() -> Option<String> {
    string(&JWT_SECRET_FILE)
}

pub fn tenant_claim() -> String {
    string(&TENANT_CLAIM).unwrap_or_else(|| "tenant_id".to_string())
}

pub fn jwt_leeway() -> i64 {
    JWT_LEEWAY.get() as i64
}

pub fn tenant_key_command() -> Option<String> {
    string(&TENANT_KEY_COMMAND)
}

pub fn tenant_key_shred_command() -> Option<String> {
    string(&TENANT_KEY_SHRED_COMMAND)
}

pub fn backup_dir() -> Option<String> {
    string(&BACKUP_DIR)
}

pub fn restore_wait() -> i32 {
    RESTORE_WAIT.get()
}

pub fn master_key_file() -> Option<String> {
    string(&MASTER_KEY_FILE)
}

pub fn master_key_command() -> Option<String> {
    string(&MASTER_KEY_COMMAND)
}

pub fn previous_master_key_file() -> Option<String> {
    string(&PREVIOUS_MASTER_KEY_FILE)
}

pub fn max_encryptions_per_key() -> i64 {
    MAX_ENCRYPTIONS_PER_KEY.get() as i64
}

pub fn explain_analyze() -> ExplainAnalyze {
    EXPLAIN_ANALYZE.get()
}

pub fn guard() -> bool {
    GUARD.get()
}

pub fn stats_max_tenants() -> usize {
    STATS_MAX_TENANTS.get().max(100) as usize
}

pub fn track_stats() -> bool {
    TRACK_STATS.get()
}

pub fn enforce_limits() -> bool {
    ENFORCE_LIMITS.get()
}

pub fn concurrency_wait_ms() -> i32 {
    CONCURRENCY_WAIT.get()
}

pub fn log_masking() -> bool {
    LOG_MASKING.get()
}

pub fn log_tenant() -> bool {
    LOG_TENANT.get()
}

pub fn metrics_port() -> u16 {
    METRICS_PORT.get().clamp(0, 65535) as u16
}

pub fn metrics_listen_address() -> String {
    string(&METRICS_LISTEN).unwrap_or_else(|| "127.0.0.1".into())
}

pub fn metrics_database() -> String {
    string(&METRICS_DATABASE).unwrap_or_else(|| "postgres".into())
}

/// The region this cluster serves (`pg_tenancy.region`; None when not set).
pub fn region() -> Option<String> {
    string(&REGION)
}

/// The databases of `pg_tenancy.usage_databases` (names trimmed, empty ones dropped).
pub fn usage_databases() -> Vec<String> {
    string(&USAGE_DATABASES)
        .map(|s| s.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect())
        .unwrap_or_default()
}

/// Seconds between snapshots (0: none).
pub fn snapshot_interval() -> i32 {
    SNAPSHOT_INTERVAL.get()
}

/// Seconds between storage measurements (0: none).
pub fn storage_interval() -> i32 {
    STORAGE_INTERVAL.get()
}
