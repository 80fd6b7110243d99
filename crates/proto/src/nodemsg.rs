//! Node RPCs: what a stream on a channel is for, and the small messages
//! nodes exchange directly (PROTOCOL.md §8).
//!
//! A stream's OPEN payload is a [`Purpose`]. For [`Purpose::Service`] the
//! owner answers with one status byte ([`SERVICE_ACCEPTED`]) and then the
//! stream carries the forwarded connection's bytes; a refusal is a stream
//! reset with a code from [`crate::link::code`]. Every other purpose is one
//! request/response exchange: the opener sends the request and half-closes,
//! the other side answers and half-closes.

use crate::bytes::{Reader, Writer};
use crate::name::ServiceName;
use crate::{Error, Result};

/// First byte the owner sends on an accepted service stream.
pub const SERVICE_ACCEPTED: u8 = 0;
/// Most signed records in one peer-sync page.
pub const MAX_SYNC_PAGE: usize = 64;
/// Most services in one catalog answer.
pub const MAX_CATALOG: usize = 256;
/// Largest RPC request or response body.
pub const MAX_RPC_LEN: usize = 96 * 1024;
/// Largest signed record carried in a node message.
const MAX_ITEM: usize = crate::record::MAX_RECORD_LEN;

/// What a stream is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Forward a connection to the named service on the stream's receiver.
    Service(ServiceName),
    /// A DHT request ([`crate::dhtmsg`]).
    Dht,
    /// A page of the receiver's known signed NodeRecords ([`SyncRequest`]).
    PeerSync,
    /// The receiver's services visible to the authenticated opener ([`Catalog`]).
    Catalog,
    /// The opener pushes its fresh signed NodeRecord (body: the record).
    PushRecord,
}

impl Purpose {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Purpose::Service(name) => {
                w.u8(1).bytes8(name.as_str().as_bytes());
            }
            Purpose::Dht => {
                w.u8(2);
            }
            Purpose::PeerSync => {
                w.u8(3);
            }
            Purpose::Catalog => {
                w.u8(4);
            }
            Purpose::PushRecord => {
                w.u8(5);
            }
        }
        w.into_vec()
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b);
        let p = match r.u8()? {
            1 => {
                let raw = r.bytes8(crate::name::MAX_NAME_LEN, "service name")?;
                let s = std::str::from_utf8(raw).map_err(|_| Error::Invalid {
                    what: "service name",
                    why: "not UTF-8",
                })?;
                let name = ServiceName::new(s)?;
                // `ServiceName::new` lowercases; the wire form must already
                // be lowercase so that a purpose has exactly one encoding.
                if name.as_str().as_bytes() != raw {
                    return Err(Error::Invalid {
                        what: "service name",
                        why: "not canonical lowercase",
                    });
                }
                Purpose::Service(name)
            }
            2 => Purpose::Dht,
            3 => Purpose::PeerSync,
            4 => Purpose::Catalog,
            5 => Purpose::PushRecord,
            t => {
                return Err(Error::UnknownTag {
                    what: "stream purpose",
                    tag: t.into(),
                });
            }
        };
        r.finish()?;
        Ok(p)
    }
}

/// Asks for one page of signed NodeRecords, freshest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    /// Opaque position returned by the previous page (0 for the first).
    pub cursor: u32,
    /// Records wanted, at most [`MAX_SYNC_PAGE`].
    pub limit: u16,
}

impl SyncRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.cursor).u16(self.limit);
        w.into_vec()
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b);
        let s = Self {
            cursor: r.u32()?,
            limit: r.u16()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// A list of encoded signed records (a sync page or a catalog), plus an
/// optional cursor for the next page.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RecordList {
    pub records: Vec<Vec<u8>>,
    /// Position of the next page; `None` at the end.
    pub next: Option<u32>,
}

