//! AES-256-GCM for the data path. On x86-64 CPUs with AES-NI and PCLMULQDQ: AES-CTR eight blocks
//! at a time and a GHASH that sums eight block products before one reduction; where VAES and
//! VPCLMULQDQ exist too, the same in 256-bit lanes, sixteen blocks per pipeline. Elsewhere:
//! RustCrypto's `aes-gcm`. All produce the same bytes (standard AES-256-GCM, 96-bit nonce,
//! 128-bit tag): the tests below compare the three on random keys, nonces, associated data and
//! every length up to several pipelines, and check the published test vectors.
//!
//! GHASH is computed as POLYVAL over byte-reversed blocks (RFC 8452, appendix A):
//! `GHASH(H, X) = rev(POLYVAL(mulX(rev(H)), rev(X_1), ...))`, which lets the reduction use the
//! Montgomery form (two multiplications by a constant) instead of bit shifts. The hardware
//! instructions used take the same time whatever the data; the tag is compared in one 128-bit
//! test. Round keys and powers of H are zeroed when a key is dropped.
//!
//! Why not `aes-gcm` alone: its GHASH (polyval 0.6) multiplies one block at a time, which made
//! decryption of a 4 KiB value slower than pgcrypto's unauthenticated AES-CBC (bench/README.md).

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

pub const TAG_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;
/// GCM's limit on one message: 2^32 - 2 blocks (the 32-bit counter; values here stay under 1 GB).
const MAX_LEN: u64 = (1 << 36) - 32;

/// The tag did not match: the ciphertext, nonce, associated data or key is not the one sealed.
#[derive(Debug, PartialEq, Eq)]
pub struct Unauthentic;

pub struct Gcm(Backend);

enum Backend {
    #[cfg(target_arch = "x86_64")]
    Ni(Box<ni::Key>),
    Soft(Box<Aes256Gcm>),
}

impl Gcm {
    pub fn new(key: &[u8; 32]) -> Gcm {
        #[cfg(target_arch = "x86_64")]
        if ni::available() {
            // SAFETY: the CPU has the features `ni` is compiled for (checked just above).
            return Gcm(Backend::Ni(unsafe { ni::Key::new(key, true) }));
        }
        Gcm(Backend::Soft(Box::new(Aes256Gcm::new(key.into()))))
    }

