//! Per-tenant encryption: data keys per tenant, wrapped by a master key that never enters the
//! database, AES-256-GCM ciphertexts bound to their tenant and context, rotation, crypto-shredding
//! and blind indexes.
//!
//! Key hierarchy: the master key (KEK, 32 bytes) comes from `pg_tenancy.master_key_file` or the
//! output of `pg_tenancy.master_key_command` (e.g. a Vault CLI call, run with a time limit, an
//! output cap and a reduced environment). Each tenant has versioned data keys (DEKs) and one
//! blind-index key, generated from the OS random source and stored only wrapped in
//! `tenancy.keys`, with the KEK's identity (a hash, never the key). The ciphertext format and the
//! cipher (AWS-LC's AES-256-GCM) are in `pg_tenancy_core::envelope`, the key wrapping in
//! `pg_tenancy_core::master_key`; the caches in [`keystore`].
use hmac::{Hmac, Mac};
use pgrx::prelude::*;
use sha2::Sha256;
use zeroize::Zeroizing;

use pg_tenancy_core::envelope::{self, EnvelopeError, OVERHEAD};
use pg_tenancy_core::model::KeyKind;

use crate::catalog;
use crate::context;
use crate::error::{OrRaise, Result, TenancyError};

pub mod keystore;

use keystore::{cipher_for, key_for, note_encryption, Create, Creation};

/// The ciphertext of `plain`, built in place in a bytea.
fn encrypt_bytes(plain: &[u8], context: &str) -> Result<ByteaOut> {
    let (tenant, creation) = context::with_context(|v| (v.tenant.clone(), Creation::of(v)))?;
    let (version, key) = cipher_for(&tenant, None, Some(&creation))?;
    let len = plain.len() + OVERHEAD;
    if len > MAX_VALUE {
        return Err(TenancyError::ValueTooLarge);
    }
    let mut value = ByteaOut::alloc(len);
    envelope::seal(&key, version, keystore::random_nonce(), &tenant, context, plain, value.as_mut());
    note_encryption(&tenant, version)?;
    Ok(value)
}

/// Decrypt into a plaintext buffer made by `out` for the plaintext length (a Vec, or PostgreSQL
/// memory for a value returned as is). On any failure the buffer holds no plaintext.
fn decrypt_with<B: AsMut<[u8]>>(ciphertext: &[u8], context: &str, out: impl FnOnce(usize) -> B) -> Result<B> {
    let header = envelope::header(ciphertext).map_err(|_| TenancyError::CiphertextMalformed)?;
    let tenant = context::with_context(|v| v.tenant.clone())?;
    let key = match cipher_for(&tenant, Some(header.version), None) {
        Ok((_, k)) if k.id() == header.key_id => k,
        // Not this tenant's key: another tenant's ciphertext (or a forged header).
        Ok(_) | Err(TenancyError::CiphertextInvalid) => {
            crate::audit::record(
                crate::audit::Event::WrongTenantKey,
                pg_sys::InvalidOid,
                None,
                "22000",
                "ciphertext made with a key that is not the current tenant's",
            );
            return Err(TenancyError::CiphertextInvalid);
        }
        Err(e) => return Err(e),
    };
    let mut plain = out(ciphertext.len() - OVERHEAD);
    envelope::open(&key, &tenant, context, ciphertext, plain.as_mut()).map_err(|e| match e {
        EnvelopeError::Malformed => TenancyError::CiphertextMalformed,
        EnvelopeError::Unauthentic => TenancyError::CiphertextInvalid,
    })?;
    Ok(plain)
}

fn decrypt_bytes(ciphertext: &[u8], context: &str) -> Result<Vec<u8>> {
    decrypt_with(ciphertext, context, |n| vec![0u8; n])
}

/// A varlena allocated with palloc in the current memory context and filled in place, returned
/// to PostgreSQL as is: decrypted values are not copied from Rust memory into a Datum.
struct Varlena(std::ptr::NonNull<pg_sys::varlena>);

/// The largest bytea or text value (MaxAllocSize minus the header).
const MAX_VALUE: usize = 0x3fff_ffff - pg_sys::VARHDRSZ;

