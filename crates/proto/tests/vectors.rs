//! The test vectors in docs/PROTOCOL.md (§2.2, §4.7, §5.8, §6, §7.8, §8.9)
//! are exactly what the code produces today, and they mean what the document
//! says they mean.
//!
//! Every line of the form `vector <name>: <value>` in the document is compared
//! with [`vx6_proto::vectors::generate`]. To accept a deliberate change of the
//! encoding, regenerate the lines:
//!
//! ```text
//! VX6_WRITE_VECTORS=1 cargo test -p vx6-proto --test vectors
//! ```
//!
//! which rewrites the values in place and adds missing vectors before the
//! `<!-- vectors:end -->` marker.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use vx6_proto::dhtmsg::{
    DhtKey, ErrorCode, RecordFamily, RejectReason, Request, Response, StoreOutcome,
};
use vx6_proto::link::{Cmd, FRAME_HEADER_LEN, FrameHeader, code, decode_u32_payload};
use vx6_proto::name::{NodeName, ServiceName};
use vx6_proto::nodemsg::{
    MAX_CATALOG, MAX_SYNC_PAGE, Purpose, RecordList, SERVICE_ACCEPTED, SyncRequest,
};
use vx6_proto::record::{NameClaim, NodeRecord, RecordBody, ServiceRecord, Signed};
use vx6_proto::vectors::{self, Vector};
use vx6_proto::{NodeId, UnixTime};

const END_MARKER: &str = "<!-- vectors:end -->";
const REGENERATE: &str = "VX6_WRITE_VECTORS=1 cargo test -p vx6-proto --test vectors";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/PROTOCOL.md")
}

/// `vector <name>: <value>` → (name, value).
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_end().strip_prefix("vector ")?;
    let (name, value) = rest.split_once(": ")?;
    Some((name, value.trim()))
}

