//! The `circuit-vector` lines of docs/PROTOCOL.md §9.9 are exactly what the
//! code produces. To accept a deliberate change, regenerate them:
//!
//! ```text
//! VX6_WRITE_VECTORS=1 cargo test -p vx6-circuit --test vectors
//! ```
//!
//! which rewrites values in place and adds missing vectors before the
//! `<!-- circuit-vectors:end -->` marker.

use std::path::PathBuf;

use vx6_circuit::vectors::{self, hex};

const END_MARKER: &str = "<!-- circuit-vectors:end -->";
const PREFIX: &str = "circuit-vector ";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/PROTOCOL.md")
}

fn parse_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_end().strip_prefix(PREFIX)?;
    let (name, value) = rest.split_once(": ")?;
    Some((name, value.trim()))
}

#[test]
fn protocol_md_circuit_vectors_match_code() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path).unwrap();
    let generated: Vec<(&str, String)> = vectors::generate()
        .unwrap()
        .iter()
        .map(|v| (v.name, hex(&v.bytes)))
        .collect();
    let in_doc: Vec<(&str, &str)> = doc.lines().filter_map(parse_line).collect();

    if std::env::var_os("VX6_WRITE_VECTORS").is_some_and(|v| v == "1") {
        assert!(doc.contains(END_MARKER), "PROTOCOL.md lacks {END_MARKER}");
        let mut out = String::with_capacity(doc.len());
        for line in doc.lines() {
            if let Some((name, _)) = parse_line(line)
                && let Some((_, v)) = generated.iter().find(|(n, _)| *n == name)
            {
                out.push_str(&format!("{PREFIX}{name}: {v}\n"));
                continue;
            }
            if line.trim() == END_MARKER {
                for (n, v) in &generated {
                    if !in_doc.iter().any(|(d, _)| d == n) {
                        out.push_str(&format!("```text\n{PREFIX}{n}: {v}\n```\n\n"));
                    }
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        std::fs::write(&path, out).unwrap();
        return;
    }

    let mut problems = Vec::new();
    for (name, value) in &in_doc {
        match generated.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("{name} is in PROTOCOL.md but not generated")),
            Some((_, v)) if v != value => {
                problems.push(format!("{name} differs:\n  doc:  {value}\n  code: {v}"))
            }
            Some(_) => {}
        }
    }
    for (n, _) in &generated {
        let count = in_doc.iter().filter(|(d, _)| d == n).count();
        if count != 1 {
            problems.push(format!("{n} appears {count} times in PROTOCOL.md (want 1)"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n(regenerate: VX6_WRITE_VECTORS=1 cargo test -p vx6-circuit --test vectors)",
        problems.join("\n")
    );
}
