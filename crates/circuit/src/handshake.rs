//! The circuit handshake (PROTOCOL.md §9.3): ntor-style, one
//! round trip, authenticated by the relay's onion key.
//!
//! The client knows the relay's node id `ID` and onion key `B` from the
//! relay's signed NodeRecord. It picks an ephemeral `x`, sends `X = x·G`.
//! The relay picks an ephemeral `y` and computes
//!
//! ```text
//! secret_input = X^y || X^b || ID || B || X || Y || PROTOID
//! ```
//!
//! (the client computes the same bytes as `Y^x || B^x || ...`), then
//!
//! ```text
//! H(key, msg)  = HMAC-SHA256(key, msg)
//! verify       = H(PROTOID ":verify", secret_input)
//! auth         = H(PROTOID ":mac", verify || ID || B || Y || X || PROTOID || "server")
//! prk          = H(PROTOID ":key_extract", secret_input)      = HKDF-Extract(salt, IKM)
//! keys         = HKDF-Expand(prk, PROTOID ":key_expand", 96)
//!              = Sf[16] || Af[32] || Sb[16] || Ab[32]
//! ```
//!
//! with `PROTOID = "vx6/v1/circuit-ntor"`. Only the holder of `b` can compute
//! `X^b`, so a matching `auth` proves the client talks to the node whose
//! record it used; the ephemeral `X^y` gives forward secrecy. Either side
//! refuses a handshake in which `X^y`, `X^b` (relay) or `Y^x`, `B^x`
//! (client) is all zero: a low-order point would make the "shared" secret
//! known to everyone.
//!
//! This module never sends anything and keeps no state beyond one pending
//! client handshake; randomness is passed in.

use std::fmt;

use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use vx6_proto::NodeId;
use vx6_proto::id::OnionKey;

use crate::cell::{AUTH_LEN, Create, Created, HandshakeType};
use crate::layer::HopKeys;
use crate::{CircuitError, Result};

/// The protocol id that ends `secret_input` and prefixes every label.
pub const PROTOID: &[u8] = b"vx6/v1/circuit-ntor";
const T_VERIFY: &[u8] = b"vx6/v1/circuit-ntor:verify";
const T_MAC: &[u8] = b"vx6/v1/circuit-ntor:mac";
const T_KEY_EXTRACT: &[u8] = b"vx6/v1/circuit-ntor:key_extract";
const T_KEY_EXPAND: &[u8] = b"vx6/v1/circuit-ntor:key_expand";
const SERVER: &[u8] = b"server";

/// Bytes of key material the handshake yields (four 32-byte keys).
pub const KEY_MATERIAL_LEN: usize = 96;

/// `Sf || Af || Sb || Ab`, zeroized on drop.
pub(crate) type KeyMaterial = Zeroizing<[u8; KEY_MATERIAL_LEN]>;

/// HMAC-SHA256(key, msg). HKDF-Extract(salt, ikm) is defined as
/// HMAC-Hash(salt, ikm) (RFC 5869 §2.2), so this is HMAC exactly.
fn hmac(key: &[u8], msg: &[u8]) -> Zeroizing<[u8; 32]> {
    let (prk, _) = Hkdf::<Sha256>::extract(Some(key), msg);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&prk);
    out
}

fn secret_from_rng(rng: &mut impl FnMut(&mut [u8])) -> StaticSecret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng(bytes.as_mut());
    StaticSecret::from(*bytes)
}

fn contributory(s: &SharedSecret) -> Result<()> {
    if s.was_contributory() {
        Ok(())
    } else {
        Err(CircuitError::Handshake)
    }
}

/// Both sides' shared computation: from the two DH outputs and the public
/// transcript to (key material, auth).
fn derive(
    xy: &SharedSecret,
    xb: &SharedSecret,
    id: &NodeId,
    b: &[u8; 32],
    x_pub: &[u8; 32],
    y_pub: &[u8; 32],
) -> Result<(KeyMaterial, Zeroizing<[u8; AUTH_LEN]>)> {
    let mut secret_input = Zeroizing::new(Vec::with_capacity(32 * 6 + PROTOID.len()));
    secret_input.extend_from_slice(xy.as_bytes());
    secret_input.extend_from_slice(xb.as_bytes());
    secret_input.extend_from_slice(id.as_bytes());
    secret_input.extend_from_slice(b);
    secret_input.extend_from_slice(x_pub);
    secret_input.extend_from_slice(y_pub);
    secret_input.extend_from_slice(PROTOID);

    let verify = hmac(T_VERIFY, &secret_input);
    let mut auth_input = Vec::with_capacity(32 * 5 + PROTOID.len() + SERVER.len());
    auth_input.extend_from_slice(verify.as_ref());
    auth_input.extend_from_slice(id.as_bytes());
    auth_input.extend_from_slice(b);
    auth_input.extend_from_slice(y_pub);
    auth_input.extend_from_slice(x_pub);
    auth_input.extend_from_slice(PROTOID);
    auth_input.extend_from_slice(SERVER);
    let auth = hmac(T_MAC, &auth_input);
    auth_input.zeroize();

    let prk = hmac(T_KEY_EXTRACT, &secret_input);
    let hk = Hkdf::<Sha256>::from_prk(prk.as_ref()).map_err(|_| CircuitError::Handshake)?;
    let mut okm = Zeroizing::new([0u8; KEY_MATERIAL_LEN]);
    hk.expand(T_KEY_EXPAND, okm.as_mut())
        .map_err(|_| CircuitError::Handshake)?;
    Ok((okm, auth))
}