fn doc_vectors(doc: &str) -> Vec<(String, String)> {
    doc.lines()
        .filter_map(parse_line)
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Rewrites the values of vector lines, appends missing vectors before the
/// end marker, and returns the new document.
fn rewrite(doc: &str, generated: &[Vector]) -> String {
    let by_name: BTreeMap<&str, &str> = generated
        .iter()
        .map(|v| (v.name, v.value.as_str()))
        .collect();
    let present: Vec<String> = doc_vectors(doc).into_iter().map(|(n, _)| n).collect();
    let mut out = String::with_capacity(doc.len());
    for line in doc.lines() {
        match parse_line(line) {
            Some((name, _)) if by_name.contains_key(name) => {
                out.push_str(&format!("vector {name}: {}\n", by_name[name]));
            }
            _ if line.trim() == END_MARKER => {
                for v in generated
                    .iter()
                    .filter(|v| !present.iter().any(|p| p == v.name))
                {
                    out.push_str(&format!("```text\nvector {}: {}\n```\n\n", v.name, v.value));
                }
                out.push_str(line);
                out.push('\n');
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn protocol_md_vectors_match_code() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = vectors::generate().expect("vectors generate");

    if std::env::var_os("VX6_WRITE_VECTORS").is_some_and(|v| v == "1") {
        assert!(
            doc.contains(END_MARKER),
            "PROTOCOL.md lacks the {END_MARKER} marker"
        );
        let new = rewrite(&doc, &generated);
        if new != doc {
            std::fs::write(&path, new).expect("write PROTOCOL.md");
            eprintln!("rewrote the vectors in {}", path.display());
        }
        return;
    }

    let in_doc = doc_vectors(&doc);
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    for (name, value) in &in_doc {
        if seen.insert(name.as_str(), value.as_str()).is_some() {
            problems.push(format!(
                "vector {name} appears more than once in PROTOCOL.md"
            ));
        }
        if !generated.iter().any(|v| v.name == name) {
            problems.push(format!(
                "vector {name} is in PROTOCOL.md but the code no longer generates it (delete it)"
            ));
        }
    }
    for v in &generated {
        match seen.get(v.name) {
            None => problems.push(format!("vector {} is missing from PROTOCOL.md", v.name)),
            Some(doc_value) if *doc_value != v.value => {
                let at = doc_value
                    .bytes()
                    .zip(v.value.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(doc_value.len().min(v.value.len()));
                problems.push(format!(
                    "vector {} differs (first difference at character {at}, byte {}):\n  \
                     doc:  {doc_value}\n  code: {}",
                    v.name,
                    at / 2,
                    v.value
                ));
            }
            Some(_) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "docs/PROTOCOL.md test vectors do not match the code:\n{}\n\n\
         If the encoding changed on purpose, run:\n  {REGENERATE}",
        problems.join("\n")
    );
}

/// Annotated dumps: a fenced block whose first line is `annotated <name>`,
/// then lines of hex (spaces allowed) with an optional `# comment`.
/// Returns (name, concatenated hex).
fn doc_annotations(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("annotated ") {
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some((name, hex)) = current.as_mut() {
            if line.starts_with("```") {
                out.push((std::mem::take(name), std::mem::take(hex)));
                current = None;
            } else {
                let data = line.split('#').next().unwrap_or("");
                hex.extend(data.chars().filter(|c| !c.is_whitespace()));
            }
        }
    }
    out
}

#[test]
fn protocol_md_annotated_dumps_match_their_vectors() {
    let doc = std::fs::read_to_string(doc_path()).expect("read PROTOCOL.md");
    let annotations = doc_annotations(&doc);
    assert!(
        !annotations.is_empty(),
        "PROTOCOL.md §4.7 should carry an annotated dump"
    );
    for (name, hex) in annotations {
        let want = value(&name);
        assert!(
            hex == want,
            "the annotated dump of {name} in PROTOCOL.md does not concatenate to the vector \
             (update the dump by hand):\n  dump:   {hex}\n  vector: {want}"
        );
    }
}

fn value(name: &str) -> String {
    vectors::generate()
        .expect("vectors generate")
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vector {name}"))
        .value
}

fn unhex(s: &str) -> Vec<u8> {
    data_encoding::HEXLOWER.decode(s.as_bytes()).expect("hex")
}

/// The vectors are not just stable but valid: they decode, verify within
/// their lifetime and re-encode to the same bytes.
#[test]
fn vectors_are_valid_records() {
    let now = vectors::ISSUED;
    let node = unhex(&value("node-record-signed"));
    let s = Signed::<NodeRecord>::decode_verified(&node, now).expect("node record");
    assert_eq!(s.body, vectors::node_record().unwrap());
    assert_eq!(s.encode(), node);

    let svc = unhex(&value("service-record-signed"));
    let s = Signed::<ServiceRecord>::decode_verified(&svc, now).expect("service record");
    assert_eq!(s.body, vectors::service_record().unwrap());
    assert_eq!(s.encode(), svc);

    let claim = unhex(&value("name-claim-signed"));
    let s = Signed::<NameClaim>::decode_verified(&claim, now).expect("name claim");
    assert_eq!(s.body, vectors::name_claim().unwrap());
    assert_eq!(s.encode(), claim);

    // Still valid one second before expiry, not at it.
    assert!(Signed::<NameClaim>::decode_verified(&claim, UnixTime(vectors::EXPIRES.0 - 1)).is_ok());
    assert!(Signed::<NameClaim>::decode_verified(&claim, vectors::EXPIRES).is_err());
}

#[test]
fn vectors_are_consistent_with_each_other() {
    let id_bytes = unhex(&value("node-id"));
    let id: NodeId = value("node-id-text").parse().expect("node id text");
    assert_eq!(id.as_bytes().as_slice(), id_bytes.as_slice());

    // signed-message = u8(len(tag)) || tag || body
    let body = unhex(&value("node-record-body"));
    let msg = unhex(&value("node-record-signed-message"));
    let tag = NodeRecord::TAG.as_bytes();
    assert_eq!(msg[0] as usize, tag.len());
    assert_eq!(&msg[1..1 + tag.len()], tag);
    assert_eq!(&msg[1 + tag.len()..], body.as_slice());

    // signed record = body || signature(64), and the signature is over msg.
    let signed = unhex(&value("node-record-signed"));
    assert_eq!(&signed[..body.len()], body.as_slice());
    assert_eq!(signed.len(), body.len() + 64);
    let key = ed25519_dalek::VerifyingKey::from_bytes(id.as_bytes()).expect("key");
    let sig = ed25519_dalek::Signature::from_slice(&signed[body.len()..]).expect("sig");
    key.verify_strict(&msg, &sig)
        .expect("signature over the signed message");
}

/// A frame vector split into its decoded header and its payload.
fn frame(name: &str) -> (FrameHeader, Vec<u8>) {
    let raw = unhex(&value(name));
    let (h, payload) = raw.split_at(FRAME_HEADER_LEN);
    let h = FrameHeader::decode(h.try_into().expect("13 bytes")).expect("frame header");
    assert_eq!(h.len as usize, payload.len(), "{name}: length field");
    assert_eq!(h.circ.0, 0, "{name}: direct circuit");
    assert_eq!(h.encode().as_slice(), &raw[..FRAME_HEADER_LEN]);
    (h, payload.to_vec())
}

/// §5.8: every frame decodes to what the document says it is.
#[test]
fn frame_vectors_decode_as_documented() {
    let (h, p) = frame("frame-open");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Open, 1));
    assert_eq!(
        Purpose::decode(&p).unwrap(),
        Purpose::Service(ServiceName::new("web").unwrap())
    );
    assert_eq!(p, unhex(&value("purpose-service")));

    let (h, p) = frame("frame-data");
    assert_eq!(
        (h.cmd, h.stream.0, p),
        (Cmd::Data, 1, vec![SERVICE_ACCEPTED])
    );

    let (h, p) = frame("frame-window-stream");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Window, 1));
    assert_eq!(decode_u32_payload(&p).unwrap(), 4 * 1024 * 1024);
    let (h, p) = frame("frame-window-channel");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Window, 0));
    assert_eq!(decode_u32_payload(&p).unwrap(), 8 * 1024 * 1024);

    let (h, p) = frame("frame-fin");
    assert_eq!((h.cmd, h.stream.0, p.len()), (Cmd::Fin, 1, 0));
    let (h, p) = frame("frame-reset");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Reset, 3));
    assert_eq!(decode_u32_payload(&p).unwrap(), code::REFUSED);

    let (h, ping) = frame("frame-ping");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Ping, 0));
    let (h, pong) = frame("frame-pong");
    assert_eq!((h.cmd, h.stream.0), (Cmd::Pong, 0));
    assert_eq!(ping, pong, "a PONG echoes its PING");
    assert_eq!(ping, vectors::PING_PAYLOAD);

    let (h, p) = frame("frame-goaway");
    assert_eq!((h.cmd, h.stream.0), (Cmd::GoAway, 0));
    assert_eq!(decode_u32_payload(&p).unwrap(), code::SHUTDOWN);
}

