//! Signed records (PROTOCOL.md §2–§4): round trips, the byte layout, and every
//! way decoding or verification must refuse a record.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use proptest::prelude::*;
use proptest::sample::Index;
use vx6_proto::id::{OnionKey, Signature};
use vx6_proto::identity::signed_message;
use vx6_proto::name::{MAX_NAME_LEN, NodeName, QualifiedName, ServiceName};
use vx6_proto::record::{
    Capabilities, Endpoint, MAX_CLOCK_SKEW_SECS, MAX_ENDPOINTS, MAX_LIFETIME_SECS, MAX_RECORD_LEN,
    NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed, TransportKind, Visibility,
};
use vx6_proto::{Error, NodeId, NodeKeypair, UnixTime};

const T0: UnixTime = UnixTime(1_700_000_000);
const DAY: u64 = 86_400;

fn key(seed: u8) -> NodeKeypair {
    NodeKeypair::from_secret_bytes(&[seed; 32])
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        port,
    )
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), port)
}

fn node_record(k: &NodeKeypair) -> NodeRecord {
    NodeRecord {
        node: k.node_id(),
        name: Some(NodeName::new("alice").unwrap()),
        endpoints: vec![
            Endpoint {
                transport: TransportKind::Tcp,
                addr: v6(4433),
            },
            Endpoint {
                transport: TransportKind::Quic,
                addr: v6(4433),
            },
            Endpoint {
                transport: TransportKind::Tcp,
                addr: v4(4433),
            },
        ],
        onion_key: OnionKey([9u8; 32]),
        caps: Capabilities(Capabilities::RELAY | Capabilities::DHT),
        seq: 5,
        issued: T0,
        expires: T0.plus(DAY),
    }
}

fn service_record(k: &NodeKeypair) -> ServiceRecord {
    ServiceRecord {
        node: k.node_id(),
        service: ServiceName::new("web").unwrap(),
        visibility: Visibility::Private,
        seq: 3,
        issued: T0,
        expires: T0.plus(DAY),
    }
}

fn name_claim(k: &NodeKeypair) -> NameClaim {
    NameClaim {
        name: NodeName::new("alice").unwrap(),
        node: k.node_id(),
        seq: 1,
        issued: T0,
        expires: T0.plus(DAY),
    }
}

/// Signs whatever body bytes we hand it, bypassing `RecordBody::sign`'s
/// checks, so the decoder and verifier are tested against correctly signed
/// but otherwise bad records.
fn sign_raw<T: RecordBody>(k: &NodeKeypair, body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    out.extend_from_slice(&k.sign(T::TAG, body).0);
    out
}

/// A `Signed<T>` whose signature is valid over `body`, whatever `body` says.
fn force_sign<T: RecordBody>(k: &NodeKeypair, body: T) -> Signed<T> {
    let sig = k.sign(T::TAG, &body.body_bytes());
    Signed { body, sig }
}

fn decode_all(bytes: &[u8]) -> [Result<(), Error>; 3] {
    [
        Signed::<NodeRecord>::decode(bytes).map(|_| ()),
        Signed::<ServiceRecord>::decode(bytes).map(|_| ()),
        Signed::<NameClaim>::decode(bytes).map(|_| ()),
    ]
}

// ---------------------------------------------------------------------------
// The byte layout, written out by hand from PROTOCOL.md §4.

fn spec_endpoint(out: &mut Vec<u8>, e: &Endpoint) {
    out.push(match e.transport {
        TransportKind::Tcp => 1,
        TransportKind::Quic => 2,
    });
    match e.addr.ip() {
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&e.addr.port().to_be_bytes());
}

fn spec_times(out: &mut Vec<u8>, seq: u64, issued: UnixTime, expires: UnixTime) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&issued.0.to_be_bytes());
    out.extend_from_slice(&expires.0.to_be_bytes());
}

/// PROTOCOL.md §4.3, with no limit on the endpoint count.
fn spec_node_body(r: &NodeRecord) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(r.node.as_bytes());
    let name = r.name.as_ref().map(|n| n.as_str()).unwrap_or("");
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(r.endpoints.len() as u8);
    for e in &r.endpoints {
        spec_endpoint(&mut out, e);
    }
    out.extend_from_slice(&r.onion_key.0);
    out.extend_from_slice(&r.caps.0.to_be_bytes());
    spec_times(&mut out, r.seq, r.issued, r.expires);
    out
}

/// PROTOCOL.md §4.4.
fn spec_service_body(r: &ServiceRecord) -> Vec<u8> {
    let mut out = vec![1];
    out.extend_from_slice(r.node.as_bytes());
    out.push(r.service.as_str().len() as u8);
    out.extend_from_slice(r.service.as_str().as_bytes());
    out.push(match r.visibility {
        Visibility::Public => 1,
        Visibility::Private => 2,
    });
    spec_times(&mut out, r.seq, r.issued, r.expires);
    out
}

