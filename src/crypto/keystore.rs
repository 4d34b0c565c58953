//! Tenant keys in this backend: the master keys read from their sources, unwrapped data and
//! blind-index keys, ready AES-GCM keys, encryption counts, and the creation and rotation of key
//! versions. Everything cached here is dropped by the invalidate module when `tenancy.keys`
//! changes, when a master-key setting changes, and when a transaction that may have created a
//! key aborts.
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use zeroize::Zeroizing;

use pg_tenancy_core::envelope::{self, DataKey, NoncePool};
use pg_tenancy_core::master_key::{self, Key, COMMAND_LIMITS};
use pg_tenancy_core::model::{KeyKind, KeyState};

use crate::catalog;
use crate::catalog::keys::KeyRow;
use crate::context;
use crate::error::{Result, TenancyError};
use crate::gucs;

/// A master key and its identity.
pub struct Kek {
    pub key: Key,
    pub id: String,
}

thread_local! {
    /// Master keys by the setting they came from (file path or command).
    static KEKS: RefCell<HashMap<String, Rc<Kek>>> = RefCell::new(HashMap::new());
    /// Unwrapped tenant keys by (tenant, kind, version).
    static DEKS: RefCell<HashMap<(String, KeyKind, i32), Key>> = RefCell::new(HashMap::new());
    /// Active key version by (tenant, kind).
    static ACTIVE: RefCell<HashMap<(String, KeyKind), i32>> = RefCell::new(HashMap::new());
    /// Ready AES-GCM keys by tenant, then version: expanding a key on every call cost ~15% of a
    /// 100-byte encryption (bench/README.md). (Keyed by tenant first, so that a lookup borrows
    /// the tenant instead of copying it.)
    static CIPHERS: RefCell<HashMap<String, HashMap<i32, Rc<DataKey>>>> = RefCell::new(HashMap::new());
    static NONCES: RefCell<NoncePool> = RefCell::new(NoncePool::default());
    /// Encryptions made in this backend and not yet added to tenancy.keys.encryptions.
    static COUNTS: RefCell<HashMap<(String, i32), i64>> = RefCell::new(HashMap::new());
}

/// Forget every unwrapped tenant key (tenancy.keys changed somewhere, or a transaction that may
/// have created one aborted).
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

/// Forget the master keys too (a master-key setting changed).
pub fn forget_master_keys() {
    KEKS.with(|k| {
        if let Ok(mut k) = k.try_borrow_mut() {
            k.clear();
        }
    });
    forget_keys();
}

pub fn random_nonce() -> [u8; envelope::NONCE_LEN] {
    NONCES.with(|n| n.borrow_mut().next()).unwrap_or_else(|_| pgrx::error!("pg_tenancy: the OS random source failed"))
}

fn load_kek(source: &str, is_command: bool) -> Result<Rc<Kek>> {
    let cache_key = format!("{}{source}", if is_command { "cmd:" } else { "file:" });
    if let Some(k) = KEKS.with(|k| k.borrow().get(&cache_key).cloned()) {
        return Ok(k);
    }
    let raw = if is_command {
        master_key::run_command(source, &COMMAND_LIMITS).map_err(TenancyError::MasterKeyUnusable)?
    } else {
        Zeroizing::new(
            std::fs::read(source).map_err(|_| TenancyError::MasterKeyUnusable("the master key file cannot be read"))?,
        )
    };
    let key = master_key::parse(&raw).map_err(TenancyError::MasterKeyUnusable)?;
    let kek = Rc::new(Kek { id: master_key::id(&key), key });
    KEKS.with(|k| k.borrow_mut().insert(cache_key, kek.clone()));
    Ok(kek)
}

pub fn current_kek() -> Result<Rc<Kek>> {
    if let Some(cmd) = gucs::master_key_command() {
        load_kek(&cmd, true)
    } else if let Some(file) = gucs::master_key_file() {
        load_kek(&file, false)
    } else {
        Err(TenancyError::NoMasterKey)
    }
}

fn previous_kek() -> Option<Rc<Kek>> {
    gucs::previous_master_key_file().and_then(|f| load_kek(&f, false).ok())
}

