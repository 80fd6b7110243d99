//! DHT wire messages and record keys (PROTOCOL.md §7).
//!
//! Owns the typed PING / FIND_NODE / FIND_VALUE / STORE requests, their
//! responses, their canonical byte encoding, and the derivation of the 256-bit
//! [`DhtKey`]s records are stored under. It must never interpret a value
//! beyond its length: admission (signature, key/content match, seq, expiry,
//! rate limits) is the `vx6-dht` crate's job. Peers in responses travel as
//! signed NodeRecords, decoded structurally here and verified by the receiver,
//! which treats them as *candidates* until it has contacted them.
//!
//! # Record keys
//!
//! ```text
//! DhtKey = SHA-256( u8(14) || "vx6/v1/dht-key" || u8(family) || subject )
//!
//! family  subject
//! 1 node record     node_id[32]
//! 2 name claim      u8(len) || name            (canonical lowercase, 1..=32 bytes)
//! 3 service record  node_id[32] || u8(len) || service name
//! 4 hidden desc.    reserved (not yet defined)
//! ```
//!
//! A node's own position in the key space is `DhtKey::for_node(node_id)`, so
//! the nodes closest to a node are also the holders of its node record.
//! Distance is XOR, compared as a 256-bit big-endian unsigned integer.
//!
//! # Message layout
//!
//! All integers are big-endian. Every message is
//!
//! ```text
//! message = u8 version (= 1) || u8 type || body         (≤ 32768 bytes in total)
//! ```
//!
//! and decoding rejects an unknown version or type, any length or count over
//! its limit, truncated input and trailing bytes. Requests use types
//! `0x01..=0x04`, responses `0x81..=0x85`, so one can never be read as the
//! other.
//!
//! ```text
//! type  message        body
//! 0x01  PING           (empty)
//! 0x02  FIND_NODE      target[32]
//! 0x03  FIND_VALUE     key[32]
//! 0x04  STORE          key[32] || u8 family || u16 len || value[len]        len ≤ 1024
//!
//! 0x81  PONG           (empty)
//! 0x82  NODES          u8 n || n × (u16 len || signed_node_record[len])    n ≤ 20, len ≤ 1024
//! 0x83  VALUE          u8 v || v × (u16 len || value[len])                 v ≤ 8,  len ≤ 1024
//!                      u8 n || n × (u16 len || signed_node_record[len])    n ≤ 20, len ≤ 1024
//! 0x84  STORE_RESULT   u8 code        0 = accepted, else a reject reason (below)
//! 0x85  ERROR          u8 code        1 malformed, 2 unsupported, 3 busy, 4 internal
//! ```
//!
//! `signed_node_record` is the encoding of `Signed<NodeRecord>` (PROTOCOL.md
//! §4): body || signature. A VALUE response always carries the responder's
//! closest known nodes too, whether or not it had values, so a lookup can go
//! on collecting (e.g. every signer of a clashing name).
//!
//! STORE reject reasons:
//!
//! ```text
//!  1 malformed          value does not decode as the family's record
//!  2 unsupported-family family is reserved or not stored by this holder
//!  3 too-large          value over 1024 bytes
//!  4 key-mismatch       key is not the hash of the record's subject
//!  5 bad-signature      signature does not verify (or the signer key is invalid)
//!  6 expired            record has expired
//!  7 bad-lifetime       issued in the future or lifetime out of range
//!  8 stale              seq not newer than the held one (same seq, same bytes is accepted)
//!  9 rate-limited       sender or its address prefix is over its rate limit
//! 10 too-many-signers   the key already holds claims from the most signers allowed
//! 11 store-full         the holder is full of values closer to it than this one
//! ```

use std::fmt;

use sha2::{Digest, Sha256};

use crate::bytes::{Reader, Writer};
use crate::id::NodeId;
use crate::name::{NodeName, ServiceName};
use crate::record::{MAX_RECORD_LEN, NodeRecord, Signed};
use crate::{Error, Result};