/// The client's pending half of one handshake: the ephemeral secret and
/// what it was sent to. Zeroized on drop; no Debug that shows the secret.
pub struct ClientHandshake {
    x: StaticSecret,
    x_pub: [u8; 32],
    relay: NodeId,
    onion_key: OnionKey,
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientHandshake(to {:?})", self.relay)
    }
}

impl ClientHandshake {
    /// Starts a handshake with `relay`, whose signed record published
    /// `onion_key`. `rng` fills 32 bytes for the ephemeral secret.
    pub fn start(
        relay: NodeId,
        onion_key: &OnionKey,
        rng: &mut impl FnMut(&mut [u8]),
    ) -> (Self, Create) {
        let x = secret_from_rng(rng);
        let x_pub = PublicKey::from(&x).to_bytes();
        let create = Create {
            htype: HandshakeType::NtorV1,
            client_pk: x_pub,
        };
        (
            Self {
                x,
                x_pub,
                relay,
                onion_key: *onion_key,
            },
            create,
        )
    }

    /// The relay this handshake is with.
    pub fn relay(&self) -> NodeId {
        self.relay
    }

    /// Checks the relay's CREATED and derives the hop keys. Fails when
    /// the auth does not match (wrong key, wrong id, tampered reply) or a
    /// shared secret is all zero.
    pub(crate) fn finish(self, created: &Created) -> Result<HopKeys> {
        let y = PublicKey::from(created.relay_pk);
        let b = PublicKey::from(self.onion_key.0);
        let yx = self.x.diffie_hellman(&y);
        let bx = self.x.diffie_hellman(&b);
        contributory(&yx)?;
        contributory(&bx)?;
        let (okm, auth) = derive(
            &yx,
            &bx,
            &self.relay,
            &self.onion_key.0,
            &self.x_pub,
            &created.relay_pk,
        )?;
        if bool::from(auth.as_ref().ct_eq(&created.auth)) {
            Ok(HopKeys::from_key_material(&okm))
        } else {
            Err(CircuitError::Handshake)
        }
    }
}

/// The relay's side: answers `create` with its onion secret `b` (whose
/// public half is in its record, with node id `my_id`). `rng` fills 32
/// bytes for the ephemeral secret.
pub(crate) fn relay_handshake(
    onion_secret: &StaticSecret,
    my_id: &NodeId,
    create: &Create,
    rng: &mut impl FnMut(&mut [u8]),
) -> Result<(HopKeys, Created)> {
    let (okm, created) = relay_key_material(onion_secret, my_id, create, rng)?;
    Ok((HopKeys::from_key_material(&okm), created))
}

