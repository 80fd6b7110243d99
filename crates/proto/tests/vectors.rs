//! The test vectors in docs/PROTOCOL.md §4.7 are exactly what the code
//! produces today.
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