/// PROTOCOL.md §4.5.
fn spec_claim_body(r: &NameClaim) -> Vec<u8> {
    let mut out = vec![1, r.name.as_str().len() as u8];
    out.extend_from_slice(r.name.as_str().as_bytes());
    out.extend_from_slice(r.node.as_bytes());
    spec_times(&mut out, r.seq, r.issued, r.expires);
    out
}

#[test]
fn encoding_matches_the_spec_layout() {
    let k = key(1);
    let n = node_record(&k);
    assert_eq!(n.body_bytes(), spec_node_body(&n));
    let unnamed = NodeRecord {
        name: None,
        endpoints: vec![],
        ..n.clone()
    };
    assert_eq!(unnamed.body_bytes(), spec_node_body(&unnamed));
    assert_eq!(unnamed.body_bytes().len(), 1 + 32 + 1 + 1 + 32 + 4 + 24);
    let s = service_record(&k);
    assert_eq!(s.body_bytes(), spec_service_body(&s));
    let c = name_claim(&k);
    assert_eq!(c.body_bytes(), spec_claim_body(&c));

    // §2: the signature is over u8(len(tag)) || tag || body, and the signed
    // form is body || signature.
    let signed = n.clone().sign(&k).unwrap();
    let msg = signed_message("vx6/v1/node-record", &n.body_bytes());
    assert_eq!(msg[0], 18);
    let vk = ed25519_dalek::VerifyingKey::from_bytes(k.node_id().as_bytes()).unwrap();
    vk.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&signed.sig.0))
        .unwrap();
    let enc = signed.encode();
    assert_eq!(&enc[..enc.len() - 64], n.body_bytes().as_slice());
    assert_eq!(&enc[enc.len() - 64..], signed.sig.0.as_slice());
}

#[test]
fn domain_tags() {
    assert_eq!(NodeRecord::TAG, "vx6/v1/node-record");
    assert_eq!(ServiceRecord::TAG, "vx6/v1/service-record");
    assert_eq!(NameClaim::TAG, "vx6/v1/name-claim");
}

#[test]
fn the_largest_record_fits_the_size_limit() {
    let k = key(1);
    let ep = Endpoint {
        transport: TransportKind::Quic,
        addr: v6(65535),
    };
    let r = NodeRecord {
        name: Some(NodeName::new(&"a".repeat(MAX_NAME_LEN)).unwrap()),
        endpoints: vec![ep; MAX_ENDPOINTS],
        ..node_record(&k)
    };
    let enc = r.clone().sign(&k).unwrap().encode();
    assert_eq!(enc.len(), 1 + 32 + 1 + 32 + 1 + 16 * 20 + 32 + 4 + 24 + 64);
    assert!(enc.len() <= MAX_RECORD_LEN);
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, T0)
            .unwrap()
            .body,
        r
    );
}

// ---------------------------------------------------------------------------
// Round trips.

fn arb_name() -> impl Strategy<Value = String> {
    "[a-z]([a-z0-9-]{0,30}[a-z0-9])?"
}

fn arb_endpoint() -> impl Strategy<Value = Endpoint> {
    let transport = prop_oneof![Just(TransportKind::Tcp), Just(TransportKind::Quic)];
    let ip = prop_oneof![
        any::<[u8; 16]>().prop_map(IpAddr::from),
        any::<[u8; 4]>().prop_map(IpAddr::from),
    ];
    (transport, ip, 1u16..).prop_map(|(transport, ip, port)| Endpoint {
        transport,
        addr: SocketAddr::new(ip, port),
    })
}

/// (issued, expires) with a valid lifetime.
fn arb_times() -> impl Strategy<Value = (UnixTime, UnixTime)> {
    (0..u64::MAX - MAX_LIFETIME_SECS, 1..=MAX_LIFETIME_SECS)
        .prop_map(|(i, l)| (UnixTime(i), UnixTime(i + l)))
}

fn arb_node_record() -> impl Strategy<Value = (u8, NodeRecord)> {
    (
        any::<u8>(),
        proptest::option::of(arb_name()),
        proptest::collection::vec(arb_endpoint(), 0..=MAX_ENDPOINTS),
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<u64>(),
        arb_times(),
    )
        .prop_map(
            |(seed, name, endpoints, onion, caps, seq, (issued, expires))| {
                let rec = NodeRecord {
                    node: key(seed).node_id(),
                    name: name.map(|n| NodeName::new(&n).unwrap()),
                    endpoints,
                    onion_key: OnionKey(onion),
                    caps: Capabilities(caps),
                    seq,
                    issued,
                    expires,
                };
                (seed, rec)
            },
        )
}