/// Domain tag hashed into every [`DhtKey`].
pub const DHT_KEY_TAG: &str = "vx6/v1/dht-key";
/// The one message version this code speaks.
pub const DHT_MSG_VERSION: u8 = 1;
/// Most peers in one NODES or VALUE response (Kademlia's k).
pub const MAX_NODES_PER_RESPONSE: usize = 20;
/// Most values one key holds, and so one VALUE response carries.
pub const MAX_VALUES_PER_KEY: usize = 8;
/// Largest value (an encoded signed record).
pub const MAX_VALUE_LEN: usize = MAX_RECORD_LEN;
/// Largest encoded message of either direction.
pub const MAX_DHT_MESSAGE_LEN: usize = 32 * 1024;

/// A 256-bit position in the DHT key space: where a record is stored and
/// where a node sits (`DhtKey::for_node`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DhtKey(pub [u8; 32]);

impl DhtKey {
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn derive(family: RecordFamily, subject: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update([DHT_KEY_TAG.len() as u8]);
        h.update(DHT_KEY_TAG.as_bytes());
        h.update([family.code()]);
        h.update(subject);
        Self(h.finalize().into())
    }

    /// Key of a node's record, and the node's own position in the key space.
    pub fn for_node(id: &NodeId) -> Self {
        Self::derive(RecordFamily::NodeRecord, id.as_bytes())
    }

    /// Key under which every claim on `name` is stored.
    pub fn for_name(name: &NodeName) -> Self {
        let mut w = Writer::with_capacity(33);
        w.bytes8(name.as_str().as_bytes());
        Self::derive(RecordFamily::NameClaim, w.as_slice())
    }

    /// Key of `service`'s record on node `id`.
    pub fn for_service(id: &NodeId, service: &ServiceName) -> Self {
        let mut w = Writer::with_capacity(65);
        w.raw(id.as_bytes()).bytes8(service.as_str().as_bytes());
        Self::derive(RecordFamily::ServiceRecord, w.as_slice())
    }

    /// XOR distance to `other`.
    pub fn distance(&self, other: &DhtKey) -> Distance {
        let mut d = [0u8; 32];
        for ((o, a), b) in d.iter_mut().zip(self.0.iter()).zip(other.0.iter()) {
            *o = a ^ b;
        }
        Distance(d)
    }
}

impl fmt::Display for DhtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DhtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DhtKey(")?;
        for b in self.0.iter().take(6) {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..)")
    }
}

/// XOR distance between two keys; `Ord` is the 256-bit big-endian order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Distance(pub [u8; 32]);

impl Distance {
    pub const ZERO: Distance = Distance([0u8; 32]);

    /// Number of leading zero bits (256 for distance zero). Kademlia buckets
    /// are indexed by this: a higher count means closer.
    pub fn leading_zeros(&self) -> u32 {
        let mut n = 0;
        for b in self.0 {
            if b != 0 {
                return n + b.leading_zeros();
            }
            n += 8;
        }
        n
    }
}

/// What kind of record a value is; part of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordFamily {
    NodeRecord,
    NameClaim,
    ServiceRecord,
    /// Reserved for hidden-service descriptors; not yet stored.
    HiddenDescriptor,
}

impl RecordFamily {
    pub const fn code(self) -> u8 {
        match self {
            Self::NodeRecord => 1,
            Self::NameClaim => 2,
            Self::ServiceRecord => 3,
            Self::HiddenDescriptor => 4,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(Self::NodeRecord),
            2 => Ok(Self::NameClaim),
            3 => Ok(Self::ServiceRecord),
            4 => Ok(Self::HiddenDescriptor),
            t => Err(Error::UnknownTag {
                what: "record family",
                tag: t.into(),
            }),
        }
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NodeRecord => "node-record",
            Self::NameClaim => "name-claim",
            Self::ServiceRecord => "service-record",
            Self::HiddenDescriptor => "hidden-descriptor",
        }
    }
}

/// Why a holder refused a STORE. Codes are in the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    Malformed,
    UnsupportedFamily,
    TooLarge,
    KeyMismatch,
    BadSignature,
    Expired,
    BadLifetime,
    Stale,
    RateLimited,
    TooManySigners,
    StoreFull,
}

