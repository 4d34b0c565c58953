//! The ciphertext format (v1) and the AES-256-GCM that seals and opens it.
//!
//! `01 | 01 (AES-256-GCM) | key version (u32, big-endian) | key id (8 bytes) | nonce (12) |
//! ciphertext | tag (16)`: 42 bytes of overhead. The associated data is the 14 header bytes, the
//! tenant id, a NUL and the caller's context, so a ciphertext copied to another tenant, column or
//! row does not open. The key id is an HMAC of the data key: it names the key, not the tenant,
//! and tells a ciphertext of another tenant (another key) from one that was altered.
//!
//! The primitive is AWS-LC's AES-256-GCM (through `aws-lc-rs`): its x86-64 code has published
//! formal proofs, a FIPS build exists, and it picks AES-NI/VAES/AVX-512 code at run time. This
//! module writes only the format around it.
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroize;

pub const FORMAT_V1: u8 = 1;
pub const ALG_AES_256_GCM: u8 = 1;
/// format, algorithm, key version (4 bytes), key id (8 bytes)
pub const HEADER_LEN: usize = 14;
pub const KEY_ID_LEN: usize = 8;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a ciphertext adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

/// Why a ciphertext does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Too short, or an unknown format or algorithm.
    Malformed,
    /// The tag did not match: altered, or another key, tenant or context.
    Unauthentic,
}

/// A data key ready to use: the AES-GCM key schedule (inside AWS-LC, which wipes its memory when
/// it frees it) and the key's public id.
pub struct DataKey {
    aead: LessSafeKey,
    id: [u8; KEY_ID_LEN],
}

impl DataKey {
    pub fn new(key: &[u8; 32]) -> DataKey {
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key");
        DataKey { aead: LessSafeKey::new(unbound), id: key_id(key) }
    }

    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }
}

/// The public id of a data key: the first 8 bytes of HMAC-SHA256(key, "pg_tenancy key id v1").
pub fn key_id(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(b"pg_tenancy key id v1");
    let full = mac.finalize().into_bytes();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&full[..KEY_ID_LEN]);
    id
}

/// What a ciphertext's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: i32,
    pub key_id: [u8; KEY_ID_LEN],
}

/// Read the header of a ciphertext (checking its length, format and algorithm).
pub fn header(ciphertext: &[u8]) -> Result<Header, EnvelopeError> {
    if ciphertext.len() < OVERHEAD || ciphertext[0] != FORMAT_V1 || ciphertext[1] != ALG_AES_256_GCM {
        return Err(EnvelopeError::Malformed);
    }
    let version = u32::from_be_bytes(ciphertext[2..6].try_into().expect("4 bytes"));
    let version = i32::try_from(version).map_err(|_| EnvelopeError::Malformed)?;
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&ciphertext[6..HEADER_LEN]);
    Ok(Header { version, key_id })
}

/// Calls `f` with the associated data: the header, the tenant, a NUL, the context (on the stack
/// when it fits, as it nearly always does).
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

/// Seal `plain` into `out`, which is exactly `plain.len() + OVERHEAD` bytes.
pub fn seal(key: &DataKey, version: i32, nonce: [u8; NONCE_LEN], tenant: &str, context: &str, plain: &[u8], out: &mut [u8]) {
    assert_eq!(out.len(), plain.len() + OVERHEAD, "sealed length");
    let (header, rest) = out.split_at_mut(HEADER_LEN);
    header[0] = FORMAT_V1;
    header[1] = ALG_AES_256_GCM;
    header[2..6].copy_from_slice(&(version as u32).to_be_bytes());
    header[6..].copy_from_slice(&key.id);
    let (n, rest) = rest.split_at_mut(NONCE_LEN);
    n.copy_from_slice(&nonce);
    let (body, tag) = rest.split_at_mut(plain.len());
    body.copy_from_slice(plain);
    let t = with_aad(header, tenant, context, |aad| {
        key.aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .expect("AES-GCM sealing of a value under 1 GB")
    });
    tag.copy_from_slice(t.as_ref());
}

