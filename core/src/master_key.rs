//! The master key (KEK): reading it, naming it, and wrapping the tenant keys with it.
//!
//! It comes from a file or from the output of a command (a Vault CLI call, say); it never enters
//! the database. It is 32 bytes written as 64 hexadecimal digits or as base64 (surrounding white
//! space ignored); raw binary is refused (a truncated or re-encoded file would otherwise pass for
//! a key). Tenant keys are stored only wrapped: AES-256-GCM under the master key, bound to tenant,
//! kind and version, as `nonce (12) | ciphertext (32) | tag (16)`.
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

use crate::envelope::{NONCE_LEN, TAG_LEN};

pub type Key = Zeroizing<[u8; 32]>;

/// The key that wraps a tenant's keys when the tenant has a key of its own in an outside store
/// (`pg_tenancy.tenant_key_command`): HMAC-SHA256 keyed by the master key over the tenant id and
/// the tenant's key. Neither alone unwraps anything: deleting the tenant's key in the store
/// makes every copy of its wrapped keys, anywhere, useless.
pub fn tenant_kek(master: &[u8; 32], tenant: &str, tenant_key: &[u8; 32]) -> Key {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes any key length");
    mac.update(b"pg_tenancy tenant kek v1\0");
    mac.update(tenant.as_bytes());
    mac.update(b"\0");
    mac.update(tenant_key);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// A per-tenant command: `%t` replaced by the tenant id. A tenant id is letters, digits, '_',
/// '-' and '.', so it is one shell word as it is; one that starts with '-' or '.' could still be
/// read as an option or a path step (`-rf`, `..`), so those ids get no command (None).
pub fn tenant_command(template: &str, tenant: &str) -> Option<String> {
    if tenant.is_empty() || tenant.starts_with('-') || tenant.starts_with('.') {
        return None;
    }
    Some(template.replace("%t", tenant))
}

/// Bytes of a wrapped key.
pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

/// Why a master key cannot be used (the text is the error's detail; it never includes the key).
pub type Unusable = &'static str;

/// 64 hexadecimal digits or base64 of 32 bytes, surrounding white space ignored.
pub fn parse(raw: &[u8]) -> Result<Key, Unusable> {
    const WHY: Unusable = "it is not 32 bytes written as 64 hexadecimal digits or as base64";
    let text = std::str::from_utf8(raw).map_err(|_| WHY)?.trim();
    let mut key = Zeroizing::new([0u8; 32]);
    if text.len() == 64 && hex::decode_to_slice(text, &mut key[..]).is_ok() {
        return Ok(key);
    }
    let bytes = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| WHY)?);
    if bytes.len() != 32 {
        return Err(WHY);
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// The identity of a master key (`sha256:` and 16 hex digits of a hash): never the key.
pub fn id(key: &[u8; 32]) -> String {
    let digest = Sha256::new().chain_update(b"pg_tenancy master key id\0").chain_update(key).finalize();
    format!("sha256:{}", hex::encode(&digest[..8]))
}

fn aad(tenant: &str, kind: &str, version: i32) -> Vec<u8> {
    format!("pg_tenancy:key:{tenant}:{kind}:{version}").into_bytes()
}

fn aead(kek: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, kek).expect("a 32-byte key"))
}

/// Wrap a tenant key under the master key, bound to (tenant, kind, version).
pub fn wrap(kek: &[u8; 32], dek: &[u8; 32], tenant: &str, kind: &str, version: i32, nonce: [u8; NONCE_LEN]) -> Vec<u8> {
    let mut body = dek.to_vec();
    let tag = aead(kek)
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad(tenant, kind, version)), &mut body)
        .expect("sealing 32 bytes");
    let out = [nonce.as_slice(), &body, tag.as_ref()].concat();
    zeroize::Zeroize::zeroize(&mut body);
    out
}

/// Unwrap a tenant key; `None` if this master key did not wrap it for (tenant, kind, version).
pub fn unwrap(kek: &[u8; 32], wrapped: &[u8], tenant: &str, kind: &str, version: i32) -> Option<Key> {
    if wrapped.len() != WRAPPED_LEN {
        return None;
    }
    let nonce: [u8; NONCE_LEN] = wrapped[..NONCE_LEN].try_into().ok()?;
    let mut key = Zeroizing::new([0u8; 32]);
    aead(kek)
        .open_separate_gather(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(tenant, kind, version)),
            &wrapped[NONCE_LEN..NONCE_LEN + 32],
            &wrapped[NONCE_LEN + 32..],
            &mut key[..],
        )
        .ok()?;
    Some(key)
}

/// How `master_key_command` runs.
pub struct CommandLimits {
    /// Killed (with every process it started) after this long.
    pub timeout: Duration,
    /// Output beyond this many bytes is refused.
    pub max_output: usize,
    /// The only environment variables passed on from the server's: these names, and names
    /// beginning with one of the prefixes.
    pub env_names: &'static [&'static str],
    pub env_prefixes: &'static [&'static str],
}

/// What `master_key_command` gets by default.
pub const COMMAND_LIMITS: CommandLimits = CommandLimits {
    timeout: Duration::from_secs(10),
    max_output: 4096,
    env_names: &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"],
    env_prefixes: &["VAULT_", "AWS_", "GOOGLE_", "AZURE_"],
};

