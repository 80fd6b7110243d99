//! One hop's onion layer (PROTOCOL.md §9.4): per direction an AES-128-CTR
//! stream key `S` and an AES-256-GCM key `A`, each with its own counter.
//!
//! - `S` is applied (XOR, length-preserving) to **every** cell that passes
//!   the hop in that direction; its counter counts those cells.
//! - `A` seals/opens only the cells **originated by or destined to** the
//!   hop; its counter counts those cells.
//!
//! A body is `recognized[8] || ciphertext || tag[16]`. The origin sets
//! `recognized` to the destination's *marker* for the AEAD counter it seals
//! with — eight bytes of `AES-128(S, 0xffffffff || u64_be(counter) || 0^32)`,
//! a block no stream layer ever uses — and applies the stream layers of the
//! hops *between* it and the destination only. So a hop tells "for me" from
//! "for a later hop" with one AES block and an 8-byte compare before it
//! touches the cell, while every other hop sees eight pseudorandom bytes:
//! a fixed value (zeros, say) would show the hop just before the
//! destination, which sees the field in the clear once it has removed its
//! own layer, that its neighbour is the end of the circuit. A false match
//! has probability 2^-64 per cell, and then the tag check fails and the
//! circuit ends.
//!
//! Nonces: AEAD `[0u8; 4] || u64_be(counter)`; CTR counter block
//! `[0u8; 4] || u64_be(counter) || u32_be(block)`, blocks from 2. Keys
//! differ per hop and per direction, so no (key, nonce) pair repeats.
//!
//! Why blocks from 2: that keystream is exactly what AES-128-GCM XORs into
//! a message under the nonce `[0u8; 4] || u64_be(counter)` (its counter
//! starts at 2, block 1 masks the tag). Where GCM runs on 512-bit VAES it
//! is ~1.6× faster than AES-NI CTR even with the GHASH it computes, so
//! large cells take their keystream from a GCM seal whose tag is dropped
//! (and never leaves this module: without a tag, nothing of GHASH's key is
//! exposed by both ends sealing under the same nonce). Small cells, and
//! CPUs without those units, use plain CTR; both give the same bytes
//! (tested).
//!
//! This module owns the keys and counters and never interprets a message.

use std::sync::OnceLock;

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use subtle::ConstantTimeEq;

use crate::handshake::KEY_MATERIAL_LEN;
use crate::msg::{RECOGNIZED_LEN, TAG_LEN};
use crate::{CircuitError, Result};

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    let (_, tail) = n.split_at_mut(4);
    tail.copy_from_slice(&counter.to_be_bytes());
    n
}

fn next(counter: &mut u64) -> Result<u64> {
    let c = *counter;
    *counter = c.checked_add(1).ok_or(CircuitError::CounterExhausted)?;
    Ok(c)
}

/// `recognized || ciphertext || tag` → the three parts, or `BadCell` for a
/// body too short to hold them (cells are 512 or 16384 bytes; never short).
fn split(body: &mut [u8]) -> Result<(&mut [u8], &mut [u8], &mut [u8])> {
    let (rec, rest) = body
        .split_at_mut_checked(RECOGNIZED_LEN)
        .ok_or(CircuitError::BadCell)?;
    let ct_len = rest
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CircuitError::BadCell)?;
    let (ct, tag) = rest.split_at_mut(ct_len);
    Ok((rec, ct, tag))
}

/// The plaintext region of a body (between `recognized` and the tag).
pub(crate) fn plaintext(body: &[u8]) -> &[u8] {
    let end = body.len().saturating_sub(TAG_LEN);
    body.get(RECOGNIZED_LEN..end).unwrap_or_default()
}

/// The AEAD tag at the end of a sealed body.
pub(crate) fn tag(body: &[u8]) -> Result<[u8; TAG_LEN]> {
    body.get(body.len().saturating_sub(TAG_LEN)..)
        .and_then(|t| t.try_into().ok())
        .ok_or(CircuitError::BadCell)
}

/// The plaintext region of a body, writable.
pub(crate) fn plaintext_mut(body: &mut [u8]) -> &mut [u8] {
    let end = body.len().saturating_sub(TAG_LEN);
    body.get_mut(RECOGNIZED_LEN..end).unwrap_or_default()
}

/// The keys and counters of one hop in one direction. aws-lc zeroizes both
/// key schedules on drop.
pub(crate) struct DirLayer {
    /// AES-128 in CTR mode (`Iv128` is the whole counter block).
    stream: EncryptingKey,
    /// The same key as AES-128-GCM, for the keystream of large cells.
    stream_gcm: LessSafeKey,
    aead: LessSafeKey,
    stream_ctr: u64,
    aead_ctr: u64,
    /// `marker(aead_ctr)`, kept current: every cell passing the hop is
    /// checked against it, and the counter moves only for the hop's own cells.
    next_marker: [u8; RECOGNIZED_LEN],
}