impl RejectReason {
    /// Every reason, in code order (for per-reason counters).
    pub const ALL: [RejectReason; 11] = [
        Self::Malformed,
        Self::UnsupportedFamily,
        Self::TooLarge,
        Self::KeyMismatch,
        Self::BadSignature,
        Self::Expired,
        Self::BadLifetime,
        Self::Stale,
        Self::RateLimited,
        Self::TooManySigners,
        Self::StoreFull,
    ];

    pub const fn code(self) -> u8 {
        match self {
            Self::Malformed => 1,
            Self::UnsupportedFamily => 2,
            Self::TooLarge => 3,
            Self::KeyMismatch => 4,
            Self::BadSignature => 5,
            Self::Expired => 6,
            Self::BadLifetime => 7,
            Self::Stale => 8,
            Self::RateLimited => 9,
            Self::TooManySigners => 10,
            Self::StoreFull => 11,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| r.code() == c)
            .ok_or(Error::UnknownTag {
                what: "store reject reason",
                tag: c.into(),
            })
    }
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedFamily => "unsupported-family",
            Self::TooLarge => "too-large",
            Self::KeyMismatch => "key-mismatch",
            Self::BadSignature => "bad-signature",
            Self::Expired => "expired",
            Self::BadLifetime => "bad-lifetime",
            Self::Stale => "stale",
            Self::RateLimited => "rate-limited",
            Self::TooManySigners => "too-many-signers",
            Self::StoreFull => "store-full",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a STORE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    Accepted,
    Rejected(RejectReason),
}

/// Why a responder could not answer at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request did not decode.
    Malformed,
    /// Unknown version or message type.
    Unsupported,
    /// Overloaded or rate-limited; retry later or elsewhere.
    Busy,
    /// The responder failed; not the requester's fault.
    Internal,
}

impl ErrorCode {
    pub const fn code(self) -> u8 {
        match self {
            Self::Malformed => 1,
            Self::Unsupported => 2,
            Self::Busy => 3,
            Self::Internal => 4,
        }
    }
    pub fn from_code(c: u8) -> Result<Self> {
        match c {
            1 => Ok(Self::Malformed),
            2 => Ok(Self::Unsupported),
            3 => Ok(Self::Busy),
            4 => Ok(Self::Internal),
            t => Err(Error::UnknownTag {
                what: "dht error code",
                tag: t.into(),
            }),
        }
    }
}

/// A DHT request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Ping,
    FindNode {
        target: DhtKey,
    },
    FindValue {
        key: DhtKey,
    },
    Store {
        key: DhtKey,
        family: RecordFamily,
        value: Vec<u8>,
    },
}

/// A DHT response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Pong,
    /// The responder's closest known nodes to the target (candidates).
    Nodes(Vec<Signed<NodeRecord>>),
    /// Values held under the key (possibly none) and closer candidates.
    Value {
        values: Vec<Vec<u8>>,
        closer: Vec<Signed<NodeRecord>>,
    },
    StoreResult(StoreOutcome),
    Error(ErrorCode),
}

const T_PING: u8 = 0x01;
const T_FIND_NODE: u8 = 0x02;
const T_FIND_VALUE: u8 = 0x03;
const T_STORE: u8 = 0x04;
const T_PONG: u8 = 0x81;
const T_NODES: u8 = 0x82;
const T_VALUE: u8 = 0x83;
const T_STORE_RESULT: u8 = 0x84;
const T_ERROR: u8 = 0x85;