/// §2.2: the onion key is X25519(HKDF-SHA256(salt, seed, info)), recomputed
/// here from the document's description.
#[test]
fn onion_key_vector_follows_the_documented_derivation() {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(b"vx6/v1/onion-key"), &vectors::NODE_SEED);
    let mut okm = [0u8; 32];
    hk.expand(b"x25519", &mut okm).unwrap();
    let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(okm));
    assert_eq!(
        public.to_bytes().to_vec(),
        unhex(&value("onion-public-key"))
    );
}

/// §6: the SPKI is the fixed DER prefix and the node id; the server name is
/// the id's text form and the suffix.
#[test]
fn transport_vectors_are_consistent() {
    let id = unhex(&value("node-id"));
    let spki = unhex(&value("tls-spki"));
    assert_eq!(spki.len(), 44);
    assert_eq!(&spki[..12], &unhex("302a300506032b6570032100")[..]);
    assert_eq!(&spki[12..], &id[..]);

    let name = value("tls-server-name-text");
    let (label, suffix) = name.split_at(52);
    assert_eq!(suffix, ".vx6.invalid");
    assert_eq!(label, value("node-id-text"));

    assert_eq!(unhex(&value("transport-preamble")), b"VX6\x01");
}

/// `SHA-256(u8(14) || "vx6/v1/dht-key" || u8(family) || subject)`, from §7.2.
fn documented_key(family: u8, subject: &[u8]) -> Vec<u8> {
    let mut m = vec![14u8];
    m.extend_from_slice(b"vx6/v1/dht-key");
    m.push(family);
    m.extend_from_slice(subject);
    Sha256::digest(&m).to_vec()
}