impl DirLayer {
    fn new(stream_key: &[u8; STREAM_KEY_LEN], aead_key: &[u8; AEAD_KEY_LEN]) -> Self {
        // A 32-byte key is always valid for AES-256-GCM.
        let aead = UnboundKey::new(&AES_256_GCM, aead_key)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
        // A 16-byte key is always valid for AES-128.
        let stream = UnboundCipherKey::new(&AES_128, stream_key)
            .and_then(EncryptingKey::ctr)
            .unwrap_or_else(|_| unreachable!("AES-128-CTR takes 16-byte keys"));
        let stream_gcm = UnboundKey::new(&AES_128_GCM, stream_key)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("AES-128-GCM takes 16-byte keys"));
        let mut layer = Self {
            stream,
            stream_gcm,
            aead,
            stream_ctr: 0,
            aead_ctr: 0,
            next_marker: [0; RECOGNIZED_LEN],
        };
        // AES-CTR takes any IV, so computing a marker cannot fail.
        layer.next_marker = layer
            .marker(0)
            .unwrap_or_else(|_| unreachable!("AES-CTR accepts every IV"));
        layer
    }

    /// Moves the AEAD counter on and computes the marker that goes with it.
    fn advance_aead(&mut self) -> Result<()> {
        next(&mut self.aead_ctr)?;
        self.next_marker = self.marker(self.aead_ctr)?;
        Ok(())
    }

    /// Adds or removes this hop's stream layer (XOR) and advances the
    /// stream counter.
    pub(crate) fn apply_stream(&mut self, body: &mut [u8]) -> Result<()> {
        let counter = next(&mut self.stream_ctr)?;
        if body.len() >= GCM_KEYSTREAM_MIN && gcm_keystream_is_faster() {
            self.keystream_gcm(counter, body)
        } else {
            self.keystream_ctr(counter, body)
        }
    }

    /// XORs the keystream of cell `counter` with plain CTR.
    fn keystream_ctr(&self, counter: u64, body: &mut [u8]) -> Result<()> {
        // Cells are at most 16 KiB: the 32-bit block counter never wraps.
        self.xor_ctr([0; 4], counter, FIRST_BLOCK, body)
    }

    /// XORs the same keystream with a GCM seal, dropping the tag.
    fn keystream_gcm(&self, counter: u64, body: &mut [u8]) -> Result<()> {
        let n = Nonce::assume_unique_for_key(nonce(counter));
        self.stream_gcm
            .seal_in_place_separate_tag(n, Aad::empty(), body)
            .map(|_| ())
            .map_err(|_| CircuitError::Usage("the stream layer failed"))
    }

    /// The `recognized` value of the cell sealed with AEAD counter
    /// `counter` (the module doc and PROTOCOL.md §9.4 give the block): the
    /// first CTR keystream block from a block is AES of that block.
    fn marker(&self, counter: u64) -> Result<[u8; RECOGNIZED_LEN]> {
        let mut m = [0u8; RECOGNIZED_LEN];
        self.xor_ctr(MARKER_PREFIX, counter, 0, &mut m)?;
        Ok(m)
    }

    /// XORs `buf` with AES-128-CTR under `S` from the counter block
    /// `head || u64_be(counter) || u32_be(block)`.
    fn xor_ctr(&self, head: [u8; 4], counter: u64, block: u32, buf: &mut [u8]) -> Result<()> {
        let mut iv = [0u8; 16];
        let (h, rest) = iv.split_at_mut(4);
        h.copy_from_slice(&head);
        let (c, b) = rest.split_at_mut(8);
        c.copy_from_slice(&counter.to_be_bytes());
        b.copy_from_slice(&block.to_be_bytes());
        self.stream
            .less_safe_encrypt(buf, EncryptionContext::Iv128(iv.into()))
            .map(|_| ())
            .map_err(|_| CircuitError::Usage("the stream layer failed"))
    }

    /// Whether `body`, as it reaches this hop, carries the `recognized`
    /// marker of the next cell sealed for this hop.
    pub(crate) fn recognized(&self, body: &[u8]) -> bool {
        body.get(..RECOGNIZED_LEN)
            .is_some_and(|r| bool::from(r.ct_eq(&self.next_marker)))
    }

    /// Writes this hop's marker into `recognized`, encrypts the plaintext
    /// region in place, writes the tag into the last 16 bytes and advances
    /// the AEAD counter.
    pub(crate) fn seal(&mut self, body: &mut [u8]) -> Result<()> {
        let (rec, plain, tag_out) = split(body)?;
        rec.copy_from_slice(&self.next_marker);
        let n = Nonce::assume_unique_for_key(nonce(self.aead_ctr));
        self.advance_aead()?;
        let tag = self
            .aead
            .seal_in_place_separate_tag(n, Aad::empty(), plain)
            .map_err(|_| CircuitError::Usage("cell too long for the AEAD"))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Authenticates and decrypts a recognized body with the current AEAD
    /// counter; the plaintext is then in [`plaintext`]. Failure is
    /// [`CircuitError::BadCell`] (fatal: the body is not restored).
    pub(crate) fn open(&mut self, body: &mut [u8]) -> Result<()> {
        let (_, ct, tag) = split(body)?;
        let n = Nonce::assume_unique_for_key(nonce(self.aead_ctr));
        self.aead
            .open_in_place_separate_tag(n, Aad::empty(), tag, ct)
            .map_err(|_| CircuitError::BadCell)?;
        self.advance_aead()
    }
}