fn arb_service_record() -> impl Strategy<Value = (u8, ServiceRecord)> {
    (
        any::<u8>(),
        arb_name(),
        any::<bool>(),
        any::<u64>(),
        arb_times(),
    )
        .prop_map(|(seed, name, public, seq, (issued, expires))| {
            let rec = ServiceRecord {
                node: key(seed).node_id(),
                service: ServiceName::new(&name).unwrap(),
                visibility: if public {
                    Visibility::Public
                } else {
                    Visibility::Private
                },
                seq,
                issued,
                expires,
            };
            (seed, rec)
        })
}

fn arb_name_claim() -> impl Strategy<Value = (u8, NameClaim)> {
    (any::<u8>(), arb_name(), any::<u64>(), arb_times()).prop_map(
        |(seed, name, seq, (issued, expires))| {
            let rec = NameClaim {
                name: NodeName::new(&name).unwrap(),
                node: key(seed).node_id(),
                seq,
                issued,
                expires,
            };
            (seed, rec)
        },
    )
}

/// Sign, encode, decode, verify; then every single-bit flip is refused.
fn check_round_trip<T>(seed: u8, rec: T, flip: Index) -> Result<(), TestCaseError>
where
    T: RecordBody + PartialEq + std::fmt::Debug,
{
    let signed = rec.clone().sign(&key(seed)).unwrap();
    let enc = signed.encode();
    prop_assert!(enc.len() <= MAX_RECORD_LEN);
    let back = Signed::<T>::decode(&enc).unwrap();
    prop_assert_eq!(&back, &signed);
    prop_assert_eq!(back.encode(), enc.clone());
    prop_assert_eq!(back.verify(rec.issued()).unwrap(), &rec);
    prop_assert_eq!(back.verify(rec.expires()), Err(Error::Expired));

    let bit = flip.index(enc.len() * 8);
    let mut bad = enc.clone();
    bad[bit / 8] ^= 1 << (bit % 8);
    prop_assert!(
        Signed::<T>::decode_verified(&bad, rec.issued()).is_err(),
        "flipping bit {} was accepted",
        bit
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn node_record_round_trip((seed, rec) in arb_node_record(), flip in any::<Index>()) {
        check_round_trip(seed, rec, flip)?;
    }

    #[test]
    fn service_record_round_trip((seed, rec) in arb_service_record(), flip in any::<Index>()) {
        check_round_trip(seed, rec, flip)?;
    }

    #[test]
    fn name_claim_round_trip((seed, rec) in arb_name_claim(), flip in any::<Index>()) {
        check_round_trip(seed, rec, flip)?;
    }

    /// Decoding arbitrary bytes never panics, and anything accepted has
    /// exactly one encoding: its own bytes.
    #[test]
    fn decode_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(s) = Signed::<NodeRecord>::decode(&bytes) {
            prop_assert_eq!(s.encode(), bytes.clone());
        }
        if let Ok(s) = Signed::<ServiceRecord>::decode(&bytes) {
            prop_assert_eq!(s.encode(), bytes.clone());
        }
        if let Ok(s) = Signed::<NameClaim>::decode(&bytes) {
            prop_assert_eq!(s.encode(), bytes.clone());
        }
    }

    /// Valid-looking prefixes of a real record decode to structurally valid
    /// bodies or fail cleanly (mutations near the header, where the tags are).
    #[test]
    fn header_mutations_never_panic(pos in 0usize..64, byte in any::<u8>()) {
        let k = key(1);
        let mut enc = node_record(&k).sign(&k).unwrap().encode();
        enc[pos] = byte;
        let _ = Signed::<NodeRecord>::decode_verified(&enc, T0);
    }
}

// ---------------------------------------------------------------------------
// Signature and key failures.

#[test]
fn flipped_body_bit_is_a_bad_signature() {
    let k = key(1);
    let mut enc = node_record(&k).sign(&k).unwrap().encode();
    // The last byte of the body is the low byte of `expires`: still decodes
    // and is still within the lifetime, but the signature no longer matches.
    let last_body = enc.len() - 65;
    enc[last_body] ^= 1;
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, T0),
        Err(Error::BadSignature)
    );

    let mut enc = service_record(&k).sign(&k).unwrap().encode();
    let seq_low = enc.len() - 64 - 17;
    enc[seq_low] ^= 0x80;
    assert_eq!(
        Signed::<ServiceRecord>::decode_verified(&enc, T0),
        Err(Error::BadSignature)
    );
}

#[test]
fn flipped_signature_bit_is_a_bad_signature() {
    let k = key(1);
    for (i, bit) in [(0usize, 0u8), (31, 7), (32, 0), (63, 3)] {
        let mut enc = name_claim(&k).sign(&k).unwrap().encode();
        let at = enc.len() - 64 + i;
        enc[at] ^= 1 << bit;
        assert_eq!(
            Signed::<NameClaim>::decode_verified(&enc, T0),
            Err(Error::BadSignature),
            "sig byte {i} bit {bit}"
        );
    }
    // An all-zero signature.
    let mut s = name_claim(&k).sign(&k).unwrap();
    s.sig = Signature([0u8; 64]);
    assert_eq!(s.verify(T0), Err(Error::BadSignature));
}

