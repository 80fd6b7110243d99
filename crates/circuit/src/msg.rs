//! Relay messages: the plaintext inside a cell body, seen only by the hop a
//! cell is for (PROTOCOL.md §9.5).
//!
//! ```text
//! u8 cmd | u32 stream | u16 len | data[len] | zero padding
//! ```
//!
//! The plaintext fills the body minus the 16-byte AEAD tag. Everything here
//! (command, stream, length) is encrypted, so a relay that forwards a cell
//! learns none of it. This module owns the layout and the per-command rules
//! (which commands need a stream id, which direction they may travel); it
//! never touches keys.

use vx6_proto::NodeId;
use vx6_proto::bytes::{Reader, Writer};
use vx6_proto::link::StreamId;
use vx6_proto::name::{MAX_NAME_LEN, ServiceName};

use crate::cell::{CellSize, Create, Created, Reason};
use crate::flow::SENDME_TAG_LEN;
use crate::{CircuitError, Result};

/// Bytes of the "recognized" field at the start of every cell body.
pub const RECOGNIZED_LEN: usize = 8;
/// Bytes of the AEAD tag at the end of every cell body.
pub const TAG_LEN: usize = 16;
/// Bytes of a body that are not plaintext: `recognized` and the tag.
pub const BODY_OVERHEAD: usize = RECOGNIZED_LEN + TAG_LEN;
/// Bytes of the plaintext header `u8 cmd | u32 stream | u16 len`.
pub const MSG_HEADER_LEN: usize = 7;
/// Most `data` bytes a small cell holds (481).
pub const SMALL_DATA_MAX: usize = CellSize::SMALL_LEN - BODY_OVERHEAD - MSG_HEADER_LEN;
/// Most `data` bytes a large cell holds (16353); the largest DATA message.
pub const LARGE_DATA_MAX: usize = CellSize::LARGE_LEN - BODY_OVERHEAD - MSG_HEADER_LEN;

/// Which way a message travels along the circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → hops (towards the owner).
    Forward,
    /// Hops → client.
    Backward,
}

/// What a SENDME credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowScope {
    /// The whole circuit (wire: stream 0).
    Circuit,
    /// One stream.
    Stream(StreamId),
}

/// One relay message.
#[derive(Clone, PartialEq, Eq)]
pub enum RelayMsg {
    /// Forward, to the current last hop: extend the circuit to `next`. The
    /// relay resolves `next` to endpoints from its own registry (signed
    /// records); there is no address here, so a client can never make a relay
    /// dial an arbitrary host:port.
    Extend { next: NodeId, create: Create },
    /// Backward, from the hop that was asked to extend: the new hop's CREATED.
    Extended(Created),
    /// Forward, to the last hop: open `stream` to the declared service `service`.
    Begin {
        stream: StreamId,
        service: ServiceName,
    },
    /// Backward: `stream` is open.
    Connected { stream: StreamId },
    /// Either way: stream bytes (1..=[`LARGE_DATA_MAX`]); counts against the
    /// circuit and stream windows.
    Data { stream: StreamId, data: Vec<u8> },
    /// Either way: `stream` is closed.
    End { stream: StreamId, reason: Reason },
    /// Either way: flow-control credit (crate::flow).
    Sendme(FlowScope),
    /// Forward, to a hop: drop your next hop (and everything after it).
    Truncate,
    /// Backward, from a hop: my next hop is gone (failed extend, closed link,
    /// or an answer to TRUNCATE). The hops after the sender no longer exist.
    Truncated { reason: Reason },
    /// Either way: padding; the receiving hop discards it.
    Drop,
    /// Forward, to the last hop: would a BEGIN for `service` be honoured?
    /// Lets a client refuse a forward to a service the owner does not offer,
    /// before any local connection, without touching the service.
    Probe { service: ServiceName },
    /// Backward, the answer to PROBE: `offered` is exactly whether a BEGIN
    /// for that service would be accepted now (no reason, no other detail).
    Probed { offered: bool },
}

impl std::fmt::Debug for RelayMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints payload bytes or key material.
        match self {
            RelayMsg::Extend { next, .. } => write!(f, "Extend({next:?})"),
            RelayMsg::Extended(_) => f.write_str("Extended"),
            RelayMsg::Begin { stream, service } => write!(f, "Begin({}, {service})", stream.0),
            RelayMsg::Connected { stream } => write!(f, "Connected({})", stream.0),
            RelayMsg::Data { stream, data } => {
                write!(f, "Data({}, {} bytes)", stream.0, data.len())
            }
            RelayMsg::End { stream, reason } => write!(f, "End({}, {reason:?})", stream.0),
            RelayMsg::Sendme(s) => write!(f, "Sendme({s:?})"),
            RelayMsg::Truncate => f.write_str("Truncate"),
            RelayMsg::Truncated { reason } => write!(f, "Truncated({reason:?})"),
            RelayMsg::Drop => f.write_str("Drop"),
            RelayMsg::Probe { service } => write!(f, "Probe({service})"),
            RelayMsg::Probed { offered } => write!(f, "Probed({offered})"),
        }
    }
}

