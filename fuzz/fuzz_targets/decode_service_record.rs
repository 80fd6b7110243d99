//! `Signed<ServiceRecord>` decoding and verification never panic, and whatever
//! decodes re-encodes to exactly the input (PROTOCOL.md §1: canonical
//! encodings).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vx6_proto::UnixTime;
use vx6_proto::record::{RecordBody, ServiceRecord, Signed};

fuzz_target!(|data: &[u8]| {
    let Ok(signed) = Signed::<ServiceRecord>::decode(data) else {
        return;
    };
    assert_eq!(signed.encode(), data, "accepted a non-canonical encoding");
    let body = &signed.body;
    // Before, at the issue time (the one that reaches the signature check),
    // and after the end of time.
    for now in [UnixTime(0), body.issued(), UnixTime(u64::MAX)] {
        let _ = signed.verify(now);
    }
});