/// The key that wraps `tenant`'s keys now: the master key, or, with
/// `pg_tenancy.tenant_key_command`, the master key bound to the tenant's own key.
pub fn kek_for(tenant: &str) -> Result<Rc<Kek>> {
    let master = current_kek()?;
    match gucs::tenant_key_command() {
        None => Ok(master),
        Some(template) => bind(&master, tenant, &template),
    }
}

/// The master key bound to the tenant's own key (read with the command, once per backend).
fn bind(master: &Kek, tenant: &str, template: &str) -> Result<Rc<Kek>> {
    let cache_key = format!("tenant:{}:{template}:{tenant}", master.id);
    if let Some(k) = KEKS.with(|k| k.borrow().get(&cache_key).cloned()) {
        return Ok(k);
    }
    if !pg_tenancy_core::tenant_id::valid(tenant) {
        return Err(TenancyError::InvalidTenantId);
    }
    let command = master_key::tenant_command(template, tenant)
        .ok_or(TenancyError::TenantKeyUnavailable("a tenant id that starts with '-' or '.' is never put into a key store command"))?;
    let raw = master_key::run_command(&command, &COMMAND_LIMITS)
        .map_err(|_| TenancyError::TenantKeyUnavailable("the tenant key command failed (its key may have been deleted by a shred)"))?;
    let own = master_key::parse(&raw).map_err(|_| TenancyError::TenantKeyUnavailable("the tenant key command did not print a 32-byte key"))?;
    let kek = Rc::new(Kek {
        key: master_key::tenant_kek(&master.key, tenant, &own),
        id: format!("{}+tenant:{}", master.id, master_key::id(&own)),
    });
    KEKS.with(|k| k.borrow_mut().insert(cache_key, kek.clone()));
    Ok(kek)
}

pub fn wrap(kek: &Kek, dek: &[u8; 32], tenant: &str, kind: KeyKind, version: i32) -> Vec<u8> {
    master_key::wrap(&kek.key, dek, tenant, kind.as_str(), version, random_nonce())
}

pub fn unwrap(kek_id_stored: &str, wrapped: &[u8], tenant: &str, kind: KeyKind, version: i32) -> Result<Key> {
    let (master_id, bound) = match kek_id_stored.split_once("+tenant:") {
        Some((m, _)) => (m, true),
        None => (kek_id_stored, false),
    };
    let current = current_kek()?;
    let master = if current.id == master_id {
        current
    } else {
        previous_kek().filter(|k| k.id == master_id).ok_or(TenancyError::MasterKeyMismatch)?
    };
    let kek = if bound {
        let template = gucs::tenant_key_command()
            .ok_or(TenancyError::TenantKeyUnavailable("the key is bound to the tenant's own key and pg_tenancy.tenant_key_command is not set"))?;
        let kek = bind(&master, tenant, &template)?;
        if kek.id != kek_id_stored {
            return Err(TenancyError::TenantKeyUnavailable("the key store returned another key for the tenant"));
        }
        kek
    } else {
        master
    };
    master_key::unwrap(&kek.key, wrapped, tenant, kind.as_str(), version).ok_or(TenancyError::MasterKeyMismatch)
}

pub fn fetch_key(tenant: &str, kind: KeyKind, version: Option<i32>) -> Result<Option<KeyRow>> {
    catalog::keys::key(tenant, kind.as_str(), version)
}

/// Whether a key may be created in the current context: creating a tenant's keys is a write, so
/// it needs what a write needs (an active tenant, a read_write or admin grant).
pub struct Creation(Result<()>);