mod cmd {
    pub const EXTEND: u8 = 1;
    pub const EXTENDED: u8 = 2;
    pub const BEGIN: u8 = 3;
    pub const CONNECTED: u8 = 4;
    pub const DATA: u8 = 5;
    pub const END: u8 = 6;
    pub const SENDME: u8 = 7;
    pub const TRUNCATE: u8 = 8;
    pub const TRUNCATED: u8 = 9;
    pub const DROP: u8 = 10;
    pub const PROBE: u8 = 11;
    pub const PROBED: u8 = 12;
}

/// A canonical service name (`bytes8`), as BEGIN and PROBE carry it.
fn read_service(r: &mut Reader<'_>) -> Result<ServiceName> {
    let raw = r.bytes8(MAX_NAME_LEN, "service name")?;
    let s = std::str::from_utf8(raw).map_err(|_| invalid("service name not UTF-8"))?;
    let service = ServiceName::new(s)?;
    if service.as_str() != s {
        return Err(invalid("service name not canonical"));
    }
    Ok(service)
}

fn invalid(why: &'static str) -> CircuitError {
    CircuitError::Decode(vx6_proto::Error::Invalid {
        what: "relay message",
        why,
    })
}

impl RelayMsg {
    fn cmd(&self) -> u8 {
        match self {
            RelayMsg::Extend { .. } => cmd::EXTEND,
            RelayMsg::Extended(_) => cmd::EXTENDED,
            RelayMsg::Begin { .. } => cmd::BEGIN,
            RelayMsg::Connected { .. } => cmd::CONNECTED,
            RelayMsg::Data { .. } => cmd::DATA,
            RelayMsg::End { .. } => cmd::END,
            RelayMsg::Sendme(_) => cmd::SENDME,
            RelayMsg::Truncate => cmd::TRUNCATE,
            RelayMsg::Truncated { .. } => cmd::TRUNCATED,
            RelayMsg::Drop => cmd::DROP,
            RelayMsg::Probe { .. } => cmd::PROBE,
            RelayMsg::Probed { .. } => cmd::PROBED,
        }
    }

    fn stream(&self) -> StreamId {
        match self {
            RelayMsg::Begin { stream, .. }
            | RelayMsg::Connected { stream }
            | RelayMsg::Data { stream, .. }
            | RelayMsg::End { stream, .. }
            | RelayMsg::Sendme(FlowScope::Stream(stream)) => *stream,
            _ => StreamId(0),
        }
    }

    /// True when this message may travel in direction `d`.
    pub fn allowed(&self, d: Direction) -> bool {
        match self {
            RelayMsg::Extend { .. }
            | RelayMsg::Begin { .. }
            | RelayMsg::Truncate
            | RelayMsg::Probe { .. } => d == Direction::Forward,
            RelayMsg::Extended(_)
            | RelayMsg::Connected { .. }
            | RelayMsg::Truncated { .. }
            | RelayMsg::Probed { .. } => d == Direction::Backward,
            RelayMsg::Data { .. } | RelayMsg::End { .. } | RelayMsg::Sendme(_) | RelayMsg::Drop => {
                true
            }
        }
    }

    /// True for DATA, the only message that counts against flow-control windows.
    pub fn is_data(&self) -> bool {
        matches!(self, RelayMsg::Data { .. })
    }