#[test]
fn sign_refuses_a_key_that_is_not_the_node_id() {
    let (k, other) = (key(1), key(2));
    assert_eq!(
        node_record(&k).sign(&other).unwrap_err(),
        Error::KeyMismatch
    );
    assert_eq!(
        service_record(&k).sign(&other).unwrap_err(),
        Error::KeyMismatch
    );
    assert_eq!(name_claim(&k).sign(&other).unwrap_err(), Error::KeyMismatch);
}

#[test]
fn changing_the_node_field_breaks_verification() {
    let (k, other) = (key(1), key(2));

    // Signed by k, then relabelled as other's record: on the wire and in memory.
    let mut s = node_record(&k).sign(&k).unwrap();
    s.body.node = other.node_id();
    assert_eq!(s.verify(T0), Err(Error::BadSignature));
    let enc = s.encode();
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, T0),
        Err(Error::BadSignature)
    );

    let mut s = service_record(&k).sign(&k).unwrap();
    s.body.node = other.node_id();
    assert_eq!(s.verify(T0), Err(Error::BadSignature));

    // A name claim re-pointed at another node is exactly the attack.
    let mut s = name_claim(&k).sign(&k).unwrap();
    s.body.node = other.node_id();
    assert_eq!(s.verify(T0), Err(Error::BadSignature));

    // A record signed by `other` over a body naming `k`.
    let forged = Signed {
        body: name_claim(&k),
        sig: other.sign(NameClaim::TAG, &name_claim(&k).body_bytes()),
    };
    assert_eq!(forged.verify(T0), Err(Error::BadSignature));
}

#[test]
fn a_node_id_that_is_not_a_key_is_a_key_mismatch() {
    let k = key(1);
    // Find 32 bytes that do not decode to a curve point.
    let bad = (0u8..=255)
        .map(|b| {
            let mut a = [0u8; 32];
            a[0] = b;
            a[1] = 0x55;
            a
        })
        .find(|a| ed25519_dalek::VerifyingKey::from_bytes(a).is_err())
        .expect("some 32 bytes are not a point");
    let mut s = node_record(&k).sign(&k).unwrap();
    s.body.node = NodeId::from_bytes(bad);
    assert_eq!(s.verify(T0), Err(Error::KeyMismatch));

    // The identity point is a valid encoding but a weak key; strict
    // verification refuses it.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    s.body.node = NodeId::from_bytes(identity);
    assert!(s.verify(T0).is_err());
}

#[test]
fn signatures_are_domain_separated() {
    // The same body bytes signed under another record's tag do not verify.
    let k = key(1);
    let body = service_record(&k);
    let s = Signed {
        sig: k.sign(NodeRecord::TAG, &body.body_bytes()),
        body,
    };
    assert_eq!(s.verify(T0), Err(Error::BadSignature));
}

// ---------------------------------------------------------------------------
// Time.

#[test]
fn expired_records_are_refused() {
    let k = key(1);
    let enc = node_record(&k).sign(&k).unwrap().encode();
    let exp = T0.plus(DAY);
    assert!(Signed::<NodeRecord>::decode_verified(&enc, UnixTime(exp.0 - 1)).is_ok());
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, exp),
        Err(Error::Expired)
    );
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, exp.plus(1)),
        Err(Error::Expired)
    );
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&enc, UnixTime(u64::MAX)),
        Err(Error::Expired)
    );
}

#[test]
fn records_from_the_future_are_refused() {
    let k = key(1);
    let s = service_record(&k).sign(&k).unwrap();
    // issued may be up to MAX_CLOCK_SKEW_SECS ahead of our clock.
    assert!(s.verify(UnixTime(T0.0 - MAX_CLOCK_SKEW_SECS)).is_ok());
    assert_eq!(
        s.verify(UnixTime(T0.0 - MAX_CLOCK_SKEW_SECS - 1)),
        Err(Error::FromTheFuture)
    );
    assert_eq!(s.verify(UnixTime(0)), Err(Error::FromTheFuture));
    // Far-future issue times do not overflow.
    let far = ServiceRecord {
        issued: UnixTime(u64::MAX - 10),
        expires: UnixTime(u64::MAX),
        ..service_record(&k)
    };
    assert_eq!(
        far.clone().sign(&k).unwrap().verify(T0),
        Err(Error::FromTheFuture)
    );
    assert!(
        far.sign(&k)
            .unwrap()
            .verify(UnixTime(u64::MAX - 10))
            .is_ok()
    );
}

