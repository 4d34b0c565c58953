//! Per-tenant encryption: data keys per tenant, wrapped by a master key that never enters the
//! database, AES-256-GCM ciphertexts bound to their tenant and context, rotation, crypto-shredding
//! and blind indexes.
//!
//! Key hierarchy: the master key (KEK, 32 bytes) comes from `pg_tenancy.master_key_file` or the
//! output of `pg_tenancy.master_key_command` (e.g. a Vault CLI call). Each tenant has versioned
//! data keys (DEKs) and one blind-index key, generated from the OS random source and stored only
//! wrapped (AES-256-GCM under the KEK, bound to tenant, kind and version) in `tenancy.keys`, with
//! the KEK's identity (a hash, never the key). Unwrapped keys are cached per backend in zeroizing
//! buffers; the cache is dropped when `tenancy.keys` changes (relcache invalidation), so a
//! rotation or a shred in another session is seen at this session's next statement.
//!
//! Ciphertext v1: `01 | 01 (AES-256-GCM) | key version (u32 BE) | key id (8) | nonce (12) | ct |
//! tag (16)`. The associated data is the 14 header bytes, the tenant id and the caller's context,
//! so a ciphertext copied to another tenant, column or row does not decrypt. The cipher itself is
//! in `gcm` (AES-NI/VAES code, RustCrypto elsewhere); key wrapping uses RustCrypto directly.
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use pgrx::prelude::*;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use zeroize::Zeroizing;

use crate::catalog;
use crate::context;
use crate::error::{OrRaise, Result, TenancyError};
use crate::gcm::{Gcm, NONCE_LEN, TAG_LEN};
use crate::gucs;

const FORMAT_V1: u8 = 1;
const ALG_AES_256_GCM: u8 = 1;
/// format, algorithm, key version (4 bytes), key id (8 bytes: identifies the key, not the tenant)
const HEADER_LEN: usize = 14;
const KEY_ID_LEN: usize = 8;

type Key = Zeroizing<[u8; 32]>;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Data,
    Index,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Index => "index",
        }
    }
}

struct Kek {
    key: Key,
    id: String,
}

thread_local! {
    /// Master keys by the setting they came from (file path or command).
    static KEKS: RefCell<HashMap<String, std::rc::Rc<Kek>>> = RefCell::new(HashMap::new());
    /// Unwrapped tenant keys by (tenant, kind, version).
    static DEKS: RefCell<HashMap<(String, Kind, i32), Key>> = RefCell::new(HashMap::new());
    /// Active key version by (tenant, kind).
    static ACTIVE: RefCell<HashMap<(String, Kind), i32>> = RefCell::new(HashMap::new());
    /// Ready AES-GCM instances (expanded key schedules, zeroized on drop) by (tenant, version):
    /// expanding the key on every call cost ~15% of a 100-byte encryption (bench/README.md).
    /// (Keyed by tenant, then version, so that a lookup borrows the tenant instead of copying it.)
    static CIPHERS: RefCell<HashMap<String, HashMap<i32, std::rc::Rc<Cipher>>>> = RefCell::new(HashMap::new());
    /// OS random bytes, fetched 4 KiB at a time: one getrandom() call per 12-byte nonce cost more
    /// than the encryption of 100 bytes. Nonces are not secret; they only must not repeat.
    static NONCES: RefCell<(Box<[u8; 4096]>, usize)> = RefCell::new((Box::new([0u8; 4096]), 4096));
}

thread_local! {
    /// Encryptions made in this backend and not yet added to tenancy.keys.encryptions.
    static COUNTS: RefCell<HashMap<(String, i32), i64>> = RefCell::new(HashMap::new());
}

/// Count one encryption under (tenant, version). Every `max/4` (at most 1,000) encryptions the
/// backend adds its count to the key's row; when the total reaches
/// `pg_tenancy.max_encryptions_per_key` (2^31 by default, half the 2^32 that random 96-bit nonces
/// allow under one key) the key is rotated. A backend that exits loses at most its last batch, so
/// the real total can exceed the recorded one by (backends x batch), far below the 2^31 margin.
fn note_encryption(tenant: &str, version: i32) -> Result<()> {
    let limit = gucs::max_encryptions_per_key();
    let every = (limit / 4).clamp(1, 1000);
    let pending = COUNTS.with(|c| {
        let mut c = c.borrow_mut();
        let n = c.entry((tenant.to_string(), version)).or_insert(0);
        *n += 1;
        if *n >= every {
            std::mem::take(n)
        } else {
            0
        }
    });
    if pending == 0 {
        return Ok(());
    }
    // SAFETY: plain reads of backend state.
    if unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() } {
        // keep the count for a transaction that can write it
        COUNTS.with(|c| *c.borrow_mut().entry((tenant.to_string(), version)).or_insert(0) += pending);
        return Ok(());
    }
    let total = catalog::count_encryptions(tenant, version, pending)?;
    if total >= limit {
        create_key(tenant, Kind::Data, Create::RotateIfActive(version))?;
    }
    Ok(())
}