/// Run `/bin/sh -c command` in a process group of its own, with an environment reduced to the
/// allowed variables, no stdin and no stderr, and return its stdout: only if it exits with
/// success within the time limit and prints no more than the limit.
pub fn run_command(command: &str, limits: &CommandLimits) -> Result<Zeroizing<Vec<u8>>, Unusable> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(command).env_clear().stdin(Stdio::null()).stderr(Stdio::null()).stdout(Stdio::piped());
    cmd.process_group(0);
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if limits.env_names.contains(&name.as_ref()) || limits.env_prefixes.iter().any(|p| name.starts_with(p)) {
            cmd.env(&k, &v);
        }
    }
    let mut child = cmd.spawn().map_err(|_| "the master key command could not be run")?;
    let started = Instant::now();
    // The key is short; the pipe holds far more than the limit, so the command never blocks on
    // writing it before it exits (one that prints more than the pipe holds is killed at the
    // time limit).
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < limits.timeout => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                kill_group(child.id());
                let _ = child.wait();
                return Err("the master key command did not finish in time (10 seconds)");
            }
        }
    };
    // (a process the command left behind in its group goes too)
    kill_group(child.id());
    if !status.success() {
        return Err("the master key command failed");
    }
    let mut out = Zeroizing::new(Vec::with_capacity(limits.max_output + 1));
    child
        .stdout
        .take()
        .ok_or("the master key command could not be run")?
        .take(limits.max_output as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| "the master key command's output could not be read")?;
    if out.len() > limits.max_output {
        return Err("the master key command printed more than a key");
    }
    Ok(out)
}

/// SIGKILL to a process group (the command and what it started).
#[allow(unsafe_code)]
fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals the process group the command leads (made with
    // process_group(0)); it touches no memory of ours.
    unsafe {
        kill(-(pid as i32), 9);
    }
}

#[allow(unsafe_code)]
unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[cfg(test)]
mod tests {

    #[test]
    fn tenant_commands_and_bound_keys() {
        assert_eq!(tenant_command("cat /keys/%t.key", "acme").as_deref(), Some("cat /keys/acme.key"));
        for id in ["-rf", "..", ".", ".hidden", ""] {
            assert_eq!(tenant_command("cat /keys/%t.key", id), None, "{id}");
        }
        let (m, t1, t2) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert_ne!(*tenant_kek(&m, "a", &t1), *tenant_kek(&m, "b", &t1));
        assert_ne!(*tenant_kek(&m, "a", &t1), *tenant_kek(&m, "a", &t2));
        assert_ne!(*tenant_kek(&m, "a", &t1), *tenant_kek(&[4u8; 32], "a", &t1));
        assert_eq!(*tenant_kek(&m, "a", &t1), *tenant_kek(&m, "a", &t1));
    }

    use super::*;

    #[test]
    fn key_material_formats() {
        let raw = [7u8; 32];
        let hexed = hex::encode(raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        for input in [hexed.as_bytes(), format!("{hexed}\n").as_bytes(), b64.as_bytes(), format!(" {b64}\n").as_bytes()] {
            assert_eq!(*parse(input).unwrap(), raw);
        }
        // raw bytes are refused now, as are wrong lengths
        for bad in [&raw[..], &b"short"[..], &[1u8; 31][..], &[1u8; 33][..], hexed[..62].as_bytes(), &b""[..]] {
            assert!(parse(bad).is_err());
        }
        assert_eq!(id(&raw), id(&raw));
        assert_ne!(id(&raw), id(&[8u8; 32]));
        assert!(!id(&raw).contains(&hexed[..8]), "the id must not reveal the key");
    }

    #[test]
    fn wrapped_keys_are_bound_to_tenant_kind_and_version() {
        let kek = [9u8; 32];
        let dek = [3u8; 32];
        let w = wrap(&kek, &dek, "acme", "data", 1, [5u8; 12]);
        assert_eq!(w.len(), WRAPPED_LEN);
        assert_eq!(*unwrap(&kek, &w, "acme", "data", 1).unwrap(), dek);
        assert!(unwrap(&kek, &w, "globex", "data", 1).is_none());
        assert!(unwrap(&kek, &w, "acme", "index", 1).is_none());
        assert!(unwrap(&kek, &w, "acme", "data", 2).is_none());
        assert!(unwrap(&[8u8; 32], &w, "acme", "data", 1).is_none());
        assert!(unwrap(&kek, &w[..50], "acme", "data", 1).is_none());
    }

    #[test]
    fn keys_wrapped_before_the_switch_still_unwrap() {
        // a key row written by 0.1.0 (RustCrypto), master key 00 01 .. 1f
        let kek: [u8; 32] = std::array::from_fn(|i| i as u8);
        let w = hex::decode("c1ca061393b7f6dc5a312c25dba3977b6efac52accffd5c72d460370470b6a59008e1915b04155a87db004899d491618e9953240d558db8b125453d3").unwrap();
        assert!(unwrap(&kek, &w, "fixture-t", "data", 1).is_some());
        assert_eq!(id(&kek), "sha256:24b558adcdd5df73");
    }

    #[test]
    fn the_command_is_limited() {
        let limits = CommandLimits { timeout: Duration::from_millis(500), ..COMMAND_LIMITS };
        assert_eq!(&**run_command("printf abc", &limits).unwrap(), b"abc");
        assert!(run_command("exit 3", &limits).is_err());
        assert!(run_command("sleep 5", &limits).is_err());
        assert!(run_command("head -c 5000 /dev/zero", &limits).is_err());
        // the environment is reduced to the allowlist
        std::env::set_var("PGT_TEST_SECRET", "leak");
        std::env::set_var("VAULT_ADDR", "https://vault.example");
        let out = run_command("echo \"${PGT_TEST_SECRET:-none} $VAULT_ADDR\"", &limits).unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), "none https://vault.example");
    }
}