/// [`relay_handshake`] up to the key material (`Sf || Af || Sb || Ab`).
pub(crate) fn relay_key_material(
    onion_secret: &StaticSecret,
    my_id: &NodeId,
    create: &Create,
    rng: &mut impl FnMut(&mut [u8]),
) -> Result<(KeyMaterial, Created)> {
    match create.htype {
        HandshakeType::NtorV1 => {}
    }
    let x = PublicKey::from(create.client_pk);
    let y = secret_from_rng(rng);
    let y_pub = PublicKey::from(&y).to_bytes();
    let b_pub = PublicKey::from(onion_secret).to_bytes();
    let xy = y.diffie_hellman(&x);
    let xb = onion_secret.diffie_hellman(&x);
    contributory(&xy)?;
    contributory(&xb)?;
    let (okm, auth) = derive(&xy, &xb, my_id, &b_pub, &create.client_pk, &y_pub)?;
    Ok((
        okm,
        Created {
            relay_pk: y_pub,
            auth: *auth,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn seeded_rng(seed: u64) -> impl FnMut(&mut [u8]) {
        let mut state = seed;
        move |buf: &mut [u8]| {
            for b in buf {
                // splitmix64, test-only
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                *b = (z ^ (z >> 31)) as u8;
            }
        }
    }

    fn relay_keys(seed: u8) -> (NodeId, StaticSecret, OnionKey) {
        let b = StaticSecret::from([seed; 32]);
        let pk = OnionKey(PublicKey::from(&b).to_bytes());
        (NodeId::from_bytes([seed.wrapping_add(100); 32]), b, pk)
    }

    #[test]
    fn both_sides_derive_the_same_keys() {
        let mut rng = seeded_rng(1);
        let (id, b, pk) = relay_keys(1);
        let (hs, create) = ClientHandshake::start(id, &pk, &mut rng);
        let (mut relay_keys, created) = relay_handshake(&b, &id, &create, &mut rng).unwrap();
        let mut client_keys = hs.finish(&created).unwrap();
        assert!(client_keys.same_keys_as(&mut relay_keys));
    }

    #[test]
    fn fresh_handshakes_give_fresh_keys() {
        let mut rng = seeded_rng(2);
        let (id, b, pk) = relay_keys(2);
        let (_, c1) = ClientHandshake::start(id, &pk, &mut rng);
        let (mut k1, _) = relay_handshake(&b, &id, &c1, &mut rng).unwrap();
        let (_, c2) = ClientHandshake::start(id, &pk, &mut rng);
        let (mut k2, _) = relay_handshake(&b, &id, &c2, &mut rng).unwrap();
        assert!(!k1.same_keys_as(&mut k2));
    }

    #[test]
    fn wrong_onion_key_fails() {
        let mut rng = seeded_rng(3);
        let (id, b, _) = relay_keys(3);
        let (_, _, other_pk) = relay_keys(4);
        // The client believes the relay's key is other_pk; the relay holds b.
        let (hs, create) = ClientHandshake::start(id, &other_pk, &mut rng);
        let (_, created) = relay_handshake(&b, &id, &create, &mut rng).unwrap();
        assert_eq!(hs.finish(&created).unwrap_err(), CircuitError::Handshake);
    }

    #[test]
    fn wrong_node_id_fails() {
        let mut rng = seeded_rng(5);
        let (id, b, pk) = relay_keys(5);
        let (hs, create) = ClientHandshake::start(NodeId::from_bytes([0xEE; 32]), &pk, &mut rng);
        let (_, created) = relay_handshake(&b, &id, &create, &mut rng).unwrap();
        assert_eq!(hs.finish(&created).unwrap_err(), CircuitError::Handshake);
    }

    #[test]
    fn tampered_created_fails() {
        let mut rng = seeded_rng(6);
        let (id, b, pk) = relay_keys(6);
        for i in 0..64 {
            let (hs, create) = ClientHandshake::start(id, &pk, &mut rng);
            let (_, created) = relay_handshake(&b, &id, &create, &mut rng).unwrap();
            let mut raw = created.encode();
            raw[i] ^= 1 << (i % 8);
            let bad = Created::decode(&raw).unwrap();
            assert_eq!(
                hs.finish(&bad).unwrap_err(),
                CircuitError::Handshake,
                "byte {i}"
            );
        }
    }

    #[test]
    fn tampered_create_gives_no_matching_keys() {
        // A flipped X makes the relay derive keys the client never gets:
        // the client's auth check fails.
        let mut rng = seeded_rng(7);
        let (id, b, pk) = relay_keys(7);
        let (hs, mut create) = ClientHandshake::start(id, &pk, &mut rng);
        create.client_pk[5] ^= 0x10;
        if let Ok((_, created)) = relay_handshake(&b, &id, &create, &mut rng) {
            assert!(hs.finish(&created).is_err());
        }
    }

    /// The canonical low-order points of Curve25519 (u-coordinates), all of
    /// which give an all-zero X25519 output.
    fn low_order_points() -> Vec<[u8; 32]> {
        let mut zero = [0u8; 32];
        let mut one = [0u8; 32];
        one[0] = 1;
        // Order-8 point.
        let p8: [u8; 32] = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        // p - 1 (order 2 on the twist side collapses to zero too).
        let mut pm1 = [0xffu8; 32];
        pm1[0] = 0xec;
        pm1[31] = 0x7f;
        zero[0] = 0;
        vec![zero, one, p8, pm1]
    }

    #[test]
    fn low_order_client_key_rejected_by_relay() {
        let mut rng = seeded_rng(8);
        let (id, b, _) = relay_keys(8);
        for p in low_order_points() {
            let create = Create {
                htype: HandshakeType::NtorV1,
                client_pk: p,
            };
            assert_eq!(
                relay_handshake(&b, &id, &create, &mut rng).unwrap_err(),
                CircuitError::Handshake
            );
        }
    }

    #[test]
    fn low_order_relay_keys_rejected_by_client() {
        let mut rng = seeded_rng(9);
        let (id, _, pk) = relay_keys(9);
        for p in low_order_points() {
            // Low-order Y.
            let (hs, _) = ClientHandshake::start(id, &pk, &mut rng);
            let created = Created {
                relay_pk: p,
                auth: [0; 32],
            };
            assert_eq!(hs.finish(&created).unwrap_err(), CircuitError::Handshake);
            // Low-order onion key B in a (malicious) record.
            let (hs, _) = ClientHandshake::start(id, &OnionKey(p), &mut rng);
            let created = Created {
                relay_pk: PublicKey::from(&StaticSecret::from([1; 32])).to_bytes(),
                auth: [0; 32],
            };
            assert_eq!(hs.finish(&created).unwrap_err(), CircuitError::Handshake);
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let mut rng = seeded_rng(10);
        let (id, _, pk) = relay_keys(10);
        let (hs, create) = ClientHandshake::start(id, &pk, &mut rng);
        let s = format!("{hs:?} {create:?}");
        assert!(!s.contains(&format!("{:?}", create.client_pk)));
        assert!(!s.contains(&format!("{:?}", hs.x.to_bytes())));
    }
}
