//! Text parsers users and config files feed: node ids, names, qualified
//! names, transport kinds (PROTOCOL.md §2.2, §3). Never panic, and whatever
//! parses prints back to its canonical (lowercase) form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vx6_proto::NodeId;
use vx6_proto::name::{NodeName, QualifiedName, ServiceName};
use vx6_proto::record::TransportKind;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = s.parse::<NodeId>() {
        assert_eq!(id.to_string(), s.to_ascii_lowercase());
        let _ = id.short();
    }
    let _ = NodeId::from_bytes([0; 32]).matches_prefix(s);
    if let Ok(n) = NodeName::new(s) {
        assert_eq!(n.as_str(), s.to_ascii_lowercase());
        assert_eq!(
            ServiceName::new(n.as_str()).map(|x| x.to_string()),
            Ok(n.to_string())
        );
    }
    if let Ok(q) = s.parse::<QualifiedName>() {
        let again: QualifiedName = q.to_string().parse().expect("printed form parses");
        assert_eq!(again, q);
    }
    if let Ok(t) = s.parse::<TransportKind>() {
        assert_eq!(t.to_string(), s);
    }
});