impl RecordList {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self.next {
            Some(c) => w.u8(1).u32(c),
            None => w.u8(0),
        };
        // A list longer than a u16 count is a caller bug (decoders allow at
        // most MAX_CATALOG); the count and the records written always agree.
        let n = self.records.len().min(u16::MAX as usize);
        w.u16(n as u16);
        for r in self.records.iter().take(n) {
            w.bytes16(r);
        }
        w.into_vec()
    }

    /// Decodes a list of at most `max_items` records.
    pub fn decode(b: &[u8], max_items: usize) -> Result<Self> {
        if b.len() > MAX_RPC_LEN {
            return Err(Error::TooLong {
                what: "record list",
                len: b.len(),
                max: MAX_RPC_LEN,
            });
        }
        let mut r = Reader::new(b);
        let next = match r.u8()? {
            0 => None,
            1 => Some(r.u32()?),
            t => {
                return Err(Error::UnknownTag {
                    what: "cursor flag",
                    tag: t.into(),
                });
            }
        };
        let n = r.u16()? as usize;
        if n > max_items {
            return Err(Error::TooLong {
                what: "record list",
                len: n,
                max: max_items,
            });
        }
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            records.push(r.bytes16(MAX_ITEM, "record")?.to_vec());
        }
        r.finish()?;
        Ok(Self { records, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purpose_round_trip() {
        for p in [
            Purpose::Service(ServiceName::new("web").unwrap()),
            Purpose::Dht,
            Purpose::PeerSync,
            Purpose::Catalog,
            Purpose::PushRecord,
        ] {
            assert_eq!(Purpose::decode(&p.encode()).unwrap(), p);
        }
        assert!(Purpose::decode(&[9]).is_err());
        assert!(Purpose::decode(&[2, 0]).is_err());
        assert!(Purpose::decode(&[1, 3, b'w', b'_', b'b']).is_err());
        assert!(Purpose::decode(&[1, 0]).is_err());
        assert!(Purpose::decode(&[]).is_err());
    }

    /// PROTOCOL.md §1: one encoding per value. `Web` would decode to the same
    /// purpose as `web`, so it is refused.
    #[test]
    fn purpose_service_name_must_be_canonical() {
        assert!(matches!(
            Purpose::decode(&[1, 3, b'W', b'e', b'b']),
            Err(Error::Invalid {
                why: "not canonical lowercase",
                ..
            })
        ));
        let ok = [1, 3, b'w', b'e', b'b'];
        assert_eq!(Purpose::decode(&ok).unwrap().encode(), ok);
    }

    #[test]
    fn every_accepted_purpose_re_encodes_to_its_bytes() {
        // Exhaustive over every tag and every 1- and 2-byte name body.
        let mut inputs: Vec<Vec<u8>> = (0..=255u8).map(|t| vec![t]).collect();
        for a in 0..=255u8 {
            inputs.push(vec![1, 1, a]);
            for b in [b'a', b'A', b'-', b'0', b'z', 0xff] {
                inputs.push(vec![1, 2, a, b]);
            }
        }
        for b in inputs {
            if let Ok(p) = Purpose::decode(&b) {
                assert_eq!(p.encode(), b, "{b:?}");
            }
        }
    }

    #[test]
    fn record_list_round_trip_and_limits() {
        let l = RecordList {
            records: vec![vec![1, 2, 3], vec![]],
            next: Some(7),
        };
        assert_eq!(RecordList::decode(&l.encode(), 2).unwrap(), l);
        assert!(RecordList::decode(&l.encode(), 1).is_err());
        let mut bad = l.encode();
        bad.push(0);
        assert!(RecordList::decode(&bad, 2).is_err());
        let s = SyncRequest {
            cursor: 5,
            limit: 64,
        };
        assert_eq!(SyncRequest::decode(&s.encode()).unwrap(), s);
        assert!(SyncRequest::decode(&[0, 0, 0, 5, 0]).is_err());
        assert!(SyncRequest::decode(&[0, 0, 0, 5, 0, 64, 0]).is_err());
        // only 0 and 1 flag a cursor
        let mut flag = l.encode();
        flag[0] = 2;
        assert!(RecordList::decode(&flag, 2).is_err());
    }

    /// The count an encoder writes always matches the records it writes,
    /// even for a list too long for the `u16` count (a caller bug).
    #[test]
    fn record_list_count_matches_records_written() {
        let l = RecordList {
            records: vec![vec![]; u16::MAX as usize + 1],
            next: None,
        };
        let b = l.encode();
        assert_eq!(&b[..3], &[0, 0xff, 0xff]);
        assert_eq!(b.len(), 3 + 2 * u16::MAX as usize);
    }
}