fn check_len(what: &'static str, len: usize, max: usize) -> Result<()> {
    if len > max {
        Err(Error::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

fn finish_message(w: Writer) -> Result<Vec<u8>> {
    check_len("dht message", w.len(), MAX_DHT_MESSAGE_LEN)?;
    Ok(w.into_vec())
}

/// Opens a message: checks the total length, version, and returns its type.
fn open_message(bytes: &[u8]) -> Result<(u8, Reader<'_>)> {
    check_len("dht message", bytes.len(), MAX_DHT_MESSAGE_LEN)?;
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != DHT_MSG_VERSION {
        return Err(Error::UnknownTag {
            what: "dht message version",
            tag: version.into(),
        });
    }
    let ty = r.u8()?;
    Ok((ty, r))
}

fn encode_nodes(w: &mut Writer, nodes: &[Signed<NodeRecord>]) -> Result<()> {
    check_len("node list", nodes.len(), MAX_NODES_PER_RESPONSE)?;
    w.u8(nodes.len() as u8);
    for n in nodes {
        let b = n.encode();
        check_len("node record", b.len(), MAX_RECORD_LEN)?;
        w.bytes16(&b);
    }
    Ok(())
}

fn decode_nodes(r: &mut Reader<'_>) -> Result<Vec<Signed<NodeRecord>>> {
    let n = r.u8()? as usize;
    check_len("node list", n, MAX_NODES_PER_RESPONSE)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Signed::<NodeRecord>::decode(
            r.bytes16(MAX_RECORD_LEN, "node record")?,
        )?);
    }
    Ok(out)
}

impl Request {
    /// Canonical encoding. Fails only when a field is over its limit (a
    /// caller bug: the decoder would reject the result).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut w = Writer::with_capacity(64);
        w.u8(DHT_MSG_VERSION);
        match self {
            Self::Ping => {
                w.u8(T_PING);
            }
            Self::FindNode { target } => {
                w.u8(T_FIND_NODE).raw(target.as_bytes());
            }
            Self::FindValue { key } => {
                w.u8(T_FIND_VALUE).raw(key.as_bytes());
            }
            Self::Store { key, family, value } => {
                check_len("value", value.len(), MAX_VALUE_LEN)?;
                w.u8(T_STORE)
                    .raw(key.as_bytes())
                    .u8(family.code())
                    .bytes16(value);
            }
        }
        finish_message(w)
    }

    /// Decodes a request; rejects anything not produced by [`Request::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (ty, mut r) = open_message(bytes)?;
        let req = match ty {
            T_PING => Self::Ping,
            T_FIND_NODE => Self::FindNode {
                target: DhtKey(r.array()?),
            },
            T_FIND_VALUE => Self::FindValue {
                key: DhtKey(r.array()?),
            },
            T_STORE => {
                let key = DhtKey(r.array()?);
                let family = RecordFamily::from_code(r.u8()?)?;
                let value = r.bytes16(MAX_VALUE_LEN, "value")?.to_vec();
                Self::Store { key, family, value }
            }
            t => {
                return Err(Error::UnknownTag {
                    what: "dht request type",
                    tag: t.into(),
                });
            }
        };
        r.finish()?;
        Ok(req)
    }

    /// Short name for logs and counters.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::FindNode { .. } => "find-node",
            Self::FindValue { .. } => "find-value",
            Self::Store { .. } => "store",
        }
    }
}

