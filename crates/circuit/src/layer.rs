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
//! `[0u8; 4] || u64_be(counter) || u32_be(block)`, blocks from 0. Keys
//! differ per hop and per direction, so no (key, nonce) pair repeats.
//!
//! This module owns the keys and counters and never interprets a message.

use aes::Aes128;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use ctr::cipher::{InnerIvInit, StreamCipher, StreamCipherCoreWrapper};
use ctr::{CtrCore, flavors::Ctr32BE};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
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
/// body too short to hold them (cells are 512 or 8192 bytes; never short).
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

/// The plaintext region of a body, writable.
pub(crate) fn plaintext_mut(body: &mut [u8]) -> &mut [u8] {
    let end = body.len().saturating_sub(TAG_LEN);
    body.get_mut(RECOGNIZED_LEN..end).unwrap_or_default()
}

/// The keys and counters of one hop in one direction. The stream cipher
/// zeroizes its key schedule on drop; ring's AEAD key does not (as with the
/// TLS keys of every channel, which ring also holds).
pub(crate) struct DirLayer {
    stream: Aes128,
    aead: LessSafeKey,
    stream_ctr: u64,
    aead_ctr: u64,
}

impl DirLayer {
    fn new(stream_key: &[u8; STREAM_KEY_LEN], aead_key: &[u8; AEAD_KEY_LEN]) -> Self {
        // A 32-byte key is always valid for AES-256-GCM.
        let aead = UnboundKey::new(&AES_256_GCM, aead_key)
            .map(LessSafeKey::new)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
        Self {
            stream: Aes128::new(stream_key.into()),
            aead,
            stream_ctr: 0,
            aead_ctr: 0,
        }
    }

    /// Adds or removes this hop's stream layer (XOR) and advances the
    /// stream counter.
    pub(crate) fn apply_stream(&mut self, body: &mut [u8]) -> Result<()> {
        let mut iv = [0u8; 16];
        let (n, _) = iv.split_at_mut(12);
        n.copy_from_slice(&nonce(next(&mut self.stream_ctr)?));
        let mut c = StreamCipherCoreWrapper::from_core(CtrCore::<&Aes128, Ctr32BE>::inner_iv_init(
            &self.stream,
            &iv.into(),
        ));
        c.try_apply_keystream(body)
            .map_err(|_| CircuitError::Usage("cell too long for the stream layer"))
    }

    /// The `recognized` value of the cell sealed with AEAD counter
    /// `counter`: the first 8 bytes of `AES-128(S, MARKER_PREFIX ||
    /// u64_be(counter) || 0^32)`. CTR blocks start with four zero bytes, so
    /// this block is never part of a keystream.
    fn marker(&self, counter: u64) -> [u8; RECOGNIZED_LEN] {
        let mut block = [0u8; 16];
        let (prefix, rest) = block.split_at_mut(4);
        prefix.copy_from_slice(&MARKER_PREFIX);
        let (ctr, _) = rest.split_at_mut(8);
        ctr.copy_from_slice(&counter.to_be_bytes());
        let mut block = block.into();
        self.stream.encrypt_block(&mut block);
        let mut m = [0u8; RECOGNIZED_LEN];
        let (head, _) = block.split_at(RECOGNIZED_LEN);
        m.copy_from_slice(head);
        m
    }

    /// Whether `body`, as it reaches this hop, carries the `recognized`
    /// marker of the next cell sealed for this hop.
    pub(crate) fn recognized(&self, body: &[u8]) -> bool {
        body.get(..RECOGNIZED_LEN)
            .is_some_and(|r| bool::from(r.ct_eq(&self.marker(self.aead_ctr))))
    }

    /// Writes this hop's marker into `recognized`, encrypts the plaintext
    /// region in place, writes the tag into the last 16 bytes and advances
    /// the AEAD counter.
    pub(crate) fn seal(&mut self, body: &mut [u8]) -> Result<()> {
        let marker = self.marker(self.aead_ctr);
        let (rec, plain, tag_out) = split(body)?;
        rec.copy_from_slice(&marker);
        let n = Nonce::assume_unique_for_key(nonce(next(&mut self.aead_ctr)?));
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
        let tag = Tag::try_from(&*tag).map_err(|_| CircuitError::BadCell)?;
        let n = Nonce::assume_unique_for_key(nonce(self.aead_ctr));
        self.aead
            .open_in_place_separate_tag(n, Aad::empty(), tag, ct, 0..)
            .map_err(|_| CircuitError::BadCell)?;
        next(&mut self.aead_ctr)?;
        Ok(())
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

    /// Whether both hold the same keys, compared by what they produce.
    #[cfg(test)]
    pub(crate) fn same_keys_as(&self, o: &HopKeys) -> bool {
        fn sample(d: &DirLayer) -> Vec<u8> {
            let mut fresh = DirLayer {
                stream: d.stream.clone(),
                aead: d.aead.clone(),
                stream_ctr: 0,
                aead_ctr: 0,
            };
            let mut body = vec![0u8; 64];
            fresh.seal(&mut body).unwrap();
            fresh.apply_stream(&mut body).unwrap();
            body
        }
        sample(&self.fwd) == sample(&o.fwd) && sample(&self.bwd) == sample(&o.bwd)
    }
}

/// The first four bytes of a marker block (PROTOCOL.md §9.4); a CTR
/// counter block starts with four zero bytes.
const MARKER_PREFIX: [u8; 4] = [0xff; 4];

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
        let mut body = vec![7u8; 8192];
        a.bwd.apply_stream(&mut body).unwrap();
        assert_ne!(body, vec![7u8; 8192]);
        b.bwd.apply_stream(&mut body).unwrap();
        assert_eq!(body, vec![7u8; 8192]);
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
        // AES-128(0, 0^96 || u32_be(j)): block 0 is GCM's H and block 1 its
        // tag for empty input under the zero key (GCM test case 1).
        let okm = [0u8; KEY_MATERIAL_LEN];
        let mut k = HopKeys::from_key_material(&okm);
        let mut ks = [0u8; 32];
        k.fwd.apply_stream(&mut ks).unwrap();
        let hex: String = ks.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "66e94bd4ef8a2c3b884cfa59ca342b2e58e2fccefa7e3061367f1d57a4e7455a"
        );
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