#[test]
fn lifetime_limits() {
    let k = key(1);
    let lifetime_err = Error::Invalid {
        what: "record",
        why: "lifetime out of range",
    };
    let with = |expires: u64| NameClaim {
        expires: UnixTime(expires),
        ..name_claim(&k)
    };

    // Exactly the maximum is fine.
    let ok = with(T0.0 + MAX_LIFETIME_SECS).sign(&k).unwrap();
    assert!(ok.verify(T0).is_ok());

    for expires in [T0.0 + MAX_LIFETIME_SECS + 1, T0.0, T0.0 - 1, 0, u64::MAX] {
        // `sign` refuses to make a record nobody would accept...
        assert_eq!(
            with(expires).sign(&k).unwrap_err(),
            lifetime_err,
            "expires {expires}"
        );
        // ...and a correctly signed one is refused by `verify` at any time.
        let s = force_sign(&k, with(expires));
        assert_eq!(s.verify(T0), Err(lifetime_err.clone()), "expires {expires}");
        assert_eq!(
            Signed::<NameClaim>::decode_verified(&s.encode(), T0),
            Err(lifetime_err.clone())
        );
    }
}

// ---------------------------------------------------------------------------
// Structure: size, trailing bytes, truncation, tags.

#[test]
fn over_the_size_limit_is_refused_before_parsing() {
    let k = key(1);
    let mut enc = node_record(&k).sign(&k).unwrap().encode();
    enc.resize(MAX_RECORD_LEN + 1, 0);
    let too_long = Error::TooLong {
        what: "record",
        len: MAX_RECORD_LEN + 1,
        max: MAX_RECORD_LEN,
    };
    for r in decode_all(&enc) {
        assert_eq!(r, Err(too_long.clone()));
    }
    assert!(Signed::<NodeRecord>::decode(&vec![0xff; 1 << 20]).is_err());
}

#[test]
fn trailing_bytes_are_refused() {
    let k = key(1);
    for enc in [
        node_record(&k).sign(&k).unwrap().encode(),
        service_record(&k).sign(&k).unwrap().encode(),
        name_claim(&k).sign(&k).unwrap().encode(),
    ] {
        for extra in [&[0u8][..], &[1, 2, 3]] {
            let mut e = enc.clone();
            e.extend_from_slice(extra);
            for r in decode_all(&e) {
                assert!(r.is_err());
            }
        }
    }
    let mut enc = name_claim(&k).sign(&k).unwrap().encode();
    enc.push(0);
    assert_eq!(
        Signed::<NameClaim>::decode(&enc),
        Err(Error::TrailingBytes(1))
    );
}

#[test]
fn truncated_input_is_refused_at_every_length() {
    let k = key(1);
    fn check<T: RecordBody + std::fmt::Debug>(enc: &[u8]) {
        assert!(Signed::<T>::decode(enc).is_ok());
        for len in 0..enc.len() {
            match Signed::<T>::decode(&enc[..len]) {
                Err(Error::Truncated { needed }) => assert!(needed >= 1, "len {len}"),
                other => panic!("{} truncated to {len}: {other:?}", T::TAG),
            }
        }
    }
    check::<NodeRecord>(&node_record(&k).sign(&k).unwrap().encode());
    let unnamed = NodeRecord {
        name: None,
        endpoints: vec![],
        ..node_record(&k)
    };
    check::<NodeRecord>(&unnamed.sign(&k).unwrap().encode());
    check::<ServiceRecord>(&service_record(&k).sign(&k).unwrap().encode());
    check::<NameClaim>(&name_claim(&k).sign(&k).unwrap().encode());
}

#[test]
fn unknown_version_tags_are_refused() {
    let k = key(1);
    for v in [0u8, 2, 255] {
        let mut b = node_record(&k).body_bytes();
        b[0] = v;
        let want = Err(Error::UnknownTag {
            what: "record version",
            tag: v.into(),
        });
        assert_eq!(
            Signed::<NodeRecord>::decode(&sign_raw::<NodeRecord>(&k, &b)).map(|_| ()),
            want
        );
        let mut b = service_record(&k).body_bytes();
        b[0] = v;
        assert_eq!(
            Signed::<ServiceRecord>::decode(&sign_raw::<ServiceRecord>(&k, &b)).map(|_| ()),
            want
        );
        let mut b = name_claim(&k).body_bytes();
        b[0] = v;
        assert_eq!(
            Signed::<NameClaim>::decode(&sign_raw::<NameClaim>(&k, &b)).map(|_| ()),
            want
        );
    }
}

/// Offset of the first endpoint in a NodeRecord body named `alice`.
const FIRST_ENDPOINT: usize = 1 + 32 + 1 + 5 + 1;