impl Varlena {
    /// `len` is at most MAX_VALUE: a plaintext is shorter than the ciphertext it came from, and
    /// `encrypt_bytes` checks its result's length first.
    fn alloc(len: usize) -> Self {
        let total = len.checked_add(pg_sys::VARHDRSZ).filter(|&t| t <= 0x3fff_ffff).expect("value under 1 GB");
        // SAFETY: palloc returns at least `total` bytes or raises; the header is set before use.
        unsafe {
            let p = pg_sys::palloc(total) as *mut pg_sys::varlena;
            pgrx::set_varsize_4b(p, total as i32);
            Varlena(std::ptr::NonNull::new_unchecked(p))
        }
    }

    fn data(&mut self) -> &mut [u8] {
        // SAFETY: a 4-byte-header varlena made by `alloc`, its data right after the header.
        unsafe {
            let p = self.0.as_ptr();
            let len = pgrx::varsize_4b(p) - pg_sys::VARHDRSZ;
            std::slice::from_raw_parts_mut((p as *mut u8).add(pg_sys::VARHDRSZ), len)
        }
    }
}

macro_rules! varlena_return {
    ($name:ident, $oid:expr) => {
        /// See [`Varlena`].
        pub struct $name(Varlena);

        impl $name {
            fn alloc(len: usize) -> Self {
                $name(Varlena::alloc(len))
            }
        }

        impl AsMut<[u8]> for $name {
            fn as_mut(&mut self) -> &mut [u8] {
                self.0.data()
            }
        }

        impl IntoDatum for $name {
            fn into_datum(self) -> Option<pg_sys::Datum> {
                Some(pg_sys::Datum::from((self.0).0.as_ptr()))
            }
            fn type_oid() -> pg_sys::Oid {
                $oid
            }
        }

        // SAFETY: the Datum is a palloc'd varlena of the declared SQL type, returned non-null.
        unsafe impl pgrx::callconv::BoxRet for $name {
            /// # Safety
            /// `fcinfo` is the call's function-call info, as pgrx passes it.
            unsafe fn box_into<'fcx>(self, fcinfo: &mut pgrx::callconv::FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
                let datum = pg_sys::Datum::from((self.0).0.as_ptr());
                // SAFETY: see above.
                unsafe { fcinfo.return_raw_datum(datum) }
            }
        }
    };
}

varlena_return!(ByteaOut, pg_sys::BYTEAOID);
varlena_return!(TextOut, pg_sys::TEXTOID);

/// (In a module of their own: the macro names `Result`, which this file's scope redefines.)
mod sql_types {
    use super::{ByteaOut, TextOut};
    pgrx::impl_sql_translatable!(ByteaOut, "bytea");
    pgrx::impl_sql_translatable!(TextOut, "text");
}


/// Encrypt with the current tenant's active key, bound to the tenant and `context`.
#[pg_extern(volatile, parallel_unsafe)]
fn encrypt(data: Option<&[u8]>, context: default!(&str, "''")) -> Option<ByteaOut> {
    data.map(|d| encrypt_bytes(d, context).or_raise())
}

#[pg_extern(volatile, parallel_unsafe, name = "encrypt")]
fn encrypt_text(data: Option<&str>, context: default!(&str, "''")) -> Option<ByteaOut> {
    data.map(|d| encrypt_bytes(d.as_bytes(), context).or_raise())
}

/// Decrypt a ciphertext of the current tenant made with the same `context`.
#[pg_extern(stable, parallel_unsafe)]
fn decrypt(ciphertext: Option<&[u8]>, context: default!(&str, "''")) -> Option<ByteaOut> {
    ciphertext.map(|c| decrypt_with(c, context, ByteaOut::alloc).or_raise())
}

#[pg_extern(stable, parallel_unsafe)]
fn decrypt_text(ciphertext: Option<&[u8]>, context: default!(&str, "''")) -> Option<TextOut> {
    ciphertext.map(|c| {
        let mut text = decrypt_with(c, context, TextOut::alloc).or_raise();
        let plain = text.as_mut();
        if std::str::from_utf8(plain).is_err() {
            zeroize::Zeroize::zeroize(plain);
            TenancyError::CiphertextMalformed.raise();
        }
        text
    })
}

/// Re-encrypt under the tenant's newest key version.
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap(ciphertext: Option<&[u8]>, context: default!(&str, "''")) -> Option<ByteaOut> {
    ciphertext.map(|c| {
        let plain = Zeroizing::new(decrypt_bytes(c, context).or_raise());
        encrypt_bytes(&plain, context).or_raise()
    })
}