impl Creation {
    pub fn of(v: &context::Verified) -> Creation {
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
/// tenant by a row lock on its tenancy.tenants row.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The tenant's first key (or the one another session created meanwhile).
    First,
    /// Always a new version (tenancy.rotate_key).
    Rotate,
    /// A new version only if `version` is still the active one (automatic rotation).
    RotateIfActive(i32),
}

pub fn create_key(tenant: &str, kind: KeyKind, mode: Create) -> Result<i32> {
    let kek = kek_for(tenant)?;
    if !catalog::keys::lock_tenant(tenant)? {
        return Err(TenancyError::UnknownTenant);
    }
    if catalog::keys::keys_destroyed(tenant)? {
        return Err(TenancyError::KeysDestroyed);
    }
    match (mode, fetch_key(tenant, kind, None)?) {
        (Create::First, Some(row)) => return Ok(row.version),
        (Create::RotateIfActive(v), Some(row)) if row.version != v => return Ok(row.version),
        _ => {}
    }
    let version = catalog::keys::next_key_version(tenant, kind.as_str())?;
    let dek: Key = Zeroizing::new(envelope::random::<32>().unwrap_or_else(|_| pgrx::error!("pg_tenancy: the OS random source failed")));
    let wrapped = wrap(&kek, &dek, tenant, kind, version);
    catalog::keys::insert_active_key(tenant, kind.as_str(), version, &wrapped, &kek.id)?;
    DEKS.with(|d| d.borrow_mut().insert((tenant.to_string(), kind, version), dek));
    ACTIVE.with(|a| a.borrow_mut().insert((tenant.to_string(), kind), version));
    Ok(version)
}

/// The unwrapped key `version` (or the active one, created on first use when allowed).
pub fn key_for(tenant: &str, kind: KeyKind, version: Option<i32>, may_create: Option<&Creation>) -> Result<(i32, Key)> {
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
    if let Some(k) = DEKS.with(|d| d.borrow().get(&(tenant.to_string(), kind, version)).cloned()) {
        return Ok((version, k));
    }
    let row = fetch_key(tenant, kind, Some(version))?.ok_or(TenancyError::CiphertextInvalid)?;
    if KeyState::parse(&row.state) == Some(KeyState::Destroyed) {
        return Err(TenancyError::KeysDestroyed);
    }
    let wrapped = row.wrapped.ok_or(TenancyError::KeysDestroyed)?;
    let key = unwrap(&row.kek_id, &wrapped, tenant, kind, version)?;
    if KeyState::parse(&row.state) == Some(KeyState::Active) {
        ACTIVE.with(|a| a.borrow_mut().insert((tenant.to_string(), kind), version));
    }
    DEKS.with(|d| d.borrow_mut().insert((tenant.to_string(), kind, version), key.clone()));
    Ok((version, key))
}

/// The AES-GCM key for the tenant's data key `version` (or the active one).
pub fn cipher_for(tenant: &str, version: Option<i32>, may_create: Option<&Creation>) -> Result<(i32, Rc<DataKey>)> {
    let version = match version.or_else(|| ACTIVE.with(|a| a.borrow().get(&(tenant.to_string(), KeyKind::Data)).copied())) {
        Some(v) => v,
        None => key_for(tenant, KeyKind::Data, None, may_create)?.0,
    };
    if let Some(c) = CIPHERS.with(|c| c.borrow().get(tenant).and_then(|v| v.get(&version)).cloned()) {
        return Ok((version, c));
    }
    let (_, key) = key_for(tenant, KeyKind::Data, Some(version), None)?;
    let cipher = Rc::new(DataKey::new(&key));
    CIPHERS.with(|c| c.borrow_mut().entry(tenant.to_string()).or_default().insert(version, cipher.clone()));
    Ok((version, cipher))
}

/// Count one encryption under (tenant, version). Every `max/4` (at most 1,000) encryptions the
/// backend adds its count to the key's row; when the total reaches
/// `pg_tenancy.max_encryptions_per_key` (2^31 by default, half the 2^32 that random 96-bit nonces
/// allow under one key) the key is rotated. A backend that exits loses at most its last batch, so
/// the real total can exceed the recorded one by (backends x batch), far below the 2^31 margin.
pub fn note_encryption(tenant: &str, version: i32) -> Result<()> {
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
    let total = catalog::keys::count_encryptions(tenant, version, pending)?;
    if total >= limit {
        create_key(tenant, KeyKind::Data, Create::RotateIfActive(version))?;
    }
    Ok(())
}