#[test]
fn unknown_transport_and_family_tags_are_refused() {
    let k = key(1);
    let base = node_record(&k).body_bytes();
    for t in [0u8, 3, 255] {
        let mut b = base.clone();
        b[FIRST_ENDPOINT] = t;
        assert_eq!(
            Signed::<NodeRecord>::decode(&sign_raw::<NodeRecord>(&k, &b)).map(|_| ()),
            Err(Error::UnknownTag {
                what: "transport",
                tag: t.into()
            })
        );
    }
    for f in [0u8, 5, 41, 255] {
        let mut b = base.clone();
        b[FIRST_ENDPOINT + 1] = f;
        assert_eq!(
            Signed::<NodeRecord>::decode(&sign_raw::<NodeRecord>(&k, &b)).map(|_| ()),
            Err(Error::UnknownTag {
                what: "address family",
                tag: f.into()
            })
        );
    }
    // The third endpoint is IPv4: 4 + 1 + 1 + 16 + 2 + 1 + 1 + 16 + 2 bytes in.
    let third = FIRST_ENDPOINT + 2 * 20;
    assert_eq!(base[third + 1], 4);
    let mut b = base.clone();
    b[third] = 9;
    assert_eq!(
        Signed::<NodeRecord>::decode(&sign_raw::<NodeRecord>(&k, &b)).map(|_| ()),
        Err(Error::UnknownTag {
            what: "transport",
            tag: 9
        })
    );
}

#[test]
fn unknown_visibility_is_refused() {
    let k = key(1);
    let mut b = service_record(&k).body_bytes();
    let at = 1 + 32 + 1 + 3;
    assert_eq!(b[at], 2, "Private");
    for v in [0u8, 3, 255] {
        b[at] = v;
        assert_eq!(
            Signed::<ServiceRecord>::decode(&sign_raw::<ServiceRecord>(&k, &b)).map(|_| ()),
            Err(Error::UnknownTag {
                what: "visibility",
                tag: v.into()
            })
        );
    }
}

#[test]
fn capability_bits_are_carried_opaquely() {
    // Unknown capability bits are signed and kept: a newer node's record
    // still verifies for an older one.
    let k = key(1);
    let r = NodeRecord {
        caps: Capabilities(0xffff_ffff),
        ..node_record(&k)
    };
    let back =
        Signed::<NodeRecord>::decode_verified(&r.clone().sign(&k).unwrap().encode(), T0).unwrap();
    assert_eq!(back.body, r);
    assert!(back.body.caps.has(Capabilities::RELAY) && back.body.caps.has(Capabilities::DHT));
    assert!(!Capabilities::default().has(Capabilities::RELAY));
}

// ---------------------------------------------------------------------------
// Names inside records.

/// Replaces the name bytes in a body (same length) and re-signs.
fn with_name_bytes<T: RecordBody>(k: &NodeKeypair, body: &[u8], at: usize, name: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b[at..at + name.len()].copy_from_slice(name);
    sign_raw::<T>(k, &b)
}

#[test]
fn non_canonical_names_in_records_are_refused() {
    let k = key(1);
    let node = node_record(&k).body_bytes(); // name at 34..39
    let svc = service_record(&k).body_bytes(); // name at 34..37
    let claim = name_claim(&k).body_bytes(); // name at 2..7
    let not_canonical = |what| {
        Err(Error::Invalid {
            what,
            why: "not canonical lowercase",
        })
    };

    for upper in [&b"Alice"[..], b"ALICE", b"alicE"] {
        let enc = with_name_bytes::<NodeRecord>(&k, &node, 34, upper);
        assert_eq!(
            Signed::<NodeRecord>::decode(&enc).map(|_| ()),
            not_canonical("node name")
        );
        let enc = with_name_bytes::<NameClaim>(&k, &claim, 2, upper);
        assert_eq!(
            Signed::<NameClaim>::decode(&enc).map(|_| ()),
            not_canonical("node name")
        );
    }
    let enc = with_name_bytes::<ServiceRecord>(&k, &svc, 34, b"Web");
    assert_eq!(
        Signed::<ServiceRecord>::decode(&enc).map(|_| ()),
        not_canonical("service name")
    );

    // Invalid characters, a leading digit, a trailing '-', non-UTF-8.
    for bad in [
        &b"al ce"[..],
        b"al.ce",
        b"al_ce",
        b"1lice",
        b"alic-",
        b"-lice",
        b"al\xffce",
        b"al\0ce",
    ] {
        let enc = with_name_bytes::<NodeRecord>(&k, &node, 34, bad);
        assert!(Signed::<NodeRecord>::decode(&enc).is_err(), "{bad:?}");
        let enc = with_name_bytes::<NameClaim>(&k, &claim, 2, bad);
        assert!(Signed::<NameClaim>::decode(&enc).is_err(), "{bad:?}");
    }
}