fn random_nonce() -> [u8; NONCE_LEN] {
    NONCES.with(|n| {
        let mut n = n.borrow_mut();
        let (buf, used) = &mut *n;
        if *used + NONCE_LEN > buf.len() {
            getrandom::getrandom(&mut buf[..])
                .unwrap_or_else(|_| pgrx::error!("pg_tenancy: the OS random source failed"));
            *used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&buf[*used..*used + NONCE_LEN]);
        // never hand out the same bytes twice
        buf[*used..*used + NONCE_LEN].fill(0);
        *used += NONCE_LEN;
        nonce
    })
}

/// A ready data key: the AES-GCM key schedule and the key's public id, written into each
/// ciphertext's header so that a ciphertext of another tenant (another key) is told apart from
/// one that was altered, and reported.
pub struct Cipher {
    gcm: Gcm,
    id: [u8; KEY_ID_LEN],
}

fn key_id(key: &[u8]) -> [u8; KEY_ID_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(b"pg_tenancy key id v1");
    let full = mac.finalize().into_bytes();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&full[..KEY_ID_LEN]);
    id
}

/// The AES-GCM instance for the tenant's data key `version` (or the active one).
fn cipher_for(tenant: &str, version: Option<i32>, may_create: Option<&Creation>) -> Result<(i32, std::rc::Rc<Cipher>)> {
    let version = match version.or_else(|| ACTIVE.with(|a| a.borrow().get(&(tenant.to_string(), Kind::Data)).copied())) {
        Some(v) => v,
        None => key_for(tenant, Kind::Data, None, may_create)?.0,
    };
    if let Some(c) = CIPHERS.with(|c| c.borrow().get(tenant).and_then(|v| v.get(&version)).cloned()) {
        return Ok((version, c));
    }
    let (_, key) = key_for(tenant, Kind::Data, Some(version), None)?;
    let key = Zeroizing::new(key);
    let cipher = std::rc::Rc::new(Cipher {
        gcm: Gcm::new(&key),
        id: key_id(&key[..]),
    });
    CIPHERS.with(|c| c.borrow_mut().entry(tenant.to_string()).or_default().insert(version, cipher.clone()));
    Ok((version, cipher))
}

/// Register the abort callbacks: a key created in a transaction (or savepoint) that rolls back
/// must not survive in the cache. (The relcache invalidation already covers this; this does not
/// depend on it.)
pub fn init() {
    // SAFETY: registers plain #[pg_guard] callbacks once, from _PG_init.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if event == pg_sys::XactEvent::XACT_EVENT_ABORT || event == pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT {
        forget_keys();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        forget_keys();
    }
}

/// Forget every unwrapped tenant key (tenancy.keys changed somewhere).
pub fn forget_keys() {
    DEKS.with(|d| {
        if let Ok(mut d) = d.try_borrow_mut() {
            d.clear();
        }
    });
    ACTIVE.with(|a| {
        if let Ok(mut a) = a.try_borrow_mut() {
            a.clear();
        }
    });
    CIPHERS.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.clear();
        }
    });
}

/// Forget the master keys (a master-key setting changed).
pub fn forget_master_keys() {
    KEKS.with(|k| {
        if let Ok(mut k) = k.try_borrow_mut() {
            k.clear();
        }
    });
    forget_keys();
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).unwrap_or_else(|_| pgrx::error!("pg_tenancy: the OS random source failed"));
    b
}

