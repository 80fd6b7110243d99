//! Deterministic test vectors for PROTOCOL.md, generated from the code.
//!
//! Owns the fixed inputs (seeds, times, names, addresses) behind the vectors
//! printed in `docs/PROTOCOL.md` (§4.7 for records, then link frames §5,
//! transport §6, DHT messages §7 and node RPCs §8) and the function that
//! turns them into bytes. It never reads a clock or an RNG: Ed25519
//! signatures are deterministic, so the same code always yields the same
//! vectors. The test `crates/proto/tests/vectors.rs` compares these with the
//! document (`VX6_WRITE_VECTORS=1` rewrites the document from the code).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::Result;
use crate::dhtmsg::{
    DhtKey, ErrorCode, RecordFamily, RejectReason, Request, Response, StoreOutcome,
};
use crate::id::{NodeId, OnionKey};
use crate::identity::{self, NodeKeypair, UnixTime};
use crate::link::{CircId, Cmd, FrameHeader, StreamId, code};
use crate::name::{NodeName, ServiceName};
use crate::nodemsg::{Purpose, RecordList, SERVICE_ACCEPTED, SyncRequest};
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

/// Payload of the vector PING and PONG frames.
pub const PING_PAYLOAD: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
/// HKDF info of the onion key derivation (PROTOCOL.md §2.2).
pub use crate::identity::ONION_KEY_INFO;
/// HKDF salt of the onion key derivation (PROTOCOL.md §2.2).
pub use crate::identity::ONION_KEY_SALT;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo, everything but the 32 key
/// bytes (RFC 8410). A copy of the constant in `vx6-net`'s `tls` module,
/// which this crate cannot depend on; PROTOCOL.md §6.2.
pub const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// Connection preamble the dialer writes after the TLS handshake. A copy of
/// `vx6-net`'s `transport::PREAMBLE`; PROTOCOL.md §6.4.
pub const PREAMBLE: [u8; 4] = *b"VX6\x01";
/// Suffix of the TLS server names of §6.3. A copy of `vx6-net`'s
/// `tls::SERVER_NAME_SUFFIX`.
pub const SERVER_NAME_SUFFIX: &str = ".vx6.invalid";

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

/// The X25519 onion public key derived from a node's 32-byte identity seed
/// (PROTOCOL.md §2.2): `okm = HKDF-SHA256(salt "vx6/v1/onion-key", IKM seed,
/// info "x25519", L = 32)`, used as the X25519 secret (clamped by X25519).
pub fn onion_public_key(seed: &[u8; 32]) -> OnionKey {
    crate::NodeKeypair::from_secret_bytes(seed).onion_key()
}

/// The raw-public-key "certificate" of `id` (PROTOCOL.md §6.2).
pub fn ed25519_spki(id: &NodeId) -> Vec<u8> {
    let mut v = ED25519_SPKI_PREFIX.to_vec();
    v.extend_from_slice(id.as_bytes());
    v
}