#[test]
fn name_length_prefixes_are_checked() {
    let k = key(1);
    // An empty service name / claim name is not a name.
    let mut s = spec_service_body(&service_record(&k));
    s.splice(33..37, [0u8]);
    assert!(Signed::<ServiceRecord>::decode(&sign_raw::<ServiceRecord>(&k, &s)).is_err());
    let mut c = spec_claim_body(&name_claim(&k));
    c.splice(1..7, [0u8]);
    assert!(Signed::<NameClaim>::decode(&sign_raw::<NameClaim>(&k, &c)).is_err());

    // A length prefix over MAX_NAME_LEN is refused before reading the bytes.
    let mut n = node_record(&k).body_bytes();
    n[33] = MAX_NAME_LEN as u8 + 1;
    assert_eq!(
        Signed::<NodeRecord>::decode(&sign_raw::<NodeRecord>(&k, &n)).map(|_| ()),
        Err(Error::TooLong {
            what: "node name",
            len: MAX_NAME_LEN + 1,
            max: MAX_NAME_LEN
        })
    );
    // An empty node-record name means "no name".
    let unnamed = NodeRecord {
        name: None,
        ..node_record(&k)
    };
    assert_eq!(unnamed.body_bytes()[33], 0);
    assert_eq!(
        Signed::<NodeRecord>::decode_verified(&unnamed.clone().sign(&k).unwrap().encode(), T0)
            .unwrap()
            .body,
        unnamed
    );
}

// ---------------------------------------------------------------------------
// Endpoints.

#[test]
fn too_many_endpoints_are_refused() {
    let k = key(1);
    let ep = Endpoint {
        transport: TransportKind::Tcp,
        addr: v4(80),
    };
    let r = NodeRecord {
        endpoints: vec![ep; MAX_ENDPOINTS + 1],
        ..node_record(&k)
    };
    let too_many = Error::TooLong {
        what: "endpoint list",
        len: MAX_ENDPOINTS + 1,
        max: MAX_ENDPOINTS,
    };
    assert_eq!(r.clone().sign(&k).unwrap_err(), too_many);
    // Signed anyway (by a buggy or hostile node): refused on decode...
    let enc = sign_raw::<NodeRecord>(&k, &spec_node_body(&r));
    assert_eq!(
        Signed::<NodeRecord>::decode(&enc).map(|_| ()),
        Err(too_many.clone())
    );
    // ...and by verify for an in-memory record.
    assert_eq!(force_sign(&k, r).verify(T0), Err(too_many));
    // Exactly the maximum is fine.
    let r = NodeRecord {
        endpoints: vec![ep; MAX_ENDPOINTS],
        ..node_record(&k)
    };
    assert!(Signed::<NodeRecord>::decode_verified(&r.sign(&k).unwrap().encode(), T0).is_ok());
}

#[test]
fn port_zero_is_refused() {
    let k = key(1);
    let port0 = Error::Invalid {
        what: "endpoint",
        why: "port 0",
    };
    for addr in [v6(0), v4(0)] {
        let mut r = node_record(&k);
        r.endpoints.push(Endpoint {
            transport: TransportKind::Quic,
            addr,
        });
        assert_eq!(r.clone().sign(&k).unwrap_err(), port0);
        let enc = sign_raw::<NodeRecord>(&k, &spec_node_body(&r));
        assert_eq!(
            Signed::<NodeRecord>::decode(&enc).map(|_| ()),
            Err(port0.clone())
        );
        assert_eq!(force_sign(&k, r).verify(T0), Err(port0.clone()));
    }
}

#[test]
fn ipv6_scope_and_flow_label_are_not_signed() {
    // The encoding has no room for them, so a record carrying them would not
    // decode back to itself; sign refuses instead of silently dropping them.
    let k = key(1);
    let ip = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    for addr in [
        SocketAddrV6::new(ip, 443, 0, 2),
        SocketAddrV6::new(ip, 443, 7, 0),
    ] {
        let ep = Endpoint {
            transport: TransportKind::Tcp,
            addr: SocketAddr::V6(addr),
        };
        assert!(ep.validate().is_err());
        let r = NodeRecord {
            endpoints: vec![ep],
            ..node_record(&k)
        };
        assert!(r.sign(&k).is_err());
    }
    let plain = Endpoint {
        transport: TransportKind::Tcp,
        addr: SocketAddr::V6(SocketAddrV6::new(ip, 443, 0, 0)),
    };
    assert!(plain.validate().is_ok());
}

#[test]
fn transport_kind_text() {
    for t in [TransportKind::Tcp, TransportKind::Quic] {
        assert_eq!(t.to_string().parse::<TransportKind>().unwrap(), t);
        assert_eq!(TransportKind::from_code(t.code()).unwrap(), t);
    }
    assert!("TCP".parse::<TransportKind>().is_err());
    assert!("udp".parse::<TransportKind>().is_err());
}

// ---------------------------------------------------------------------------
// Name validation (PROTOCOL.md §3).