/// The key version a ciphertext was made with (NULL for NULL; raises for a malformed one).
#[pg_extern(immutable, parallel_safe)]
fn key_version(ciphertext: Option<&[u8]>) -> Option<i32> {
    ciphertext.map(|c| envelope::header(c).map_err(|_| TenancyError::CiphertextMalformed).or_raise().version)
}

/// The current tenant's active data key version (created on first use).
#[pg_extern(volatile, parallel_unsafe)]
fn active_key_version() -> i32 {
    let (tenant, creation) = context::with_context(|v| (v.tenant.clone(), Creation::of(v))).or_raise();
    key_for(&tenant, KeyKind::Data, None, Some(&creation)).or_raise().0
}

/// A new active key version for `tenant`; older versions keep decrypting. Returns the version.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_key(tenant: &str) -> i32 {
    if !catalog::tenants::tenant_exists(tenant).or_raise() {
        TenancyError::UnknownTenant.raise();
    }
    keystore::create_key(tenant, KeyKind::Data, Create::Rotate).or_raise()
}

/// Destroy every key of `tenant` (crypto-shredding). `confirm` must repeat the tenant id.
#[pg_extern(volatile, parallel_unsafe)]
fn shred(tenant: &str, confirm: Option<&str>) -> i64 {
    if confirm != Some(tenant) {
        TenancyError::InvalidArgument("confirm (it must repeat the tenant id)").raise();
    }
    if !catalog::tenants::tenant_exists(tenant).or_raise() {
        TenancyError::UnknownTenant.raise();
    }
    let n = catalog::keys::shred(tenant).or_raise();
    // captured changes are plaintext copies of its rows
    catalog::backups::forget_changes(tenant).or_raise();
    // its own key in the outside store: without it no copy of its wrapped keys unwraps. The
    // command cannot be undone, so it runs when the transaction commits (if it fails, the commit
    // fails and nothing was destroyed; a rolled-back shred never runs it).
    if let Some(template) = crate::gucs::tenant_key_shred_command() {
        let command = pg_tenancy_core::master_key::tenant_command(&template, tenant)
            .ok_or(TenancyError::TenantKeyUnavailable("a tenant id that starts with '-' or '.' is never put into a key store command"))
            .or_raise();
        // SAFETY: reads the backend's transaction nesting level.
        let level = unsafe { pg_sys::GetCurrentTransactionNestLevel() };
        PENDING_SHREDS.with(|p| p.borrow_mut().push((level, command)));
    }
    keystore::forget_master_keys();
    n
}

static PENDING_SHREDS: crate::util::Backend<std::cell::RefCell<Vec<(i32, String)>>> =
    crate::util::Backend::new(std::cell::RefCell::new(Vec::new()));

/// Whether this transaction made shreds whose commands run at its commit (a cell read: the
/// commit of every other transaction does not enter an error boundary for them).
pub fn shreds_pending() -> bool {
    PENDING_SHREDS.with(|p| p.try_borrow().map_or(true, |p| !p.is_empty()))
}

/// At commit: run the key store commands of the shreds this transaction made; one that fails
/// fails the commit (the shred is rolled back with it).
pub fn run_pending_shreds() {
    let pending = PENDING_SHREDS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (_, command) in pending {
        if pg_tenancy_core::master_key::run_command(&command, &pg_tenancy_core::master_key::COMMAND_LIMITS).is_err() {
            PENDING_SHREDS.with(|p| p.borrow_mut().clear());
            TenancyError::TenantKeyUnavailable("the tenant key shred command failed: the shred is rolled back, nothing was destroyed").raise();
        }
    }
}

/// At the abort of a (sub)transaction at nesting `level`: its shreds' commands never run.
pub fn forget_pending_shreds(level: i32) {
    PENDING_SHREDS.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            p.retain(|(l, _)| *l < level);
        }
    });
}