/// Open `ciphertext` into `out`, which is exactly `ciphertext.len() - OVERHEAD` bytes. On any
/// failure `out` holds zeros, never plaintext.
pub fn open(key: &DataKey, tenant: &str, context: &str, ciphertext: &[u8], out: &mut [u8]) -> Result<(), EnvelopeError> {
    header(ciphertext)?;
    assert_eq!(out.len(), ciphertext.len() - OVERHEAD, "opened length");
    let nonce: [u8; NONCE_LEN] = ciphertext[HEADER_LEN..HEADER_LEN + NONCE_LEN].try_into().expect("nonce");
    let (body, tag) = ciphertext[HEADER_LEN + NONCE_LEN..].split_at(out.len());
    let opened = with_aad(&ciphertext[..HEADER_LEN], tenant, context, |aad| {
        key.aead.open_separate_gather(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body, tag, out)
    });
    if opened.is_err() {
        out.zeroize();
        return Err(EnvelopeError::Unauthentic);
    }
    Ok(())
}

/// Nonces from the OS random source, fetched 4 KiB at a time (one system call per 12-byte nonce
/// cost more than sealing 100 bytes). Nonces are not secret; they must not repeat, so bytes
/// handed out are wiped from the pool.
pub struct NoncePool {
    buf: Box<[u8; 4096]>,
    used: usize,
}

impl Default for NoncePool {
    fn default() -> Self {
        NoncePool { buf: Box::new([0u8; 4096]), used: 4096 }
    }
}

impl NoncePool {
    pub fn next(&mut self) -> Result<[u8; NONCE_LEN], aws_lc_rs::error::Unspecified> {
        if self.used + NONCE_LEN > self.buf.len() {
            aws_lc_rs::rand::fill(&mut self.buf[..])?;
            self.used = 0;
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&self.buf[self.used..self.used + NONCE_LEN]);
        self.buf[self.used..self.used + NONCE_LEN].fill(0);
        self.used += NONCE_LEN;
        Ok(nonce)
    }
}

/// Random bytes from the OS source.
pub fn random<const N: usize>() -> Result<[u8; N], aws_lc_rs::error::Unspecified> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b)?;
    Ok(b)
}