/// The rule of §3, written independently of the implementation.
fn is_valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

#[test]
fn name_charset_and_lengths() {
    for good in [
        "a",
        "alice",
        "a1",
        "a-b",
        "a--b",
        "web-2",
        "x0-9z",
        &"a".repeat(32),
        &format!("a{}", "-9".repeat(15)),
    ] {
        assert_eq!(NodeName::new(good).unwrap().as_str(), good, "{good:?}");
        assert_eq!(ServiceName::new(good).unwrap().as_str(), good, "{good:?}");
    }
    // Case-folded to lowercase before validation.
    assert_eq!(NodeName::new("Alice").unwrap().as_str(), "alice");
    assert_eq!(ServiceName::new("WEB-1").unwrap().as_str(), "web-1");
    assert_eq!(
        "Alice".parse::<NodeName>().unwrap(),
        NodeName::new("alice").unwrap()
    );

    assert!(matches!(
        NodeName::new(""),
        Err(Error::Invalid { why: "empty", .. })
    ));
    assert_eq!(
        NodeName::new(&"a".repeat(33)),
        Err(Error::TooLong {
            what: "node name",
            len: 33,
            max: MAX_NAME_LEN
        })
    );
    for bad in [
        "1abc",
        "-abc",
        "abc-",
        "9",
        "-",
        "a_b",
        "a.b",
        "a b",
        " a",
        "a\n",
        "a/b",
        "a:b",
        "a@b",
        "caf\u{e9}",
        "\u{430}lice",   // Cyrillic a
        "a\u{200b}b",    // zero-width space
        "\u{212a}elvin", // Kelvin sign, lowercases to 'k' outside ASCII
    ] {
        assert!(NodeName::new(bad).is_err(), "{bad:?}");
        assert!(ServiceName::new(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn qualified_names() {
    let q: QualifiedName = "Alice.Web".parse().unwrap();
    assert_eq!((q.node.as_str(), q.service.as_str()), ("alice", "web"));
    assert_eq!(q.to_string(), "alice.web");

    // The node part may be a node-id prefix (≥ 4 base32 characters).
    let id = key(1).node_id().to_string();
    let q: QualifiedName = format!("{}.web", &id[..8]).parse().unwrap();
    assert_eq!(q.node, id[..8]);
    let q: QualifiedName = format!("{}.web", id.to_uppercase()).parse().unwrap();
    assert_eq!(q.node, id);
    assert!(
        format!("{id}a.web").parse::<QualifiedName>().is_err(),
        "longer than an id"
    );

    for bad in [
        "alice",
        "alice.",
        ".web",
        "alice.web.x",
        "al_ce.web",
        "alice.1web",
        "a b.web",
        "",
    ] {
        assert!(bad.parse::<QualifiedName>().is_err(), "{bad:?}");
    }
}

#[test]
fn node_id_text() {
    let id = key(1).node_id();
    let s = id.to_string();
    assert_eq!(s.len(), 52);
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
    );
    assert_eq!(s.parse::<NodeId>().unwrap(), id);
    assert_eq!(s.to_uppercase().parse::<NodeId>().unwrap(), id);
    assert!(id.matches_prefix(&id.short()));
    assert_eq!(id.short().len(), 12);
    for bad in [
        &s[..51],
        &format!("{s}a"),
        &format!("{}=", &s[..51]),
        &format!("{}0", &s[..51]),
        "é",
    ] {
        assert!(bad.parse::<NodeId>().is_err(), "{bad:?}");
    }
}

proptest! {
    #[test]
    fn name_validation_matches_the_spec(s in "[a-zA-Z0-9_. -]{0,40}") {
        let folded = s.to_ascii_lowercase();
        match NodeName::new(&s) {
            Ok(n) => {
                prop_assert!(is_valid_name(&folded), "accepted {:?}", s);
                prop_assert_eq!(n.as_str(), folded.as_str());
            }
            Err(_) => prop_assert!(!is_valid_name(&folded), "refused {:?}", s),
        }
    }

    #[test]
    fn valid_names_round_trip(s in arb_name()) {
        prop_assert!(is_valid_name(&s));
        prop_assert_eq!(ServiceName::new(&s).unwrap().to_string(), s.clone());
        let q: QualifiedName = format!("{s}.{s}").parse().unwrap();
        prop_assert_eq!(q.to_string(), format!("{s}.{s}"));
    }

    #[test]
    fn node_id_text_round_trips(b in any::<[u8; 32]>()) {
        let id = NodeId::from_bytes(b);
        prop_assert_eq!(id.to_string().parse::<NodeId>().unwrap(), id);
    }

    #[test]
    fn text_parsers_never_panic(s in "\\PC{0,80}") {
        let _ = s.parse::<NodeId>();
        let _ = s.parse::<QualifiedName>();
        let _ = NodeName::new(&s);
    }
}