/// 64 hex digits, base64 of 32 bytes, or 32 raw bytes; surrounding white space ignored.
fn parse_key_material(raw: &[u8]) -> Result<Key> {
    use base64::Engine;
    let text = std::str::from_utf8(raw).ok().map(str::trim);
    let mut key = Zeroizing::new([0u8; 32]);
    if let Some(t) = text {
        if t.len() == 64 && hex::decode_to_slice(t, &mut key[..]).is_ok() {
            return Ok(key);
        }
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(t) {
            let bytes = Zeroizing::new(bytes);
            if bytes.len() == 32 {
                key.copy_from_slice(&bytes);
                return Ok(key);
            }
        }
    }
    if raw.len() == 32 {
        key.copy_from_slice(raw);
        return Ok(key);
    }
    Err(TenancyError::MasterKeyUnusable("it is not 32 bytes (64 hex digits, base64, or raw)"))
}

fn kek_id(key: &[u8; 32]) -> String {
    let digest = Sha256::new().chain_update(b"pg_tenancy master key id\0").chain_update(key).finalize();
    format!("sha256:{}", hex::encode(&digest[..8]))
}

fn load_kek(source: &str, is_command: bool) -> Result<std::rc::Rc<Kek>> {
    let cache_key = format!("{}{source}", if is_command { "cmd:" } else { "file:" });
    if let Some(k) = KEKS.with(|k| k.borrow().get(&cache_key).cloned()) {
        return Ok(k);
    }
    let raw = Zeroizing::new(if is_command {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(source)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .map_err(|_| TenancyError::MasterKeyUnusable("the master key command could not be run"))?;
        if !out.status.success() {
            return Err(TenancyError::MasterKeyUnusable("the master key command failed"));
        }
        out.stdout
    } else {
        std::fs::read(source).map_err(|_| TenancyError::MasterKeyUnusable("the master key file cannot be read"))?
    });
    let key = parse_key_material(&raw)?;
    let kek = std::rc::Rc::new(Kek { id: kek_id(&key), key });
    KEKS.with(|k| k.borrow_mut().insert(cache_key, kek.clone()));
    Ok(kek)
}

fn current_kek() -> Result<std::rc::Rc<Kek>> {
    if let Some(cmd) = gucs::master_key_command() {
        load_kek(&cmd, true)
    } else if let Some(file) = gucs::master_key_file() {
        load_kek(&file, false)
    } else {
        Err(TenancyError::NoMasterKey)
    }
}

fn previous_kek() -> Option<std::rc::Rc<Kek>> {
    gucs::previous_master_key_file().and_then(|f| load_kek(&f, false).ok())
}

fn wrap_aad(tenant: &str, kind: Kind, version: i32) -> Vec<u8> {
    format!("pg_tenancy:key:{tenant}:{}:{version}", kind.as_str()).into_bytes()
}

fn wrap(kek: &Kek, dek: &[u8; 32], tenant: &str, kind: Kind, version: i32) -> Vec<u8> {
    let nonce = random_nonce();
    let cipher = Aes256Gcm::new_from_slice(&kek.key[..]).expect("32-byte key");
    let aad = wrap_aad(tenant, kind, version);
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: dek, aad: &aad })
        .expect("AES-GCM encryption of 32 bytes cannot fail");
    [nonce.as_slice(), &ct].concat()
}

fn unwrap(kek_id_stored: &str, wrapped: &[u8], tenant: &str, kind: Kind, version: i32) -> Result<Key> {
    let current = current_kek()?;
    let kek = if current.id == kek_id_stored {
        current
    } else {
        previous_kek().filter(|k| k.id == kek_id_stored).ok_or(TenancyError::MasterKeyMismatch)?
    };
    if wrapped.len() != NONCE_LEN + 32 + TAG_LEN {
        return Err(TenancyError::MasterKeyMismatch);
    }
    let cipher = Aes256Gcm::new_from_slice(&kek.key[..]).expect("32-byte key");
    let aad = wrap_aad(tenant, kind, version);
    let plain = Zeroizing::new(
        cipher
            .decrypt(Nonce::from_slice(&wrapped[..NONCE_LEN]), Payload { msg: &wrapped[NONCE_LEN..], aad: &aad })
            .map_err(|_| TenancyError::MasterKeyMismatch)?,
    );
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain);
    Ok(key)
}

use crate::catalog::KeyRow;

fn fetch_key(tenant: &str, kind: Kind, version: Option<i32>) -> Result<Option<KeyRow>> {
    catalog::key(tenant, kind.as_str(), version)
}

/// Whether a key may be created in the current context: creating a tenant's keys is a write, so
/// it needs what a write needs (an active tenant, a read_write or admin grant).
pub struct Creation(Result<()>);