    /// The `data[len]` part.
    fn payload(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            RelayMsg::Extend { next, create } => {
                w.raw(next.as_bytes());
                create.write(&mut w);
            }
            RelayMsg::Extended(c) => c.write(&mut w),
            RelayMsg::Begin { service, .. } | RelayMsg::Probe { service } => {
                w.bytes8(service.as_str().as_bytes());
            }
            RelayMsg::Probed { offered } => {
                w.u8(u8::from(*offered));
            }
            RelayMsg::Data { data, .. } => {
                w.raw(data);
            }
            RelayMsg::End { reason, .. } | RelayMsg::Truncated { reason } => {
                w.u8(reason.code());
            }
            // The circuit fills the tag in when it seals (`put_sendme_tag`):
            // only it knows the cell being acknowledged.
            RelayMsg::Sendme(FlowScope::Circuit) => {
                w.raw(&[0u8; SENDME_TAG_LEN]);
            }
            RelayMsg::Connected { .. }
            | RelayMsg::Sendme(FlowScope::Stream(_))
            | RelayMsg::Truncate
            | RelayMsg::Drop => {}
        }
        w.into_vec()
    }

    /// Validates a message before it is sent: stream ids where required,
    /// DATA length. Local misuse is a non-fatal error.
    fn check_sendable(&self) -> Result<()> {
        match self {
            RelayMsg::Begin { stream, .. }
            | RelayMsg::Connected { stream }
            | RelayMsg::Data { stream, .. }
            | RelayMsg::End { stream, .. }
            | RelayMsg::Sendme(FlowScope::Stream(stream))
                if stream.0 == 0 =>
            {
                Err(CircuitError::Usage("stream id 0 on a stream message"))
            }
            RelayMsg::Data { data, .. } if data.is_empty() => {
                Err(CircuitError::Usage("empty DATA"))
            }
            RelayMsg::Data { data, .. } if data.len() > LARGE_DATA_MAX => {
                Err(CircuitError::TooLarge {
                    len: data.len(),
                    max: LARGE_DATA_MAX,
                })
            }
            _ => Ok(()),
        }
    }

    /// The smallest cell size this message fits in.
    pub fn cell_size(&self) -> Result<CellSize> {
        // DATA is measured, not encoded: this runs for every bulk cell.
        let n = match self {
            RelayMsg::Data { data, .. } => data.len(),
            _ => self.payload().len(),
        };
        if n <= SMALL_DATA_MAX {
            Ok(CellSize::Small)
        } else if n <= LARGE_DATA_MAX {
            Ok(CellSize::Large)
        } else {
            Err(CircuitError::TooLarge {
                len: n,
                max: LARGE_DATA_MAX,
            })
        }
    }

    /// Writes the padded plaintext into `out` (the body minus the tag).
    /// `out` must be one of the two plaintext lengths and large enough.
    pub(crate) fn encode_into(&self, out: &mut [u8]) -> Result<()> {
        self.check_sendable()?;
        // DATA is written straight from its buffer (the bulk of all bytes);
        // other messages are small and encoded first.
        let small;
        let payload: &[u8] = match self {
            RelayMsg::Data { data, .. } => data,
            _ => {
                small = self.payload();
                &small
            }
        };
        let len = u16::try_from(payload.len()).map_err(|_| CircuitError::TooLarge {
            len: payload.len(),
            max: LARGE_DATA_MAX,
        })?;
        let room = out.len().saturating_sub(MSG_HEADER_LEN);
        let too_large = CircuitError::TooLarge {
            len: payload.len(),
            max: room,
        };
        let (head, rest) = out
            .split_at_mut_checked(MSG_HEADER_LEN)
            .ok_or(too_large.clone())?;
        let (body, pad) = rest.split_at_mut_checked(payload.len()).ok_or(too_large)?;
        let mut w = Writer::with_capacity(MSG_HEADER_LEN);
        w.u8(self.cmd()).u32(self.stream().0).u16(len);
        head.copy_from_slice(w.as_slice());
        body.copy_from_slice(payload);
        pad.fill(0);
        Ok(())
    }

    /// Where a circuit SENDME's tag sits in its plaintext.
    const SENDME_TAG: std::ops::Range<usize> = MSG_HEADER_LEN..MSG_HEADER_LEN + SENDME_TAG_LEN;

    /// Writes `tag` into an encoded circuit SENDME's plaintext.
    pub(crate) fn put_sendme_tag(plain: &mut [u8], tag: &[u8; SENDME_TAG_LEN]) -> Result<()> {
        plain
            .get_mut(Self::SENDME_TAG)
            .ok_or(CircuitError::BadCell)?
            .copy_from_slice(tag);
        Ok(())
    }

    /// The tag of a decoded circuit SENDME's plaintext.
    pub(crate) fn sendme_tag(plain: &[u8]) -> &[u8] {
        plain.get(Self::SENDME_TAG).unwrap_or_default()
    }

    /// Decodes a padded plaintext. The padding must be all zero and every
    /// field canonical, so one message has exactly one plaintext.
    pub(crate) fn decode_padded(plain: &[u8]) -> Result<Self> {
        let mut r = Reader::new(plain);
        let c = r.u8()?;
        let stream = StreamId(r.u32()?);
        let len = r.u16()? as usize;
        let data = r.take(len)?;
        if r.rest().iter().any(|&b| b != 0) {
            return Err(invalid("non-zero padding"));
        }
        let needs_stream = matches!(c, cmd::BEGIN | cmd::CONNECTED | cmd::DATA | cmd::END);
        let may_stream = needs_stream || c == cmd::SENDME;
        if needs_stream && stream.0 == 0 {
            return Err(invalid("stream 0 on a stream message"));
        }
        if !may_stream && stream.0 != 0 {
            return Err(invalid("stream id on a circuit message"));
        }
        let mut r = Reader::new(data);
        let msg = match c {
            cmd::EXTEND => {
                let next = NodeId::from_bytes(r.array()?);
                let create = Create::read(&mut r)?;
                RelayMsg::Extend { next, create }
            }
            cmd::EXTENDED => RelayMsg::Extended(Created::read(&mut r)?),
            cmd::BEGIN => RelayMsg::Begin {
                stream,
                service: read_service(&mut r)?,
            },
            cmd::PROBE => RelayMsg::Probe {
                service: read_service(&mut r)?,
            },
            cmd::PROBED => RelayMsg::Probed {
                offered: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(invalid("PROBED answer not 0 or 1")),
                },
            },
            cmd::CONNECTED => RelayMsg::Connected { stream },
            cmd::DATA => {
                if len == 0 {
                    return Err(invalid("empty DATA"));
                }
                let data = r.take(len)?.to_vec();
                RelayMsg::Data { stream, data }
            }
            cmd::END => RelayMsg::End {
                stream,
                reason: Reason::from_code(r.u8()?)?,
            },
            cmd::SENDME if stream.0 == 0 => {
                // The tag is checked by the circuit (`sendme_tag`).
                r.take(SENDME_TAG_LEN)?;
                RelayMsg::Sendme(FlowScope::Circuit)
            }
            cmd::SENDME => RelayMsg::Sendme(FlowScope::Stream(stream)),
            cmd::TRUNCATE => RelayMsg::Truncate,
            cmd::TRUNCATED => RelayMsg::Truncated {
                reason: Reason::from_code(r.u8()?)?,
            },
            cmd::DROP => RelayMsg::Drop,
            t => {
                return Err(vx6_proto::Error::UnknownTag {
                    what: "relay command",
                    tag: t.into(),
                }
                .into());
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cell::HandshakeType;
    use proptest::prelude::*;

    pub(crate) fn samples() -> Vec<RelayMsg> {
        let s = StreamId(7);
        vec![
            RelayMsg::Extend {
                next: NodeId::from_bytes([3; 32]),
                create: Create {
                    htype: HandshakeType::NtorV1,
                    client_pk: [4; 32],
                },
            },
            RelayMsg::Extended(Created {
                relay_pk: [5; 32],
                auth: [6; 32],
            }),
            RelayMsg::Begin {
                stream: s,
                service: ServiceName::new("web").unwrap(),
            },
            RelayMsg::Connected { stream: s },
            RelayMsg::Data {
                stream: s,
                data: b"hello".to_vec(),
            },
            RelayMsg::Data {
                stream: s,
                data: vec![9; SMALL_DATA_MAX],
            },
            RelayMsg::Data {
                stream: s,
                data: vec![9; SMALL_DATA_MAX + 1],
            },
            RelayMsg::Data {
                stream: s,
                data: vec![1; LARGE_DATA_MAX],
            },
            RelayMsg::End {
                stream: s,
                reason: Reason::TargetFailed,
            },
            RelayMsg::Sendme(FlowScope::Circuit),
            RelayMsg::Sendme(FlowScope::Stream(s)),
            RelayMsg::Truncate,
            RelayMsg::Truncated {
                reason: Reason::Unreachable,
            },
            RelayMsg::Drop,
            RelayMsg::Probe {
                service: ServiceName::new("ssh").unwrap(),
            },
            RelayMsg::Probed { offered: true },
            RelayMsg::Probed { offered: false },
        ]
    }

    fn encode(m: &RelayMsg) -> Vec<u8> {
        let mut out = vec![0xAA; m.cell_size().unwrap().body_len() - BODY_OVERHEAD];
        m.encode_into(&mut out).unwrap();
        out
    }

    #[test]
    fn round_trip_and_sizes() {
        for m in samples() {
            let p = encode(&m);
            assert_eq!(RelayMsg::decode_padded(&p).unwrap(), m, "{m:?}");
            let big = matches!(&m, RelayMsg::Data { data, .. } if data.len() > SMALL_DATA_MAX);
            let want = if big {
                CellSize::Large
            } else {
                CellSize::Small
            };
            assert_eq!(m.cell_size().unwrap(), want, "{m:?}");
        }
        assert_eq!(SMALL_DATA_MAX, 481);
        assert_eq!(LARGE_DATA_MAX, 16353);
    }

    #[test]
    fn rejects_bad_plaintexts() {
        let data = RelayMsg::Data {
            stream: StreamId(1),
            data: b"abc".to_vec(),
        };
        let good = encode(&data);
        // Non-zero padding.
        let mut p = good.clone();
        *p.last_mut().unwrap() = 1;
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Length running past the end (truncated).
        let mut p = good.clone();
        p[5..7].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Stream 0 on DATA; stream on a circuit message.
        let mut p = good.clone();
        p[1..5].copy_from_slice(&[0; 4]);
        assert!(RelayMsg::decode_padded(&p).is_err());
        let mut p = encode(&RelayMsg::Truncate);
        p[4] = 1;
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Unknown command, command 0 (an all-zero plaintext).
        let mut p = good.clone();
        p[0] = 200;
        assert!(RelayMsg::decode_padded(&p).is_err());
        assert!(RelayMsg::decode_padded(&vec![0; 496]).is_err());
        // Trailing bytes inside data (END with 2 bytes of data).
        let mut p = encode(&RelayMsg::End {
            stream: StreamId(1),
            reason: Reason::Done,
        });
        p[6] = 2;
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Truncated data inside (EXTEND with too little).
        let mut p = encode(&RelayMsg::Extend {
            next: NodeId::from_bytes([3; 32]),
            create: Create {
                htype: HandshakeType::NtorV1,
                client_pk: [4; 32],
            },
        });
        p[6] = 60;
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Uppercase service name is not canonical.
        let mut p = encode(&RelayMsg::Begin {
            stream: StreamId(1),
            service: ServiceName::new("web").unwrap(),
        });
        p[8] = b'W';
        assert!(RelayMsg::decode_padded(&p).is_err());
        // Too short for a header.
        assert!(RelayMsg::decode_padded(&[5, 0, 0]).is_err());
    }

    #[test]
    fn rejects_unsendable() {
        let mut out = vec![0; CellSize::LARGE_LEN - BODY_OVERHEAD];
        for m in [
            RelayMsg::Data {
                stream: StreamId(0),
                data: b"x".to_vec(),
            },
            RelayMsg::Data {
                stream: StreamId(1),
                data: vec![],
            },
            RelayMsg::Connected {
                stream: StreamId(0),
            },
        ] {
            assert!(matches!(
                m.encode_into(&mut out),
                Err(CircuitError::Usage(_))
            ));
        }
        let big = RelayMsg::Data {
            stream: StreamId(1),
            data: vec![0; LARGE_DATA_MAX + 1],
        };
        assert!(matches!(
            big.cell_size(),
            Err(CircuitError::TooLarge { .. })
        ));
        assert!(matches!(
            big.encode_into(&mut out),
            Err(CircuitError::TooLarge { .. })
        ));
        // A large message into a small plaintext buffer.
        let mut small = vec![0; CellSize::SMALL_LEN - BODY_OVERHEAD];
        let m = RelayMsg::Data {
            stream: StreamId(1),
            data: vec![0; SMALL_DATA_MAX + 1],
        };
        assert!(m.encode_into(&mut small).is_err());
    }

    #[test]
    fn directions() {
        for m in samples() {
            assert!(m.allowed(Direction::Forward) || m.allowed(Direction::Backward));
        }
        assert!(!RelayMsg::Truncate.allowed(Direction::Backward));
        assert!(
            !RelayMsg::Truncated {
                reason: Reason::Done
            }
            .allowed(Direction::Forward)
        );
    }

    proptest! {
        #[test]
        fn data_round_trips(stream in 1u32.., data in proptest::collection::vec(any::<u8>(), 1..LARGE_DATA_MAX)) {
            let m = RelayMsg::Data { stream: StreamId(stream), data };
            prop_assert_eq!(RelayMsg::decode_padded(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn decode_is_canonical(plain in proptest::collection::vec(any::<u8>(), 0..64), pad in 0usize..8) {
            let mut p = plain.clone();
            p.extend(std::iter::repeat_n(0, pad));
            if let Ok(m) = RelayMsg::decode_padded(&p)
                && let Ok(size) = m.cell_size()
            {
                let mut out = vec![0; size.body_len() - BODY_OVERHEAD];
                m.encode_into(&mut out).unwrap();
                // Same message bytes; only the amount of zero padding differs.
                prop_assert_eq!(&out[..p.len().min(out.len())], &p[..p.len().min(out.len())]);
            }
        }
    }
}
