//! Records and contacts for unit tests (deterministic keys from small seeds).

use vx6_proto::id::OnionKey;
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::record::{
    Capabilities, Endpoint, NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed,
    TransportKind, Visibility,
};
use vx6_proto::{NodeKeypair, UnixTime};

use crate::contact::Contact;

pub fn keypair(seed: u32) -> NodeKeypair {
    let mut s = [0x42u8; 32];
    s[..4].copy_from_slice(&seed.to_be_bytes());
    NodeKeypair::from_secret_bytes(&s)
}

pub fn name(s: &str) -> NodeName {
    NodeName::new(s).unwrap()
}
pub fn service(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

pub fn node_record_caps(
    k: &NodeKeypair,
    seq: u64,
    issued: UnixTime,
    expires: UnixTime,
    caps: u32,
) -> NodeRecord {
    NodeRecord {
        node: k.node_id(),
        name: None,
        endpoints: vec![Endpoint {
            transport: TransportKind::Quic,
            addr: "[2001:db8::1]:4242".parse().unwrap(),
        }],
        onion_key: OnionKey([1; 32]),
        caps: Capabilities(caps),
        seq,
        issued,
        expires,
    }
}
pub fn node_record(k: &NodeKeypair, seq: u64, issued: UnixTime, expires: UnixTime) -> NodeRecord {
    node_record_caps(k, seq, issued, expires, Capabilities::DHT)
}
pub fn signed_node(
    k: &NodeKeypair,
    seq: u64,
    issued: UnixTime,
    expires: UnixTime,
) -> Signed<NodeRecord> {
    node_record(k, seq, issued, expires).sign(k).unwrap()
}

/// A verified contact for `seed`: seq 1, valid from 0 to 1,000,000.
pub fn contact(seed: u32) -> Contact {
    contact_seq(&keypair(seed), 1)
}
pub fn contact_seq(k: &NodeKeypair, seq: u64) -> Contact {
    Contact::verify(
        signed_node(k, seq, UnixTime(0), UnixTime(600_000)),
        UnixTime(1),
    )
    .unwrap()
}
pub fn contact_with_caps(seed: u32, caps: u32) -> Contact {
    let k = keypair(seed);
    let rec = node_record_caps(&k, 1, UnixTime(0), UnixTime(600_000), caps)
        .sign(&k)
        .unwrap();
    Contact::verify(rec, UnixTime(1)).unwrap()
}

pub fn name_claim(
    k: &NodeKeypair,
    n: &str,
    seq: u64,
    issued: UnixTime,
    expires: UnixTime,
) -> Signed<NameClaim> {
    NameClaim {
        name: name(n),
        node: k.node_id(),
        seq,
        issued,
        expires,
    }
    .sign(k)
    .unwrap()
}

pub fn service_record(
    k: &NodeKeypair,
    s: &str,
    seq: u64,
    issued: UnixTime,
    expires: UnixTime,
) -> Signed<ServiceRecord> {
    ServiceRecord {
        node: k.node_id(),
        service: service(s),
        visibility: Visibility::Public,
        seq,
        issued,
        expires,
    }
    .sign(k)
    .unwrap()
}