impl Creation {
    fn of(v: &context::Verified) -> Creation {
        Creation(v.writable())
    }
    fn allowed(&self) -> Result<()> {
        if let Err(e) = &self.0 {
            crate::audit::record(
                crate::audit::Event::ReadOnlyWrite,
                pg_sys::InvalidOid,
                None,
                &e.sqlstate_text(),
                "creating the tenant's keys is a write",
            );
        }
        self.0.clone()
    }
}

/// Insert a new key version (the first, or a rotation); returns its version. Serialized per
/// tenant by a row lock on its tenancy.tenants row; `first` returns an existing active key
/// instead (another session created it while this one waited).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Create {
    /// The tenant's first key (or the one another session created meanwhile).
    First,
    /// Always a new version (tenancy.rotate_key).
    Rotate,
    /// A new version only if `version` is still the active one (automatic rotation).
    RotateIfActive(i32),
}

fn create_key(tenant: &str, kind: Kind, mode: Create) -> Result<i32> {
    let kek = current_kek()?;
    if !catalog::lock_tenant(tenant)? {
        return Err(TenancyError::UnknownTenant);
    }
    if catalog::keys_destroyed(tenant)? {
        return Err(TenancyError::KeysDestroyed);
    }
    match (mode, fetch_key(tenant, kind, None)?) {
        (Create::First, Some(row)) => return Ok(row.version),
        (Create::RotateIfActive(v), Some(row)) if row.version != v => return Ok(row.version),
        _ => {}
    }
    let version = catalog::next_key_version(tenant, kind.as_str())?;
    let dek: Key = Zeroizing::new(random_bytes::<32>());
    let wrapped = wrap(&kek, &dek, tenant, kind, version);
    catalog::insert_active_key(tenant, kind.as_str(), version, &wrapped, &kek.id)?;
    DEKS.with(|d| d.borrow_mut().insert((tenant.to_string(), kind, version), dek));
    ACTIVE.with(|a| a.borrow_mut().insert((tenant.to_string(), kind), version));
    Ok(version)
}

/// The unwrapped key `version` (or the active one, created on first use) of `tenant`.
fn key_for(tenant: &str, kind: Kind, version: Option<i32>, may_create: Option<&Creation>) -> Result<(i32, [u8; 32])> {
    let version = match version.or_else(|| ACTIVE.with(|a| a.borrow().get(&(tenant.to_string(), kind)).copied())) {
        Some(v) => v,
        None => match fetch_key(tenant, kind, None)? {
            Some(row) => row.version,
            None => match may_create {
                Some(c) => {
                    c.allowed()?;
                    create_key(tenant, kind, Create::First)?
                }
                None => return Err(TenancyError::CiphertextInvalid),
            },
        },
    };
    if let Some(k) = DEKS.with(|d| d.borrow().get(&(tenant.to_string(), kind, version)).map(|k| **k)) {
        return Ok((version, k));
    }
    let row = fetch_key(tenant, kind, Some(version))?.ok_or(TenancyError::CiphertextInvalid)?;
    if row.state == "destroyed" {
        return Err(TenancyError::KeysDestroyed);
    }
    let wrapped = row.wrapped.ok_or(TenancyError::KeysDestroyed)?;
    let key = unwrap(&row.kek_id, &wrapped, tenant, kind, version)?;
    let out = *key;
    if row.state == "active" {
        ACTIVE.with(|a| a.borrow_mut().insert((tenant.to_string(), kind), version));
    }
    DEKS.with(|d| d.borrow_mut().insert((tenant.to_string(), kind, version), key));
    Ok((version, out))
}

/// Calls `f` with the associated data of a ciphertext: its header, the tenant, a NUL, the
/// caller's context (on the stack when it fits, as it nearly always does).
fn with_aad<R>(header: &[u8], tenant: &str, context: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let len = header.len() + tenant.len() + 1 + context.len();
    let mut stack = [0u8; 256];
    let mut heap = Vec::new();
    let a: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let (h, rest) = a.split_at_mut(header.len());
    h.copy_from_slice(header);
    let (t, rest) = rest.split_at_mut(tenant.len());
    t.copy_from_slice(tenant.as_bytes());
    rest[0] = 0;
    rest[1..].copy_from_slice(context.as_bytes());
    f(a)
}