/// Rewrap every tenant key that the current master key did not wrap (those wrapped by
/// `pg_tenancy.previous_master_key_file`). Data rows are not touched. Returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_master_key() -> i64 {
    keystore::current_kek().or_raise();
    // every live key not wrapped by what wraps its tenant's keys now (a new master key, or the
    // master key newly bound to the tenants' own keys by pg_tenancy.tenant_key_command)
    let rows = catalog::keys::live_keys().or_raise();
    let mut n = 0;
    let mut skipped = 0;
    for (tenant, kind, version, kek_id) in rows {
        // a tenant whose own key cannot be read (shredded in the store, a store outage) is
        // skipped and reported, not a reason to leave every other tenant unrotated
        let kek = match keystore::kek_for(&tenant) {
            Ok(k) => k,
            Err(TenancyError::TenantKeyUnavailable(_)) => {
                skipped += 1;
                continue;
            }
            Err(e) => e.raise(),
        };
        if kek.id == kek_id {
            continue;
        }
        let kind = KeyKind::parse(&kind).unwrap_or(KeyKind::Data);
        let row = keystore::fetch_key(&tenant, kind, Some(version)).or_raise().ok_or(TenancyError::MasterKeyMismatch).or_raise();
        let key = keystore::unwrap(&row.kek_id, row.wrapped.as_deref().unwrap_or_default(), &tenant, kind, version).or_raise();
        let wrapped = keystore::wrap(&kek, &key, &tenant, kind, version);
        catalog::keys::rewrap_key(&tenant, kind.as_str(), version, &wrapped, &kek.id).or_raise();
        n += 1;
    }
    if skipped > 0 {
        pgrx::warning!("pg_tenancy: {skipped} tenant keys were not rewrapped: their tenant's own key cannot be read from the key store");
    }
    n
}

/// Keyed HMAC-SHA256 of `value` with the current tenant's blind-index key, for equality lookups
/// on encrypted columns. Stable across data-key rotations.
#[pg_extern(volatile, parallel_unsafe)]
fn blind_index(value: Option<&str>, context: default!(&str, "''")) -> Option<Vec<u8>> {
    value.map(|v| {
        let (tenant, creation) = context::with_context(|c| (c.tenant.clone(), Creation::of(c))).or_raise();
        let (_, key) = key_for(&tenant, KeyKind::Index, None, Some(&creation)).or_raise();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("any key length");
        mac.update(context.as_bytes());
        mac.update(&[0]);
        mac.update(v.as_bytes());
        mac.finalize().into_bytes().to_vec()
    })
}

/// The AES-256-GCM code this server's CPU gets from AWS-LC (it chooses at run time): AES-NI with
/// VAES/VPCLMULQDQ, AES-NI with PCLMULQDQ, or portable code. Same ciphertexts whichever.
#[pg_extern(stable, parallel_safe)]
fn cipher_implementation() -> &'static str {
    envelope::implementation()
}

/// The identity of the configured master key (a hash; never the key).
#[pg_extern(volatile, parallel_unsafe)]
fn master_key_id() -> String {
    keystore::current_kek().or_raise().id.clone()
}


#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn ciphertexts_of_0_1_0_still_decrypt() {
        // made by 0.1.0 before AES-GCM moved to AWS-LC (pg_test/fixtures/ciphertexts-v1.txt)
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pg_test/fixtures");
        Spi::run(&format!("SET pg_tenancy.master_key_file = '{}'", dir.join("master-key-v1.hex").display())).unwrap();
        Spi::run("SELECT tenancy.create_tenant('fixture-t', 'Fixture')").unwrap();
        let fixtures = std::fs::read_to_string(dir.join("ciphertexts-v1.txt")).unwrap();
        for line in fixtures.lines().filter(|l| l.starts_with("key=")) {
            let f: Vec<&str> = line["key=".len()..].split('|').collect();
            Spi::run(&format!(
                "INSERT INTO tenancy.keys (tenant, kind, version, state, wrapped, kek_id) \
                 VALUES ('{}', '{}', {}, '{}', '\\x{}', '{}')",
                f[0], f[1], f[2], f[3], f[4], f[5]
            ))
            .unwrap();
        }
        Spi::run("SELECT tenancy.set_tenant('fixture-t')").unwrap();
        for line in fixtures.lines().filter(|l| !l.starts_with("key=") && !l.starts_with('#') && !l.is_empty()) {
            let f: Vec<&str> = line.split('|').collect();
            let got = Spi::get_one::<String>(&format!("SELECT tenancy.decrypt_text('\\x{}', '{}')", f[2], f[1])).unwrap();
            assert_eq!(got.as_deref(), Some(f[0]));
        }
    }
}