/// §7.2 and §7.8: keys follow the documented hash, and every message decodes
/// to what the document says and re-encodes to the same bytes.
#[test]
fn dht_vectors_decode_as_documented() {
    let id_bytes = unhex(&value("node-id"));
    let id = NodeId::from_bytes(id_bytes.clone().try_into().unwrap());
    let node_key = unhex(&value("dht-key-node"));
    let name_key = unhex(&value("dht-key-name"));
    let service_key = unhex(&value("dht-key-service"));
    assert_eq!(node_key, documented_key(1, &id_bytes));
    assert_eq!(name_key, documented_key(2, b"\x05alice"));
    let mut svc_subject = id_bytes.clone();
    svc_subject.extend_from_slice(b"\x03web");
    assert_eq!(service_key, documented_key(3, &svc_subject));
    assert_eq!(DhtKey::for_node(&id).as_bytes().to_vec(), node_key);
    let name = NodeName::new("alice").unwrap();
    assert_eq!(DhtKey::for_name(&name).as_bytes().to_vec(), name_key);
    let web = ServiceName::new("web").unwrap();
    assert_eq!(
        DhtKey::for_service(&id, &web).as_bytes().to_vec(),
        service_key
    );
    let key = |b: &[u8]| DhtKey(b.try_into().unwrap());

    let req = |name: &str| {
        let b = unhex(&value(name));
        let r = Request::decode(&b).expect(name);
        assert_eq!(r.encode().unwrap(), b, "{name} re-encodes");
        assert!(Response::decode(&b).is_err(), "{name} is not a response");
        r
    };
    assert_eq!(req("dht-ping"), Request::Ping);
    assert_eq!(
        req("dht-find-node"),
        Request::FindNode {
            target: key(&node_key)
        }
    );
    assert_eq!(
        req("dht-find-value"),
        Request::FindValue {
            key: key(&service_key)
        }
    );
    let claim = unhex(&value("name-claim-signed"));
    assert_eq!(
        req("dht-store"),
        Request::Store {
            key: key(&name_key),
            family: RecordFamily::NameClaim,
            value: claim.clone(),
        }
    );

    let resp = |name: &str| {
        let b = unhex(&value(name));
        let r = Response::decode(&b).expect(name);
        assert_eq!(r.encode().unwrap(), b, "{name} re-encodes");
        assert!(Request::decode(&b).is_err(), "{name} is not a request");
        r
    };
    let node = Signed::<NodeRecord>::decode(&unhex(&value("node-record-signed"))).unwrap();
    assert_eq!(resp("dht-pong"), Response::Pong);
    assert_eq!(resp("dht-nodes"), Response::Nodes(vec![node.clone()]));
    assert_eq!(
        resp("dht-value"),
        Response::Value {
            values: vec![claim],
            closer: vec![node],
        }
    );
    assert_eq!(
        resp("dht-store-accepted"),
        Response::StoreResult(StoreOutcome::Accepted)
    );
    assert_eq!(
        resp("dht-store-rejected"),
        Response::StoreResult(StoreOutcome::Rejected(RejectReason::Stale))
    );
    assert_eq!(resp("dht-error"), Response::Error(ErrorCode::Unsupported));
}

/// §8.9: purposes, the sync request and record lists decode as documented,
/// and the records inside verify.
#[test]
fn rpc_vectors_decode_as_documented() {
    let purposes = [
        (
            "purpose-service",
            Purpose::Service(ServiceName::new("web").unwrap()),
        ),
        ("purpose-dht", Purpose::Dht),
        ("purpose-peer-sync", Purpose::PeerSync),
        ("purpose-catalog", Purpose::Catalog),
        ("purpose-push-record", Purpose::PushRecord),
    ];
    for (name, p) in purposes {
        let b = unhex(&value(name));
        assert_eq!(Purpose::decode(&b).unwrap(), p, "{name}");
        assert_eq!(p.encode(), b, "{name}");
    }

    let b = unhex(&value("sync-request"));
    let s = SyncRequest::decode(&b).unwrap();
    assert_eq!((s.cursor, s.limit), (64, 64));
    assert_eq!(s.encode(), b);

    let now = vectors::ISSUED;
    let b = unhex(&value("record-list-page"));
    let page = RecordList::decode(&b, MAX_SYNC_PAGE).unwrap();
    assert_eq!(page.next, Some(1));
    assert_eq!(page.records, vec![unhex(&value("node-record-signed"))]);
    Signed::<NodeRecord>::decode_verified(&page.records[0], now).unwrap();
    assert_eq!(page.encode(), b);

    let b = unhex(&value("record-list-catalog"));
    let cat = RecordList::decode(&b, MAX_CATALOG).unwrap();
    assert_eq!(cat.next, None);
    assert_eq!(cat.records, vec![unhex(&value("service-record-signed"))]);
    Signed::<ServiceRecord>::decode_verified(&cat.records[0], now).unwrap();
    assert_eq!(cat.encode(), b);
}

#[test]
fn rewrite_updates_values_and_adds_missing() {
    let generated = vec![
        Vector {
            name: "a",
            value: "00".into(),
        },
        Vector {
            name: "b",
            value: "11".into(),
        },
    ];
    let doc = format!("# x\n```text\nvector a: ff\n```\n{END_MARKER}\ntail\n");
    let new = rewrite(&doc, &generated);
    assert_eq!(
        new,
        format!(
            "# x\n```text\nvector a: 00\n```\n```text\nvector b: 11\n```\n\n{END_MARKER}\ntail\n"
        )
    );
    assert_eq!(rewrite(&new, &generated), new);
}