/// The ciphertext of `plain`, built in place in a bytea: header, nonce, ciphertext, tag.
fn encrypt_bytes(plain: &[u8], context: &str) -> Result<ByteaOut> {
    let (tenant, creation) = context::with_context(|v| (v.tenant.clone(), Creation::of(v)))?;
    let (version, cipher) = cipher_for(&tenant, None, Some(&creation))?;
    let len = HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN;
    if len > MAX_VALUE {
        return Err(TenancyError::ValueTooLarge);
    }
    let nonce = random_nonce();
    let mut value = ByteaOut::alloc(len);
    let out = value.as_mut();
    let (header, rest) = out.split_at_mut(HEADER_LEN);
    header[..2].copy_from_slice(&[FORMAT_V1, ALG_AES_256_GCM]);
    header[2..6].copy_from_slice(&(version as u32).to_be_bytes());
    header[6..].copy_from_slice(&cipher.id);
    let (n, rest) = rest.split_at_mut(NONCE_LEN);
    n.copy_from_slice(&nonce);
    let (body, tag) = rest.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    tag.copy_from_slice(&with_aad(header, &tenant, context, |aad| cipher.gcm.seal(&nonce, aad, body)));
    note_encryption(&tenant, version)?;
    Ok(value)
}

/// Decrypt into a plaintext buffer made by `out` for the plaintext length (a Vec, or PostgreSQL
/// memory for a value returned as is). On any failure the buffer holds no plaintext.
fn decrypt_with<B: AsMut<[u8]>>(ciphertext: &[u8], context: &str, out: impl FnOnce(usize) -> B) -> Result<B> {
    if ciphertext.len() < HEADER_LEN + NONCE_LEN + TAG_LEN
        || ciphertext[0] != FORMAT_V1
        || ciphertext[1] != ALG_AES_256_GCM
    {
        return Err(TenancyError::CiphertextMalformed);
    }
    let version = u32::from_be_bytes(ciphertext[2..6].try_into().expect("4 bytes"));
    let version = i32::try_from(version).map_err(|_| TenancyError::CiphertextMalformed)?;
    let tenant = context::with_context(|v| v.tenant.clone())?;
    let cipher = match cipher_for(&tenant, Some(version), None) {
        Ok((_, c)) if c.id[..] == ciphertext[6..HEADER_LEN] => c,
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
    let nonce: &[u8; NONCE_LEN] = ciphertext[HEADER_LEN..HEADER_LEN + NONCE_LEN].try_into().expect("nonce");
    let (body, tag) = ciphertext[HEADER_LEN + NONCE_LEN..].split_at(ciphertext.len() - HEADER_LEN - NONCE_LEN - TAG_LEN);
    let mut plain = out(body.len());
    with_aad(&ciphertext[..HEADER_LEN], &tenant, context, |aad| {
        cipher.gcm.open_to(nonce, aad, body, tag.try_into().expect("tag"), plain.as_mut())
    })
    .map_err(|_| TenancyError::CiphertextInvalid)?;
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
    ciphertext.map(|c| {
        if c.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || c[0] != FORMAT_V1 || c[1] != ALG_AES_256_GCM {
            TenancyError::CiphertextMalformed.raise();
        }
        u32::from_be_bytes(c[2..6].try_into().expect("4 bytes")) as i32
    })
}

/// The current tenant's active data key version (created on first use).
#[pg_extern(volatile, parallel_unsafe)]
fn active_key_version() -> i32 {
    let (tenant, creation) = context::with_context(|v| (v.tenant.clone(), Creation::of(v))).or_raise();
    key_for(&tenant, Kind::Data, None, Some(&creation)).or_raise().0
}

/// A new active key version for `tenant`; older versions keep decrypting. Returns the version.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_key(tenant: &str) -> i32 {
    if !catalog::tenant_exists(tenant).or_raise() {
        TenancyError::UnknownTenant.raise();
    }
    create_key(tenant, Kind::Data, Create::Rotate).or_raise()
}

/// Destroy every key of `tenant` (crypto-shredding). `confirm` must repeat the tenant id.
#[pg_extern(volatile, parallel_unsafe)]
fn shred(tenant: &str, confirm: Option<&str>) -> i64 {
    if confirm != Some(tenant) {
        TenancyError::InvalidArgument("confirm (it must repeat the tenant id)").raise();
    }
    if !catalog::tenant_exists(tenant).or_raise() {
        TenancyError::UnknownTenant.raise();
    }
    let n = catalog::shred(tenant).or_raise();
    forget_keys();
    n
}