/// A whole frame: header then payload (PROTOCOL.md §5.1).
pub fn frame(cmd: Cmd, stream: u32, payload: &[u8]) -> Vec<u8> {
    let hdr = FrameHeader {
        cmd,
        circ: CircId::DIRECT,
        stream: StreamId(stream),
        len: payload.len() as u32,
    };
    let mut v = hdr.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// The link frames of §5: an OPEN of stream 1 for the service `web`, the
/// owner's accept byte as DATA, stream and channel WINDOWs, FIN, a RESET with
/// code REFUSED, PING, PONG and GOAWAY.
fn frame_vectors() -> Result<Vec<Vector>> {
    let web = Purpose::Service(ServiceName::new("web")?).encode();
    let u32p = |v: u32| v.to_be_bytes();
    Ok(vec![
        vector("frame-open", frame(Cmd::Open, 1, &web)),
        vector("frame-data", frame(Cmd::Data, 1, &[SERVICE_ACCEPTED])),
        vector(
            "frame-window-stream",
            frame(Cmd::Window, 1, &u32p(4 * 1024 * 1024)),
        ),
        vector(
            "frame-window-channel",
            frame(Cmd::Window, 0, &u32p(8 * 1024 * 1024)),
        ),
        vector("frame-fin", frame(Cmd::Fin, 1, &[])),
        vector("frame-reset", frame(Cmd::Reset, 3, &u32p(code::REFUSED))),
        vector("frame-ping", frame(Cmd::Ping, 0, &PING_PAYLOAD)),
        vector("frame-pong", frame(Cmd::Pong, 0, &PING_PAYLOAD)),
        vector("frame-goaway", frame(Cmd::GoAway, 0, &u32p(code::SHUTDOWN))),
    ])
}

/// The transport values of §6 for the vector node.
fn transport_vectors(id: &NodeId) -> Vec<Vector> {
    vec![
        vector("tls-spki", ed25519_spki(id)),
        Vector {
            name: "tls-server-name-text",
            value: format!("{id}{SERVER_NAME_SUFFIX}"),
        },
        vector("transport-preamble", PREAMBLE.to_vec()),
    ]
}

/// The DHT keys and messages of §7, built from the vector records.
fn dht_vectors(id: &NodeId) -> Result<Vec<Vector>> {
    let key = NodeKeypair::from_secret_bytes(&NODE_SEED);
    let node_key = DhtKey::for_node(id);
    let name_key = DhtKey::for_name(&NodeName::new("alice")?);
    let service_key = DhtKey::for_service(id, &ServiceName::new("web")?);
    let node_signed = node_record()?.sign(&key)?;
    let claim_bytes = name_claim()?.sign(&key)?.encode();
    Ok(vec![
        vector("dht-key-node", node_key.as_bytes().to_vec()),
        vector("dht-key-name", name_key.as_bytes().to_vec()),
        vector("dht-key-service", service_key.as_bytes().to_vec()),
        vector("dht-ping", Request::Ping.encode()?),
        vector(
            "dht-find-node",
            Request::FindNode { target: node_key }.encode()?,
        ),
        vector(
            "dht-find-value",
            Request::FindValue { key: service_key }.encode()?,
        ),
        vector(
            "dht-store",
            Request::Store {
                key: name_key,
                family: RecordFamily::NameClaim,
                value: claim_bytes.clone(),
            }
            .encode()?,
        ),
        vector("dht-pong", Response::Pong.encode()?),
        vector(
            "dht-nodes",
            Response::Nodes(vec![node_signed.clone()]).encode()?,
        ),
        vector(
            "dht-value",
            Response::Value {
                values: vec![claim_bytes],
                closer: vec![node_signed],
            }
            .encode()?,
        ),
        vector(
            "dht-store-accepted",
            Response::StoreResult(StoreOutcome::Accepted).encode()?,
        ),
        vector(
            "dht-store-rejected",
            Response::StoreResult(StoreOutcome::Rejected(RejectReason::Stale)).encode()?,
        ),
        vector(
            "dht-error",
            Response::Error(ErrorCode::Unsupported).encode()?,
        ),
    ])
}

/// The node RPC messages of §8.
fn rpc_vectors() -> Result<Vec<Vector>> {
    let key = NodeKeypair::from_secret_bytes(&NODE_SEED);
    Ok(vec![
        vector(
            "purpose-service",
            Purpose::Service(ServiceName::new("web")?).encode(),
        ),
        vector("purpose-dht", Purpose::Dht.encode()),
        vector("purpose-peer-sync", Purpose::PeerSync.encode()),
        vector("purpose-catalog", Purpose::Catalog.encode()),
        vector("purpose-push-record", Purpose::PushRecord.encode()),
        vector(
            "sync-request",
            SyncRequest {
                cursor: 64,
                limit: 64,
            }
            .encode(),
        ),
        vector(
            "record-list-page",
            RecordList {
                records: vec![node_record()?.sign(&key)?.encode()],
                next: Some(1),
            }
            .encode(),
        ),
        vector(
            "record-list-catalog",
            RecordList {
                records: vec![service_record()?.sign(&key)?.encode()],
                next: None,
            }
            .encode(),
        ),
    ])
}

fn vector(name: &'static str, bytes: Vec<u8>) -> Vector {
    Vector {
        name,
        value: hex(&bytes),
    }
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
    Ok([
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
    ]
    .into_iter()
    .chain(std::iter::once(vector(
        "onion-public-key",
        onion_public_key(&NODE_SEED).0.to_vec(),
    )))
    .chain(frame_vectors()?)
    .chain(transport_vectors(&id))
    .chain(dht_vectors(&id)?)
    .chain(rpc_vectors()?)
    .collect())
}
