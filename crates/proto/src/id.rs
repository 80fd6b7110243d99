//! Typed identifiers: node ids and the public keys that travel in records.
//!
//! A [`NodeId`] *is* the node's Ed25519 public key (32 bytes). Its text form
//! is lowercase base32 without padding (RFC 4648 alphabet, 52 characters);
//! [`NodeId::short`] gives a display prefix. Parsing accepts any case.

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

const B32: data_encoding::Encoding = data_encoding::BASE32_NOPAD;

/// Length of a node id's full text form.
pub const NODE_ID_TEXT_LEN: usize = 52;
/// Length of [`NodeId::short`].
pub const NODE_ID_SHORT_LEN: usize = 12;

/// A node's identity: its Ed25519 public key.
///
/// Holding a `NodeId` says nothing about whether the bytes are a valid curve
/// point; [`crate::identity::verify`] checks that when a signature is checked.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Lowercase base32 prefix for display (not unique; never use as a key).
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(NODE_ID_SHORT_LEN);
        s
    }
    /// True when `prefix` (any case, at least 4 characters) starts this id's text form.
    pub fn matches_prefix(&self, prefix: &str) -> bool {
        prefix.len() >= 4 && self.to_string().starts_with(&prefix.to_ascii_lowercase())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B32.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |why| Error::Invalid {
            what: "node id",
            why,
        };
        if s.len() != NODE_ID_TEXT_LEN {
            return Err(invalid("must be 52 base32 characters"));
        }
        let bytes = B32
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid("not base32"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| invalid("wrong length"))?;
        // Reject non-canonical text (trailing bits set) so one id has one spelling.
        if !B32.encode(&arr).eq_ignore_ascii_case(s) {
            return Err(invalid("non-canonical base32"));
        }
        Ok(Self(arr))
    }
}

/// A node's X25519 onion key, used for circuit handshakes. Published in its
/// NodeRecord so that the handshake authenticates the relay.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OnionKey(pub [u8; 32]);

impl fmt::Debug for OnionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OnionKey({})",
            &B32.encode(&self.0).to_ascii_lowercase()[..8]
        )
    }
}

/// An Ed25519 signature over a domain-separated message.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signature(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let id = NodeId::from_bytes([7u8; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), NODE_ID_TEXT_LEN);
        assert_eq!(s, s.to_ascii_lowercase());
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert_eq!(s.to_ascii_uppercase().parse::<NodeId>().unwrap(), id);
        assert!(id.matches_prefix(&id.short()));
        assert!(!id.matches_prefix("abc"));
    }

    #[test]
    fn rejects_bad_text() {
        assert!("".parse::<NodeId>().is_err());
        assert!("a".repeat(51).parse::<NodeId>().is_err());
        assert!("1".repeat(52).parse::<NodeId>().is_err());
        // last char carries 2 padding bits; setting them is non-canonical
        let mut s = NodeId::from_bytes([0u8; 32]).to_string();
        s.pop();
        s.push('b');
        assert!(s.parse::<NodeId>().is_err());
    }
}
