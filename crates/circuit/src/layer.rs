//! One hop's onion layer (PROTOCOL.md §9.4): per direction a
//! ChaCha20 stream key `S` and a ChaCha20-Poly1305 key `A`, each with its own
//! counter used as the nonce.
//!
//! - `S` is applied (XOR, length-preserving) to **every** cell that passes
//!   the hop in that direction; its counter counts those cells.
//! - `A` seals/opens only the cells **originated by or destined to** the
//!   hop; its counter counts those cells.
//!
//! Nonce for both: `[0u8; 4] || u64_be(counter)`. Keys differ per hop and
//! per direction, so no (key, nonce) pair is ever used twice. The body is
//! `ciphertext[len - 16] || tag[16]`, the tag covering the ciphertext with
//! empty associated data.
//!
//! This module owns the keys and counters and never interprets a message.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Tag};
use zeroize::Zeroizing;

use crate::handshake::KEY_MATERIAL_LEN;
use crate::msg::TAG_LEN;
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

/// The keys and counters of one hop in one direction.
pub(crate) struct DirLayer {
    stream_key: Zeroizing<[u8; 32]>,
    aead: ChaCha20Poly1305,
    stream_ctr: u64,
    aead_ctr: u64,
}

impl DirLayer {
    fn new(stream_key: &[u8], aead_key: &[u8]) -> Self {
        let mut sk = Zeroizing::new([0u8; 32]);
        sk.copy_from_slice(stream_key);
        let mut ak = Zeroizing::new([0u8; 32]);
        ak.copy_from_slice(aead_key);
        Self {
            stream_key: sk,
            aead: ChaCha20Poly1305::new(&(*ak).into()),
            stream_ctr: 0,
            aead_ctr: 0,
        }
    }

    /// Adds or removes this hop's stream layer (XOR) and advances the
    /// stream counter.
    pub(crate) fn apply_stream(&mut self, body: &mut [u8]) -> Result<()> {
        let n = nonce(next(&mut self.stream_ctr)?);
        let mut c = ChaCha20::new(&(*self.stream_key).into(), &n.into());
        c.apply_keystream(body);
        Ok(())
    }

    /// Encrypts `body[..len-16]` in place and writes the tag into the last
    /// 16 bytes; advances the AEAD counter.
    pub(crate) fn seal(&mut self, body: &mut [u8]) -> Result<()> {
        let split = body.len().saturating_sub(TAG_LEN);
        let (plain, tag_out) = body.split_at_mut(split);
        let n = nonce(self.aead_ctr);
        let tag = self
            .aead
            .encrypt_inout_detached(&n.into(), &[], plain.into())
            .map_err(|_| CircuitError::Usage("cell too long for the AEAD"))?;
        tag_out.copy_from_slice(&tag);
        next(&mut self.aead_ctr)?;
        Ok(())
    }

    /// Tries to authenticate and decrypt `body` with the current AEAD
    /// counter. On success the plaintext is in `body[..len-16]`, the counter
    /// advances and `true` is returned. On failure `body` is unchanged (the
    /// AEAD verifies before it decrypts; the layering tests depend on this)
    /// and the counter does not move.
    pub(crate) fn try_open(&mut self, body: &mut [u8]) -> Result<bool> {
        let split = body.len().saturating_sub(TAG_LEN);
        let (ct, tag) = body.split_at_mut(split);
        let tag = Tag::try_from(&*tag).map_err(|_| CircuitError::BadCell)?;
        let n = nonce(self.aead_ctr);
        match self
            .aead
            .decrypt_inout_detached(&n.into(), &[], ct.into(), &tag)
        {
            Ok(()) => {
                next(&mut self.aead_ctr)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    #[cfg(test)]
    fn same_keys_as(&self, o: &DirLayer) -> bool {
        *self.stream_key == *o.stream_key && {
            // Compare AEAD keys by behaviour: seal the same input.
            let a = self.aead.clone();
            let b = o.aead.clone();
            let mut x = [0u8; 32];
            let mut y = [0u8; 32];
            let ta = AeadInOut::encrypt_inout_detached(
                &a,
                &nonce(0).into(),
                &[],
                x.as_mut_slice().into(),
            );
            let tb = AeadInOut::encrypt_inout_detached(
                &b,
                &nonce(0).into(),
                &[],
                y.as_mut_slice().into(),
            );
            ta.ok() == tb.ok() && x == y
        }
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
        let (f, b) = okm.split_at(64);
        let (sf, af) = f.split_at(32);
        let (sb, ab) = b.split_at(32);
        Self {
            fwd: DirLayer::new(sf, af),
            bwd: DirLayer::new(sb, ab),
        }
    }

    #[cfg(test)]
    pub(crate) fn same_keys_as(&self, o: &HopKeys) -> bool {
        self.fwd.same_keys_as(&o.fwd) && self.bwd.same_keys_as(&o.bwd)
    }
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
            a.fwd.seal(&mut body).unwrap();
            assert_ne!(&body[..496], &[i; 496][..]);
            assert!(b.fwd.try_open(&mut body).unwrap());
            assert_eq!(&body[..496], &[i; 496][..]);
        }
        // Out of step: sealed with counter 100, opened with 101 fails and
        // leaves the body and the counter alone.
        let mut body = vec![0; 512];
        a.fwd.seal(&mut body).unwrap();
        let mut skipped = vec![0; 512];
        a.fwd.seal(&mut skipped).unwrap();
        let before = skipped.clone();
        assert!(!b.fwd.try_open(&mut skipped).unwrap());
        assert_eq!(skipped, before);
        assert!(b.fwd.try_open(&mut body).unwrap());
        assert!(b.fwd.try_open(&mut skipped).unwrap());
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
    fn directions_and_kinds_use_different_keys() {
        let k = keys(3);
        assert!(*k.fwd.stream_key != *k.bwd.stream_key);
        assert!(!k.fwd.same_keys_as(&k.bwd));
        assert!(!keys(3).same_keys_as(&keys(4)));
    }

    #[test]
    fn counter_exhaustion_is_an_error() {
        let mut k = keys(5);
        k.fwd.stream_ctr = u64::MAX;
        assert_eq!(
            k.fwd.apply_stream(&mut [0u8; 512]).unwrap_err(),
            CircuitError::CounterExhausted
        );
    }
}