    /// Which code this CPU gets (all produce the same standard AES-256-GCM).
    pub fn implementation() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if ni::available() {
            return if ni::wide_available() {
                "aes-ni+vaes+vpclmulqdq (256-bit lanes, 16-block pipeline)"
            } else {
                "aes-ni+pclmulqdq (8-block pipeline)"
            };
        }
        "portable (RustCrypto aes-gcm)"
    }

    /// The 128-bit AES-NI path even where 256-bit VAES exists (for the tests); `None` without
    /// AES-NI.
    #[cfg(any(test, feature = "pg_test"))]
    pub fn narrow(key: &[u8; 32]) -> Option<Gcm> {
        #[cfg(target_arch = "x86_64")]
        if ni::available() {
            // SAFETY: as in `new`.
            return Some(Gcm(Backend::Ni(unsafe { ni::Key::new(key, false) })));
        }
        None
    }

    /// The portable implementation, whatever the CPU (for the tests).
    #[cfg(any(test, feature = "pg_test"))]
    pub fn portable(key: &[u8; 32]) -> Gcm {
        Gcm(Backend::Soft(Box::new(Aes256Gcm::new(key.into()))))
    }

    /// Encrypt `buf` in place; returns the tag.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        assert!(buf.len() as u64 <= MAX_LEN, "AES-GCM message too long");
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Ni` key only exists on a CPU with the features (see `new`).
            Backend::Ni(k) => unsafe { k.seal(nonce, aad, buf) },
            Backend::Soft(a) => {
                let tag = a
                    .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
                    .expect("input within GCM's limits");
                tag.into()
            }
        }
    }

    /// Decrypt `buf` in place if `tag` authenticates it; otherwise `buf` is zeroed and
    /// `Unauthentic` returned (no unauthenticated plaintext is ever left behind).
    pub fn open(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), Unauthentic> {
        assert!(buf.len() as u64 <= MAX_LEN, "AES-GCM message too long");
        let ok = match &self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `seal`; source and destination are the same buffer, which the
            // implementation allows (each block is read before it is written).
            Backend::Ni(k) => unsafe { k.open(nonce, aad, buf.as_ptr(), buf.as_mut_ptr(), buf.len(), tag) },
            Backend::Soft(a) => a
                .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
                .is_ok(),
        };
        if ok {
            Ok(())
        } else {
            buf.zeroize();
            Err(Unauthentic)
        }
    }

    /// Decrypt `src` into `dst` (same length) if `tag` authenticates it; otherwise `dst` is
    /// zeroed and `Unauthentic` returned. Saves the copy of `open` when the output goes
    /// elsewhere anyway.
    pub fn open_to(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        src: &[u8],
        tag: &[u8; TAG_LEN],
        dst: &mut [u8],
    ) -> Result<(), Unauthentic> {
        assert_eq!(src.len(), dst.len(), "open_to: source and destination lengths differ");
        assert!(src.len() as u64 <= MAX_LEN, "AES-GCM message too long");
        match &self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `seal`; the lengths are equal (asserted).
            Backend::Ni(k) => {
                if unsafe { k.open(nonce, aad, src.as_ptr(), dst.as_mut_ptr(), src.len(), tag) } {
                    Ok(())
                } else {
                    dst.zeroize();
                    Err(Unauthentic)
                }
            }
            Backend::Soft(_) => {
                dst.copy_from_slice(src);
                self.open(nonce, aad, dst, tag)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;
    use std::sync::OnceLock;

    const PIPE: usize = 8;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("aes")
                && std::is_x86_feature_detected!("pclmulqdq")
                && std::is_x86_feature_detected!("sse4.1")
                && std::is_x86_feature_detected!("ssse3")
        })
    }

    pub fn wide_available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(wide::available)
    }

    /// Round keys and the GHASH key's powers. Zeroed on drop.
    pub struct Key {
        rk: [__m128i; 15],
        /// POLYVAL form of H: `h[i]` = H^(i+1).
        h: [__m128i; 16],
        /// The same powers in pairs for 256-bit lanes, highest first: (H^16, H^15), ...,
        /// (H^2, H^1).
        hw: [[__m128i; 2]; 8],
        /// VAES and VPCLMULQDQ available.
        wide: bool,
    }

    impl Drop for Key {
        fn drop(&mut self) {
            // SAFETY: plain-old-data arrays; volatile so the stores are not elided.
            unsafe {
                for r in self.rk.iter_mut().chain(self.h.iter_mut()).chain(self.hw.iter_mut().flatten()) {
                    core::ptr::write_volatile(r, _mm_setzero_si128());
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn rev() -> __m128i {
        _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    }

    macro_rules! expand_round {
        ($rk:ident, $i:expr, $rcon:expr) => {{
            // even round key: from the previous two, with RotWord/SubWord/Rcon
            let t = _mm_shuffle_epi32(_mm_aeskeygenassist_si128($rk[$i - 1], $rcon), 0xff);
            $rk[$i] = _mm_xor_si128(spread($rk[$i - 2]), t);
            if $i + 1 < 15 {
                // odd round key: SubWord only
                let t = _mm_shuffle_epi32(_mm_aeskeygenassist_si128($rk[$i], 0), 0xaa);
                $rk[$i + 1] = _mm_xor_si128(spread($rk[$i - 1]), t);
            }
        }};
    }

    /// Multiplication by x in POLYVAL's field (RFC 8452, appendix A): a 128-bit left shift
    /// (blocks are little-endian) with the reduction polynomial folded in when a bit falls out.
    #[inline(always)]
    unsafe fn mulx(h: __m128i) -> __m128i {
        let carry = _mm_srai_epi32(_mm_shuffle_epi32(h, 0xff), 31); // all ones if bit 127 is set
        let shifted = _mm_or_si128(_mm_slli_epi64(h, 1), _mm_srli_epi64(_mm_slli_si128(h, 8), 63));
        let poly = _mm_set_epi64x(0xc200000000000000u64 as i64, 1);
        _mm_xor_si128(shifted, _mm_and_si128(carry, poly))
    }

    /// w0, w0^w1, w0^w1^w2, w0^w1^w2^w3 (the running XOR of the key schedule's words).
    #[inline(always)]
    unsafe fn spread(mut x: __m128i) -> __m128i {
        x = _mm_xor_si128(x, _mm_slli_si128(x, 4));
        x = _mm_xor_si128(x, _mm_slli_si128(x, 8));
        x
    }

    #[inline(always)]
    unsafe fn aes(rk: &[__m128i; 15], mut b: __m128i) -> __m128i {
        b = _mm_xor_si128(b, rk[0]);
        for k in &rk[1..14] {
            b = _mm_aesenc_si128(b, *k);
        }
        _mm_aesenclast_si128(b, rk[14])
    }

    /// Unreduced 256-bit product, as (lo, mid, hi).
    #[inline(always)]
    unsafe fn mul_wide(a: __m128i, b: __m128i) -> (__m128i, __m128i, __m128i) {
        (
            _mm_clmulepi64_si128(a, b, 0x00),
            _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01), _mm_clmulepi64_si128(a, b, 0x10)),
            _mm_clmulepi64_si128(a, b, 0x11),
        )
    }

    /// POLYVAL's `dot` of an unreduced product: Montgomery reduction by x^128 + x^127 + x^126 +
    /// x^121 + 1.
    #[inline(always)]
    unsafe fn reduce((lo, mid, hi): (__m128i, __m128i, __m128i)) -> __m128i {
        let poly = _mm_set_epi64x(0xc200000000000000u64 as i64, 1);
        let mut lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
        let hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
        lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), _mm_clmulepi64_si128(lo, poly, 0x10));
        lo = _mm_xor_si128(_mm_shuffle_epi32(lo, 0x4e), _mm_clmulepi64_si128(lo, poly, 0x10));
        _mm_xor_si128(hi, lo)
    }

    #[inline(always)]
    unsafe fn xor3(a: (__m128i, __m128i, __m128i), b: (__m128i, __m128i, __m128i)) -> (__m128i, __m128i, __m128i) {
        (_mm_xor_si128(a.0, b.0), _mm_xor_si128(a.1, b.1), _mm_xor_si128(a.2, b.2))
    }

    #[inline(always)]
    unsafe fn load(p: &[u8]) -> __m128i {
        debug_assert!(p.len() >= 16);
        _mm_loadu_si128(p.as_ptr() as *const __m128i)
    }

    /// The last `tail.len()` (< 16) bytes as a zero-padded block.
    #[inline(always)]
    unsafe fn load_partial(tail: &[u8]) -> __m128i {
        let mut b = [0u8; 16];
        b[..tail.len()].copy_from_slice(tail);
        _mm_loadu_si128(b.as_ptr() as *const __m128i)
    }

    impl Key {
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
        pub unsafe fn new(key: &[u8; 32], allow_wide: bool) -> Box<Key> {
            let mut rk = [_mm_setzero_si128(); 15];
            rk[0] = load(&key[..16]);
            rk[1] = load(&key[16..]);
            expand_round!(rk, 2, 0x01);
            expand_round!(rk, 4, 0x02);
            expand_round!(rk, 6, 0x04);
            expand_round!(rk, 8, 0x08);
            expand_round!(rk, 10, 0x10);
            expand_round!(rk, 12, 0x20);
            expand_round!(rk, 14, 0x40);
            // H = E(0), in POLYVAL form: mulX(rev(H))
            let h = _mm_shuffle_epi8(aes(&rk, _mm_setzero_si128()), rev());
            let h1 = mulx(h);
            let mut key = Box::new(Key { rk, h: [h1; 16], hw: [[h1; 2]; 8], wide: allow_wide && wide_available() });
            for i in 1..16 {
                key.h[i] = reduce(mul_wide(key.h[i - 1], h1));
            }
            for m in 0..8 {
                key.hw[m] = [key.h[15 - 2 * m], key.h[14 - 2 * m]];
            }
            rk.iter_mut().for_each(|r| core::ptr::write_volatile(r, _mm_setzero_si128()));
            key
        }

        /// POLYVAL over `data` as byte-reversed, zero-padded blocks.
        #[inline(always)]
        unsafe fn absorb(&self, mut acc: __m128i, data: &[u8]) -> __m128i {
            let mut chunks = data.chunks_exact(16 * PIPE);
            for c in &mut chunks {
                acc = self.absorb8(acc, c);
            }
            let rest = chunks.remainder();
            let mut blocks = rest.chunks_exact(16);
            for b in &mut blocks {
                acc = reduce(mul_wide(_mm_xor_si128(acc, _mm_shuffle_epi8(load(b), rev())), self.h[0]));
            }
            let tail = blocks.remainder();
            if !tail.is_empty() {
                acc = reduce(mul_wide(_mm_xor_si128(acc, _mm_shuffle_epi8(load_partial(tail), rev())), self.h[0]));
            }
            acc
        }

        /// Eight blocks, one reduction: acc·H^8 + X1·H^8 + X2·H^7 + ... + X8·H.
        #[inline(always)]
        unsafe fn absorb8(&self, acc: __m128i, c: &[u8]) -> __m128i {
            let r = rev();
            let mut sum = mul_wide(_mm_xor_si128(acc, _mm_shuffle_epi8(load(c), r)), self.h[PIPE - 1]);
            for j in 1..PIPE {
                sum = xor3(sum, mul_wide(_mm_shuffle_epi8(load(&c[16 * j..]), r), self.h[PIPE - 1 - j]));
            }
            reduce(sum)
        }

        #[inline(always)]
        unsafe fn ctr_block(&self, j0: __m128i, counter: u32) -> __m128i {
            _mm_insert_epi32(j0, counter.swap_bytes() as i32, 3)
        }

        /// Eight blocks from `src`, XORed with the key stream from `counter`, to `dst` (which
        /// may be `src`).
        #[inline(always)]
        unsafe fn ctr8(&self, j0: __m128i, counter: u32, src: *const u8, dst: *mut u8) {
            let mut ks = [_mm_setzero_si128(); PIPE];
            for (j, k) in ks.iter_mut().enumerate() {
                *k = _mm_xor_si128(self.ctr_block(j0, counter.wrapping_add(j as u32)), self.rk[0]);
            }
            for rk in &self.rk[1..14] {
                for k in ks.iter_mut() {
                    *k = _mm_aesenc_si128(*k, *rk);
                }
            }
            for (j, k) in ks.iter().enumerate() {
                let x = _mm_loadu_si128(src.add(16 * j) as *const __m128i);
                _mm_storeu_si128(dst.add(16 * j) as *mut __m128i, _mm_xor_si128(x, _mm_aesenclast_si128(*k, self.rk[14])));
            }
        }

        /// The `len` (< 128) bytes after the whole pipelines, from `src` XORed with the key
        /// stream from `counter` to `dst` (which may be `src`).
        #[inline(always)]
        unsafe fn ctr_rest(&self, j0: __m128i, mut counter: u32, src: *const u8, dst: *mut u8, len: usize) {
            let mut i = 0;
            while i + 16 <= len {
                let x = _mm_loadu_si128(src.add(i) as *const __m128i);
                let ks = aes(&self.rk, self.ctr_block(j0, counter));
                _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm_xor_si128(x, ks));
                counter = counter.wrapping_add(1);
                i += 16;
            }
            if i < len {
                let mut b = [0u8; 16];
                core::ptr::copy_nonoverlapping(src.add(i), b.as_mut_ptr(), len - i);
                let x = _mm_xor_si128(_mm_loadu_si128(b.as_ptr() as *const __m128i), aes(&self.rk, self.ctr_block(j0, counter)));
                _mm_storeu_si128(b.as_mut_ptr() as *mut __m128i, x);
                core::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(i), len - i);
                core::ptr::write_volatile(&mut b, [0u8; 16]);
            }
        }

        /// The lengths block, then GHASH(A, C) XOR E(J0).
        #[inline(always)]
        unsafe fn finish(&self, j0: __m128i, mut acc: __m128i, aad_len: usize, ct_len: usize) -> __m128i {
            // in bits, big-endian; byte-reversed that is (len(C), len(A)) little-endian
            let lens = _mm_set_epi64x((aad_len as u64 * 8) as i64, (ct_len as u64 * 8) as i64);
            acc = reduce(mul_wide(_mm_xor_si128(acc, lens), self.h[0]));
            _mm_xor_si128(_mm_shuffle_epi8(acc, rev()), aes(&self.rk, self.ctr_block(j0, 1)))
        }

        #[inline(always)]
        unsafe fn j0(nonce: &[u8; 12]) -> __m128i {
            let mut b = [0u8; 16];
            b[..12].copy_from_slice(nonce);
            _mm_loadu_si128(b.as_ptr() as *const __m128i)
        }

        /// CTR over `len` bytes from `src` to `dst` (which may be `src`) and GHASH over the
        /// ciphertext, pipeline by pipeline: hashed before decrypting, or when `SEAL` once
        /// encrypted — one pipeline behind, so that hashing overlaps the next encryption (4%
        /// faster sealing of 4 KiB); returns the tag.
        #[inline(always)]
        unsafe fn crypt<const SEAL: bool>(&self, nonce: &[u8; 12], aad: &[u8], src: *const u8, dst: *mut u8, len: usize) -> __m128i {
            let j0 = Self::j0(nonce);
            let mut acc = self.absorb(_mm_setzero_si128(), aad);
            let mut counter = 2u32;
            let mut done = 0;
            if self.wide && len >= WIDE_CHUNK {
                (acc, counter, done) = wide::crypt::<SEAL>(self, j0, acc, src, dst, len);
            }
            let block = |p: *const u8| core::slice::from_raw_parts(p, 16 * PIPE);
            let mut sealed_unhashed = None;
            while len - done >= 16 * PIPE {
                if !SEAL {
                    acc = self.absorb8(acc, block(src.add(done)));
                }
                self.ctr8(j0, counter, src.add(done), dst.add(done));
                if SEAL {
                    if let Some(at) = sealed_unhashed.replace(done) {
                        acc = self.absorb8(acc, block(dst.add(at)));
                    }
                }
                counter = counter.wrapping_add(PIPE as u32);
                done += 16 * PIPE;
            }
            if let Some(at) = sealed_unhashed {
                acc = self.absorb8(acc, block(dst.add(at)));
            }
            if !SEAL {
                acc = self.absorb(acc, core::slice::from_raw_parts(src.add(done), len - done));
            }
            self.ctr_rest(j0, counter, src.add(done), dst.add(done), len - done);
            if SEAL {
                acc = self.absorb(acc, core::slice::from_raw_parts(dst.add(done), len - done));
            }
            self.finish(j0, acc, aad.len(), len)
        }

        /// Encrypt `buf` in place; returns the tag.
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
        pub unsafe fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
            let tag = self.crypt::<true>(nonce, aad, buf.as_ptr(), buf.as_mut_ptr(), buf.len());
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, tag);
            out
        }

        /// Hash and decrypt `len` bytes from `src` to `dst` (which may be `src`); true when the
        /// tag matched. On a mismatch the caller zeroes `dst`.
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
        pub unsafe fn open(&self, nonce: &[u8; 12], aad: &[u8], src: *const u8, dst: *mut u8, len: usize, tag: &[u8; 16]) -> bool {
            let diff = _mm_xor_si128(
                self.crypt::<false>(nonce, aad, src, dst, len),
                _mm_loadu_si128(tag.as_ptr() as *const __m128i),
            );
            // constant time: one test of all 128 bits
            _mm_testz_si128(diff, diff) == 1
        }
    }

    /// 256-bit VAES and VPCLMULQDQ: two blocks per instruction, sixteen blocks per pipeline.
    const WIDE_CHUNK: usize = 256;

    mod wide {
        use super::{reduce, Key};
        use core::arch::x86_64::*;

        pub fn available() -> bool {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("vaes")
                && std::is_x86_feature_detected!("vpclmulqdq")
        }

        /// Both 128-bit lanes: `lo` in the low one.
        #[inline(always)]
        unsafe fn pair(lo: __m128i, hi: __m128i) -> __m256i {
            _mm256_set_m128i(hi, lo)
        }

        /// POLYVAL of 16 blocks at `c` into `acc`, one reduction: the first block (with `acc`)
        /// times H^16, ..., the last times H.
        #[inline(always)]
        unsafe fn absorb16(k: &Key, acc: __m128i, c: *const u8) -> __m128i {
            let rev = _mm256_broadcastsi128_si256(super::rev());
            let mut lo = _mm256_setzero_si256();
            let mut mid = _mm256_setzero_si256();
            let mut hi = _mm256_setzero_si256();
            for m in 0..8 {
                let mut x = _mm256_shuffle_epi8(_mm256_loadu_si256(c.add(32 * m) as *const __m256i), rev);
                if m == 0 {
                    x = _mm256_xor_si256(x, _mm256_zextsi128_si256(acc));
                }
                let h = _mm256_loadu_si256(k.hw.as_ptr().add(m) as *const __m256i);
                lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, h, 0x00));
                mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, h, 0x01));
                mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(x, h, 0x10));
                hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, h, 0x11));
            }
            let fold = |v: __m256i| _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            reduce((fold(lo), fold(mid), fold(hi)))
        }

        /// 16 blocks from `src` XORed with the key stream to `dst` (which may be `src`); `ctr`
        /// holds the byte-reversed counter blocks of the first two (counter in the low 32 bits of
        /// each lane).
        #[inline(always)]
        unsafe fn ctr16(k: &Key, ctr: __m256i, src: *const u8, dst: *mut u8) {
            let rev = _mm256_broadcastsi128_si256(super::rev());
            let mut s = [_mm256_setzero_si256(); 8];
            let rk0 = _mm256_broadcastsi128_si256(k.rk[0]);
            for (m, b) in s.iter_mut().enumerate() {
                let step = _mm256_set_epi32(0, 0, 0, 2 * m as i32, 0, 0, 0, 2 * m as i32);
                *b = _mm256_xor_si256(_mm256_shuffle_epi8(_mm256_add_epi32(ctr, step), rev), rk0);
            }
            for r in 1..14 {
                let rk = _mm256_broadcastsi128_si256(k.rk[r]);
                for b in s.iter_mut() {
                    *b = _mm256_aesenc_epi128(*b, rk);
                }
            }
            let last = _mm256_broadcastsi128_si256(k.rk[14]);
            for (m, b) in s.iter().enumerate() {
                let x = _mm256_loadu_si256(src.add(32 * m) as *const __m256i);
                _mm256_storeu_si256(dst.add(32 * m) as *mut __m256i, _mm256_xor_si256(x, _mm256_aesenclast_epi128(*b, last)));
            }
        }

        /// The byte-reversed counter blocks `counter`, `counter + 1`.
        #[inline(always)]
        unsafe fn counters(j0: __m128i, counter: u32) -> __m256i {
            let r = _mm_shuffle_epi8(_mm_insert_epi32(j0, counter.swap_bytes() as i32, 3), super::rev());
            pair(r, _mm_add_epi32(r, _mm_set_epi32(0, 0, 0, 1)))
        }

        /// The whole 256-byte pipelines of `len` bytes, as `Key::crypt` does them: returns the
        /// hash, the next counter and the bytes done.
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1,avx,avx2,vaes,vpclmulqdq")]
        pub unsafe fn crypt<const SEAL: bool>(
            k: &Key,
            j0: __m128i,
            mut acc: __m128i,
            src: *const u8,
            dst: *mut u8,
            len: usize,
        ) -> (__m128i, u32, usize) {
            let whole = len / super::WIDE_CHUNK;
            let mut counter = 2u32;
            for i in 0..whole {
                let at = super::WIDE_CHUNK * i;
                if !SEAL {
                    acc = absorb16(k, acc, src.add(at));
                }
                ctr16(k, counters(j0, counter), src.add(at), dst.add(at));
                if SEAL && i > 0 {
                    // one pipeline behind, as in `Key::crypt`
                    acc = absorb16(k, acc, dst.add(at - super::WIDE_CHUNK));
                }
                counter = counter.wrapping_add(16);
            }
            if SEAL && whole > 0 {
                acc = absorb16(k, acc, dst.add(super::WIDE_CHUNK * (whole - 1)));
            }
            (acc, counter, super::WIDE_CHUNK * whole)
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    fn rnd<const N: usize>() -> [u8; N] {
        let mut b = [0u8; N];
        getrandom::getrandom(&mut b).unwrap();
        b
    }

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// The fast path and RustCrypto's implementation agree on every length around the pipeline
    /// boundaries, with and without associated data, and each opens the other's output.
    #[pg_test]
    fn agrees_with_reference() {
        for len in (0..600).chain([1023, 1024, 1025, 4096, 4097, 65536 + 5]) {
            for aad_len in [0usize, 1, 15, 16, 17, 40, 128, 129, 300] {
                let key = rnd::<32>();
                let nonce = rnd::<12>();
                let aad: Vec<u8> = (0..aad_len).map(|i| (i * 7 + len) as u8).collect();
                let plain: Vec<u8> = (0..len).map(|i| (i * 13 + aad_len) as u8).collect();
                let fast = Gcm::new(&key);
                let slow = Gcm::portable(&key);
                if let Some(narrow) = Gcm::narrow(&key) {
                    let mut n = plain.clone();
                    let tn = narrow.seal(&nonce, &aad, &mut n);
                    let mut to = vec![0u8; len];
                    narrow.open_to(&nonce, &aad, &n, &tn, &mut to).unwrap();
                    assert_eq!(to, plain, "narrow round trip, len {len} aad {aad_len}");
                    let mut r = plain.clone();
                    assert_eq!(slow.seal(&nonce, &aad, &mut r), tn, "narrow tag, len {len} aad {aad_len}");
                    assert_eq!(r, n, "narrow ciphertext, len {len} aad {aad_len}");
                }
                let mut a = plain.clone();
                let mut b = plain.clone();
                let ta = fast.seal(&nonce, &aad, &mut a);
                let tb = slow.seal(&nonce, &aad, &mut b);
                assert_eq!(a, b, "ciphertext, len {len} aad {aad_len}");
                assert_eq!(ta, tb, "tag, len {len} aad {aad_len}");
                let mut to = vec![0u8; len];
                fast.open_to(&nonce, &aad, &a, &ta, &mut to).unwrap();
                assert_eq!(to, plain);
                slow.open_to(&nonce, &aad, &b, &tb, &mut to).unwrap();
                assert_eq!(to, plain);
                fast.open(&nonce, &aad, &mut b, &tb).unwrap();
                slow.open(&nonce, &aad, &mut a, &ta).unwrap();
                assert_eq!(a, plain);
                assert_eq!(b, plain);
            }
        }
    }

    /// Random lengths up to 70,000 bytes and random associated data: every implementation this
    /// CPU has produces the same ciphertext and tag, opens the others' output, and refuses a
    /// random tag.
    #[pg_test]
    fn agrees_on_random_lengths() {
        for _ in 0..300 {
            let r = rnd::<8>();
            let len = u32::from_le_bytes([r[0], r[1], r[2], 0]) as usize % 70_000;
            let aad_len = u16::from_le_bytes([r[3], r[4]]) as usize % 600;
            let key = rnd::<32>();
            let nonce = rnd::<12>();
            let mut plain = vec![0u8; len];
            getrandom::getrandom(&mut plain).unwrap();
            let mut aad = vec![0u8; aad_len];
            getrandom::getrandom(&mut aad).unwrap();
            let impls: Vec<Gcm> = [Gcm::new(&key), Gcm::portable(&key)].into_iter().chain(Gcm::narrow(&key)).collect();
            let mut reference = plain.clone();
            let tag = impls[1].seal(&nonce, &aad, &mut reference);
            for g in &impls {
                let mut c = plain.clone();
                assert_eq!(g.seal(&nonce, &aad, &mut c), tag, "tag, len {len} aad {aad_len}");
                assert_eq!(c, reference, "ciphertext, len {len} aad {aad_len}");
                let mut out = vec![0u8; len];
                g.open_to(&nonce, &aad, &reference, &tag, &mut out).unwrap();
                assert_eq!(out, plain);
                let forged = rnd::<16>();
                assert_eq!(g.open_to(&nonce, &aad, &reference, &forged, &mut out), Err(Unauthentic));
                assert!(out.iter().all(|&b| b == 0));
            }
        }
    }

    /// Any change to ciphertext, tag, nonce or associated data is refused, and leaves zeros.
    #[pg_test]
    fn refuses_alterations() {
        let key = rnd::<32>();
        let nonce = rnd::<12>();
        let g = Gcm::new(&key);
        let plain = vec![0x5au8; 300]; // past one 256-byte pipeline
        let mut ct = plain.clone();
        let tag = g.seal(&nonce, b"ctx", &mut ct);
        for i in 0..ct.len() {
            for bit in [0x01u8, 0x80] {
                let mut c = ct.clone();
                c[i] ^= bit;
                let mut to = vec![0xffu8; c.len()];
                assert_eq!(g.open_to(&nonce, b"ctx", &c, &tag, &mut to), Err(Unauthentic));
                assert!(to.iter().all(|&b| b == 0));
                assert_eq!(g.open(&nonce, b"ctx", &mut c, &tag), Err(Unauthentic));
                assert!(c.iter().all(|&b| b == 0));
            }
        }
        for i in 0..16 {
            let mut t = tag;
            t[i] ^= 1;
            assert!(g.open(&nonce, b"ctx", &mut ct.clone(), &t).is_err());
        }
        for i in 0..12 {
            let mut n = nonce;
            n[i] ^= 1;
            assert!(g.open(&n, b"ctx", &mut ct.clone(), &tag).is_err());
        }
        assert!(g.open(&nonce, b"ctx2", &mut ct.clone(), &tag).is_err());
        assert!(g.open(&nonce, b"ctx", &mut ct[..299].to_vec(), &tag).is_err());
        assert!(Gcm::new(&rnd::<32>()).open(&nonce, b"ctx", &mut ct.clone(), &tag).is_err());
        let mut ok = ct.clone();
        g.open(&nonce, b"ctx", &mut ok, &tag).unwrap();
        assert_eq!(ok, plain);
    }

    /// Published AES-256-GCM vectors (McGrew & Viega, "The Galois/Counter Mode of Operation",
    /// test cases 13-16).
    #[pg_test]
    fn published_vectors() {
        let k0 = [0u8; 32];
        let n0 = [0u8; 12];
        for g in [Gcm::new(&k0), Gcm::portable(&k0)].into_iter().chain(Gcm::narrow(&k0)) {
            let mut empty = [];
            assert_eq!(g.seal(&n0, &[], &mut empty).to_vec(), unhex("530f8afbc74536b9a963b4f1c4cb738b"));
            let mut one = [0u8; 16];
            let t = g.seal(&n0, &[], &mut one);
            assert_eq!(one.to_vec(), unhex("cea7403d4d606b6e074ec5d3baf39d18"));
            assert_eq!(t.to_vec(), unhex("d0d1c8a799996bf0265b98b5d48ab919"));
        }
        let key: [u8; 32] = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308").try_into().unwrap();
        let nonce: [u8; 12] = unhex("cafebabefacedbaddecaf888").try_into().unwrap();
        let plain = unhex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let expect = unhex(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        );
        for g in [Gcm::new(&key), Gcm::portable(&key)].into_iter().chain(Gcm::narrow(&key)) {
            let mut buf = plain.clone();
            let tag = g.seal(&nonce, &aad, &mut buf);
            assert_eq!(buf, expect);
            assert_eq!(tag.to_vec(), unhex("76fc6ece0f4e1768cddf8853bb2d551b"));
            g.open(&nonce, &aad, &mut buf, &tag).unwrap();
            assert_eq!(buf, plain);
        }
    }
}