/// Both directions of one hop, from the handshake's 128 bytes of key
/// material `Sf || Af || Sb || Ab`. Zeroized on drop; `Debug` prints nothing secret.
pub(crate) struct HopKeys {
    pub(crate) fwd: DirLayer,
    pub(crate) bwd: DirLayer,
}

impl std::fmt::Debug for HopKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopKeys(..)")
    }
}

impl HopKeys {
    pub(crate) fn from_key_material(okm: &[u8; KEY_MATERIAL_LEN]) -> Self {
        let (sf, rest) = split_key::<STREAM_KEY_LEN>(okm);
        let (af, rest) = split_key::<AEAD_KEY_LEN>(rest);
        let (sb, rest) = split_key::<STREAM_KEY_LEN>(rest);
        let (ab, _) = split_key::<AEAD_KEY_LEN>(rest);
        Self {
            fwd: DirLayer::new(sf, af),
            bwd: DirLayer::new(sb, ab),
        }
    }

    /// Whether both hold the same keys, compared by what they produce from
    /// counter 0 (the counters are put back afterwards).
    #[cfg(test)]
    pub(crate) fn same_keys_as(&mut self, o: &mut HopKeys) -> bool {
        fn sample(d: &mut DirLayer) -> Vec<u8> {
            let saved = (d.stream_ctr, d.aead_ctr, d.next_marker);
            (d.stream_ctr, d.aead_ctr, d.next_marker) = (0, 0, d.marker(0).unwrap());
            let mut body = vec![0u8; 64];
            d.seal(&mut body).unwrap();
            d.apply_stream(&mut body).unwrap();
            (d.stream_ctr, d.aead_ctr, d.next_marker) = saved;
            body
        }
        sample(&mut self.fwd) == sample(&mut o.fwd) && sample(&mut self.bwd) == sample(&mut o.bwd)
    }
}

/// The first four bytes of a marker block (PROTOCOL.md §9.4); a CTR
/// counter block starts with four zero bytes.
const MARKER_PREFIX: [u8; 4] = [0xff; 4];

/// The block counter of a cell's first keystream block: GCM's first
/// message block (see the module doc).
const FIRST_BLOCK: u32 = 2;

/// Below this a GCM call's setup costs more than its faster blocks save
/// (512-byte cells: 4.4 GiB/s against CTR's 5.9 here).
const GCM_KEYSTREAM_MIN: usize = 2048;