impl Response {
    /// Canonical encoding. Fails only when a list or field is over its limit
    /// (a caller bug: the decoder would reject the result).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut w = Writer::with_capacity(256);
        w.u8(DHT_MSG_VERSION);
        match self {
            Self::Pong => {
                w.u8(T_PONG);
            }
            Self::Nodes(nodes) => {
                w.u8(T_NODES);
                encode_nodes(&mut w, nodes)?;
            }
            Self::Value { values, closer } => {
                w.u8(T_VALUE);
                check_len("value list", values.len(), MAX_VALUES_PER_KEY)?;
                w.u8(values.len() as u8);
                for v in values {
                    check_len("value", v.len(), MAX_VALUE_LEN)?;
                    w.bytes16(v);
                }
                encode_nodes(&mut w, closer)?;
            }
            Self::StoreResult(outcome) => {
                let code = match outcome {
                    StoreOutcome::Accepted => 0,
                    StoreOutcome::Rejected(r) => r.code(),
                };
                w.u8(T_STORE_RESULT).u8(code);
            }
            Self::Error(code) => {
                w.u8(T_ERROR).u8(code.code());
            }
        }
        finish_message(w)
    }

    /// Decodes a response; rejects anything not produced by [`Response::encode`].
    /// Node records are decoded structurally only: verify them before use.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let (ty, mut r) = open_message(bytes)?;
        let resp = match ty {
            T_PONG => Self::Pong,
            T_NODES => Self::Nodes(decode_nodes(&mut r)?),
            T_VALUE => {
                let n = r.u8()? as usize;
                check_len("value list", n, MAX_VALUES_PER_KEY)?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(r.bytes16(MAX_VALUE_LEN, "value")?.to_vec());
                }
                let closer = decode_nodes(&mut r)?;
                Self::Value { values, closer }
            }
            T_STORE_RESULT => Self::StoreResult(match r.u8()? {
                0 => StoreOutcome::Accepted,
                c => StoreOutcome::Rejected(RejectReason::from_code(c)?),
            }),
            T_ERROR => Self::Error(ErrorCode::from_code(r.u8()?)?),
            t => {
                return Err(Error::UnknownTag {
                    what: "dht response type",
                    tag: t.into(),
                });
            }
        };
        r.finish()?;
        Ok(resp)
    }

    /// Short name for logs and counters.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Pong => "pong",
            Self::Nodes(_) => "nodes",
            Self::Value { .. } => "value",
            Self::StoreResult(_) => "store-result",
            Self::Error(_) => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::OnionKey;
    use crate::identity::{NodeKeypair, UnixTime};
    use crate::record::{Capabilities, Endpoint, RecordBody, TransportKind};

    fn record(seed: u8, endpoints: usize) -> Signed<NodeRecord> {
        let k = NodeKeypair::from_secret_bytes(&[seed; 32]);
        NodeRecord {
            node: k.node_id(),
            name: Some(NodeName::new("alice").unwrap()),
            endpoints: (0..endpoints)
                .map(|i| Endpoint {
                    transport: TransportKind::Quic,
                    addr: format!("[2001:db8::{}]:4242", i + 1).parse().unwrap(),
                })
                .collect(),
            onion_key: OnionKey([seed; 32]),
            caps: Capabilities(Capabilities::DHT),
            seq: 1,
            issued: UnixTime(1_000),
            expires: UnixTime(2_000),
        }
        .sign(&k)
        .unwrap()
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Ping,
            Request::FindNode {
                target: DhtKey([1; 32]),
            },
            Request::FindValue {
                key: DhtKey([2; 32]),
            },
            Request::Store {
                key: DhtKey([3; 32]),
                family: RecordFamily::NameClaim,
                value: vec![9; 100],
            },
            Request::Store {
                key: DhtKey([3; 32]),
                family: RecordFamily::NodeRecord,
                value: vec![],
            },
        ]
    }

    fn all_responses() -> Vec<Response> {
        let nodes: Vec<_> = (0..MAX_NODES_PER_RESPONSE as u8)
            .map(|i| record(i, MAX_ENDPOINTS_TEST))
            .collect();
        let mut v = vec![
            Response::Pong,
            Response::Nodes(vec![]),
            Response::Nodes(nodes.clone()),
            Response::Value {
                values: vec![],
                closer: vec![],
            },
            Response::Value {
                values: vec![vec![7; MAX_VALUE_LEN]; MAX_VALUES_PER_KEY],
                closer: nodes,
            },
            Response::StoreResult(StoreOutcome::Accepted),
            Response::Error(ErrorCode::Busy),
        ];
        v.extend(
            RejectReason::ALL
                .iter()
                .map(|r| Response::StoreResult(StoreOutcome::Rejected(*r))),
        );
        v
    }

    const MAX_ENDPOINTS_TEST: usize = crate::record::MAX_ENDPOINTS;

    #[test]
    fn requests_round_trip() {
        for req in all_requests() {
            let b = req.encode().unwrap();
            assert_eq!(Request::decode(&b).unwrap(), req);
            // a request is never a response
            assert!(Response::decode(&b).is_err());
        }
    }

    #[test]
    fn responses_round_trip() {
        for resp in all_responses() {
            let b = resp.encode().unwrap();
            assert!(b.len() <= MAX_DHT_MESSAGE_LEN);
            assert_eq!(Response::decode(&b).unwrap(), resp, "{}", resp.kind());
            assert!(Request::decode(&b).is_err());
        }
    }

    #[test]
    fn largest_value_response_fits() {
        // 8 max-size values and 20 max-endpoint records stay under the message cap
        let resp = &all_responses()[4];
        let b = resp.encode().unwrap();
        assert!(b.len() < MAX_DHT_MESSAGE_LEN, "{}", b.len());
    }

    #[test]
    fn truncated_input_is_rejected() {
        for b in all_requests()
            .iter()
            .map(|r| r.encode().unwrap())
            .chain(all_responses().iter().map(|r| r.encode().unwrap()))
        {
            for cut in 0..b.len() {
                let t = &b[..cut];
                assert!(
                    Request::decode(t).is_err() && Response::decode(t).is_err(),
                    "prefix {cut} of {}",
                    b.len()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        for mut b in all_requests().iter().map(|r| r.encode().unwrap()) {
            b.push(0);
            assert!(matches!(Request::decode(&b), Err(Error::TrailingBytes(1))));
        }
        for mut b in all_responses().iter().map(|r| r.encode().unwrap()) {
            b.push(0);
            assert!(matches!(Response::decode(&b), Err(Error::TrailingBytes(1))));
        }
    }

    #[test]
    fn oversized_input_is_rejected() {
        // too long a value, both ways
        let big = Request::Store {
            key: DhtKey([0; 32]),
            family: RecordFamily::NameClaim,
            value: vec![0; MAX_VALUE_LEN + 1],
        };
        assert!(matches!(big.encode(), Err(Error::TooLong { .. })));
        let mut b = vec![DHT_MSG_VERSION, T_STORE];
        b.extend_from_slice(&[0; 32]);
        b.push(2);
        b.extend_from_slice(&((MAX_VALUE_LEN + 1) as u16).to_be_bytes());
        b.extend(std::iter::repeat_n(0, MAX_VALUE_LEN + 1));
        assert!(matches!(
            Request::decode(&b),
            Err(Error::TooLong { what: "value", .. })
        ));

        // too many nodes / values
        let r = record(1, 1);
        let many = Response::Nodes(vec![r.clone(); MAX_NODES_PER_RESPONSE + 1]);
        assert!(matches!(many.encode(), Err(Error::TooLong { .. })));
        let mut b = Response::Nodes(vec![r.clone(); MAX_NODES_PER_RESPONSE])
            .encode()
            .unwrap();
        b[2] = (MAX_NODES_PER_RESPONSE + 1) as u8;
        assert!(matches!(
            Response::decode(&b),
            Err(Error::TooLong {
                what: "node list",
                ..
            })
        ));
        let vals = Response::Value {
            values: vec![vec![1]; MAX_VALUES_PER_KEY + 1],
            closer: vec![],
        };
        assert!(matches!(vals.encode(), Err(Error::TooLong { .. })));
        let mut b = Response::Value {
            values: vec![vec![1]; MAX_VALUES_PER_KEY],
            closer: vec![],
        }
        .encode()
        .unwrap();
        b[2] = (MAX_VALUES_PER_KEY + 1) as u8;
        assert!(matches!(
            Response::decode(&b),
            Err(Error::TooLong {
                what: "value list",
                ..
            })
        ));

        // whole message over the cap
        let huge = vec![0u8; MAX_DHT_MESSAGE_LEN + 1];
        assert!(matches!(
            Response::decode(&huge),
            Err(Error::TooLong {
                what: "dht message",
                ..
            })
        ));
        assert!(matches!(
            Request::decode(&huge),
            Err(Error::TooLong {
                what: "dht message",
                ..
            })
        ));
    }

    #[test]
    fn unknown_tags_are_rejected() {
        assert!(matches!(
            Request::decode(&[2, T_PING]),
            Err(Error::UnknownTag { .. })
        ));
        assert!(matches!(
            Request::decode(&[1, 0x05]),
            Err(Error::UnknownTag { .. })
        ));
        assert!(matches!(
            Response::decode(&[1, 0x86]),
            Err(Error::UnknownTag { .. })
        ));
        assert!(matches!(
            Response::decode(&[1, T_STORE_RESULT, 12]),
            Err(Error::UnknownTag { .. })
        ));
        assert!(matches!(
            Response::decode(&[1, T_ERROR, 0]),
            Err(Error::UnknownTag { .. })
        ));
        let mut b = vec![1, T_STORE];
        b.extend_from_slice(&[0; 32]);
        b.extend_from_slice(&[9, 0, 0]);
        assert!(matches!(
            Request::decode(&b),
            Err(Error::UnknownTag {
                what: "record family",
                ..
            })
        ));
        assert!(Request::decode(&[]).is_err());
    }

    #[test]
    fn bad_node_record_in_response_is_rejected() {
        let mut b = Response::Nodes(vec![record(1, 1)]).encode().unwrap();
        // corrupt the record's version byte (first byte after count and u16 length)
        b[5] = 9;
        assert!(Response::decode(&b).is_err());
    }

    #[test]
    fn keys_are_domain_separated_and_stable() {
        let id = NodeKeypair::from_secret_bytes(&[1; 32]).node_id();
        let name = NodeName::new("alice").unwrap();
        let svc = ServiceName::new("web").unwrap();
        let keys = [
            DhtKey::for_node(&id),
            DhtKey::for_name(&name),
            DhtKey::for_service(&id, &svc),
        ];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_ne!(keys[1], keys[2]);
        assert_eq!(DhtKey::for_name(&NodeName::new("ALICE").unwrap()), keys[1]);
        assert_ne!(
            DhtKey::for_service(&id, &ServiceName::new("db").unwrap()),
            keys[2]
        );
        // the derivation as documented
        let mut m = vec![14u8];
        m.extend_from_slice(b"vx6/v1/dht-key");
        m.push(2);
        m.push(5);
        m.extend_from_slice(b"alice");
        let want: [u8; 32] = Sha256::digest(&m).into();
        assert_eq!(keys[1].0, want);
    }

    #[test]
    fn distance_metric() {
        let a = DhtKey([0; 32]);
        let mut bb = [0u8; 32];
        bb[0] = 0x10;
        let b = DhtKey(bb);
        assert_eq!(a.distance(&a), Distance::ZERO);
        assert_eq!(a.distance(&a).leading_zeros(), 256);
        assert_eq!(a.distance(&b), b.distance(&a));
        assert_eq!(a.distance(&b).leading_zeros(), 3);
        let mut cc = [0u8; 32];
        cc[31] = 1;
        assert!(a.distance(&DhtKey(cc)) < a.distance(&b));
        assert_eq!(a.distance(&DhtKey(cc)).leading_zeros(), 255);
    }

    #[test]
    fn family_and_codes_round_trip() {
        for f in [
            RecordFamily::NodeRecord,
            RecordFamily::NameClaim,
            RecordFamily::ServiceRecord,
            RecordFamily::HiddenDescriptor,
        ] {
            assert_eq!(RecordFamily::from_code(f.code()).unwrap(), f);
        }
        assert!(RecordFamily::from_code(0).is_err());
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_code(r.code()).unwrap(), r);
        }
        assert!(RejectReason::from_code(0).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_key() -> impl Strategy<Value = DhtKey> {
            any::<[u8; 32]>().prop_map(DhtKey)
        }

        fn arb_request() -> impl Strategy<Value = Request> {
            prop_oneof![
                Just(Request::Ping),
                arb_key().prop_map(|target| Request::FindNode { target }),
                arb_key().prop_map(|key| Request::FindValue { key }),
                (
                    arb_key(),
                    1u8..=4,
                    proptest::collection::vec(any::<u8>(), 0..=MAX_VALUE_LEN)
                )
                    .prop_map(|(key, f, value)| Request::Store {
                        key,
                        family: RecordFamily::from_code(f).unwrap(),
                        value,
                    }),
            ]
        }

        proptest! {
            #[test]
            fn request_round_trip(req in arb_request()) {
                let b = req.encode().unwrap();
                prop_assert_eq!(Request::decode(&b).unwrap(), req);
            }

            #[test]
            fn value_response_round_trip(
                values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..=MAX_VALUES_PER_KEY),
                n in 0usize..4,
            ) {
                let closer: Vec<_> = (0..n as u8).map(|i| record(i, 1)).collect();
                let resp = Response::Value { values, closer };
                let b = resp.encode().unwrap();
                prop_assert_eq!(Response::decode(&b).unwrap(), resp);
            }

            #[test]
            fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Request::decode(&bytes);
                let _ = Response::decode(&bytes);
                // and with a valid header
                let mut m = vec![DHT_MSG_VERSION, bytes.first().copied().unwrap_or(0) | 0x80];
                m.extend_from_slice(&bytes);
                let _ = Response::decode(&m);
            }
        }
    }
}
