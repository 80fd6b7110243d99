//! Node identity keys, domain-separated signatures, and protocol time.
//!
//! Every signature in VX6 is over `u8(len(tag)) || tag || body` where `tag`
//! is an ASCII domain string such as `vx6/v1/node-record` (PROTOCOL.md §2).
//! The length byte keeps one tag from being a prefix of another.
//! Secret keys zeroize on drop and have no `Display`/`Debug` that leaks them.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::id::{NodeId, Signature};
use crate::{Error, Result};

/// Seconds since the Unix epoch. The core never reads a clock: drivers pass
/// the current time in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixTime(pub u64);

impl UnixTime {
    pub fn plus(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }
}

/// HKDF salt of the onion key derivation (PROTOCOL.md §2.2).
pub const ONION_KEY_SALT: &[u8] = b"vx6/v1/onion-key";
/// HKDF info of the onion key derivation.
pub const ONION_KEY_INFO: &[u8] = b"x25519";

/// Fills `buf` from the operating system's CSPRNG.
///
/// Only drivers and key generation call this; state machines take randomness
/// as input so tests stay deterministic.
pub fn fill_random(buf: &mut [u8]) {
    // The OS RNG failing is unrecoverable (no safe fallback for key material).
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("operating system RNG unavailable");
}

/// The message that is actually signed for `tag` and `body`.
pub fn signed_message(tag: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + tag.len() + body.len());
    m.push(tag.len() as u8);
    m.extend_from_slice(tag.as_bytes());
    m.extend_from_slice(body);
    m
}

/// A node's long-term Ed25519 keypair.
pub struct NodeKeypair {
    signing: SigningKey,
}

impl NodeKeypair {
    /// A fresh keypair from the OS RNG.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        fill_random(seed.as_mut());
        Self::from_secret_bytes(&seed)
    }

    /// Rebuilds a keypair from its 32-byte secret seed.
    pub fn from_secret_bytes(seed: &[u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The secret seed, for persisting to the identity file.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn node_id(&self) -> NodeId {
        NodeId::from_bytes(self.signing.verifying_key().to_bytes())
    }

    /// Signs `body` under domain `tag`.
    pub fn sign(&self, tag: &str, body: &[u8]) -> Signature {
        Signature(self.signing.sign(&signed_message(tag, body)).to_bytes())
    }

    /// The X25519 onion (circuit handshake) secret, derived from the
    /// identity seed with HKDF-SHA256 (PROTOCOL.md §2.2), so one secret file
    /// is all there is to protect.
    pub fn onion_secret(&self) -> x25519_dalek::StaticSecret {
        let seed = self.secret_bytes();
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(ONION_KEY_SALT), seed.as_ref());
        let mut okm = Zeroizing::new([0u8; 32]);
        // 32 bytes is always a valid HKDF-SHA256 output length.
        let _ = hk.expand(ONION_KEY_INFO, okm.as_mut());
        x25519_dalek::StaticSecret::from(*okm)
    }

    /// The public half of [`NodeKeypair::onion_secret`], as published in NodeRecords.
    pub fn onion_key(&self) -> crate::id::OnionKey {
        crate::id::OnionKey(x25519_dalek::PublicKey::from(&self.onion_secret()).to_bytes())
    }

    /// The dalek key, for crates that must hand it to TLS.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }
}

impl Clone for NodeKeypair {
    fn clone(&self) -> Self {
        Self::from_secret_bytes(&self.secret_bytes())
    }
}

impl fmt::Debug for NodeKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKeypair({:?})", self.node_id())
    }
}

/// Verifies `sig` by `id` over `body` under domain `tag`.
///
/// Fails with [`Error::KeyMismatch`] when `id` is not a valid Ed25519 key and
/// [`Error::BadSignature`] when the signature does not verify (strict
/// verification: no malleable or small-order signatures).
pub fn verify(id: &NodeId, tag: &str, body: &[u8], sig: &Signature) -> Result<()> {
    let key = VerifyingKey::from_bytes(id.as_bytes()).map_err(|_| Error::KeyMismatch)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify_strict(&signed_message(tag, body), &sig)
        .map_err(|_| Error::BadSignature)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let k = NodeKeypair::from_secret_bytes(&[1u8; 32]);
        let sig = k.sign("vx6/v1/test", b"hello");
        verify(&k.node_id(), "vx6/v1/test", b"hello", &sig).unwrap();
        assert_eq!(
            verify(&k.node_id(), "vx6/v1/other", b"hello", &sig),
            Err(Error::BadSignature)
        );
        assert_eq!(
            verify(&k.node_id(), "vx6/v1/test", b"hellO", &sig),
            Err(Error::BadSignature)
        );
        let other = NodeKeypair::from_secret_bytes(&[2u8; 32]);
        assert_eq!(
            verify(&other.node_id(), "vx6/v1/test", b"hello", &sig),
            Err(Error::BadSignature)
        );
    }

    #[test]
    fn secret_round_trip() {
        let k = NodeKeypair::generate();
        let k2 = NodeKeypair::from_secret_bytes(&k.secret_bytes());
        assert_eq!(k.node_id(), k2.node_id());
    }
}
