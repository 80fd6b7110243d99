//! Deterministic test vectors for PROTOCOL.md, generated from the code.
//!
//! Owns the fixed inputs (seeds, times, names, addresses) behind the vectors
//! printed in `docs/PROTOCOL.md` §4.7 and the function that turns them into
//! bytes. It never reads a clock or an RNG: Ed25519 signatures are
//! deterministic, so the same code always yields the same vectors. The test
//! `crates/proto/tests/vectors.rs` compares these with the document
//! (`VX6_WRITE_VECTORS=1` rewrites the document from the code).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Result;
use crate::id::OnionKey;
use crate::identity::{self, NodeKeypair, UnixTime};
use crate::name::{NodeName, ServiceName};
use crate::record::{
    Capabilities, Endpoint, NameClaim, NodeRecord, RecordBody, ServiceRecord, TransportKind,
    Visibility,
};

/// Secret seed of the node keypair every vector is signed with.
pub const NODE_SEED: [u8; 32] = [1u8; 32];
/// X25519 secret whose public key is the vector NodeRecord's onion key.
pub const ONION_SEED: [u8; 32] = [2u8; 32];
/// Issue time of every vector record (2023-11-14T22:13:20Z).
pub const ISSUED: UnixTime = UnixTime(1_700_000_000);
/// Expiry of every vector record: one day after [`ISSUED`].
pub const EXPIRES: UnixTime = UnixTime(1_700_000_000 + 86_400);

/// One named test vector. `value` is lowercase hex, except for vectors whose
/// name ends in `-text`, whose value is the text itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vector {
    pub name: &'static str,
    pub value: String,
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

/// The NodeRecord the vectors are made from: name `alice`, endpoints
/// `tcp [2001:db8::1]:4433`, `quic [2001:db8::1]:4433`, `tcp 192.0.2.1:4433`,
/// both capabilities, seq 1.
pub fn node_record() -> Result<NodeRecord> {
    let key = NodeKeypair::from_secret_bytes(&NODE_SEED);
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    let onion = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(ONION_SEED));
    Ok(NodeRecord {
        node: key.node_id(),
        name: Some(NodeName::new("alice")?),
        endpoints: vec![
            Endpoint {
                transport: TransportKind::Tcp,
                addr: SocketAddr::new(v6, 4433),
            },
            Endpoint {
                transport: TransportKind::Quic,
                addr: SocketAddr::new(v6, 4433),
            },
            Endpoint {
                transport: TransportKind::Tcp,
                addr: SocketAddr::new(v4, 4433),
            },
        ],
        onion_key: OnionKey(onion.to_bytes()),
        caps: Capabilities(Capabilities::RELAY | Capabilities::DHT),
        seq: 1,
        issued: ISSUED,
        expires: EXPIRES,
    })
}

/// The ServiceRecord the vectors are made from: service `web`, public, seq 7.
pub fn service_record() -> Result<ServiceRecord> {
    Ok(ServiceRecord {
        node: NodeKeypair::from_secret_bytes(&NODE_SEED).node_id(),
        service: ServiceName::new("web")?,
        visibility: Visibility::Public,
        seq: 7,
        issued: ISSUED,
        expires: EXPIRES,
    })
}

/// The NameClaim the vectors are made from: `alice`, seq 1.
pub fn name_claim() -> Result<NameClaim> {
    Ok(NameClaim {
        name: NodeName::new("alice")?,
        node: NodeKeypair::from_secret_bytes(&NODE_SEED).node_id(),
        seq: 1,
        issued: ISSUED,
        expires: EXPIRES,
    })
}

/// Every vector, in the order PROTOCOL.md lists them.
pub fn generate() -> Result<Vec<Vector>> {
    let key = NodeKeypair::from_secret_bytes(&NODE_SEED);
    let id = key.node_id();
    let node = node_record()?;
    let node_body = node.body_bytes();
    let node_msg = identity::signed_message(NodeRecord::TAG, &node_body);
    let node_signed = node.sign(&key)?;
    let service_signed = service_record()?.sign(&key)?;
    let claim_signed = name_claim()?.sign(&key)?;
    Ok(vec![
        Vector {
            name: "node-id",
            value: hex(id.as_bytes()),
        },
        Vector {
            name: "node-id-text",
            value: id.to_string(),
        },
        Vector {
            name: "node-record-body",
            value: hex(&node_body),
        },
        Vector {
            name: "node-record-signed-message",
            value: hex(&node_msg),
        },
        Vector {
            name: "node-record-signed",
            value: hex(&node_signed.encode()),
        },
        Vector {
            name: "service-record-signed",
            value: hex(&service_signed.encode()),
        },
        Vector {
            name: "name-claim-signed",
            value: hex(&claim_signed.encode()),
        },
    ])
}