/// Which AES-GCM code AWS-LC runs on this CPU (it chooses at run time; the output is the same
/// standard AES-256-GCM whichever).
pub fn implementation() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let ni = std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq");
        let wide = std::arch::is_x86_feature_detected!("vaes") && std::arch::is_x86_feature_detected!("vpclmulqdq");
        if ni && wide {
            return "aws-lc (AES-NI, VAES/VPCLMULQDQ)";
        }
        if ni {
            return "aws-lc (AES-NI, PCLMULQDQ)";
        }
    }
    "aws-lc (portable)"
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, Payload};
    use aes_gcm::{Aes256Gcm, KeyInit};

    fn seal_vec(key: &DataKey, version: i32, nonce: [u8; 12], tenant: &str, ctx: &str, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; plain.len() + OVERHEAD];
        seal(key, version, nonce, tenant, ctx, plain, &mut out);
        out
    }

    fn open_vec(key: &DataKey, tenant: &str, ctx: &str, c: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut out = vec![0xAAu8; c.len().saturating_sub(OVERHEAD)];
        header(c)?;
        open(key, tenant, ctx, c, &mut out).map(|_| out)
    }

    #[test]
    fn round_trip_and_binding() {
        let k = DataKey::new(&[7u8; 32]);
        for len in [0usize, 1, 15, 16, 17, 100, 4096, 70_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let c = seal_vec(&k, 3, [9u8; 12], "acme", "orders.card:1", &plain);
            assert_eq!(c.len(), len + 42);
            assert_eq!(header(&c).unwrap(), Header { version: 3, key_id: key_id(&[7u8; 32]) });
            assert_eq!(open_vec(&k, "acme", "orders.card:1", &c).unwrap(), plain);
            assert_eq!(open_vec(&k, "globex", "orders.card:1", &c), Err(EnvelopeError::Unauthentic));
            assert_eq!(open_vec(&k, "acme", "orders.card:2", &c), Err(EnvelopeError::Unauthentic));
            assert_eq!(open_vec(&DataKey::new(&[8u8; 32]), "acme", "orders.card:1", &c), Err(EnvelopeError::Unauthentic));
        }
    }

    #[test]
    fn every_altered_byte_is_refused_and_leaves_no_plaintext() {
        let k = DataKey::new(&[1u8; 32]);
        let c = seal_vec(&k, 1, [2u8; 12], "t", "", b"a secret of some length");
        for i in 0..c.len() {
            let mut bad = c.clone();
            bad[i] ^= 0x01;
            let mut out = vec![0xAAu8; c.len() - OVERHEAD];
            let r = header(&bad).and_then(|_| open(&k, "t", "", &bad, &mut out));
            assert!(r.is_err(), "byte {i}");
            if r == Err(EnvelopeError::Unauthentic) {
                assert!(out.iter().all(|&b| b == 0), "plaintext left after a failed open");
            }
        }
        for short in 0..OVERHEAD {
            assert_eq!(header(&c[..short]), Err(EnvelopeError::Malformed));
        }
    }

    #[test]
    fn aws_lc_produces_standard_aes_gcm() {
        // RustCrypto's aes-gcm (which made 0.1.0's ciphertexts) opens what AWS-LC seals, and
        // AWS-LC opens what it seals, for random keys, nonces, contexts and lengths.
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..400 {
            let key: [u8; 32] = std::array::from_fn(|_| next() as u8);
            let nonce: [u8; 12] = std::array::from_fn(|_| next() as u8);
            let len = if round % 50 == 0 { (next() % 70_000) as usize } else { (next() % 600) as usize };
            let plain: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let ctx = format!("ctx:{}", next() % 1000);
            let k = DataKey::new(&key);
            let c = seal_vec(&k, 5, nonce, "tenant-x", &ctx, &plain);
            let aad = [&c[..HEADER_LEN], b"tenant-x\0", ctx.as_bytes()].concat();
            let reference = Aes256Gcm::new(&key.into());
            let opened = reference
                .decrypt((&nonce).into(), Payload { msg: &c[HEADER_LEN + NONCE_LEN..], aad: &aad })
                .expect("the reference opens it");
            assert_eq!(opened, plain);
            let theirs = reference.encrypt((&nonce).into(), Payload { msg: &plain, aad: &aad }).unwrap();
            let mut ours = c[..HEADER_LEN + NONCE_LEN].to_vec();
            ours.extend_from_slice(&theirs);
            assert_eq!(ours, c, "same bytes as the reference");
        }
    }

    #[test]
    fn published_vector() {
        // NIST GCM test case 16 (AES-256, 96-bit IV, 60-byte plaintext, 20-byte AAD).
        let key = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308").unwrap();
        let iv = hex::decode("cafebabefacedbaddecaf888").unwrap();
        let p = hex::decode("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39").unwrap();
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").unwrap();
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
        let mut buf = p.clone();
        let tag = k
            .seal_in_place_separate_tag(Nonce::try_assume_unique_for_key(&iv).unwrap(), Aad::from(&aad), &mut buf)
            .unwrap();
        assert_eq!(hex::encode(&buf), "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662");
        assert_eq!(hex::encode(tag.as_ref()), "76fc6ece0f4e1768cddf8853bb2d551b");
    }

    #[test]
    fn nonces_do_not_repeat() {
        let mut pool = NoncePool::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..5000 {
            assert!(seen.insert(pool.next().unwrap()));
        }
    }
}