/// Whether this CPU has what aws-lc's 512-bit VAES AES-GCM needs. Without
/// it GCM runs on AES-NI and CLMUL and is slower than plain CTR.
fn gcm_keystream_is_faster() -> bool {
    static FASTER: OnceLock<bool> = OnceLock::new();
    *FASTER.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("vaes")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// AES-128 stream keys, AES-256-GCM keys.
const STREAM_KEY_LEN: usize = 16;
const AEAD_KEY_LEN: usize = 32;
const _: () = assert!(KEY_MATERIAL_LEN == 2 * (STREAM_KEY_LEN + AEAD_KEY_LEN));

/// The first `N` bytes as a key and the rest. `from_key_material` only
/// splits a buffer whose length is asserted above, so the fallback (zero
/// key) can never be taken.
fn split_key<const N: usize>(b: &[u8]) -> (&[u8; N], &[u8]) {
    b.split_first_chunk::<N>()
        .unwrap_or_else(|| unreachable!("key material is long enough"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> HopKeys {
        let mut okm = [0u8; KEY_MATERIAL_LEN];
        for (i, b) in okm.iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        HopKeys::from_key_material(&okm)
    }

    #[test]
    fn seal_open_and_counters() {
        let mut a = keys(1);
        let mut b = keys(1);
        for i in 0..100u8 {
            let mut body = vec![i; 512];
            assert!(!b.fwd.recognized(&body));
            a.fwd.seal(&mut body).unwrap();
            assert!(b.fwd.recognized(&body));
            assert!(!b.bwd.recognized(&body));
            assert_ne!(body[..8], [0; 8]);
            assert_ne!(plaintext(&body), &[i; 512 - 24][..]);
            b.fwd.open(&mut body).unwrap();
            assert_eq!(plaintext(&body), &[i; 512 - 24][..]);
        }
        // Out of step: sealed with counter 100, opened with 101 fails.
        let mut body = vec![0; 512];
        a.fwd.seal(&mut body).unwrap();
        let mut skipped = vec![0; 512];
        a.fwd.seal(&mut skipped).unwrap();
        assert_eq!(b.fwd.open(&mut skipped), Err(CircuitError::BadCell));
        b.fwd.open(&mut body).unwrap();
    }

    #[test]
    fn every_flipped_bit_fails_the_tag() {
        let mut a = keys(6);
        for byte in [8usize, 9, 100, 495, 496, 511] {
            let mut b = keys(6);
            let mut body = vec![3u8; 512];
            a.fwd.seal(&mut body).unwrap();
            body[byte] ^= 0x10;
            // Keep b's counter in step with a's.
            for _ in 0..b_counter_gap(&a, &b) {
                b.fwd.aead_ctr += 1;
            }
            assert_eq!(
                b.fwd.open(&mut body),
                Err(CircuitError::BadCell),
                "byte {byte}"
            );
        }
    }

    fn b_counter_gap(a: &HopKeys, b: &HopKeys) -> u64 {
        a.fwd.aead_ctr - 1 - b.fwd.aead_ctr
    }

    #[test]
    fn stream_layer_is_an_involution_per_counter() {
        let mut a = keys(2);
        let mut b = keys(2);
        let mut body = vec![7u8; 16384];
        a.bwd.apply_stream(&mut body).unwrap();
        assert_ne!(body, vec![7u8; 16384]);
        b.bwd.apply_stream(&mut body).unwrap();
        assert_eq!(body, vec![7u8; 16384]);
        // Next counter gives a different keystream.
        let mut x = vec![0u8; 64];
        let mut y = vec![0u8; 64];
        a.bwd.apply_stream(&mut x).unwrap();
        a.bwd.apply_stream(&mut y).unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn stream_layer_is_standard_aes_ctr() {
        // With an all-zero stream key, keystream block j of cell 0 is
        // AES-128(0, 0^96 || u32_be(2 + j)): block 0 is the ciphertext of
        // GCM test case 2 (zero key, zero IV, one zero block).
        let okm = [0u8; KEY_MATERIAL_LEN];
        let mut k = HopKeys::from_key_material(&okm);
        let mut ks = [0u8; 16];
        k.fwd.apply_stream(&mut ks).unwrap();
        let hex: String = ks.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "0388dace60b6a392f328c2b971b2fe78");
    }

    #[test]
    fn gcm_and_ctr_give_the_same_keystream() {
        // Whichever path this CPU takes, the other must agree byte for byte.
        let k = keys(9);
        for len in [0, 1, 15, 16, 17, 511, 512, 2047, 2048, 4099, 8192, 16384] {
            for counter in [0u64, 1, 0xfffe, u64::MAX - 1] {
                let mut a: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut b = a.clone();
                k.fwd.keystream_ctr(counter, &mut a).unwrap();
                k.fwd.keystream_gcm(counter, &mut b).unwrap();
                assert_eq!(a, b, "len {len} counter {counter}");
            }
        }
    }

    #[test]
    fn directions_and_hops_use_different_keys() {
        let mut k = keys(3);
        let (mut f, mut b) = ([0u8; 64], [0u8; 64]);
        k.fwd.apply_stream(&mut f).unwrap();
        k.bwd.apply_stream(&mut b).unwrap();
        assert_ne!(f, b);
        let mut other = keys(4);
        let mut o = [0u8; 64];
        other.fwd.apply_stream(&mut o).unwrap();
        assert_ne!(f, o);
        // A cell sealed for one direction does not open in the other.
        let mut body = vec![0u8; 512];
        k.fwd.seal(&mut body).unwrap();
        assert_eq!(k.bwd.open(&mut body), Err(CircuitError::BadCell));
    }

    #[test]
    fn counter_exhaustion_is_an_error() {
        let mut k = keys(5);
        k.fwd.stream_ctr = u64::MAX;
        assert_eq!(
            k.fwd.apply_stream(&mut [0u8; 512]).unwrap_err(),
            CircuitError::CounterExhausted
        );
        k.fwd.aead_ctr = u64::MAX;
        assert_eq!(
            k.fwd.seal(&mut [0u8; 512]).unwrap_err(),
            CircuitError::CounterExhausted
        );
    }
}
