//! Every wire decoder a peer can reach besides records: link frame headers
//! (PROTOCOL.md §5), stream purposes and node RPC bodies (§8), DHT messages
//! (§7). None may panic; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vx6_proto::dhtmsg::{Request, Response};
use vx6_proto::link::{FRAME_HEADER_LEN, FrameHeader};
use vx6_proto::nodemsg::{Purpose, RecordList, SyncRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <[u8; FRAME_HEADER_LEN]>::try_from(data.get(..FRAME_HEADER_LEN).unwrap_or(&[])) {
        if let Ok(hdr) = FrameHeader::decode(&h) {
            assert_eq!(hdr.encode(), h);
        }
    }
    if let Ok(p) = Purpose::decode(data) {
        assert_eq!(p.encode(), data);
    }
    if let Ok(s) = SyncRequest::decode(data) {
        assert_eq!(s.encode(), data);
    }
    if let Ok(l) = RecordList::decode(data, 64) {
        assert_eq!(l.encode(), data);
    }
    if let Ok(r) = Request::decode(data) {
        assert_eq!(r.encode().ok().as_deref(), Some(data));
    }
    if let Ok(r) = Response::decode(data) {
        let _ = r.encode();
    }
});