/// Rewrap every tenant key that the current master key did not wrap (those wrapped by
/// `pg_tenancy.previous_master_key_file`). Data rows are not touched. Returns how many.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_master_key() -> i64 {
    let kek = current_kek().or_raise();
    let rows = catalog::keys_not_wrapped_by(&kek.id).or_raise();
    let mut n = 0;
    for (tenant, kind, version) in rows {
        let kind = if kind == "index" { Kind::Index } else { Kind::Data };
        let row = fetch_key(&tenant, kind, Some(version)).or_raise().expect("listed above");
        let key = unwrap(&row.kek_id, row.wrapped.as_deref().unwrap_or_default(), &tenant, kind, version).or_raise();
        let wrapped = wrap(&kek, &key, &tenant, kind, version);
        catalog::rewrap_key(&tenant, kind.as_str(), version, &wrapped, &kek.id).or_raise();
        n += 1;
    }
    n
}

/// Keyed HMAC-SHA256 of `value` with the current tenant's blind-index key, for equality lookups
/// on encrypted columns. Stable across data-key rotations.
#[pg_extern(volatile, parallel_unsafe)]
fn blind_index(value: Option<&str>, context: default!(&str, "''")) -> Option<Vec<u8>> {
    value.map(|v| {
        let (tenant, creation) = context::with_context(|c| (c.tenant.clone(), Creation::of(c))).or_raise();
        let (_, key) = key_for(&tenant, Kind::Index, None, Some(&creation)).or_raise();
        let key = Zeroizing::new(key);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("any key length");
        mac.update(context.as_bytes());
        mac.update(&[0]);
        mac.update(v.as_bytes());
        mac.finalize().into_bytes().to_vec()
    })
}

/// The AES-256-GCM code this server's CPU runs: AES-NI with 256-bit VAES/VPCLMULQDQ, AES-NI with
/// PCLMULQDQ, or the portable RustCrypto implementation. Same ciphertexts whichever.
#[pg_extern(stable, parallel_safe)]
fn cipher_implementation() -> &'static str {
    crate::gcm::Gcm::implementation()
}

/// The identity of the configured master key (a hash; never the key).
#[pg_extern(volatile, parallel_unsafe)]
fn master_key_id() -> String {
    current_kek().or_raise().id.clone()
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn master_key_material_formats() {
        let raw = [7u8; 32];
        let hexed = hex::encode(raw);
        let b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(raw)
        };
        for input in [hexed.as_bytes(), format!("{hexed}\n").as_bytes(), b64.as_bytes(), &raw[..]] {
            assert_eq!(*parse_key_material(input).unwrap(), raw);
        }
        for bad in [&b"short"[..], &[1u8; 31][..], &[1u8; 33][..], hexed[..62].as_bytes()] {
            assert!(parse_key_material(bad).is_err());
        }
        assert_eq!(kek_id(&raw), kek_id(&raw));
        assert_ne!(kek_id(&raw), kek_id(&[8u8; 32]));
        assert!(!kek_id(&raw).contains(&hexed[..8]), "the id must not reveal the key");
    }

    #[pg_test]
    fn wrapped_keys_are_bound_to_tenant_kind_and_version() {
        let kek = Kek { key: Zeroizing::new([9u8; 32]), id: kek_id(&[9u8; 32]) };
        KEKS.with(|k| k.borrow_mut().insert("file:/unit".into(), std::rc::Rc::new(Kek { key: kek.key.clone(), id: kek.id.clone() })));
        Spi::run("SET pg_tenancy.master_key_file = '/unit'").unwrap();
        // (the assign hook emptied the cache: put the test key back)
        KEKS.with(|k| k.borrow_mut().insert("file:/unit".into(), std::rc::Rc::new(Kek { key: kek.key.clone(), id: kek.id.clone() })));
        let dek = [3u8; 32];
        let w = wrap(&kek, &dek, "acme", Kind::Data, 1);
        assert_eq!(*unwrap(&kek.id, &w, "acme", Kind::Data, 1).unwrap(), dek);
        assert!(unwrap(&kek.id, &w, "globex", Kind::Data, 1).is_err());
        assert!(unwrap(&kek.id, &w, "acme", Kind::Index, 1).is_err());
        assert!(unwrap(&kek.id, &w, "acme", Kind::Data, 2).is_err());
        assert!(unwrap("sha256:0000000000000000", &w, "acme", Kind::Data, 1).is_err());
    }

    #[pg_test]
    fn nonces_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            assert!(seen.insert(random_nonce()));
        }
    }
}
